# Cohort tables (one pass over the per-subject files), statistics, figures and the HTML report.
from glandpet.cohort.report_tables import use_one_node_per_rule_graph

# the report's step graph: one node per rule (Snakemake's has one per rule and DAG level)
use_one_node_per_rule_graph()


rule cohort_tables:
    input:
        sheet=SUBJECT_SHEET,
        series=f"{RESULTS}/tables/series.parquet",
        stats=lambda w: all_subject_files(subject_stats),
        index=lambda w: [
            layout.path(RESULTS, s, suffix="gland_index.parquet")
            for s in indexed_subjects()
        ],
        qc=qc_files,
        failures=f"{RESULTS}/work/index_failures.parquet",
    output:
        gland_stats=f"{RESULTS}/tables/gland_stats.parquet",
        gland_index=f"{RESULTS}/tables/gland_index.parquet",
        gland_change=f"{RESULTS}/tables/gland_change.parquet",
        qc=f"{RESULTS}/tables/qc.parquet",
    log:
        f"{LOGS}/cohort_tables.log",
    benchmark:
        f"{BENCH}/cohort_tables.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(15),
    params:
        config_hash=config_digest(config),
        atlases=ATLASES,
    script:
        "../scripts/cohort_tables.py"


rule cohort_statistics:
    input:
        sheet=SUBJECT_SHEET,
        gland_stats=f"{RESULTS}/tables/gland_stats.parquet",
        gland_index=f"{RESULTS}/tables/gland_index.parquet",
    output:
        # not a report item: a browser cannot show Parquet (an empty pane), and a category named
        # "Statistics" clashes with Snakemake's own runtime "Statistics" entry; the report shows
        # these values through report_tables (Tables > statistics.html)
        stats=f"{RESULTS}/tables/cohort_stats.parquet",
        outcomes=f"{RESULTS}/tables/outcomes.parquet",
        diagnostic=f"{RESULTS}/tables/diagnostic.parquet",
    log:
        f"{LOGS}/cohort_statistics.log",
    benchmark:
        f"{BENCH}/cohort_statistics.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(10),
    params:
        clinical=config["clinical"],
    script:
        "../scripts/cohort_statistics.py"


rule report_tables:
    input:
        gland_stats=f"{RESULTS}/tables/gland_stats.parquet",
        gland_index=f"{RESULTS}/tables/gland_index.parquet",
        cohort_stats=f"{RESULTS}/tables/cohort_stats.parquet",
        outcomes=f"{RESULTS}/tables/outcomes.parquet",
        diagnostic=f"{RESULTS}/tables/diagnostic.parquet",
        qc=f"{RESULTS}/tables/qc.parquet",
    output:
        statistics=report(
            f"{RESULTS}/tables/report/statistics.html",
            caption="../report/table_statistics.rst",
            category="Tables",
        ),
        results=report(
            f"{RESULTS}/tables/report/results.html",
            caption="../report/table_results.rst",
            category="Tables",
        ),
        gland_values=report(
            f"{RESULTS}/tables/report/gland_values.html",
            caption="../report/table_gland_values.rst",
            category="Tables",
        ),
        qc=report(
            f"{RESULTS}/tables/report/qc.html",
            caption="../report/table_qc.rst",
            category="Tables",
        ),
    log:
        f"{LOGS}/report_tables.log",
    benchmark:
        f"{BENCH}/report_tables.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(10),
    script:
        "../scripts/report_tables.py"


rule cohort_figures:
    input:
        gland_stats=f"{RESULTS}/tables/gland_stats.parquet",
        gland_index=f"{RESULTS}/tables/gland_index.parquet",
        outcomes=f"{RESULTS}/tables/outcomes.parquet",
        diagnostic=f"{RESULTS}/tables/diagnostic.parquet",
        cohort_stats=f"{RESULTS}/tables/cohort_stats.parquet",  # the PSMA vs FAPI Spearman rows
    output:
        done=f"{RESULTS}/figures/.done",
        figures=report(
            directory(f"{RESULTS}/figures/cohort"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        f"{LOGS}/cohort_figures.log",
    benchmark:
        f"{BENCH}/cohort_figures.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(10),
    script:
        "../scripts/cohort_figures.py"

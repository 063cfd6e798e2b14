"""HTML views of the cohort tables for the report."""

from __future__ import annotations

import pandas as pd
import pytest

from glandpet import tables
from glandpet.cohort.report_tables import gland_values_view, statistics_view, write_report_tables


def _stats_rows():
    rows = []
    for gland, med in (("parotid", 2.5), ("lacrimal", 0.9)):
        for stat, v in (("n_pss", 4), ("median_pss", med), ("p_value", 0.03)):
            rows.append(dict(analysis="fapi_pss_vs_control", gland=gland, session="fapi", group=None,
                             variable="suv_mean", statistic=stat, value=v))
    return pd.DataFrame(rows)


def _gland_rows():
    rows = []
    for i, (group, suv) in enumerate((("pss", 3.0), ("pss", 5.0), ("pss", 7.0), ("control", 1.0))):
        for side in ("left", "right"):
            rows.append(dict(subject_id=f"S{i}", group=group, session="fapi", gland="parotid", side=side,
                             suv_mean=suv, suv_mean_pvc=suv * 1.3, volume_ml=20.0 + i))
    return pd.DataFrame(rows)


def test_statistics_pivot_one_row_per_gland():
    html = statistics_view(_stats_rows())
    assert html.count("<caption>fapi_pss_vs_control</caption>") == 1
    assert "<th>median_pss</th>" in html and "<th>p_value</th>" in html
    assert html.count("<td>parotid</td>") == 1 and html.count("<td>lacrimal</td>") == 1
    assert "<td>2.5</td>" in html and "<td>0.03</td>" in html


def test_gland_values_are_medians_by_group():
    html = gland_values_view(_gland_rows())
    # pss medians: SUVmean 5, PVC 6.5; control: 1 and 1.3; subjects counted once per group
    assert "<td>5</td>" in html and "<td>6.5</td>" in html and "<td>1.3</td>" in html
    assert "<td>3</td>" in html  # n_subjects pss


def test_write_views_from_parquet(tmp_path):
    tables.write_table(_stats_rows().assign(pipeline_version="x", config_hash="y"), "cohort_stats",
                       tmp_path / "cs.parquet")
    gs = _gland_rows()
    gs.to_parquet(tmp_path / "gs.parquet")
    qc = pd.DataFrame([dict(subject_id="S9", session="psma", stage="ingest", status="failed",
                            message="sub-S9 ses-psma: PET series #3 'PET AC': PatientWeight missing"),
                       dict(subject_id="S1", session="psma", stage="register", status="ok", message="")])
    tables.write_table(qc.assign(pipeline_version="x", config_hash="y"), "qc", tmp_path / "qc.parquet")
    outs = [tmp_path / "r" / n for n in ("s.html", "g.html", "q.html")]
    write_report_tables(tmp_path / "gs.parquet", tmp_path / "cs.parquet", tmp_path / "qc.parquet", *outs)
    assert all(o.read_text().startswith("<!DOCTYPE html>") for o in outs)
    q = outs[2].read_text()
    assert "PatientWeight missing" in q and "sub-S9" in q and "failures and warnings" in q
    assert not list((tmp_path / "r").glob(".*part"))


# ------------------------------------------------------------------ the report of the shared demo run
def _report_var(html: str, name: str):
    """A JSON variable the Snakemake report embeds (``var <name> = {...};``)."""
    import json
    import re

    m = re.search(rf"var {name} = (.*?);\s*\n", html)
    assert m, f"no {name} in the report"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def demo_report(workflow_run, tmp_path_factory):
    """``snakemake --report`` of the shared run, its terminal output and the HTML."""
    from workflow_run import snakemake

    path = tmp_path_factory.mktemp("report") / "report.html"
    proc = snakemake(workflow_run, "--report", str(path))
    return proc.stdout + proc.stderr, path.read_text()


@pytest.mark.slow
def test_report_has_one_statistics_entry_and_no_warnings(demo_report):
    """The menu showed "Statistics" twice (a result category of that name beside Snakemake's own
    runtime statistics), the cohort_stats.parquet item was an empty pane, and every caption printed
    `Duplicate explicit target name: "statistics"` (15 warnings)."""
    out, html = demo_report
    assert "Duplicate explicit target name" not in out, out[-3000:]
    categories = _report_var(html, "categories")
    assert "statistics" not in {c.lower() for c in categories}, sorted(categories)
    files = [p for cat in categories.values() for sub in cat.values() for p in sub]
    assert not [p for p in files if not p.endswith((".png", ".html"))], files  # what a browser can show
    tables = [p.split("/")[-1] for sub in categories["Tables"].values() for p in sub]
    assert sorted(tables) == ["gland_values.html", "qc.html", "results.html", "statistics.html"]


@pytest.mark.slow
def test_report_graph_lists_each_step_once(demo_report):
    """The landing page's graph showed steps twice (one node per rule and DAG level)."""
    _, html = demo_report
    spec = _report_var(html, "rulegraph_spec")
    nodes = [n["rule"] for d in spec["data"] if d["name"] == "node-data" for n in d["values"]]
    assert nodes and len(nodes) == len(set(nodes)), sorted(nodes)


def test_graph_has_one_node_per_rule_on_a_staggered_dag():
    """A rule whose jobs sit at two DAG depths (the other session's segmentation waits for the
    session alignment) gets one node; Snakemake's own spec gives it one per depth."""
    from types import SimpleNamespace

    from snakemake.report.rulegraph_spec import rulegraph_spec

    from glandpet.cohort.report_tables import rulegraph_one_node_per_rule

    class Job:  # hashable by identity, like Snakemake's jobs
        def __init__(self, rule):
            self.rule = SimpleNamespace(name=rule)

    def job(rule, tag):
        return Job(rule)

    ct1, ct2 = job("convert_ct", 1), job("convert_ct", 2)
    align, seg1, seg2 = job("align_sessions", 0), job("segment_glands", 1), job("segment_glands", 2)
    m1, m2 = job("measure_glands", 1), job("measure_glands", 2)
    deps = {ct1: set(), ct2: set(), align: {ct1, ct2}, seg1: {ct1}, seg2: {align, seg1}, m1: {seg1}, m2: {seg2}}

    class Dag:
        dependencies = deps

        def toposorted(self):
            return [{ct1, ct2}, {align, seg1}, {seg2, m1}, {m2}]

    theirs = [n["rule"] for n in rulegraph_spec(Dag())[0]["nodes"]]
    assert theirs.count("segment_glands") == 2 and theirs.count("measure_glands") == 2
    spec, _, _ = rulegraph_one_node_per_rule(Dag())
    nodes = [n["rule"] for n in spec["nodes"]]
    assert sorted(nodes) == ["align_sessions", "convert_ct", "measure_glands", "segment_glands"]
    edges = {(lk["sourcerule"], lk["targetrule"]) for lk in spec["links"] + spec["links_direct"]}
    assert edges == {("convert_ct", "align_sessions"), ("convert_ct", "segment_glands"),
                     ("align_sessions", "segment_glands"), ("segment_glands", "measure_glands")}
    assert len(spec["links"] + spec["links_direct"]) == len(edges)


def test_results_page_primary_apart_with_median_iqr_effect_p_q(tmp_path):
    """results.html: the primary outcome on its own, per gland and group median (IQR), the group effect with
    its CI, p and q; the ROC table; the clinical associations; the notes name absent clinical columns."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_clinical import synthetic_cohort

    from glandpet.cohort import statistics as cs

    gs, gi, sheet = synthetic_cohort(n_pss=6, n_control=4)
    out, notes = cs.registered_outcomes(gs, gi, sheet, {"essdai": "continuous", "anti_ssa": "binary", "nope": "ordinal"},
                                        n_boot=100)
    diag = cs.diagnostic_table(gi, n_boot=100)
    for name, df in (("gland_stats", gs.assign(suv_type="bw", volume_ml=1.0)), ("gland_index", gi)):
        df.to_parquet(tmp_path / f"{name}.parquet")
    tables.write_table(out.assign(**tables.provenance()), tables.OUTCOMES, tmp_path / "outcomes.parquet", metadata=notes)
    tables.write_table(diag.assign(**tables.provenance()), tables.DIAGNOSTIC, tmp_path / "diagnostic.parquet")
    tables.write_table(_stats_rows().assign(**tables.provenance()), tables.COHORT_STATS, tmp_path / "cs.parquet")
    tables.write_table(pd.DataFrame([dict(subject_id="S0", stage="x", status="ok")]).assign(**tables.provenance()),
                       tables.QC, tmp_path / "qc.parquet")
    assert tables.table_notes(tmp_path / "outcomes.parquet")["clinical_absent"] == ["nope"]
    write_report_tables(tmp_path / "gland_stats.parquet", tmp_path / "cs.parquet", tmp_path / "qc.parquet",
                        tmp_path / "s.html", tmp_path / "g.html", tmp_path / "q.html",
                        outcomes=str(tmp_path / "outcomes.parquet"), gland_index=str(tmp_path / "gland_index.parquet"),
                        diagnostic=str(tmp_path / "diagnostic.parquet"), out_results=str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    primary = page[page.index("Primary outcome"):page.index("Secondary: every gland")]
    assert primary.count("<tr") == 1 + 4  # header + parotid SUVmax/SUVmean x psma/fapi
    assert "pSS median (IQR)" in primary and "r (95% CI)" in primary and "n=6" in primary
    assert "Diagnostic value" in page and "parotid+submandibular" in page
    assert "clinical associations" in page and "essdai" in page and "anti_ssa" in page
    assert "not analysed: nope" in page and "Benjamini-Hochberg" in page

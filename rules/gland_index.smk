# Per subject, once its sessions are measured: the per-gland PSMA/FAPI index and (both sessions) within-gland voxel
# correlation after session alignment, and the QC montage (CT + gland contours, each session's PET
# fused) with its thumbnail for the report. One job: both read the same images, and the DAG of a
# large cohort grows with its jobs.


rule gland_index_and_montage:
    input:
        unpack(gland_index_and_montage_inputs),
    output:
        index=out("gland_index.parquet", session=None),
        png=f"{RESULTS}/figures/qc/{SUBJECT_QC_PNG}",
        # the report embeds a 640 px thumbnail, not the 1600 px montage: a self-contained report of
        # 1,000 full montages is ~1 GB (benchmarks/report_scale.py); the caption names the full image
        thumbnail=report(
            f"{RESULTS}/figures/qc/thumbnails/{SUBJECT_QC_PNG}",
            caption="../report/qc_montage.rst",
            category="QC montages",
            subcategory="{subject}",
        ),
    log:
        job_log("gland_index_and_montage", session=None),
    benchmark:
        job_benchmark("gland_index_and_montage", session=None)
    conda:
        "../envs/ants.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(20),
    params:
        index=config["index"],
    script:
        "../scripts/gland_index_and_montage.py"

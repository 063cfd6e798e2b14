# Per-gland SUV statistics with partial-volume correction, in each session's PET space.


rule measure_glands:
    input:
        suv=per_session(suv_file),
        ct=per_session(ct_file),
        dseg=per_session(dseg_file),
        dseg_table=per_session(dseg_table_file),
        xfm=per_session(pet_to_ct_file),
        sidecar=per_session(pet_sidecar_file),
        # the segmentation's per-gland confidence (glandpet.segmentation.confidence)
        seg_qc=lambda w: ses_file(w.subject, w.session, "qc.json", desc="segment"),
    output:
        stats=out("gland_stats.parquet"),
        pet_dseg=out("dseg.nii.gz", space="pet"),
    log:
        job_log("measure_glands"),
    benchmark:
        job_benchmark("measure_glands")
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(15),
    params:
        suv_type=config["suv_type"],
        pvc=config["pvc"],
        review_below=config["segmentation"]["review_below"],
    script:
        "../scripts/measure_glands.py"

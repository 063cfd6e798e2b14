# Per-gland SUV statistics with partial-volume correction, in each session's PET space.


rule measure_glands:
    input:
        suv=suv_image,
        ct=ct_image,
        dseg=dseg,
        xfm=pet_to_ct,
        sidecar=pet_sidecar,
        # the segmentation's per-gland confidence (glandpet.segmentation.confidence)
        seg_qc=lambda w: ses_file(w.subject, w.session, "qc.json", desc="segment"),
    output:
        stats=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_gland_stats.parquet",
        pet_dseg=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_space-pet_dseg.nii.gz",
    log:
        f"{LOGS}/measure_glands/sub-{{subject}}_ses-{{session}}.log",
    benchmark:
        f"{BENCH}/measure_glands/sub-{{subject}}_ses-{{session}}.tsv"
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

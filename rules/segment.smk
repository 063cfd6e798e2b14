# Multi-atlas gland segmentation on the reference session's CT (PSMA, or the only session);
# the other session receives the labels through the session transform.


rule segment_glands:
    input:
        unpack(segment_inputs),
    output:
        dseg=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_space-ct_dseg.nii.gz",
        table=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_space-ct_dseg.tsv",
        qc=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_desc-segment_qc.json",
    log:
        f"{LOGS}/segment_glands/sub-{{subject}}_ses-{{session}}.log",
    benchmark:
        f"{BENCH}/segment_glands/sub-{{subject}}_ses-{{session}}.tsv"
    conda:
        "../envs/ants.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    params:
        atlases=ATLASES,
        fusion=config["segmentation"]["fusion"],
        refine_hu=config["segmentation"].get("refine_hu", {}),
        atlases_per_gland=config["segmentation"].get("atlases_per_gland", 5),
        atlases_per_region=config["segmentation"].get("atlases_per_region", 0),
        preserve_volume=config["segmentation"].get("preserve_volume", True),
        refine_intensity=config["segmentation"].get("refine_intensity", True),
    script:
        "../scripts/segment_glands.py"

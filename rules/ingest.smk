# DICOM tree -> series index (no identifiers) -> CT and PET NIfTI (+ PET-BIDS sidecar).


checkpoint index_dicom:
    input:
        sheet=SUBJECT_SHEET,
    output:
        series=f"{RESULTS}/tables/series.parquet",
        files=f"{RESULTS}/work/series_files.parquet",
        skipped=f"{RESULTS}/tables/series_skipped.parquet",
        failures=f"{RESULTS}/work/index_failures.parquet",
    log:
        f"{LOGS}/index_dicom.log",
    benchmark:
        f"{BENCH}/index_dicom.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        dicom_root=DICOM_ROOT,
        overrides=config.get("series_overrides", []),
        suv_type=config["suv_type"],
    script:
        "../scripts/index_dicom.py"


rule convert_ct:
    input:
        selection=subject_selection,
    output:
        ct=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_ct.nii.gz",
    log:
        f"{LOGS}/convert_ct/sub-{{subject}}_ses-{{session}}.log",
    benchmark:
        f"{BENCH}/convert_ct/sub-{{subject}}_ses-{{session}}.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        dicom_root=DICOM_ROOT,
        modality="ct",
    script:
        "../scripts/convert_session.py"


rule convert_pet:
    input:
        selection=subject_selection,
    output:
        image=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}_pet.nii.gz",
        sidecar=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}_pet.json",
    log:
        f"{LOGS}/convert_pet/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}.log",
    benchmark:
        f"{BENCH}/convert_pet/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        dicom_root=DICOM_ROOT,
        modality="pet",
    script:
        "../scripts/convert_session.py"

# DICOM tree -> series index (no identifiers) -> PET NIfTI (Bq/mL + PET-BIDS sidecar) -> PET in SUV
# (QIBA vendor-neutral rules, IBSI extensions), one job per PET. The CT is converted in the job that
# registers the PET to it (rules/register.smk). Few, fuller jobs: the DAG of a 1,000-subject cohort
# costs ~2 ms of Snakemake CPU per job.


checkpoint catalog_dicom:
    input:
        sheet=SUBJECT_SHEET,
    output:
        series=f"{RESULTS}/tables/series.parquet",
        files=f"{RESULTS}/work/series_files.parquet",
        skipped=f"{RESULTS}/tables/series_skipped.parquet",
        failures=f"{RESULTS}/work/index_failures.parquet",
    log:
        f"{LOGS}/catalog_dicom.log",
    benchmark:
        f"{BENCH}/catalog_dicom.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(120),
    params:
        dicom_root=DICOM_ROOT,
        overrides=config["series_overrides"],
        suv_type=config["suv_type"],
    script:
        "../scripts/catalog_dicom.py"


rule convert_pet:
    input:
        selection=subject_selection,
    output:
        image=out("pet.nii.gz", trc="{tracer}"),
        sidecar=out("pet.json", trc="{tracer}"),
        suv=out("pet.nii.gz", trc="{tracer}", desc=SUV_DESC),
    log:
        job_log("convert_pet", trc="{tracer}"),
    benchmark:
        job_benchmark("convert_pet", trc="{tracer}")
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(20),
    params:
        dicom_root=DICOM_ROOT,
        modality="pet",
        suv_type=config["suv_type"],
    script:
        "../scripts/convert_session.py"

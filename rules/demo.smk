# The embedded demo cohort: a synthetic head-and-neck PET/CT phantom with ground truth.


rule demo_phantom:
    output:
        sheet=f"{DEMO_DIR}/subjects.tsv",
        truth=f"{DEMO_DIR}/truth/gland_truth.parquet",
        transforms=f"{DEMO_DIR}/truth/transforms.parquet",
        atlases=[
            f"{DEMO_DIR}/atlases/atlas{i:02d}/{f}"
            for i in range(1, config["demo"]["atlases"] + 1)
            for f in ("ct.nii.gz", "labels.nii.gz", "labels.tsv")
        ],
    log:
        f"{LOGS}/demo_phantom.log",
    benchmark:
        f"{BENCH}/demo_phantom.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(30),
    params:
        outdir=lambda w, output: os.path.dirname(output.sheet),
        subjects=config["demo"]["subjects"],
        seed=config["demo"]["seed"],
        atlases=config["demo"]["atlases"],
        followups=config["demo"]["followups"],
    script:
        "../scripts/demo_phantom.py"


rule phantom_atlases:
    output:
        atlases=[
            f"{RESULTS}/phantom-atlases/atlases/atlas{i:02d}/{f}"
            for i in range(1, config["demo"]["atlases"] + 1)
            for f in ("ct.nii.gz", "labels.nii.gz", "labels.tsv")
        ],
    log:
        f"{LOGS}/phantom_atlases.log",
    benchmark:
        f"{BENCH}/phantom_atlases.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(30),
    params:
        outdir=lambda w, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.atlases[0]))
        ),
        subjects=0,
        seed=config["demo"]["seed"],
        atlases=config["demo"]["atlases"],
        followups=0,
    script:
        "../scripts/demo_phantom.py"

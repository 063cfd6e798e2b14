# Multi-atlas gland segmentation on the reference session's CT (PSMA, or the only session);
# the other session receives the labels through the session transform. Beside each dseg: colour
# tables for correcting it in 3D Slicer (.ctbl) and ITK-SNAP (.itksnap.txt).
# A correction (segmentation.corrections) goes through apply_correction into a desc-corrected dseg
# that measurement and below read instead (rules/common.smk: dseg); segment_glands never reruns.

# Corrections are checked before any job: a file on another grid, with unknown label values, or
# for a subject/session not in the study stops the run with one line naming it.
if CORRECTIONS and workflow.is_main_process:
    check_corrections(CORRECTIONS, SUBJECTS, study_sessions, ct_file)


# segmentation.atlas_registration: template -- each atlas registered once to the library's
# template (glandpet/segmentation/atlas_template.py), here, once per library; every subject is then
# registered once to it. Its registrations run side by side, one ITK thread each (the template does
# not depend on the thread count).
rule build_atlas_template:
    input:
        atlas_files,
    output:
        manifest=f"{RESULTS}/work/atlas_template/manifest.json",
    log:
        f"{LOGS}/build_atlas_template.log",
    benchmark:
        f"{BENCH}/build_atlas_template.tsv"
    conda:
        "../envs/ants.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(120),
    params:
        atlases=ATLASES,
    script:
        "../scripts/build_atlas_template.py"


rule segment_glands:
    input:
        unpack(segment_inputs),
    output:
        dseg=out("dseg.nii.gz", space="ct"),
        table=out("dseg.tsv", space="ct"),
        qc=out("qc.json", desc="segment"),
        ctbl=out("dseg.ctbl", space="ct"),
        itksnap=out("dseg.itksnap.txt", space="ct"),
    log:
        job_log("segment_glands"),
    benchmark:
        job_benchmark("segment_glands")
    conda:
        "../envs/ants.yaml"
    threads: 1  # one ITK thread: bit-reproducible labels (2 threads: ~1.5 % of a subject's gland voxels differ run to run)
    resources:
        mem_mb=per_attempt(6000),
        runtime=per_attempt(60),
    params:
        atlases=ATLASES,
        fusion=config["segmentation"]["fusion"],
        refine_hu=config["segmentation"]["refine_hu"],
        atlases_per_gland=config["segmentation"]["atlases_per_gland"],
        atlases_per_region=config["segmentation"]["atlases_per_region"],
        preserve_volume=config["segmentation"]["preserve_volume"],
        refine_intensity=config["segmentation"]["refine_intensity"],
        linear_stage=config["segmentation"]["linear_stage"],
        size_transfer=config["segmentation"]["size_transfer"],
    script:
        "../scripts/segment_glands.py"


# The session's own correction (validated: the CT's grid, glandpet's label values), or the
# reference session's correction carried through the session transform (genericLabel).
rule apply_correction:
    input:
        unpack(correction_inputs),
    output:
        dseg=out("dseg.nii.gz", desc="corrected", space="ct"),
        table=out("dseg.tsv", desc="corrected", space="ct"),
        qc=out("qc.json", desc="correction"),
    log:
        job_log("apply_correction"),
    benchmark:
        job_benchmark("apply_correction")
    conda:
        "../envs/ants.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(10),
    script:
        "../scripts/apply_correction.py"

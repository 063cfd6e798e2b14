# Multi-atlas gland segmentation on the reference session's CT (PSMA, or the only session);
# the other session receives the labels through the session transform. Beside each dseg: colour
# tables for correcting it in 3D Slicer (.ctbl) and ITK-SNAP (.itksnap.txt).
# A correction (segmentation.corrections) goes through apply_correction into a desc-corrected dseg
# that measurement and below read instead (rules/common.smk: dseg); segment_glands never reruns.

# Corrections are checked before any job: a file on another grid, with unknown label values, or
# for a subject/session not in the study stops the run with one line naming it.
if CORRECTIONS and workflow.is_main_process:
    check_corrections(CORRECTIONS, SUBJECTS, study_sessions, correction_ct)


rule segment_glands:
    input:
        unpack(segment_inputs),
    output:
        dseg=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_space-ct_dseg.nii.gz",
        table=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_space-ct_dseg.tsv",
        qc=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_desc-segment_qc.json",
        ctbl=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_space-ct_dseg.ctbl",
        itksnap=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_space-ct_dseg.itksnap.txt",
    log:
        f"{LOGS}/segment_glands/sub-{{subject}}_ses-{{session}}.log",
    benchmark:
        f"{BENCH}/segment_glands/sub-{{subject}}_ses-{{session}}.tsv"
    conda:
        "../envs/ants.yaml"
    threads: 2
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
    script:
        "../scripts/segment_glands.py"


# The session's own correction (validated: the CT's grid, glandpet's label values), or the
# reference session's correction carried through the session transform (genericLabel).
rule apply_correction:
    input:
        unpack(correction_inputs),
    output:
        dseg=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_desc-corrected_space-ct_dseg.nii.gz",
        table=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_desc-corrected_space-ct_dseg.tsv",
        qc=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_desc-correction_qc.json",
    log:
        f"{LOGS}/apply_correction/sub-{{subject}}_ses-{{session}}.log",
    benchmark:
        f"{BENCH}/apply_correction/sub-{{subject}}_ses-{{session}}.tsv"
    conda:
        "../envs/ants.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(10),
    script:
        "../scripts/apply_correction.py"

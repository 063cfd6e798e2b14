# Per session: the CT series -> NIfTI, then the rigid PET -> CT registration onto it (one job: the CT
# conversion takes ~2 s). Per subject: FAPI session CT -> PSMA session CT (rigid, affine, SyN).


rule convert_ct_register_pet:
    input:
        selection=subject_selection,
        pet=pet_image,
    output:
        ct=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_ct.nii.gz",
        xfm=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_from-pet_to-ct_xfm.mat",
        qc=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_desc-register_qc.json",
    log:
        f"{LOGS}/convert_ct_register_pet/sub-{{subject}}_ses-{{session}}.log",
    benchmark:
        f"{BENCH}/convert_ct_register_pet/sub-{{subject}}_ses-{{session}}.tsv"
    conda:
        "../envs/ants.yaml"
    threads: 1  # one ITK thread: bit-reproducible transforms (see glandpet.registration.transforms)
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(30),
    params:
        dicom_root=DICOM_ROOT,
    script:
        "../scripts/convert_ct_register_pet.py"


rule align_sessions:
    input:
        psma_ct=f"{RESULTS}/sub-{{subject}}/ses-psma/sub-{{subject}}_ses-psma_ct.nii.gz",
        fapi_ct=f"{RESULTS}/sub-{{subject}}/ses-fapi/sub-{{subject}}_ses-fapi_ct.nii.gz",
    output:
        affine=f"{RESULTS}/sub-{{subject}}/sub-{{subject}}_from-fapi_to-psma_xfm.mat",
        warp=f"{RESULTS}/sub-{{subject}}/sub-{{subject}}_from-fapi_to-psma_xfm.nii.gz",
        inverse_warp=f"{RESULTS}/sub-{{subject}}/sub-{{subject}}_from-fapi_to-psma_invxfm.nii.gz",
        qc=f"{RESULTS}/sub-{{subject}}/sub-{{subject}}_desc-align_qc.json",
    log:
        f"{LOGS}/align_sessions/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/align_sessions/sub-{{subject}}.tsv"
    conda:
        "../envs/ants.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(30),
    script:
        "../scripts/align_sessions.py"

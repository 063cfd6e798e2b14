# Per session: the CT series -> NIfTI, then the rigid PET -> CT registration onto it (one job: the CT
# conversion takes ~2 s). Per subject: FAPI session CT -> PSMA session CT (rigid, affine, SyN).


rule convert_ct_register_pet:
    input:
        selection=subject_selection,
        pet=per_session(pet_file),
    output:
        ct=out("ct.nii.gz"),
        xfm=out("xfm.mat", from_="pet", to="ct"),
        qc=out("qc.json", desc="register"),
    log:
        job_log("convert_ct_register_pet"),
    benchmark:
        job_benchmark("convert_ct_register_pet")
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
        psma_ct=out("ct.nii.gz", session="psma"),
        fapi_ct=out("ct.nii.gz", session="fapi"),
    output:
        affine=out("xfm.mat", session=None, from_="fapi", to="psma"),
        warp=out("xfm.nii.gz", session=None, from_="fapi", to="psma"),
        inverse_warp=out("invxfm.nii.gz", session=None, from_="fapi", to="psma"),
        qc=out("qc.json", session=None, desc="align"),
    log:
        job_log("align_sessions", session=None),
    benchmark:
        job_benchmark("align_sessions", session=None)
    conda:
        "../envs/ants.yaml"
    threads: 1  # one ITK thread: a bit-reproducible session transform
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(30),
    script:
        "../scripts/align_sessions.py"

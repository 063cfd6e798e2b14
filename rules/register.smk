# Per session: the CT series -> NIfTI, then the rigid PET -> CT registration onto it (one job: the CT
# conversion takes ~2 s). Per subject: every other session's CT -> the reference session's CT (the
# baseline PSMA, else the earliest; rigid, affine, SyN): the other tracer and the follow-ups.


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
        reference_ct=out("ct.nii.gz", session="{reference}"),
        moving_ct=out("ct.nii.gz", session="{moving}"),
    output:
        affine=out("xfm.mat", session=None, from_="{moving}", to="{reference}"),
        warp=out("xfm.nii.gz", session=None, from_="{moving}", to="{reference}"),
        inverse_warp=out(
            "invxfm.nii.gz", session=None, from_="{moving}", to="{reference}"
        ),
        # the moving session's: a failed alignment leaves out that session only
        qc=out("qc.json", session="{moving}", to="{reference}", desc="align"),
    log:
        job_log("align_sessions", session="{moving}", to="{reference}"),
    benchmark:
        job_benchmark("align_sessions", session="{moving}", to="{reference}")
    conda:
        "../envs/ants.yaml"
    threads: 1  # one ITK thread: a bit-reproducible session transform
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(30),
    script:
        "../scripts/align_sessions.py"

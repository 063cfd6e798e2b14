# PET in Bq/mL -> PET in SUV (QIBA vendor-neutral rules, IBSI extensions).


rule suv_image:
    input:
        pet=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}_pet.nii.gz",
        sidecar=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}_pet.json",
    output:
        suv=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}_desc-{SUV_DESC}_pet.nii.gz",
    log:
        f"{LOGS}/suv_image/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}.log",
    benchmark:
        f"{BENCH}/suv_image/sub-{{subject}}_ses-{{session}}_trc-{{tracer}}.tsv"
    conda:
        "../envs/glandpet.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        suv_type=config["suv_type"],
    script:
        "../scripts/suv_image.py"

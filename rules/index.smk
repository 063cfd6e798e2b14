# Per-gland PSMA/FAPI index and within-gland voxel correlation after session alignment.


rule gland_index:
    input:
        unpack(index_inputs),
    output:
        index=f"{RESULTS}/sub-{{subject}}/sub-{{subject}}_gland_index.parquet",
    log:
        f"{LOGS}/gland_index/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/gland_index/sub-{{subject}}.tsv"
    conda:
        "../envs/ants.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    params:
        index=config["index"],
    script:
        "../scripts/gland_index.py"

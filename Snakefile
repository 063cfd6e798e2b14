# glandpet: dual-tracer (PSMA/FAPI) PET/CT -> per-gland SUV tables, index, statistics and report.
import os

from snakemake.utils import min_version, validate

min_version("9.0")


# Defaults beside this Snakefile; a study overrides them with --configfile.
configfile: os.path.join(workflow.basedir, "config.yaml")


validate(config, "config.schema.yaml")


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/ingest.smk"
include: "rules/register.smk"
include: "rules/segment.smk"
include: "rules/measure.smk"
include: "rules/index.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs,

# glandpet: dual-tracer (PSMA/FAPI) PET/CT -> per-gland SUV tables, index, statistics and report.
import os

from snakemake.utils import min_version, validate

from glandpet.preflight import config_error_line

min_version("9.0")


# Defaults beside this Snakefile; a study overrides them with --configfile.
configfile: os.path.join(workflow.basedir, "config.yaml")


# one line naming the key (as `glandpet check` words it), not the schema dump; then Snakemake's
# validation, which also fills the schema's defaults
config_error_line(
    config, os.path.join(workflow.basedir, "config.schema.yaml"), raise_error=True
)
validate(config, "config.schema.yaml")


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/ingest.smk"
include: "rules/register.smk"
include: "rules/segment.smk"
include: "rules/measure.smk"
include: "rules/index.smk"
include: "rules/report.smk"


onsuccess:
    run_finished(failed=False)


onerror:
    run_finished(failed=True)


rule all:
    default_target: True
    input:
        final_outputs,

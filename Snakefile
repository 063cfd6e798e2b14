# glandpet: dual-tracer (PSMA/FAPI) PET/CT -> per-gland SUV tables, index, statistics and report.
import atexit
import gc
import os

from snakemake.utils import min_version, validate

from glandpet.study.preflight import config_error_line
from glandpet.workflow.dag import remember_input_function_params

min_version("9.0")

# Snakemake keeps tens of objects per job alive while it builds the DAG; at Python's default
# collection thresholds (700, 10, 10) the collector rescans them over and over: ~20 % of the CPU time
# of a 1,000-subject dry run (benchmarks/scale.py dag). Rarer young collections, same peak memory.
gc.set_threshold(100_000, 50, 100)
# At exit the interpreter's last collection walks every one of them again (~3 s of a 1,000-subject
# dry run) to free memory the system takes back anyway: freeze them first. The exit handlers
# registered before this one (logging's flush and close among them) still run after it.
atexit.register(gc.freeze)


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
include: "rules/gland_index.smk"
include: "rules/report.smk"


onsuccess:
    run_finished(failed=False)


onerror:
    run_finished(failed=True)


rule all:
    default_target: True
    input:
        final_outputs,


# every rule is defined: Snakemake reads each input function's parameters once, not on every call
remember_input_function_params(workflow)

"""Snakemake wrapper: PET in Bq/mL -> SUV image of the configured type."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.suv_image(sm.input.pet, sm.input.sidecar, sm.params.suv_type, sm.output.suv)

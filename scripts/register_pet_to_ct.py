"""Snakemake wrapper: rigid PET -> CT registration of one session."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.register_pet_to_ct(sm.input.ct, sm.input.pet, sm.output.xfm, sm.output.qc, sm.threads)

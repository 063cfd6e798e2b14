"""Snakemake wrapper: a session's corrected labels into results (its own correction, or the reference session's carried)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.apply_correction(sm.input, sm.output)

"""Snakemake wrapper: a session's CT -> the reference session's CT (rigid, affine, SyN)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.align_sessions(sm.input.reference_ct, sm.input.moving_ct, sm.output, sm.threads)

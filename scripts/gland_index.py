"""Snakemake wrapper: per-gland PSMA/FAPI index and within-gland voxel correlation of one subject."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.gland_index(sm.input, sm.output.index, sm.wildcards.subject, sm.params.index)

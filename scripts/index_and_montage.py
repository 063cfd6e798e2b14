"""Snakemake wrapper: one subject's PSMA/FAPI index and voxel correlation, and its QC montage."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.gland_index(sm.input, sm.output.index, sm.wildcards.subject, sm.params.index)
    wf.qc_montage(sm.input, sm.output.png, sm.wildcards.subject)

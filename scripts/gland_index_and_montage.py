"""Snakemake wrapper: one subject's PSMA/FAPI index and voxel correlation, its QC montage and the
montage's thumbnail (the copy the report embeds)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.gland_index(sm.input, sm.output.index, sm.wildcards.subject, sm.params.index)
    wf.qc_montage(sm.input, sm.output.png, sm.wildcards.subject, sm.output.thumbnail)

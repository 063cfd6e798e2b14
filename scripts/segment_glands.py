"""Snakemake wrapper: gland labels in one session's CT space (atlases, or the session transform)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.segment_glands(sm.input, sm.output, sm.wildcards.session, sm.params.atlases, sm.params.fusion, sm.params.refine_hu, sm.threads,
                      atlases_per_gland=sm.params.atlases_per_gland,
                      atlases_per_region=sm.params.atlases_per_region, preserve_volume=sm.params.preserve_volume,
                      refine_intensity=sm.params.refine_intensity, linear_stage=sm.params.linear_stage,
                      size_transfer=sm.params.size_transfer)

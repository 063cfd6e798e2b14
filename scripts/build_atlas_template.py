"""Snakemake wrapper: the atlas library's template (segmentation.atlas_registration: template)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.build_atlas_template(sm.output.manifest, sm.params.atlases, sm.threads)

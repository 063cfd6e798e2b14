"""Snakemake wrapper: per-gland SUV statistics (+ PVC) in one session's PET space."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.measure_glands(sm.input, sm.output, sm.wildcards.subject, sm.wildcards.session, sm.params.suv_type, sm.params.pvc,
                      review_below=sm.params.review_below)

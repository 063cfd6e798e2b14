"""Snakemake wrapper: generate the synthetic demo cohort (or only its atlas set)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.demo_phantom(sm.params.outdir, sm.params.subjects, sm.params.seed, sm.params.atlases, sm.threads,
                    sm.params.followups)

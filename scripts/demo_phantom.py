"""Snakemake wrapper: generate the synthetic demo cohort (or only its atlas set)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    if int(sm.params.followups):
        # follow-ups (demo.followups): straight to the generator, which takes them (the demo step does not yet)
        from glandpet.phantom.cohort import generate_cohort

        generate_cohort(sm.params.outdir, int(sm.params.subjects), int(sm.params.seed), n_atlases=int(sm.params.atlases),
                        jobs=int(sm.threads), progress=False, followups=int(sm.params.followups))
    else:
        wf.demo_phantom(sm.params.outdir, sm.params.subjects, sm.params.seed, sm.params.atlases, sm.threads)

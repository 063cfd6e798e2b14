"""Snakemake wrapper: one session's CT series -> NIfTI, then rigid PET -> CT registration onto it."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.convert_session(sm.input.selection, sm.params.dicom_root, sm.wildcards.subject, sm.wildcards.session, "ct",
                       sm.output)
    wf.register_pet_to_ct(sm.output.ct, sm.input.pet, sm.output.xfm, sm.output.qc, sm.threads)

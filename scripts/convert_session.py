"""Snakemake wrapper: one session's CT or PET series -> NIfTI (PET: Bq/mL, PET-BIDS sidecar, SUV)."""

import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.convert_session(
        sm.input.selection, sm.params.dicom_root, sm.wildcards.subject, sm.wildcards.session, sm.params.modality,
        sm.output, suv_type=sm.params.get("suv_type"),
    )

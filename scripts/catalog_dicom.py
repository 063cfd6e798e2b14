"""Snakemake wrapper: catalog the DICOM tree (glandpet.dicom.catalog), select one CT + PET per subject and session."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    wf.catalog_dicom(
        sm.input.sheet, sm.params.dicom_root, sm.params.overrides, sm.output, sm.threads, suv_type=sm.params.suv_type,
        config=sm.config,
    )

"""The workflow's Python side: what the Snakefile asks at parse time (:mod:`.dag`), the failure
records and logs (:mod:`.failures`), and one step function per rule (:mod:`.steps`).

Each ``scripts/*.py`` wrapper imports this package as ``wf`` and calls ``wf.log_to`` and its step,
re-exported here: Snakemake treats a script's modification time as code, so a wrapper that names
only this package's interface never changes (and never reruns a cohort) when modules move.
"""

from glandpet.workflow.failures import log_to
from glandpet.workflow.steps import (
    align_sessions,
    apply_correction,
    build_atlas_template,
    cohort_figures,
    cohort_statistics,
    cohort_tables,
    convert_session,
    demo_phantom,
    gland_index,
    catalog_dicom,
    measure_glands,
    qc_montage,
    register_pet_to_ct,
    report_tables,
    segment_glands,
)

__all__ = [
    "align_sessions",
    "apply_correction",
    "build_atlas_template",
    "cohort_figures",
    "cohort_statistics",
    "cohort_tables",
    "convert_session",
    "demo_phantom",
    "gland_index",
    "catalog_dicom",
    "log_to",
    "measure_glands",
    "qc_montage",
    "register_pet_to_ct",
    "report_tables",
    "segment_glands",
]

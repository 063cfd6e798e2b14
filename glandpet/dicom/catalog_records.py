"""The records the DICOM catalog's stages pass on, the tables they become, their salted keys and how messages name them.

Every stage of the catalog (:mod:`glandpet.dicom.catalog` runs them in this order) reads and extends
these records, plain dicts whose keys are declared here:

1. :mod:`glandpet.dicom.catalog_headers`: one :class:`InstanceRecord` per DICOM file (or a skip record);
2. :mod:`glandpet.dicom.catalog_grouping`: instances grouped into one :class:`SeriesRecord` per series (or
   per part of a mixed series), classified, with their geometry; a files-table row per series;
3. :mod:`glandpet.dicom.catalog_pairing`: ``session``, ``paired_ct_key``, ``pairing_rule`` of each PET;
4. :mod:`glandpet.dicom.catalog_selection`: ``selected``, ``selection_rule`` (one PET and its CT per
   subject and session);
5. :mod:`glandpet.dicom.catalog_failures`: ``problem`` of each unusable selected PET, and the failures table.

A series record's table columns are :data:`SERIES_SCHEMA`'s; its other keys (:data:`INTERNAL_FIELDS`)
carry what the stages need and are never written (UIDs, dates, identifier strings).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import datetime
from typing import Any, Mapping, TypedDict

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "InstanceRecord", "SeriesRecord", "SERIES_SCHEMA", "FILES_SCHEMA", "SKIPPED_SCHEMA", "SKIP_REASONS",
    "INTERNAL_FIELDS", "DEFAULT_SALT", "salted_key", "subject_pseudonym", "series_label", "series_table",
]

DEFAULT_SALT = "glandpet-index-v1"

SERIES_SCHEMA = pa.schema([
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("session", pa.string()),
    pa.field("role", pa.string(), nullable=False),  # ct | pet_ac | pet_nac | localizer | other
    pa.field("role_rule", pa.string()),
    pa.field("tracer", pa.string()),
    pa.field("tracer_slug", pa.string()),
    pa.field("radionuclide", pa.string()),
    pa.field("tracer_matched_on", pa.string()),
    pa.field("tracer_note", pa.string()),
    pa.field("series_key", pa.string(), nullable=False),
    pa.field("study_key", pa.string()),
    pa.field("frame_key", pa.string()),
    pa.field("split_part", pa.int32()),
    pa.field("paired_ct_key", pa.string()),
    pa.field("pairing_rule", pa.string()),
    pa.field("selected", pa.bool_(), nullable=False),
    pa.field("selection_rule", pa.string()),
    pa.field("modality", pa.string()),
    pa.field("sop_class", pa.string()),
    pa.field("image_type", pa.string()),
    pa.field("manufacturer", pa.string()),
    pa.field("manufacturer_model", pa.string()),
    pa.field("series_number", pa.int64()),
    pa.field("n_instances", pa.int32()),
    pa.field("n_frames", pa.int32()),
    pa.field("rows", pa.int32()),
    pa.field("columns", pa.int32()),
    pa.field("n_slices", pa.int32()),
    pa.field("pixel_spacing_mm", pa.list_(pa.float64())),
    pa.field("slice_spacing_mm", pa.float64()),
    pa.field("slice_spacing_uniform", pa.bool_()),
    pa.field("slice_thickness_mm", pa.float64()),
    pa.field("orientation", pa.string()),  # axial | coronal | sagittal | oblique
    pa.field("series_description", pa.string()),
    pa.field("days_from_first_scan", pa.int32()),
    pa.field("minutes_from_first_scan", pa.float64()),
    pa.field("units", pa.string()),
    pa.field("decay_correction", pa.string()),
    pa.field("corrected_image", pa.string()),
    pa.field("transfer_syntax", pa.string()),
    pa.field("problem", pa.string()),  # why this series cannot be processed (selected PET: its session)
])

FILES_SCHEMA = pa.schema([
    pa.field("series_key", pa.string(), nullable=False),
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("n_files", pa.int32(), nullable=False),
    pa.field("paths", pa.list_(pa.string()), nullable=False),  # relative to the root, in slice order
])

SKIPPED_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),  # relative to the root
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])

SKIP_REASONS = (
    "not DICOM", "empty file", "unreadable", "truncated", "DICOMDIR", "unsupported SOP class",
    "no SeriesInstanceUID", "duplicate instance", "patient not in subject sheet",
)


class InstanceRecord(TypedDict, total=False):
    """The header record of one DICOM file (:func:`glandpet.dicom.catalog_headers.read_header`): plain
    Python values only (it crosses process boundaries). A file that is not an indexable instance is
    a skip record instead: ``path``, ``skip`` (one of :data:`SKIP_REASONS`), ``detail`` and, for a
    truncated image, ``series_uid`` and ``patient_id``."""

    path: str  # relative to the root
    sop_class: str
    sop_uid: str
    series_uid: str
    study_uid: str | None
    frame_uid: str | None
    modality: str | None
    image_type: tuple[str, ...]  # upper case
    series_description: str | None
    protocol_name: str | None
    series_number: int | None
    instance_number: int | None
    acq_dt: str | None  # DICOM date + "T" + time, as written
    series_dt: str | None
    study_dt: str | None
    content_dt: str | None
    manufacturer: str | None
    model: str | None
    rows: int | None
    columns: int | None
    n_frames: int
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    iop: tuple[float, ...] | None  # ImageOrientationPatient
    ipp: tuple[float, ...] | None  # ImagePositionPatient
    units: str | None
    decay_correction: str | None
    corrected_image: tuple[str, ...]
    has_corrected_image: bool
    transfer_syntax: str | None
    tracer: Any  # glandpet.dicom.tracers.TracerMatch or None
    suv_check: tuple | None  # (error or None, SUV factor keys the header cannot give); PET images only
    patient_id: str | None
    ids: tuple[str, ...]  # identifying strings of the header (never stored)
    subject_id: str | None  # added by catalog_grouping.assign_subjects


class SeriesRecord(TypedDict):
    """The record of one series (or one part of a split series): the columns of :data:`SERIES_SCHEMA`
    (made by catalog_grouping, then pairing, selection and failures fill theirs), then the internal keys
    (:data:`INTERNAL_FIELDS`)."""

    # table columns (SERIES_SCHEMA)
    subject_id: str
    session: str | None  # catalog_pairing (PET: its tracer family); catalog_selection (time point, override, CT)
    role: str
    role_rule: str
    tracer: str | None
    tracer_slug: str | None
    radionuclide: str | None
    tracer_matched_on: str | None
    tracer_note: str | None
    series_key: str
    study_key: str | None
    frame_key: str | None
    split_part: int | None
    paired_ct_key: str | None  # catalog_pairing
    pairing_rule: str | None  # catalog_pairing
    selected: bool  # catalog_selection
    selection_rule: str | None  # catalog_selection
    modality: str | None
    sop_class: str | None
    image_type: str | None
    manufacturer: str | None
    manufacturer_model: str | None
    series_number: int | None
    n_instances: int
    n_frames: int
    rows: int | None
    columns: int | None
    n_slices: int
    pixel_spacing_mm: list[float] | None
    slice_spacing_mm: float | None
    slice_spacing_uniform: bool | None
    slice_thickness_mm: float | None
    orientation: str | None
    series_description: str | None
    days_from_first_scan: int | None
    minutes_from_first_scan: float | None
    units: str | None
    decay_correction: str | None
    corrected_image: str | None
    transfer_syntax: str | None
    problem: str | None  # catalog_failures
    # internal keys (never written)
    desc_raw: str  # series description and protocol name, unscrubbed (role rules only)
    has_corrected_image: bool
    ci_tuple: tuple[str, ...]  # CorrectedImage values
    tracer_session: str | None  # the tracer family its tracer names (psma | fapi; the baseline session), else None
    image_type_tuple: tuple[str, ...]
    iop: tuple[float, ...] | None
    start: datetime | None  # first acquisition time
    study_uid: str | None
    frame_uid: str | None
    _ids: set[str]  # identifying strings of its headers
    _geo_problem: str | None  # why it is not one regular volume (dicom_series.volume_geometry_problem)
    _resample_note: str | None  # what the CT converter corrects (unequal spacing or tilt)
    _bad_files: list[str]  # details of its truncated files
    _suv_check: tuple | None  # InstanceRecord.suv_check of its first instance


INTERNAL_FIELDS = frozenset(SeriesRecord.__annotations__) - frozenset(SERIES_SCHEMA.names)


# ------------------------------------------------------------------------------------------
# keys

def _salt(salt: str | None) -> bytes:
    return (salt if salt is not None else os.environ.get("GLANDPET_SALT") or DEFAULT_SALT).encode()


def salted_key(value: str | None, salt: str | None = None, n: int = 16) -> str | None:
    """Deterministic short salted hash (HMAC-SHA256, hex) of a UID or identifier."""
    if value is None or value == "":
        return None
    return hmac.new(_salt(salt), str(value).encode(), hashlib.sha256).hexdigest()[:n]


def subject_pseudonym(patient_id: str, salt: str | None = None) -> str:
    """Pseudonymous subject id for a PatientID: 'p' + 10 hex digits (letters and digits only)."""
    return "p" + salted_key("patient:" + patient_id, salt, 10)


# ------------------------------------------------------------------------------------------
# naming

def series_label(s: Mapping[str, Any]) -> str:
    """How messages name a series (a series record or series-table row): kind, number and the
    identifier-free description, e.g. "PET series #4 'PET HN QCFX'"; never a UID, a path or a patient field."""
    kind = {"ct": "CT", "pet_ac": "PET", "pet_nac": "PET (not attenuation-corrected)", "localizer": "localizer"}.get(
        s.get("role"), s.get("modality") or "DICOM")
    num, desc = s.get("series_number"), s.get("series_description")
    num = f" #{int(num)}" if isinstance(num, (int, float, np.integer)) and num == num else ""
    desc = f" '{desc}'" if isinstance(desc, str) and desc else ""
    return f"{kind} series{num}{desc}"


def series_table(series_rows: list[SeriesRecord]) -> pd.DataFrame:
    """The series table (:data:`SERIES_SCHEMA` columns, internal keys dropped), sorted by subject, time
    from the first scan and series key."""
    series_df = pd.DataFrame([{k: v for k, v in s.items() if k not in INTERNAL_FIELDS} for s in series_rows],
                             columns=SERIES_SCHEMA.names)
    if not series_df.empty:
        series_df = series_df.sort_values(["subject_id", "days_from_first_scan", "minutes_from_first_scan", "series_key"],
                                          na_position="last", kind="stable").reset_index(drop=True)
    return series_df

"""Index a DICOM tree: one row per series, classified, paired and selected, with no identifiers.

`index_tree` walks a real-world export (nested folders, files without extension, DICOMDIR,
non-DICOM and truncated files, duplicate instances, several studies per patient), reads headers
only, groups instances into series, classifies each series, pairs each PET with a CT and chooses
the PET of each session (tracer family ``psma`` | ``fapi``) per subject.

Subjects
--------
From the subject sheet (:mod:`glandpet.subjects`): a row with ``dicom_dir`` owns every file under
that folder; a row with ``patient_id`` owns every file whose PatientID equals it (the whole root is
walked then, and files of other patients are listed in ``skipped``). Without a sheet, each
PatientID becomes a pseudonymous id ``p`` + 10 hex digits of a salted HMAC-SHA256 (never the
PatientID itself). UIDs are stored only as 16-hex salted hashes (``series_key``, ``study_key``,
``frame_key``): deterministic, so keys are stable between runs with the same salt (environment
variable ``GLANDPET_SALT``, else a fixed default; set a secret salt for real exports).

Grouping
--------
Instances are grouped by SeriesInstanceUID. A series that mixes modalities, SOP classes, image
sizes, pixel spacings or orientations is split into parts (``split_part`` 1, 2, ...; keys are
hashes of UID#part). A SOPInstanceUID seen twice is indexed once (first path in sorted order);
the other copies are skipped as "duplicate instance".

Roles
-----
* ``other``: secondary capture, RTSTRUCT / SEG / RTDOSE / SR / presentation states / any
  non-image SOP class, PET MIPs / projections, single-slice PET.
* ``localizer``: ImageType contains LOCALIZER, or a CT series with a single slice (scout).
* ``ct``: a CT image series with two or more slices.
* ``pet_ac``: a PET image series whose CorrectedImage contains ATTN; when CorrectedImage is
  absent, a description naming NAC/NOAC/uncorrected makes it ``pet_nac``, else it is assumed AC
  (``role_rule`` says so).
* ``pet_nac``: CorrectedImage present without ATTN.

Tracer and session of a PET: :func:`glandpet.tracers.classify_dataset`; FDG or any non-PSMA /
non-FAP tracer has session None (tracer named); an unrecognised tracer has tracer None and the
text in ``tracer_note``.

Pairing PET -> CT (``pairing_rule``)
-----------------------------------
1. ``frame_of_reference``: a CT of the same subject with the same FrameOfReferenceUID;
2. ``study_closest_time``: else a CT of the same study;
3. ``same_day_closest_time``: else a CT of the same subject acquired the same day within 3 h
   (PET and CT exported as two studies);
4. none: ``paired_ct_key`` null, ``pairing_rule`` "no CT".
Ties within a rule: axial CT first, then closest acquisition time, then most slices, then the
highest series number.

Session selection (``selected``, ``selection_rule``)
---------------------------------------------------
Per subject and session, the candidates are the ``pet_ac`` series of that tracer family.
* none: the session is missing (allowed; downstream handles it);
* one: selected ("only candidate");
* an override ``overrides[(subject_id, session)] = series_key`` selects that series (it must be
  a ``pet_ac`` series of that subject whose tracer family is that session or unknown);
* several of one acquisition (same study and frame of reference, first acquisition times within
  30 min: reconstructions of the same scan): prefer, in order, (1) the one whose CT pairs by
  frame of reference, (2) ImageType ORIGINAL over DERIVED, (3) the finest voxels (smallest voxel
  volume: glands are small), (4) the most slices, (5) the highest series number;
* several acquisitions (different days, studies, frames of reference or times, e.g. a
  repeat scan or a dual-time-point protocol): ambiguous. `on_ambiguity="error"` (default) raises a
  UserError naming the subject and the candidate series; ``"report"`` selects none of them and
  lists the problem in ``IndexResult.problems`` (used by ``glandpet init`` / ``check``).
The CT paired with a selected PET is selected too and carries its session.

Failures (``IndexResult.failures``, FAILURES_SCHEMA; never raised)
-------------------------------------------------------------------
Everything that would break a subject or a session and can be seen in the headers, without reading
pixels: a subject's folder missing or empty or without DICOM images, no PET (CT without PET), no PSMA /
FAPI tracer, an ambiguous session (``on_ambiguity="report"``), and for the selected PET and its CT: no
CT, truncated files (file size against the pixel data length the header implies), not one regular
volume (unequal spacing, missing slices, two instances at one position, gantry tilt: the converter's
tolerances; a CT whose only fault is unequal spacing or gantry tilt is not a failure but a ``warning``
row: the converter makes its slices equidistant through dcm2niix, or de-shears the tilt from the slice
positions, glandpet.ct_dcm2niix), a compressed transfer syntax without a decoder, a PET header that cannot give SUV (the
rules of :mod:`glandpet.suv` on the first header) or not the requested ``suv_type``. Each row names
the subject (``sub-<id>``), the session and the series (number and description) and the cause;
``status`` is ``failed`` (the selected PET's ``problem`` column holds the message, and the workflow
leaves the session out) or ``warning`` (an unused PET of an unknown tracer, skipped unreadable files).

No patient name, id, birth date, accession number, institution or physician is stored: the
series description (and any tracer text) is dropped when it contains one of them. File paths
relative to the root are stored in the files and skipped tables (the converter needs them);
``IndexResult.warnings`` says when a path contains an identifier (folders named after patients).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import UserError
from .glands import SESSIONS
from .tracers import classify_dataset

__all__ = [
    "IndexResult", "index_tree", "run_index", "SERIES_SCHEMA", "FILES_SCHEMA", "SKIPPED_SCHEMA", "FAILURES_SCHEMA",
    "salted_key", "subject_pseudonym", "read_overrides", "series_label", "decoder_problem",
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

# Subjects and sessions the index found unusable (or worth a warning): the workflow leaves failed
# sessions out of its DAG and the cohort tables step copies these rows into qc.parquet.
FAILURES_SCHEMA = pa.schema([
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("session", pa.string()),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # failed | warning
    pa.field("message", pa.string(), nullable=False),
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

_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
    "Modality", "ImageType", "SeriesDescription", "ProtocolName", "StudyDescription", "SeriesNumber",
    "InstanceNumber", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDate",
    "AcquisitionTime", "AcquisitionDateTime", "ContentDate", "ContentTime", "Manufacturer",
    "ManufacturerModelName", "Rows", "Columns", "PixelSpacing", "SliceThickness",
    "ImageOrientationPatient", "ImagePositionPatient", "NumberOfFrames", "SamplesPerPixel",
    "BitsAllocated", "Units", "DecayCorrection", "CorrectedImage", "RadiopharmaceuticalInformationSequence",
    "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "OtherPatientIDs", "OtherPatientNames",
    "PixelData",
]
_IDENTIFYING = [
    "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "OtherPatientIDs", "OtherPatientNames",
    "IssuerOfPatientID", "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "InstitutionalDepartmentName",
    "RequestingPhysician", "StationName", "DeviceSerialNumber",
]

_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture (and its multi-frame variants)
_CT_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_PET_CLASSES = {"1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.128.1"}
_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NAC_RE = re.compile(r"(?<![A-Z])(NAC|NOAC|NON ?AC|NON ?ATTN|NO ?ATTN|NO ?AC|UNCORR\w*|NOT ?CORRECTED)(?![A-Z])")
_MIP_RE = re.compile(r"(?<![A-Z])(MIP|MIPS|PROJECTION)(?![A-Z])")


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
# reading one file (runs in worker processes: returns plain Python values only)

def _s(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _floats(v: Any) -> tuple[float, ...] | None:
    if v is None:
        return None
    try:
        seq = list(v) if not isinstance(v, (str, bytes)) else [v]
        out = tuple(float(x) for x in seq)
        return out if out and all(math.isfinite(x) for x in out) else None
    except (TypeError, ValueError):
        return None


def _strs(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, (str, bytes)):
        v = [v]
    return tuple(str(x).strip().upper() for x in v if str(x).strip())


def _int(v: Any) -> int | None:
    try:
        return int(str(v).strip()) if v not in (None, "") else None
    except (TypeError, ValueError):
        try:
            return int(float(str(v)))
        except (TypeError, ValueError):
            return None


_IDS_CACHE: dict[tuple, tuple[str, ...]] = {}  # raw bytes of the identifying elements -> their strings


def _id_strings_of(ds: Any, get: "_Get") -> tuple[str, ...]:
    """The identifying strings of a header, sorted and unique. Files of one patient repeat the same
    identifying elements, so the strings are derived once per distinct raw content (per process)."""
    key = []
    for kw in _IDENTIFYING:
        elem = ds.get_item(_tag(kw))
        v = None if elem is None else elem.value
        key.append(v if v is None or isinstance(v, (bytes, str)) else repr(v))
    key_t = tuple(key)
    hit = _IDS_CACHE.get(key_t)
    if hit is None:
        if len(_IDS_CACHE) > 4096:
            _IDS_CACHE.clear()
        hit = _IDS_CACHE[key_t] = tuple(sorted(set(_id_strings(get))))
    return hit


def _id_strings(get: "_Get") -> list[str]:
    out: list[str] = []
    for kw in _IDENTIFYING:
        v = get(kw)
        if v is None:
            continue
        vals = v if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
        for x in vals:
            s = str(x).strip()
            if not s:
                continue
            out.append(s)
            if kw.endswith("Name") or kw.endswith("Names") or "Physician" in kw or kw == "OperatorsName":
                out.extend(p for p in re.split(r"[\^\s=,]+", s) if p)
            if kw == "PatientBirthDate" and re.fullmatch(r"\d{8}", s):
                y, m, d = s[:4], s[4:6], s[6:]
                out += [f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}"]
    return out


_TAG_OF: dict[str, Any] = {}
_TRACER_CACHE: dict[str, Any] = {}  # series UID -> TracerMatch (one classification per series and process)
_SUV_CACHE: dict[str, tuple] = {}  # series UID -> SUV check of its first header (per process)


def _suv_check(ds: Any) -> tuple:
    """(error message or None, factor keys the header cannot support) of one PET header: the SUV
    rules of :mod:`glandpet.suv` on the first instance read (per-series fields are the same in every
    slice; per-slice times only refine the scan time)."""
    from .errors import SUVError
    from .suv import suv_result

    try:
        res = suv_result([ds], "PET series")
    except SUVError as exc:
        msg = str(exc)
        return (msg[len("PET series: "):] if msg.startswith("PET series: ") else msg, ())
    except Exception as exc:  # noqa: BLE001 - a malformed header is reported, not raised
        return (f"SUV header fields cannot be read ({type(exc).__name__})", ())
    return (None, tuple(sorted(k for k, v in res.factors.items()
                               if v is None or (isinstance(v, list) and any(x is None for x in v)))))


def _tag(kw: str):
    t = _TAG_OF.get(kw)
    if t is None:
        from pydicom.datadict import tag_for_keyword
        from pydicom.tag import Tag

        t = _TAG_OF[kw] = Tag(tag_for_keyword(kw))
    return t


class _Get:
    """Fast keyword access to a dataset (by tag; a malformed value reads as None)."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __call__(self, kw: str, default: Any = None) -> Any:
        t = _tag(kw)
        if t not in self.ds:
            return default
        try:
            return self.ds[t].value
        except Exception:  # noqa: BLE001
            return default

    def __contains__(self, kw: str) -> bool:
        return _tag(kw) in self.ds


def _skip(rel: str, reason: str, detail: str | None = None) -> dict:
    return {"path": rel, "skip": reason, "detail": detail}


def read_header(abspath: str, rel: str) -> dict:
    """Header record of one file, or a skip record {'path', 'skip', 'detail'}."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        size = os.path.getsize(abspath)
        with open(abspath, "rb") as fh:
            head = fh.read(132)
            if size == 0:
                return _skip(rel, "empty file")
            preamble = len(head) >= 132 and head[128:132] == b"DICM"
            if not preamble and head[:2] not in (b"\x08\x00", b"\x02\x00"):
                return _skip(rel, "not DICOM", "no DICM preamble and no DICOM group at the start")
            fh.seek(0)
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=not preamble)
            except InvalidDicomError:
                return _skip(rel, "not DICOM", "pydicom: not a DICOM file")
            except (EOFError, OSError) as exc:
                return _skip(rel, "truncated", f"header ends early ({type(exc).__name__})")
            except Exception as exc:  # noqa: BLE001 - any parse failure is reported, not raised
                return _skip(rel, "unreadable", f"header parse failed ({type(exc).__name__})")
            pos = fh.tell()
    except OSError as exc:
        return _skip(rel, "unreadable", exc.strerror or type(exc).__name__)

    meta = getattr(ds, "file_meta", None)
    get = _Get(ds)
    media_class = _s(meta.get("MediaStorageSOPClassUID")) if meta is not None else None
    if media_class == _DICOMDIR_CLASS or os.path.basename(abspath).upper() == "DICOMDIR" or "DirectoryRecordSequence" in get:
        return _skip(rel, "DICOMDIR")
    try:
        sop_class = _s(get("SOPClassUID")) or media_class
        sop_uid = _s(get("SOPInstanceUID"))
        series_uid = _s(get("SeriesInstanceUID"))
    except Exception:  # noqa: BLE001
        return _skip(rel, "unreadable", "malformed UID elements")
    if pos >= size and not (series_uid and sop_uid and _s(get("Modality"))):
        return _skip(rel, "truncated", "the file ends inside the header")
    if not preamble and not (sop_uid and _UID_RE.match(sop_uid)):
        return _skip(rel, "not DICOM", "no DICM preamble and no valid SOPInstanceUID")
    if not sop_class or not sop_class.startswith(_STORAGE_PREFIX):
        return _skip(rel, "unsupported SOP class", f"SOP class {sop_class or 'missing'}")
    if not series_uid:
        return _skip(rel, "no SeriesInstanceUID")
    if not sop_uid:
        return _skip(rel, "unreadable", "no SOPInstanceUID")

    ts = _s(meta.get("TransferSyntaxUID")) if meta is not None else None
    rows, cols = _int(get("Rows")), _int(get("Columns"))
    nframes = _int(get("NumberOfFrames")) or 1
    # truncation: an image must hold its pixel data (file size against the length the header implies;
    # the pixels are not read). The record keeps the series UID so that the series can be refused.
    def _trunc(detail: str) -> dict:
        rec = _skip(rel, "truncated", detail)
        rec.update(series_uid=series_uid, patient_id=_s(get("PatientID")))
        return rec

    if rows and cols:
        remaining = size - pos
        if remaining <= 0:
            return _trunc("no pixel data")
        from pydicom.uid import UID

        compressed = bool(ts) and UID(ts).is_compressed
        if compressed:
            with open(abspath, "rb") as fh:
                fh.seek(max(0, size - 16))
                tail = fh.read()
            if b"\xfe\xff\xdd\xe0" not in tail:
                return _trunc("encapsulated pixel data has no sequence delimiter")
        else:
            bits = _int(get("BitsAllocated")) or 16
            spp = _int(get("SamplesPerPixel")) or 1
            expected = rows * cols * spp * nframes * bits // 8
            header = 8 if (ts in (None, "1.2.840.10008.1.2")) else 12
            if remaining < expected + header:
                return _trunc(f"pixel data has {max(0, remaining - header)} of {expected} bytes")

    def dt(date_kw: str, time_kw: str) -> str | None:
        d = _s(get(date_kw))
        if not d:
            return None
        return d + "T" + (_s(get(time_kw)) or "")

    tracer = None
    if _s(get("Modality")) == "PT" or "RadiopharmaceuticalInformationSequence" in get:
        tracer = _TRACER_CACHE.get(series_uid)
        if tracer is None:
            try:
                tracer = classify_dataset(ds)
            except Exception:  # noqa: BLE001
                tracer = None
            if len(_TRACER_CACHE) > 10000:
                _TRACER_CACHE.clear()
            _TRACER_CACHE[series_uid] = tracer
    suv_check = None
    if _s(get("Modality")) == "PT" and rows and cols:
        suv_check = _SUV_CACHE.get(series_uid)
        if suv_check is None:
            suv_check = _suv_check(ds)
            if len(_SUV_CACHE) > 10000:
                _SUV_CACHE.clear()
            _SUV_CACHE[series_uid] = suv_check
    pid = _s(get("PatientID"))
    return {
        "path": rel,
        "sop_class": sop_class,
        "sop_uid": sop_uid,
        "series_uid": series_uid,
        "study_uid": _s(get("StudyInstanceUID")),
        "frame_uid": _s(get("FrameOfReferenceUID")),
        "modality": _s(get("Modality")),
        "image_type": _strs(get("ImageType")),
        "series_description": _s(get("SeriesDescription")),
        "protocol_name": _s(get("ProtocolName")),
        "series_number": _int(get("SeriesNumber")),
        "instance_number": _int(get("InstanceNumber")),
        "acq_dt": _s(get("AcquisitionDateTime")) or dt("AcquisitionDate", "AcquisitionTime"),
        "series_dt": dt("SeriesDate", "SeriesTime"),
        "study_dt": dt("StudyDate", "StudyTime"),
        "content_dt": dt("ContentDate", "ContentTime"),
        "manufacturer": _s(get("Manufacturer")),
        "model": _s(get("ManufacturerModelName")),
        "rows": rows,
        "columns": cols,
        "n_frames": nframes,
        "pixel_spacing": _floats(get("PixelSpacing")),
        "slice_thickness": (_floats(get("SliceThickness")) or (None,))[0],
        "iop": _floats(get("ImageOrientationPatient")),
        "ipp": _floats(get("ImagePositionPatient")),
        "units": _s(get("Units")),
        "decay_correction": _s(get("DecayCorrection")),
        "corrected_image": _strs(get("CorrectedImage")),
        "has_corrected_image": "CorrectedImage" in get,
        "transfer_syntax": ts,
        "tracer": tracer,
        "suv_check": suv_check,
        "patient_id": pid,
        "ids": _id_strings_of(ds, get),
    }


def _read_many(items: list[tuple[str, str]]) -> list[dict]:
    return [read_header(a, r) for a, r in items]


# ------------------------------------------------------------------------------------------
# walking

def _walk(folder: Path, root: Path) -> list[tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            a = os.path.join(dirpath, name)
            out.append((a, os.path.relpath(a, root)))
    return out


def _parse_dt(s: str | None) -> datetime | None:
    if not s:
        return None
    m = re.match(r"^(\d{4})(\d{2})(\d{2})T?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", s.replace(":", "").replace("-", ""))
    if not m:
        return None
    y, mo, d, hh, mm, ss, frac = m.groups()
    try:
        t = datetime(int(y), int(mo), int(d), int(hh or 0), int(mm or 0), int(ss or 0))
    except ValueError:
        return None
    if frac:
        t += timedelta(microseconds=int(frac.ljust(6, "0")))
    return t


# ------------------------------------------------------------------------------------------
# result

@dataclass
class IndexResult:
    series: pd.DataFrame
    files: pd.DataFrame
    skipped: pd.DataFrame
    problems: list[str] = field(default_factory=list)  # ambiguities (on_ambiguity="report")
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # n_files, seconds, files_per_s
    # one row per subject / session that cannot be processed (status failed) or needs a look
    # (warning): FAILURES_SCHEMA columns; messages name the subject, session, series and cause
    failures: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FAILURES_SCHEMA.names))


def _scrub(text: str | None, ids: Iterable[str]) -> str | None:
    """`text`, or None when it contains any identifier string (case-insensitive)."""
    if not text:
        return None
    low = text.lower()
    for s in ids:
        s = s.strip().lower()
        if len(s) < 2:
            continue
        if len(s) >= 4 and s in low:
            return None
        if re.search(rf"(?<![a-z0-9]){re.escape(s)}(?![a-z0-9])", low):
            return None
    return text


def _orientation(iop: tuple[float, ...] | None) -> tuple[str | None, np.ndarray | None]:
    if not iop or len(iop) != 6:
        return None, None
    r, c = np.array(iop[:3]), np.array(iop[3:])
    n = np.cross(r, c)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        return None, None
    n = n / norm
    k = int(np.argmax(np.abs(n)))
    if abs(n[k]) < 0.9:
        return "oblique", n
    return ("sagittal", "coronal", "axial")[k], n


def _role(s: dict) -> tuple[str, str]:
    sop, mod = s["sop_class"] or "", s["modality"] or ""
    it = set(s["image_type_tuple"])
    desc = " " + re.sub(r"[^A-Z0-9]+", " ", (s["desc_raw"] or "").upper()) + " "
    if sop.startswith(_SC_PREFIX):
        return "other", "secondary capture"
    if "LOCALIZER" in it:
        return "localizer", "ImageType LOCALIZER"
    if mod == "CT":
        if sop not in _CT_CLASSES:
            return "other", f"CT with SOP class {sop}"
        if s["n_slices"] <= 1:
            return "localizer", "single-slice CT (scout)"
        if s["iop"] is None:
            return "other", "CT without ImageOrientationPatient"
        return "ct", "CT image series"
    if mod == "PT":
        if sop not in _PET_CLASSES:
            return "other", f"PT with SOP class {sop}"
        if it & {"MIP", "PROJECTION IMAGE", "PROJECTION"} or _MIP_RE.search(desc):
            return "other", "PET MIP / projection"
        if s["n_slices"] <= 1:
            return "other", "single-slice PET"
        ci = set(s["ci_tuple"])
        if s["has_corrected_image"] and ci:
            if "ATTN" in ci:
                return "pet_ac", "CorrectedImage has ATTN"
            return "pet_nac", "CorrectedImage lacks ATTN"
        if _NAC_RE.search(desc):
            return "pet_nac", "CorrectedImage absent; description says not attenuation-corrected"
        return "pet_ac", "CorrectedImage absent; assumed attenuation-corrected"
    return "other", f"modality {mod or 'missing'}"


def _geometry(insts: list[dict]) -> dict:
    """n_slices, slice spacing, uniformity and slice order of a group of instances."""
    first = insts[0]
    orient, normal = _orientation(first["iop"])
    nframes = sum(i["n_frames"] or 1 for i in insts)
    out = {"orientation": orient, "n_slices": nframes, "slice_spacing_mm": None, "slice_spacing_uniform": None}
    order = sorted(range(len(insts)), key=lambda k: (insts[k]["instance_number"] is None,
                                                     insts[k]["instance_number"] or 0, insts[k]["path"]))
    if normal is not None and all(i["ipp"] and len(i["ipp"]) == 3 for i in insts) and max(i["n_frames"] for i in insts) == 1:
        proj = np.array([float(np.dot(normal, i["ipp"])) for i in insts])
        order = sorted(range(len(insts)), key=lambda k: (round(proj[k], 3), insts[k]["instance_number"] or 0, insts[k]["path"]))
        uniq = np.unique(np.round(proj, 3))
        out["n_slices"] = int(len(uniq))
        if len(uniq) >= 2:
            d = np.diff(uniq)
            sp = float(np.median(d))
            out["slice_spacing_mm"] = round(sp, 6)
            out["slice_spacing_uniform"] = bool(np.max(np.abs(d - sp)) <= max(0.01, 0.01 * sp))
        out["problem"] = _volume_problem(insts, normal, proj)
        pos = np.array([insts[i]["ipp"] for i in np.argsort(proj, kind="stable")], dtype=float)
        dist = np.sort(proj)
        drift = np.linalg.norm((pos - pos[0]) - np.outer(dist - dist[0], normal), axis=1)
        straight = float(drift.max()) <= 0.01 + 1e-3 * abs(dist[-1] - dist[0])
        if out["problem"] and out["problem"].startswith("unequal slice spacing") and straight:
            gaps = np.diff(dist)
            out["resample_note"] = (f"unequal slice spacing ({gaps.min():.1f}-{gaps.max():.1f} mm) resampled by dcm2niix "
                                    "to equidistant slices")
        elif out["problem"] and out["problem"].startswith("slice positions are not along the slice normal"):
            angle = float(np.degrees(np.arctan2(drift[-1], abs(dist[-1] - dist[0]) or 1.0)))
            out["resample_note"] = (f"gantry tilt {angle:.1f} deg corrected by glandpet (each slice shifted within its "
                                    "plane onto a rectangular grid, from the slice positions)")
    out["order"] = order
    return out


def _volume_problem(insts: list[dict], normal: np.ndarray, proj: np.ndarray) -> str | None:
    """Why the converter (:func:`glandpet.dicom_series.load_series`) would refuse these slices as one
    volume, from their headers only, with its tolerances and message stems; None when it would not."""
    from .dicom_series import _ABS_TOL_MM, _REL_TOL

    if len(insts) < 2:
        return None
    dist = np.sort(proj)
    gaps = np.diff(dist)
    if np.any(gaps < _ABS_TOL_MM):
        return (f"two different instances at the same slice position ({dist[int(np.argmin(gaps))]:.3f} mm): "
                "multiple stacks or dynamic frames")
    step = (dist[-1] - dist[0]) / (len(dist) - 1)
    dev = np.abs(gaps - step)
    if np.max(dev) > _ABS_TOL_MM + _REL_TOL * step:
        k = int(np.argmax(dev))
        return (f"unequal slice spacing (gap {gaps[k]:.3f} mm between slices {k} and {k + 1}, median "
                f"{np.median(gaps):.3f} mm): missing slices?")
    order = np.argsort(proj, kind="stable")
    pos = np.array([insts[i]["ipp"] for i in order], dtype=float)
    offsets = pos - pos[0]
    perp = offsets - np.outer(dist - dist[0], normal)
    off = np.linalg.norm(perp, axis=1)
    if np.max(off) > _ABS_TOL_MM + 1e-3 * abs(dist[-1] - dist[0]):
        k = int(np.argmax(off))
        angle = np.degrees(np.arctan2(off[k], abs(dist[k] - dist[0]) or 1.0))
        return (f"slice positions are not along the slice normal (sideways drift {off[k]:.3f} mm over "
                f"{abs(dist[k] - dist[0]):.1f} mm, about {angle:.2f} deg): gantry tilt or sheared stack")
    return None


def _split_key(i: dict) -> tuple:
    iop = tuple(round(x, 3) for x in i["iop"]) if i["iop"] else None
    ps = tuple(round(x, 4) for x in i["pixel_spacing"]) if i["pixel_spacing"] else None
    return (i["modality"] or "", i["sop_class"] or "", i["rows"] or 0, i["columns"] or 0, iop or (), ps or ())


def _ambiguity_message(subject: str, session: str, cands: list[dict]) -> str:
    parts = []
    for c in cands:
        parts.append(
            f"{c['series_key']} ({c['tracer'] or 'unknown tracer'}, day {c['days_from_first_scan']}, "
            f"{c['n_slices']} slices, '{c['series_description'] or ''}')"
        )
    return (f"subject {subject}, session {session}: {len(cands)} attenuation-corrected PET series from different "
            f"acquisitions: {', '.join(parts)}; choose one with an override (subject_id, session, series_key)")


def series_label(s: Mapping[str, Any]) -> str:
    """How messages name a series (a series-table row): kind, number and the identifier-free
    description, e.g. "PET series #4 'PET HN QCFX'"; never a UID, a path or a patient field."""
    kind = {"ct": "CT", "pet_ac": "PET", "pet_nac": "PET (not attenuation-corrected)", "localizer": "localizer"}.get(
        s.get("role"), s.get("modality") or "DICOM")
    num, desc = s.get("series_number"), s.get("series_description")
    num = f" #{int(num)}" if isinstance(num, (int, float, np.integer)) and num == num else ""
    desc = f" '{desc}'" if isinstance(desc, str) and desc else ""
    return f"{kind} series{num}{desc}"




_INSTALL = {
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg + pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg + pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
}
_DECODER_CACHE: dict[str, str | None] = {}


def decoder_problem(transfer_syntax: str | None) -> str | None:
    """None when pydicom can decode pixel data of this transfer syntax here; else the message
    naming the syntax and what to install (or how to decompress the series)."""
    if not transfer_syntax:
        return None
    if transfer_syntax in _DECODER_CACHE:
        return _DECODER_CACHE[transfer_syntax]
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    msg = None
    if uid.is_compressed:
        try:
            from pydicom.pixels.decoders.base import get_decoder

            ok = get_decoder(uid).is_available
        except Exception:  # noqa: BLE001 - a syntax pydicom has no decoder class for
            ok = False
        if not ok:
            what = _INSTALL.get(str(uid), "a pydicom pixel-data plugin (pylibjpeg with its plugins, or gdcm)")
            msg = (f"pixel data use the compressed transfer syntax '{uid.name}' ({uid}) and no decoder for it is "
                   f"installed: pip install {what}, or decompress the series first (gdcmconv --raw, dcmdjpeg)")
    _DECODER_CACHE[transfer_syntax] = msg
    return msg


def _series_causes(s: dict, suv_type: str | None) -> list[str]:
    causes = []
    if s["_bad_files"]:
        n = len(s["_bad_files"])
        causes.append(f"{n} of its files {'is' if n == 1 else 'are'} truncated ({s['_bad_files'][0]}); re-export the series")
    if s["_geo_problem"] and not s["_bad_files"] and not _ct_resampled(s):  # a truncated file leaves a gap: say only why
        causes.append(s["_geo_problem"] + "; the series is not one regular volume (re-export it complete; "
                      + ("a CT is converted when tilted or unequally spaced, not both, and never with two "
                         "instances at one position" if s["role"] == "ct"
                         else "a tilted or irregular PET is refused, never resampled") + ")")
    dec = decoder_problem(s["transfer_syntax"])
    if dec:
        causes.append(dec)
    if s["role"] == "pet_ac" and s["_suv_check"] is not None:
        err, nulls = s["_suv_check"]
        if err:
            causes.append(f"cannot give SUV: {err}")
        elif suv_type:
            from .suv import SUV_CHOICES

            key = SUV_CHOICES.get(suv_type)
            if key in nulls:
                causes.append(f"cannot give SUV type '{suv_type}': the header lacks PatientSize and/or PatientSex "
                              f"(0010,1020 / 0010,0040); choose suv_type: bw")
    return causes


def _ct_resampled(s: dict) -> str | None:
    """What the converter will correct in this CT (glandpet.ct_dcm2niix), else None: unequal slice
    spacing of a stack that is otherwise regular (dcm2niix), or a gantry tilt of an equally spaced stack
    (glandpet's de-shear); never both, nor two slices at one position."""
    if s["role"] == "ct" and s["_resample_note"] and not s["_bad_files"]:
        return s["_resample_note"]
    return None


def _failures(series_rows: list[dict], by_subject: Mapping[str, list[dict]], ambiguous: Mapping[tuple[str, str], str],
              subjects: pd.DataFrame | None, folder_of: Mapping[str, Path], skipped: list[dict],
              owner: Mapping[str, str], suv_type: str | None, attributed: Iterable[str] = ()) -> list[dict]:
    """Failure / warning rows (FAILURES_SCHEMA) and the ``problem`` of each unusable selected PET."""
    out: list[dict] = []

    def add(sid: str, ses: str | None, status: str, msg: str) -> None:
        out.append({"subject_id": sid, "session": ses, "stage": "index", "status": status, "message": msg})

    for s in series_rows:
        s["problem"] = None
    keyed = {s["series_key"]: s for s in series_rows}
    usable: dict[str, set[str]] = defaultdict(set)
    for (sid, ses), msg in sorted(ambiguous.items()):
        add(sid, ses, "failed", msg)
    for sid, ss in sorted(by_subject.items()):
        for p in ss:
            if not (p["selected"] and p["role"] == "pet_ac" and p["session"]):
                continue
            ses = p["session"]
            causes = [f"{series_label(p)}: {c}" for c in _series_causes(p, suv_type)]
            if not p["paired_ct_key"]:
                causes.append(f"{series_label(p)}: the PET series has no CT (no CT shares its frame of reference or "
                              "study, or was acquired the same day within 3 h); export the CT of the PET/CT session")
            else:
                ct = keyed[p["paired_ct_key"]]
                causes += [f"its {series_label(ct)}: {c}" for c in _series_causes(ct, None)]
                note = _ct_resampled(ct)
                if note and not causes:
                    add(sid, ses, "warning", f"sub-{sid} ses-{ses}: its {series_label(ct)}: {note} "
                        "(glandpet's reader refuses it; converted with a check against the DICOM)")
            if causes:
                msg = f"sub-{sid} ses-{ses}: " + "; ".join(causes)
                p["problem"] = msg
                add(sid, ses, "failed", msg)
            else:
                usable[sid].add(ses)
        for p in ss:  # PET that no session uses, because its tracer is unknown or not PSMA / FAPI
            if p["role"] == "pet_ac" and not p["selected"] and p["tracer_session"] is None:
                why = (f"tracer not recognised ({p['tracer_note'] or 'no tracer named'})" if not p["tracer"]
                       else f"tracer {p['tracer']} is neither a PSMA nor a FAPI tracer")
                add(sid, None, "warning", f"sub-{sid}: {series_label(p)} is not used: {why}; if it is the PSMA or "
                    f"FAPI scan, name it in series_overrides (subject_id: {sid}, session, series_key: {p['series_key']})")
    # subjects left without any usable session
    sheet_ids = list(subjects["subject_id"]) if subjects is not None else []
    lines = {sid: i + 2 for i, sid in enumerate(sheet_ids)}
    n_skipped: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    in_series = set(attributed or ())
    for k in skipped:
        sid = owner.get(k["path"])
        if sid is not None and k["path"] not in in_series:  # files of a refused series: its failure says it
            n_skipped[sid][k["reason"]] += 1
    for sid, reasons in sorted(n_skipped.items()):
        bad = {r: n for r, n in reasons.items() if r in ("unreadable", "truncated", "empty file")}
        if bad:
            add(sid, None, "warning", f"sub-{sid}: " + ", ".join(f"{n} {r}" for r, n in sorted(bad.items()))
                + " file(s) in its folder were skipped (listed in series_skipped.parquet)")
    failed = {(r["subject_id"], r["session"]) for r in out if r["status"] == "failed"}
    for sid in list(dict.fromkeys(sheet_ids + sorted(by_subject))):
        if usable.get(sid):
            continue
        ss = by_subject.get(sid, [])
        folder = folder_of.get(sid)
        if folder is not None and not folder.is_dir():
            add(sid, None, "failed", f"sub-{sid}: its dicom_dir folder (subject sheet line {lines.get(sid, '?')}) does "
                "not exist under the DICOM root; fix dicom_dir or dicom_root")
        elif not ss:
            skipped_here = n_skipped.get(sid, {})
            if folder is not None and not skipped_here:
                why = "its dicom_dir folder holds no files"
            elif folder is not None:
                why = ("no DICOM image series in its dicom_dir folder (skipped files: "
                       + ", ".join(f"{n} {r}" for r, n in sorted(skipped_here.items())) + ")")
            else:
                why = "no DICOM image with its patient_id under the DICOM root"
            add(sid, None, "failed", f"sub-{sid}: {why}")
        elif any(f[0] == sid for f in failed):
            continue  # its sessions' failures say why
        else:
            pets = [p for p in ss if p["role"] == "pet_ac"]
            found = ", ".join(series_label(x) for x in ss[:6]) + (", ..." if len(ss) > 6 else "")
            if not pets:
                why = f"no attenuation-corrected PET series (found: {found}); export the PET of the PET/CT session"
            else:
                why = ("no PET series of a PSMA or FAPI tracer (see the warnings on its PET series); name the PSMA or "
                       "FAPI series in series_overrides")
            add(sid, None, "failed", f"sub-{sid}: {why}")
    return out


def index_tree(
    root: str | Path,
    subjects: pd.DataFrame | str | Path | None = None,
    jobs: int = 1,
    progress: bool = False,
    *,
    overrides: Mapping[tuple[str, str], str] | None = None,
    salt: str | None = None,
    on_ambiguity: str = "error",
    suv_type: str = "bw",
) -> IndexResult:
    """Index the DICOM tree under `root` (see the module docstring for every rule).

    `subjects`: a subject sheet (path, or DataFrame from :func:`glandpet.subjects.read_subject_sheet`);
    None: pseudonymous ids from PatientID. `overrides`: {(subject_id, session): series_key}.
    `on_ambiguity`: "error" (raise UserError) or "report" (IndexResult.problems).
    `suv_type`: the SUV the workflow will compute; a selected PET whose header cannot give it is a
    failure of its session (IndexResult.failures, and the series' ``problem``).
    """
    t0 = time.perf_counter()
    _TRACER_CACHE.clear()  # per-series caches hold within one index run only (files may change between runs)
    _SUV_CACHE.clear()
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"DICOM root {root} is not a folder")
    if on_ambiguity not in ("error", "report"):
        raise ValueError("on_ambiguity must be 'error' or 'report'")
    if subjects is not None and not isinstance(subjects, pd.DataFrame):
        from .subjects import read_subject_sheet

        subjects = read_subject_sheet(subjects, root, missing_dirs="report")

    # ---- which files, and whose
    folder_of: dict[str, Path] = {}
    pid_to_subject: dict[str, str] = {}
    if subjects is not None:
        from .subjects import subject_folders

        folder_of = subject_folders(subjects, root)
        pid_to_subject = {str(p): s for s, p in zip(subjects["subject_id"], subjects["patient_id"])
                          if isinstance(p, str) and p}
    items: list[tuple[str, str]] = []
    owner: dict[str, str] = {}  # rel path -> subject (from folders)
    if subjects is not None and not pid_to_subject:
        for sid, folder in folder_of.items():
            got = _walk(folder, root)
            items += got
            owner.update({rel: sid for _, rel in got})
    else:
        items = _walk(root, root)
        if folder_of:
            rroot = root.resolve()
            prefixes = {sid: os.path.relpath(f, rroot) for sid, f in folder_of.items()}
            for _, rel in items:
                for sid, pre in prefixes.items():
                    if rel == pre or rel.startswith(pre + os.sep):
                        owner[rel] = sid
                        break

    # ---- read headers
    records: list[dict] = []
    n = len(items)
    from .progress import Progress

    bar = Progress(n, "indexing", unit="files", quiet=not progress)
    if jobs and jobs > 1 and n > 64:
        from concurrent.futures import ProcessPoolExecutor

        size = max(16, min(512, n // (jobs * 8) or 16))
        chunks = [items[i:i + size] for i in range(0, n, size)]
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for got in ex.map(_read_many, chunks):
                records.extend(got)
                bar.update(len(got))
    else:
        for a, rel in items:
            records.append(read_header(a, rel))
            bar.update()
    t_read = time.perf_counter() - t0

    skipped: list[dict] = [{"path": r["path"], "reason": r["skip"], "detail": r.get("detail")} for r in records if "skip" in r]
    bad_files: dict[str, list[str]] = defaultdict(list)  # series UID -> details of its truncated files
    for r in records:
        if "skip" in r and r.get("series_uid"):
            bad_files[r["series_uid"]].append(r.get("detail") or r["skip"])
    insts = [r for r in records if "skip" not in r]

    # ---- subjects
    for r in insts:
        sid = owner.get(r["path"])
        if sid is None and pid_to_subject:
            sid = pid_to_subject.get(r["patient_id"] or "")
        if sid is None and subjects is None:
            base = r["patient_id"] or ("nopatientid:" + (r["study_uid"] or r["series_uid"]))
            sid = subject_pseudonym(base, salt)
        r["subject_id"] = sid
    for r in insts:
        if r["subject_id"] is None:
            skipped.append({"path": r["path"], "reason": "patient not in subject sheet", "detail": None})
    insts = [r for r in insts if r["subject_id"] is not None]

    # ---- duplicates (same SOPInstanceUID): keep the first path
    insts.sort(key=lambda r: r["path"])
    seen: dict[str, dict] = {}
    kept = []
    for r in insts:
        prev = seen.get(r["sop_uid"])
        if prev is not None:
            if prev["subject_id"] != r["subject_id"]:
                raise UserError(f"the same DICOM instance is in the folders of subjects {prev['subject_id']} and "
                                f"{r['subject_id']} ({prev['path']} and {r['path']}); fix the subject sheet or the export")
            skipped.append({"path": r["path"], "reason": "duplicate instance", "detail": f"same SOPInstanceUID as {prev['path']}"})
            continue
        seen[r["sop_uid"]] = r
        kept.append(r)

    # ---- group into series, split mixed ones
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in kept:
        groups[(r["subject_id"], r["series_uid"])].append(r)
    series_rows: list[dict] = []
    files_rows: list[dict] = []
    key_owner: dict[str, str] = {}
    for (sid, suid), members in sorted(groups.items()):
        parts: dict[tuple, list[dict]] = defaultdict(list)
        for r in members:
            parts[_split_key(r)].append(r)
        plist = sorted(parts.values(), key=lambda p: (min((i["instance_number"] or 0) for i in p), p[0]["path"]))
        for pi, part in enumerate(plist):
            skey = salted_key(suid if len(plist) == 1 else f"{suid}#{pi + 1}", salt)
            if skey in key_owner and key_owner[skey] != sid:
                raise UserError(f"series {skey} has files in the folders of subjects {key_owner[skey]} and {sid}; "
                                "each series must belong to one subject")
            key_owner[skey] = sid
            first = part[0]
            geo = _geometry(part)
            times = [t for t in (_parse_dt(i["acq_dt"]) for i in part) if t is not None]
            start = min(times) if times else (_parse_dt(first["series_dt"]) or _parse_dt(first["study_dt"])
                                               or _parse_dt(first["content_dt"]))
            ids = set().union(*(set(i["ids"]) for i in part))
            tr = first["tracer"]
            note = None
            if tr is not None:
                note = tr.conflict if tr.tracer else (f"unrecognised tracer: {tr.unrecognised}" if tr.unrecognised else "no tracer named")
                note = _scrub(note, ids) if note else None
            ps = first["pixel_spacing"]
            s = {
                "subject_id": sid,
                "series_key": skey,
                "study_key": salted_key(first["study_uid"], salt),
                "frame_key": salted_key(first["frame_uid"], salt),
                "split_part": (pi + 1) if len(plist) > 1 else None,
                "modality": first["modality"],
                "sop_class": first["sop_class"],
                "image_type": "\\".join(first["image_type"]) or None,
                "manufacturer": _scrub(first["manufacturer"], ids),
                "manufacturer_model": _scrub(first["model"], ids),
                "series_number": first["series_number"],
                "n_instances": len(part),
                "n_frames": sum(i["n_frames"] or 1 for i in part),
                "rows": first["rows"],
                "columns": first["columns"],
                "n_slices": geo["n_slices"],
                "pixel_spacing_mm": list(ps) if ps else None,
                "slice_spacing_mm": geo["slice_spacing_mm"],
                "slice_spacing_uniform": geo["slice_spacing_uniform"],
                "slice_thickness_mm": first["slice_thickness"],
                "orientation": geo["orientation"],
                "series_description": _scrub(first["series_description"], ids),
                "desc_raw": " ".join(x for x in (first["series_description"], first["protocol_name"]) if x),
                "units": first["units"],
                "decay_correction": first["decay_correction"],
                "corrected_image": "\\".join(first["corrected_image"]) or None,
                "has_corrected_image": first["has_corrected_image"],
                "ci_tuple": first["corrected_image"],
                "transfer_syntax": first["transfer_syntax"],
                "_geo_problem": geo.get("problem") if (first["n_frames"] or 1) == 1 else None,
                "_resample_note": geo.get("resample_note") if (first["n_frames"] or 1) == 1 else None,
                "_bad_files": bad_files.get(suid, []),
                "_suv_check": first.get("suv_check"),
                "tracer": tr.tracer if tr else None,
                "tracer_slug": tr.slug if tr else None,
                "radionuclide": tr.radionuclide if tr else None,
                "tracer_matched_on": tr.matched_on if tr else None,
                "tracer_note": note,
                "tracer_session": tr.session if tr else None,
                "image_type_tuple": first["image_type"],
                "iop": first["iop"],
                "start": start,
                "study_uid": first["study_uid"],
                "frame_uid": first["frame_uid"],
                "_ids": ids,
            }
            s["role"], s["role_rule"] = _role(s)
            series_rows.append(s)
            files_rows.append({"series_key": skey, "subject_id": sid, "n_files": len(part),
                               "paths": [part[k]["path"] for k in geo["order"]]})

    # ---- days from first scan (per subject), no calendar dates kept
    firsts: dict[str, datetime] = {}
    imaging = {s["subject_id"] for s in series_rows if s["role"] != "other" and s["start"] is not None}
    for s in series_rows:
        if s["start"] is not None and (s["role"] != "other" or s["subject_id"] not in imaging):
            f = firsts.get(s["subject_id"])
            firsts[s["subject_id"]] = s["start"] if f is None or s["start"] < f else f
    for s in series_rows:
        f = firsts.get(s["subject_id"])
        if s["start"] is not None and f is not None:
            s["days_from_first_scan"] = (s["start"].date() - f.date()).days
            s["minutes_from_first_scan"] = round((s["start"] - f).total_seconds() / 60.0, 2)
        else:
            s["days_from_first_scan"] = None
            s["minutes_from_first_scan"] = None

    # ---- pairing PET -> CT
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for s in series_rows:
        by_subject[s["subject_id"]].append(s)
        s.update(session=None, paired_ct_key=None, pairing_rule=None, selected=False, selection_rule=None)
    for sid, ss in by_subject.items():
        cts = [c for c in ss if c["role"] == "ct"]
        for p in ss:
            if p["role"] not in ("pet_ac", "pet_nac"):
                continue
            p["session"] = p["tracer_session"]
            rule, cands = None, []
            if p["frame_uid"]:
                cands = [c for c in cts if c["frame_uid"] == p["frame_uid"]]
                rule = "frame_of_reference"
            if not cands and p["study_uid"]:
                cands = [c for c in cts if c["study_uid"] == p["study_uid"]]
                rule = "study_closest_time"
            if not cands and p["start"] is not None:
                cands = [c for c in cts if c["start"] is not None and c["start"].date() == p["start"].date()
                         and abs((c["start"] - p["start"]).total_seconds()) <= 3 * 3600]
                rule = "same_day_closest_time"
            if not cands:
                p["pairing_rule"] = "no CT"
                continue

            def ct_rank(c: dict) -> tuple:
                dtv = abs((c["start"] - p["start"]).total_seconds()) if c["start"] and p["start"] else math.inf
                return (c["orientation"] != "axial", dtv, -(c["n_slices"] or 0), -(c["series_number"] or 0), c["series_key"])

            best = min(cands, key=ct_rank)
            p["paired_ct_key"], p["pairing_rule"] = best["series_key"], rule

    # ---- session selection
    overrides = dict(overrides or {})
    problems: list[str] = []
    ambiguous: dict[tuple[str, str], str] = {}
    keyed = {s["series_key"]: s for s in series_rows}
    for (osid, oses), okey in overrides.items():
        if oses not in SESSIONS:
            raise UserError(f"override for subject {osid}: unknown session {oses!r} (expected {', '.join(SESSIONS)})")
        if osid not in by_subject:
            raise UserError(f"override for subject {osid}, session {oses}: no such subject in the index")
        s = keyed.get(okey)
        pets = [x["series_key"] for x in by_subject[osid] if x["role"] == "pet_ac"]
        if s is None or s["subject_id"] != osid:
            raise UserError(f"override for subject {osid}, session {oses}: series {okey!r} is not a series of this "
                            f"subject (its attenuation-corrected PET series: {', '.join(pets) or 'none'})")
        if s["role"] != "pet_ac":
            raise UserError(f"override for subject {osid}, session {oses}: series {okey} is {s['role']}, not an "
                            f"attenuation-corrected PET (choose one of: {', '.join(pets) or 'none'})")
        if s["tracer_session"] not in (None, oses):
            raise UserError(f"override for subject {osid}, session {oses}: series {okey} has tracer {s['tracer']} "
                            f"(session {s['tracer_session']}), not a {oses} tracer")
    for sid, ss in sorted(by_subject.items()):
        for ses in SESSIONS:
            okey = overrides.get((sid, ses))
            if okey:
                chosen = keyed[okey]
                chosen["session"] = ses
                chosen["selected"], chosen["selection_rule"] = True, "override"
                continue
            cands = [p for p in ss if p["role"] == "pet_ac" and p["tracer_session"] == ses
                     and not any(overrides.get((sid, x)) == p["series_key"] for x in SESSIONS)]
            if not cands:
                continue
            if len(cands) == 1:
                cands[0]["selected"], cands[0]["selection_rule"] = True, "only candidate"
                continue
            ref = cands[0]

            def same_acq(a: dict, b: dict) -> bool:
                if a["study_uid"] != b["study_uid"]:
                    return False
                if a["frame_uid"] and b["frame_uid"] and a["frame_uid"] != b["frame_uid"]:
                    return False
                if a["start"] and b["start"] and abs((a["start"] - b["start"]).total_seconds()) > 30 * 60:
                    return False
                return True

            if not all(same_acq(ref, c) for c in cands[1:]):
                msg = _ambiguity_message(sid, ses, cands)
                problems.append(msg)
                ambiguous[(sid, ses)] = msg
                for c in cands:
                    c["selection_rule"] = "ambiguous: several acquisitions; needs an override"
                continue

            def pet_rank(c: dict) -> tuple:
                ps = c["pixel_spacing_mm"] or [math.inf, math.inf]
                vox = ps[0] * ps[1] * (c["slice_spacing_mm"] or c["slice_thickness_mm"] or math.inf)
                return (c["pairing_rule"] != "frame_of_reference",
                        bool(c["image_type_tuple"]) and c["image_type_tuple"][0] == "DERIVED",
                        round(vox, 3), -(c["n_slices"] or 0), -(c["series_number"] or 0), c["series_key"])

            ranked = sorted(cands, key=pet_rank)
            ranked[0]["selected"] = True
            ranked[0]["selection_rule"] = (f"preferred among {len(cands)} reconstructions of one acquisition "
                                           "(CT by frame of reference, ORIGINAL, finest voxels, most slices, latest series)")
            for c in ranked[1:]:
                c["selection_rule"] = f"another reconstruction of the acquisition of {ranked[0]['series_key']}"
    if problems and on_ambiguity == "error":
        raise UserError("; ".join(problems))
    # CTs paired with selected PETs
    for s in series_rows:
        if s["selected"] and s["role"] == "pet_ac" and s["paired_ct_key"]:
            ct = keyed[s["paired_ct_key"]]
            if not ct["selected"]:
                ct["selected"], ct["session"] = True, s["session"]
                ct["selection_rule"] = f"CT of the selected {s['session']} PET {s['series_key']} ({s['pairing_rule']})"

    # ---- what cannot be processed: per subject and session (the workflow leaves these out)
    attributed = {r["path"] for r in records if "skip" in r and r.get("series_uid")}
    failures = _failures(series_rows, by_subject, ambiguous, subjects, folder_of, skipped, owner, suv_type, attributed)

    # ---- warnings: identifiers in paths
    warnings: list[str] = []
    n_bad = 0
    for s, f in zip(series_rows, files_rows):
        low_ids = [i.lower() for i in s["_ids"] if len(i) >= 3]
        if any(any(i in p.lower() for i in low_ids) for p in f["paths"][:1]):
            n_bad += 1
    if n_bad:
        warnings.append(f"{n_bad} series have a patient identifier in their folder or file names; the files table "
                        "stores those paths (keep it with the linkage key, not with shared results)")

    internal = {"ci_tuple", "desc_raw", "has_corrected_image", "tracer_session", "image_type_tuple", "iop", "start",
                "study_uid", "frame_uid", "_ids", "_geo_problem", "_resample_note", "_bad_files", "_suv_check"}
    series_df = pd.DataFrame([{k: v for k, v in s.items() if k not in internal} for s in series_rows],
                             columns=SERIES_SCHEMA.names)
    if not series_df.empty:
        series_df = series_df.sort_values(["subject_id", "days_from_first_scan", "minutes_from_first_scan", "series_key"],
                                          na_position="last", kind="stable").reset_index(drop=True)
    files_df = pd.DataFrame(files_rows, columns=FILES_SCHEMA.names)
    skipped_df = pd.DataFrame(sorted(skipped, key=lambda r: r["path"]), columns=SKIPPED_SCHEMA.names)
    dt_total = time.perf_counter() - t0
    stats = {"n_files": float(n), "seconds": dt_total, "read_seconds": t_read,
             "files_per_s": n / t_read if t_read > 0 else math.nan}
    bar.close(f"indexed {n} files in {dt_total:.1f} s ({stats['files_per_s']:.0f} files/s): "
              f"{len(series_df)} series, {len(skipped_df)} skipped")
    failures_df = pd.DataFrame(failures, columns=FAILURES_SCHEMA.names)
    return IndexResult(series_df, files_df, skipped_df, problems, warnings, stats, failures_df)


# ------------------------------------------------------------------------------------------
# writing and the command

def _write(df: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    from .tables import write_table

    write_table(df, schema, path)


def output_paths(series_path: str | Path) -> tuple[Path, Path, Path]:
    """(series, files, skipped) table paths: `<stem>.parquet`, `<stem>_files.parquet`, `<stem>_skipped.parquet`."""
    p = Path(series_path)
    stem = p.name[:-len(".parquet")] if p.name.endswith(".parquet") else p.stem
    return p, p.with_name(f"{stem}_files.parquet"), p.with_name(f"{stem}_skipped.parquet")


def write_index(result: IndexResult, series_path: str | Path, files_path: str | Path | None = None,
                skipped_path: str | Path | None = None, failures_path: str | Path | None = None
                ) -> tuple[Path, Path, Path]:
    """Write the three tables (default paths: :func:`output_paths`); the series table last. With
    `failures_path`, the failures table too (FAILURES_SCHEMA)."""
    sp, fp, kp = output_paths(series_path)
    fp, kp = Path(files_path or fp), Path(skipped_path or kp)
    _write(result.files, FILES_SCHEMA, fp)
    _write(result.skipped, SKIPPED_SCHEMA, kp)
    if failures_path is not None:
        _write(result.failures, FAILURES_SCHEMA, Path(failures_path))
    _write(result.series, SERIES_SCHEMA, sp)
    return sp, fp, kp


def read_overrides(path: str | Path) -> dict[tuple[str, str], str]:
    """Overrides TSV: columns subject_id, session, series_key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"overrides file {p} not found")
    df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
    missing = {"subject_id", "session", "series_key"} - set(df.columns)
    if missing:
        raise UserError(f"overrides file {p}: missing column(s) {sorted(missing)}")
    return {(r.subject_id.strip(), r.session.strip()): r.series_key.strip() for r in df.itertuples()}


def summary_text(result: IndexResult) -> str:
    s, k = result.series, result.skipped
    lines = []
    roles = s["role"].value_counts() if not s.empty else pd.Series(dtype=int)
    lines.append("series by role: " + (", ".join(f"{r} {int(n)}" for r, n in roles.items()) or "none"))
    if not s.empty:
        sel = s[s["selected"] & (s["role"] == "pet_ac")]
        n_subj = s["subject_id"].nunique()
        ses = ", ".join(f"{x} {int((sel['session'] == x).sum())}" for x in SESSIONS)
        lines.append(f"subjects: {n_subj}; sessions selected: {ses}")
        pet = s[s["role"].isin(["pet_ac", "pet_nac"])]
        if not pet.empty:
            tr = pet["tracer"].fillna("unknown").value_counts()
            lines.append("PET series by tracer: " + ", ".join(f"{t} {int(n)}" for t, n in tr.items()))
    kr = k["reason"].value_counts() if not k.empty else pd.Series(dtype=int)
    lines.append("skipped files: " + (", ".join(f"{r} {int(n)}" for r, n in kr.items()) or "none"))
    for p in result.problems:
        lines.append("problem: " + p)
    for row in result.failures.itertuples():
        if row.message not in result.problems:
            lines.append(f"{row.status}: {row.message}")
    for w in result.warnings:
        lines.append("warning: " + w)
    return "\n".join(lines)


def run_index(args: Any) -> int:
    """`glandpet index DICOM_ROOT -o series.parquet [--subjects SHEET] [--jobs N]`."""
    root = Path(args.dicom_root)
    overrides = None
    if getattr(args, "overrides", None):
        overrides = read_overrides(args.overrides)
    subjects = getattr(args, "subjects", None) or None
    result = index_tree(root, subjects, jobs=int(getattr(args, "jobs", 1) or 1), progress=True,
                        overrides=overrides)
    sp, fp, kp = write_index(result, args.output)
    print(summary_text(result))
    print(f"wrote {sp}, {fp.name}, {kp.name}")
    return 0

"""Reading a DICOM tree's headers into instance records: which files, whose, and one record per file.

:func:`files_to_read` lists the files under the root (or under each subject's folder) and who owns
them; :func:`read_header` reads one file's header (never its pixels) into an
:class:`~glandpet.dicom.catalog_records.InstanceRecord`, or a skip record saying why it is not indexed
(not DICOM, empty, truncated, DICOMDIR, unsupported SOP class, ...); :func:`read_headers` reads
many, in worker processes when asked. Identifying header elements are read only to drop text that
contains them (``ids``); they are never stored.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from glandpet.dicom.tracers import classify_dataset

__all__ = ["read_header", "read_headers", "files_to_read", "clear_caches", "sort_records"]

_IDENTIFYING = [
    "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "OtherPatientIDs", "OtherPatientNames",
    "IssuerOfPatientID", "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "InstitutionalDepartmentName",
    "RequestingPhysician", "StationName", "DeviceSerialNumber",
]

_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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
    rules of :mod:`glandpet.suv.factors` on the first instance read (per-series fields are the same in every
    slice; per-slice times only refine the scan time)."""
    from glandpet.errors import SUVError
    from glandpet.suv.factors import suv_result

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
    """Header record of one file (:class:`~glandpet.dicom.catalog_records.InstanceRecord`), or a skip record
    {'path', 'skip', 'detail'}."""
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


def files_to_read(root: Path, subjects: pd.DataFrame | None
                  ) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, Path], dict[str, str]]:
    """The files to read and whose they are: (absolute, relative path) pairs in walking order, the
    owner of each relative path by subject folder, each subject's folder and the sheet's
    PatientID -> subject map. With a sheet of folders only, only those folders are walked; else
    the whole root."""
    folder_of: dict[str, Path] = {}
    pid_to_subject: dict[str, str] = {}
    if subjects is not None:
        from glandpet.study.subjects import subject_folders

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
    return items, owner, folder_of, pid_to_subject


def clear_caches() -> None:
    """Forget the per-series tracer and SUV checks: they hold within one index run only (files may
    change between runs)."""
    _TRACER_CACHE.clear()
    _SUV_CACHE.clear()


def read_headers(items: list[tuple[str, str]], jobs: int, bar: Any) -> list[dict]:
    """The records of `items` ((absolute, relative path) pairs), in their order: read by `jobs`
    worker processes when there are more than 64 files, else here; `bar` (a
    :class:`glandpet.progress.Progress`) counts the files read."""
    records: list[dict] = []
    n = len(items)
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
    return records


def sort_records(records: list[dict]) -> tuple[list[dict], list[dict], dict[str, list[str]], set[str]]:
    """(instance records, skipped-table rows, series UID -> details of its truncated files, paths of
    those truncated files) of the records read."""
    skipped: list[dict] = [{"path": r["path"], "reason": r["skip"], "detail": r.get("detail")} for r in records if "skip" in r]
    bad_files: dict[str, list[str]] = defaultdict(list)  # series UID -> details of its truncated files
    for r in records:
        if "skip" in r and r.get("series_uid"):
            bad_files[r["series_uid"]].append(r.get("detail") or r["skip"])
    insts = [r for r in records if "skip" not in r]
    attributed = {r["path"] for r in records if "skip" in r and r.get("series_uid")}
    return insts, skipped, bad_files, attributed

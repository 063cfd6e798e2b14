"""Grouping instance records into series records: subjects, duplicates, series (split when mixed), role, geometry and scan times.

Instances are grouped by subject and SeriesInstanceUID; a series that mixes modalities, SOP classes,
image sizes, pixel spacings or orientations is split into parts. Each series record gets its role
(ct, pet_ac, pet_nac, localizer, other: the rules in :mod:`glandpet.dicom.catalog`), its slice
geometry and order, whether it is one regular volume (:func:`glandpet.dicom.series.volume_geometry_problem`,
the reader's own check, on the headers), its identifier-free description and its time from the
subject's first scan; a files-table row lists its files in slice order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Iterable, Mapping

import numpy as np

from glandpet.dicom.catalog_records import SeriesRecord, salted_key, subject_pseudonym
from glandpet.dicom.series import volume_geometry_problem
from glandpet.errors import UserError

__all__ = ["assign_subjects", "drop_duplicates", "group_series", "add_scan_times"]

_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture (and its multi-frame variants)
_CT_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_PET_CLASSES = {"1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.128.1"}
_NAC_RE = re.compile(r"(?<![A-Z])(NAC|NOAC|NON ?AC|NON ?ATTN|NO ?ATTN|NO ?AC|UNCORR\w*|NOT ?CORRECTED)(?![A-Z])")
_MIP_RE = re.compile(r"(?<![A-Z])(MIP|MIPS|PROJECTION)(?![A-Z])")


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
        problem = volume_geometry_problem(proj, [i["ipp"] for i in insts], normal)
        out["problem"] = problem.message if problem else None
        pos = np.array([insts[i]["ipp"] for i in np.argsort(proj, kind="stable")], dtype=float)
        dist = np.sort(proj)
        drift = np.linalg.norm((pos - pos[0]) - np.outer(dist - dist[0], normal), axis=1)
        straight = float(drift.max()) <= 0.01 + 1e-3 * abs(dist[-1] - dist[0])
        if problem and problem.kind == "unequal_spacing" and straight:
            gaps = np.diff(dist)
            out["resample_note"] = (f"unequal slice spacing ({gaps.min():.1f}-{gaps.max():.1f} mm) resampled by dcm2niix "
                                    "to equidistant slices")
        elif problem and problem.kind == "tilt":
            angle = float(np.degrees(np.arctan2(drift[-1], abs(dist[-1] - dist[0]) or 1.0)))
            out["resample_note"] = (f"gantry tilt {angle:.1f} deg corrected by glandpet (each slice shifted within its "
                                    "plane onto a rectangular grid, from the slice positions)")
    out["order"] = order
    return out


def _split_key(i: dict) -> tuple:
    iop = tuple(round(x, 3) for x in i["iop"]) if i["iop"] else None
    ps = tuple(round(x, 4) for x in i["pixel_spacing"]) if i["pixel_spacing"] else None
    return (i["modality"] or "", i["sop_class"] or "", i["rows"] or 0, i["columns"] or 0, iop or (), ps or ())



def assign_subjects(insts: list[dict], owner: Mapping[str, str], pid_to_subject: Mapping[str, str], sheet: bool,
                    salt: str | None, skipped: list[dict]) -> list[dict]:
    """The instances that belong to a subject, each with its ``subject_id``: the owner of its folder,
    else the sheet row of its PatientID, else (no `sheet`) a pseudonym of its PatientID; the others
    are appended to `skipped` as "patient not in subject sheet"."""
    for r in insts:
        sid = owner.get(r["path"])
        if sid is None and pid_to_subject:
            sid = pid_to_subject.get(r["patient_id"] or "")
        if sid is None and not sheet:
            base = r["patient_id"] or ("nopatientid:" + (r["study_uid"] or r["series_uid"]))
            sid = subject_pseudonym(base, salt)
        r["subject_id"] = sid
    for r in insts:
        if r["subject_id"] is None:
            skipped.append({"path": r["path"], "reason": "patient not in subject sheet", "detail": None})
    insts = [r for r in insts if r["subject_id"] is not None]
    return insts


def drop_duplicates(insts: list[dict], skipped: list[dict]) -> list[dict]:
    """The instances, sorted by path, with each SOPInstanceUID once (its first path); the other copies
    are appended to `skipped` as "duplicate instance". One instance in two subjects' folders is a UserError."""
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
    return kept


def group_series(kept: list[dict], bad_files: Mapping[str, list[str]], salt: str | None
                 ) -> tuple[list[SeriesRecord], list[dict]]:
    """One series record per subject and series (per part of a mixed series), classified, and its
    files-table row (paths in slice order); `bad_files`: series UID -> details of its truncated files."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in kept:
        groups[(r["subject_id"], r["series_uid"])].append(r)
    series_rows: list[SeriesRecord] = []
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
    return series_rows, files_rows


def add_scan_times(series_rows: list[SeriesRecord]) -> None:
    """Set ``days_from_first_scan`` and ``minutes_from_first_scan`` of each series: from the subject's
    first imaging series (no calendar date is kept)."""
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

"""The failures table: every subject and session the catalog finds unusable, or worth a warning, from the headers alone.

Everything that would break a subject or a session and can be seen in the headers, without reading
pixels: a subject's folder missing or empty or without DICOM images, no PET, no PSMA / FAPI tracer, an
ambiguous session, and for the selected PET and its CT: no CT, truncated files, not one regular volume
(a CT whose only fault is unequal spacing or gantry tilt is a ``warning``: the converter corrects it), a
compressed transfer syntax without a decoder, a PET header that cannot give SUV or not the requested
``suv_type``. Each row (:data:`FAILURES_SCHEMA`) names the subject, the session, the series (number and
description) and the cause; never an identifier. Also the warning when file paths hold an identifier.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import pyarrow as pa

from glandpet.dicom.catalog_records import SeriesRecord, series_label
from glandpet.problems import Problem
from glandpet.tables import PROBLEM_FIELDS

__all__ = ["FAILURES_SCHEMA", "DECODER_CACHE", "decoder_problem", "failure_rows", "identifier_warnings"]

# Subjects and sessions the index found unusable (or worth a warning): the workflow leaves failed
# sessions out of its DAG and the cohort tables step copies these rows into qc.parquet.
FAILURES_SCHEMA = pa.schema(PROBLEM_FIELDS)  # status failed | warning

_INSTALL = {
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg + pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg + pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
}
DECODER_CACHE: dict[str, str | None] = {}  # transfer syntax -> decoder_problem's answer (per process; tests reset it)


def decoder_problem(transfer_syntax: str | None) -> str | None:
    """None when pydicom can decode pixel data of this transfer syntax here; else the message
    naming the syntax and what to install (or how to decompress the series)."""
    if not transfer_syntax:
        return None
    if transfer_syntax in DECODER_CACHE:
        return DECODER_CACHE[transfer_syntax]
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
    DECODER_CACHE[transfer_syntax] = msg
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
            from glandpet.suv.factors import SUV_CHOICES

            key = SUV_CHOICES.get(suv_type)
            if key in nulls:
                causes.append(f"cannot give SUV type '{suv_type}': the header lacks PatientSize and/or PatientSex "
                              f"(0010,1020 / 0010,0040); choose suv_type: bw")
    return causes


def _ct_resampled(s: dict) -> str | None:
    """What the converter will correct in this CT (glandpet.dicom.ct_dcm2niix), else None: unequal slice
    spacing of a stack that is otherwise regular (dcm2niix), or a gantry tilt of an equally spaced stack
    (glandpet's de-shear); never both, nor two slices at one position."""
    if s["role"] == "ct" and s["_resample_note"] and not s["_bad_files"]:
        return s["_resample_note"]
    return None


def failure_rows(series_rows: list[SeriesRecord], by_subject: Mapping[str, list[SeriesRecord]],
                 ambiguous: Mapping[tuple[str, str], str], subjects: pd.DataFrame | None, folder_of: Mapping[str, Path],
                 skipped: list[dict], owner: Mapping[str, str], suv_type: str | None,
                 attributed: Iterable[str] = ()) -> list[dict]:
    """Failure / warning rows (FAILURES_SCHEMA) and the ``problem`` of each unusable selected PET (set in place)."""
    out: list[dict] = []

    def add(sid: str, ses: str | None, status: str, msg: str) -> None:
        out.append(Problem(sid, ses, "index", status, msg).fields())

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


def identifier_warnings(series_rows: list[SeriesRecord], files_rows: list[dict]) -> list[str]:
    """The warning when the first file path of some series holds an identifier string of its headers
    (folders named after patients): the files table stores those paths."""
    warnings: list[str] = []
    warnings: list[str] = []
    n_bad = 0
    for s, f in zip(series_rows, files_rows):
        low_ids = [i.lower() for i in s["_ids"] if len(i) >= 3]
        if any(any(i in p.lower() for i in low_ids) for p in f["paths"][:1]):
            n_bad += 1
    if n_bad:
        warnings.append(f"{n_bad} series have a patient identifier in their folder or file names; the files table "
                        "stores those paths (keep it with the linkage key, not with shared results)")
    return warnings

"""Ranking and selecting series records: one PET and its CT per subject and session.

Per subject and session, the candidates are the ``pet_ac`` records of that tracer family:

* none: the session is missing (allowed; downstream handles it);
* one: selected ("only candidate");
* an override ``overrides[(subject_id, session)] = series_key`` selects that series (checked by
  :func:`check_overrides`);
* several of one acquisition (:func:`same_acquisition`): the first by :func:`pet_rank`;
* several acquisitions: ambiguous (:func:`ambiguity_message`), none selected.

The CT paired with a selected PET is selected too and carries its session (:func:`select_paired_cts`);
which CT a PET pairs with is decided by :func:`ct_rank` (:mod:`glandpet.dicom.catalog_pairing`).
"""

from __future__ import annotations

import math
from typing import Mapping

from glandpet.dicom.catalog_records import SeriesRecord
from glandpet.errors import UserError
from glandpet.glands import SESSIONS

__all__ = ["ct_rank", "pet_rank", "same_acquisition", "ambiguity_message", "check_overrides", "select_sessions",
           "select_paired_cts"]


def ct_rank(ct: SeriesRecord, pet: SeriesRecord) -> tuple:
    """Sort key of a CT for `pet` (smallest first): axial, closest acquisition time, most slices, highest
    series number, then series key."""
    dtv = abs((ct["start"] - pet["start"]).total_seconds()) if ct["start"] and pet["start"] else math.inf
    return (ct["orientation"] != "axial", dtv, -(ct["n_slices"] or 0), -(ct["series_number"] or 0), ct["series_key"])


def pet_rank(c: SeriesRecord) -> tuple:
    """Sort key of reconstructions of one acquisition (smallest first): CT paired by frame of reference,
    ImageType ORIGINAL over DERIVED, finest voxels (smallest voxel volume: glands are small), most slices,
    highest series number, then series key."""
    ps = c["pixel_spacing_mm"] or [math.inf, math.inf]
    vox = ps[0] * ps[1] * (c["slice_spacing_mm"] or c["slice_thickness_mm"] or math.inf)
    return (c["pairing_rule"] != "frame_of_reference",
            bool(c["image_type_tuple"]) and c["image_type_tuple"][0] == "DERIVED",
            round(vox, 3), -(c["n_slices"] or 0), -(c["series_number"] or 0), c["series_key"])


def same_acquisition(a: SeriesRecord, b: SeriesRecord) -> bool:
    """Whether two PET records can be reconstructions of one scan: same study, no differing frame of
    reference, first acquisition times within 30 min."""
    if a["study_uid"] != b["study_uid"]:
        return False
    if a["frame_uid"] and b["frame_uid"] and a["frame_uid"] != b["frame_uid"]:
        return False
    if a["start"] and b["start"] and abs((a["start"] - b["start"]).total_seconds()) > 30 * 60:
        return False
    return True


def ambiguity_message(subject: str, session: str, cands: list[SeriesRecord]) -> str:
    """The problem of a session with PET series of several acquisitions: names each candidate by series
    key, tracer, day, slices and description, and asks for an override."""
    parts = []
    for c in cands:
        parts.append(
            f"{c['series_key']} ({c['tracer'] or 'unknown tracer'}, day {c['days_from_first_scan']}, "
            f"{c['n_slices']} slices, '{c['series_description'] or ''}')"
        )
    return (f"subject {subject}, session {session}: {len(cands)} attenuation-corrected PET series from different "
            f"acquisitions: {', '.join(parts)}; choose one with an override (subject_id, session, series_key)")


def check_overrides(overrides: Mapping[tuple[str, str], str], by_subject: Mapping[str, list[SeriesRecord]],
                    keyed: Mapping[str, SeriesRecord]) -> None:
    """Raise a UserError for an override whose session is unknown, whose subject is not indexed, or whose
    series is not an attenuation-corrected PET of that subject with that session's tracer (or an unknown one)."""
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


def select_sessions(by_subject: Mapping[str, list[SeriesRecord]], keyed: Mapping[str, SeriesRecord],
                    overrides: Mapping[tuple[str, str], str]) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Select the PET of each subject and session (in place: ``selected``, ``selection_rule``, and
    ``session`` of an override); returns the ambiguity problems and {(subject, session): problem}."""
    problems: list[str] = []
    ambiguous: dict[tuple[str, str], str] = {}
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
            if not all(same_acquisition(ref, c) for c in cands[1:]):
                msg = ambiguity_message(sid, ses, cands)
                problems.append(msg)
                ambiguous[(sid, ses)] = msg
                for c in cands:
                    c["selection_rule"] = "ambiguous: several acquisitions; needs an override"
                continue
            ranked = sorted(cands, key=pet_rank)
            ranked[0]["selected"] = True
            ranked[0]["selection_rule"] = (f"preferred among {len(cands)} reconstructions of one acquisition "
                                           "(CT by frame of reference, ORIGINAL, finest voxels, most slices, latest series)")
            for c in ranked[1:]:
                c["selection_rule"] = f"another reconstruction of the acquisition of {ranked[0]['series_key']}"
    return problems, ambiguous


def select_paired_cts(series_rows: list[SeriesRecord], keyed: Mapping[str, SeriesRecord]) -> None:
    """Select the CT paired with each selected PET (in place), with that PET's session."""
    for s in series_rows:
        if s["selected"] and s["role"] == "pet_ac" and s["paired_ct_key"]:
            ct = keyed[s["paired_ct_key"]]
            if not ct["selected"]:
                ct["selected"], ct["session"] = True, s["session"]
                ct["selection_rule"] = f"CT of the selected {s['session']} PET {s['series_key']} ({s['pairing_rule']})"

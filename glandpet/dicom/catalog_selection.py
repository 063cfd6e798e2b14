"""Ranking and selecting series records: one PET and its CT per subject and session.

A session is a tracer family at a time point (:func:`glandpet.layout.session_name`): ``psma`` / ``fapi`` the
baseline, ``psma2`` / ``fapi2`` the first follow-up, ``psma3`` ... Per subject and tracer family, the
candidates are the ``pet_ac`` records of that family; they are grouped into acquisitions
(:func:`same_acquisition`: reconstructions of one scan) and the acquisitions into time points by their day
(``days_from_first_scan``): the earliest day is the baseline, each later day the next time point (numbered by
distinct day). Per time point:

* no candidate: the session is missing (allowed; downstream handles it);
* one: selected ("only candidate");
* an override ``overrides[(subject_id, session)] = series_key`` selects that series for that session (any
  session name, ``psma2`` too; checked by :func:`check_overrides`); an overridden series is no automatic
  candidate of any session, and a time point whose session is overridden selects nothing else. A series
  named by an override counts with its day among its family's time points, so naming a duplicate never
  renumbers the later days;
* several of one acquisition: the first by :func:`pet_rank`;
* several acquisitions on the same day (a repeat scan): ambiguous (:func:`ambiguity_message`), none
  selected; the other time points are still selected.

When an acquisition has no day (no acquisition, series or study date), the family's acquisitions cannot be
ordered: one acquisition is the baseline, several are ambiguous (session ``psma`` / ``fapi``).

The selected PET's ``session`` is its time point's session (``tracer_session`` stays the family); the other
candidates of a time point carry its session too. The CT paired with a selected PET is selected too and
carries its session (:func:`select_paired_cts`); which CT a PET pairs with is decided by :func:`ct_rank`
(:mod:`glandpet.dicom.catalog_pairing`).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Mapping

from glandpet.dicom.catalog_records import SeriesRecord
from glandpet.errors import UserError
from glandpet.glands import SESSIONS
from glandpet.layout import is_session, session_name, session_order, session_parts

__all__ = ["ct_rank", "pet_rank", "same_acquisition", "acquisitions", "time_points", "ambiguity_message",
           "check_overrides", "select_sessions", "select_paired_cts"]

#: How messages name the valid session forms.
SESSION_FORMS = "psma or fapi (baseline), psma2, fapi2, psma3, ... (follow-ups)"


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


def acquisitions(cands: list[SeriesRecord]) -> list[list[SeriesRecord]]:
    """The PET records grouped into acquisitions (each record joins the first group it is
    :func:`same_acquisition` with every member of), in order of acquisition time (records without one last)."""
    groups: list[list[SeriesRecord]] = []
    for c in sorted(cands, key=lambda c: (c["start"] is None, c["start"] or datetime.min, c["series_key"])):
        for g in groups:
            if all(same_acquisition(c, x) for x in g):
                g.append(c)
                break
        else:
            groups.append([c])
    return groups


def _day(group: list[SeriesRecord]) -> int | None:
    days = [c["days_from_first_scan"] for c in group if c["days_from_first_scan"] is not None]
    return min(days) if days else None


def time_points(groups: list[list[SeriesRecord]]) -> list[tuple[int | None, list[list[SeriesRecord]]]]:
    """The acquisitions of one tracer family by time point: ``[(day, acquisitions of that day), ...]`` in
    order of day (the first is the baseline). One acquisition without a day is one time point of day None;
    several acquisitions of which one has no day cannot be ordered: one time point of day None holding them all."""
    days = [_day(g) for g in groups]
    if None in days:
        return [(None, groups)] if groups else []
    return [(d, [g for g, gd in zip(groups, days) if gd == d]) for d in sorted(set(days))]


def ambiguity_message(subject: str, session: str, cands: list[SeriesRecord], day: int | None = None) -> str:
    """The problem of a session with PET series of several acquisitions (on one `day`, when known): names
    each candidate by series key, tracer, day, slices and description, and asks for an override."""
    parts = []
    for c in cands:
        parts.append(
            f"{c['series_key']} ({c['tracer'] or 'unknown tracer'}, day {c['days_from_first_scan']}, "
            f"{c['n_slices']} slices, '{c['series_description'] or ''}')"
        )
    when = f" on day {day}" if day is not None else ""
    return (f"subject {subject}, session {session}: {len(cands)} attenuation-corrected PET series from different "
            f"acquisitions{when}: {', '.join(parts)}; choose one with an override (subject_id, session, series_key)")


def check_overrides(overrides: Mapping[tuple[str, str], str], by_subject: Mapping[str, list[SeriesRecord]],
                    keyed: Mapping[str, SeriesRecord]) -> None:
    """Raise a UserError for an override whose session is not a session name (:func:`glandpet.layout.is_session`),
    whose subject is not indexed, whose series is not an attenuation-corrected PET of that subject with that
    session's tracer family (or an unknown tracer), or whose series is named for two sessions."""
    named: dict[tuple[str, str], str] = {}
    for (osid, oses), okey in overrides.items():
        if not is_session(oses):
            raise UserError(f"override for subject {osid}: unknown session {oses!r} (expected {SESSION_FORMS})")
        family = session_parts(oses)[0]
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
        if s["tracer_session"] not in (None, family):
            raise UserError(f"override for subject {osid}, session {oses}: series {okey} has tracer {s['tracer']} "
                            f"(session {s['tracer_session']}), not a {family} tracer")
        other = named.get((osid, okey))
        if other is not None:
            first, second = sorted((other, oses), key=session_order)
            raise UserError(f"override for subject {osid}: series {okey} is named for sessions {first} and {second}; "
                            "a series is the PET of one session")
        named[(osid, okey)] = oses


def select_sessions(by_subject: Mapping[str, list[SeriesRecord]], keyed: Mapping[str, SeriesRecord],
                    overrides: Mapping[tuple[str, str], str]) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Select the PET of each subject and session (in place: ``selected``, ``selection_rule`` and ``session``,
    the time point's session, of the candidates); returns the ambiguity problems and {(subject, session): problem}."""
    problems: list[str] = []
    ambiguous: dict[tuple[str, str], str] = {}
    for sid, ss in sorted(by_subject.items()):
        by_override = {ses: keyed[okey] for (osid, ses), okey in overrides.items() if osid == sid}
        for ses, chosen in by_override.items():
            chosen["session"] = ses
            chosen["selected"], chosen["selection_rule"] = True, "override"
        named = {c["series_key"]: ses for ses, c in by_override.items()}
        for family in SESSIONS:
            # the family's acquisitions, the overridden series among them: they fix the days' numbering
            pool = [p for p in ss if p["role"] == "pet_ac" and (p["tracer_session"] == family or (
                p["series_key"] in named and session_parts(named[p["series_key"]])[0] == family))]
            points = time_points(acquisitions(pool))
            for t, (day, groups) in enumerate(points, 1):
                ses = session_name(family, t)
                groups = [g for g in ([c for c in g if c["series_key"] not in named] for g in groups) if g]
                cands = [c for g in groups for c in g]
                for c in cands:
                    c["session"] = ses
                if ses in by_override:
                    chosen = by_override[ses]["series_key"]
                    for c in cands:
                        c["selection_rule"] = f"not selected: the override chose {chosen} for {ses}"
                    continue
                if not groups:
                    continue
                if len(groups) > 1:
                    msg = ambiguity_message(sid, ses, cands, day)
                    problems.append(msg)
                    ambiguous[(sid, ses)] = msg
                    for c in cands:
                        c["selection_rule"] = "ambiguous: several acquisitions; needs an override"
                    continue
                ranked = sorted(groups[0], key=pet_rank)
                rule = ("only candidate" if len(ranked) == 1 else
                        f"preferred among {len(ranked)} reconstructions of one acquisition (CT by frame of reference, "
                        "ORIGINAL, finest voxels, most slices, latest series)")
                if len(points) > 1:
                    what = (f"baseline of {len(points)} {family} time points" if t == 1 else
                            f"follow-up {ses}: time point {t} of {family}")
                    rule = f"{what} (day {day}); {rule}"
                ranked[0]["selected"], ranked[0]["selection_rule"] = True, rule
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

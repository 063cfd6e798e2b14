"""Pairing each PET series record with a CT of the same subject, and giving each PET the session its tracer names.

A PET (``pet_ac`` or ``pet_nac``) gets ``session`` = its tracer family (psma | fapi, else None; the
selection renames a follow-up's PET ``psma2``, ... by its day) and the CT it pairs with (``paired_ct_key``,
``pairing_rule``), by the first rule that finds a CT:

1. ``frame_of_reference``: a CT of the subject with the same FrameOfReferenceUID;
2. ``study_closest_time``: else a CT of the same study;
3. ``same_day_closest_time``: else a CT acquired the same day within 3 h (PET and CT exported as two studies);
4. else ``pairing_rule`` "no CT".

Among the CTs a rule finds, the best by :func:`glandpet.dicom.catalog_selection.ct_rank`.
"""

from __future__ import annotations

from collections import defaultdict

from glandpet.dicom.catalog_records import SeriesRecord
from glandpet.dicom.catalog_selection import ct_rank

__all__ = ["pair_pets_with_cts"]


def pair_pets_with_cts(series_rows: list[SeriesRecord]) -> dict[str, list[SeriesRecord]]:
    """Pair each PET record with its CT (in place; every record gets ``session``, ``paired_ct_key``,
    ``pairing_rule``, ``selected`` False and ``selection_rule`` None first) and return the records
    by subject, in their order."""
    by_subject: dict[str, list[SeriesRecord]] = defaultdict(list)
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
            best = min(cands, key=lambda c: ct_rank(c, p))
            p["paired_ct_key"], p["pairing_rule"] = best["series_key"], rule
    return by_subject

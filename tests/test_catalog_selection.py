"""Selecting one PET per subject and session from synthetic series records (no DICOM): time points from the
scan days (psma, psma2, ...), same-day duplicates, reconstructions, overrides and the paired CTs."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from glandpet.dicom.catalog_selection import check_overrides, select_paired_cts, select_sessions
from glandpet.errors import UserError

T0 = datetime(2024, 3, 1, 10, 0)


def pet(key: str, family: str | None, day: int | None, *, minute: int = 0, study: str | None = None,
        frame: str | None = None, spacing: float = 4.0, ct: str | None = None, subject: str = "s1") -> dict:
    """A pet_ac series record as the pairing stage leaves it (session = its tracer family); ``day`` None:
    no acquisition time at all."""
    start = T0 + timedelta(days=day, minutes=minute) if day is not None else None
    return {
        "subject_id": subject, "series_key": key, "role": "pet_ac", "tracer": {"psma": "PSMA-11", "fapi": "FAPI-46"}.get(family),
        "tracer_session": family, "session": family, "study_uid": study or f"study-{key}", "frame_uid": frame or f"frame-{key}",
        "start": start, "days_from_first_scan": day, "minutes_from_first_scan": None,
        "paired_ct_key": ct, "pairing_rule": "frame_of_reference" if ct else "no CT", "selected": False,
        "selection_rule": None, "pixel_spacing_mm": [spacing, spacing], "slice_spacing_mm": 3.0, "slice_thickness_mm": 3.0,
        "image_type_tuple": ("ORIGINAL", "PRIMARY"), "n_slices": 5, "series_number": 3, "series_description": "WB",
    }


def ct(key: str, day: int, subject: str = "s1") -> dict:
    return {"subject_id": subject, "series_key": key, "role": "ct", "tracer_session": None, "session": None,
            "selected": False, "selection_rule": None, "start": T0 + timedelta(days=day), "days_from_first_scan": day}


def run(records: list[dict], overrides: dict | None = None) -> tuple[list[str], dict, dict[str, dict]]:
    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject_id"], []).append(r)
    keyed = {r["series_key"]: r for r in records}
    overrides = overrides or {}
    check_overrides(overrides, by_subject, keyed)
    problems, ambiguous = select_sessions(by_subject, keyed, overrides)
    select_paired_cts(records, keyed)
    return problems, ambiguous, keyed


def selected(keyed: dict[str, dict], role: str = "pet_ac") -> dict[str, str]:
    """{session: series_key} of the selected records of a role."""
    out = {}
    for k, r in keyed.items():
        if r["selected"] and r["role"] == role:
            assert r["session"] not in out, r["session"]
            out[r["session"]] = k
    return out


def test_one_scan_per_tracer_keeps_the_baseline_names():
    problems, _, keyed = run([pet("p", "psma", 0), pet("f", "fapi", 14)])
    assert problems == [] and selected(keyed) == {"psma": "p", "fapi": "f"}
    assert keyed["p"]["selection_rule"] == keyed["f"]["selection_rule"] == "only candidate"


def test_scans_on_different_days_are_time_points():
    recs = [pet("p1", "psma", 0, ct="c1"), pet("f1", "fapi", 1, ct="c2"), pet("p2", "psma", 120, ct="c3"),
            pet("f2", "fapi", 121, ct="c4"), ct("c1", 0), ct("c2", 1), ct("c3", 120), ct("c4", 121)]
    problems, ambiguous, keyed = run(recs)
    assert problems == [] and ambiguous == {}
    assert selected(keyed) == {"psma": "p1", "fapi": "f1", "psma2": "p2", "fapi2": "f2"}
    assert selected(keyed, "ct") == {"psma": "c1", "fapi": "c2", "psma2": "c3", "fapi2": "c4"}
    assert keyed["c3"]["selection_rule"] == "CT of the selected psma2 PET p2 (frame_of_reference)"
    assert all(keyed[k]["tracer_session"] == "psma" for k in ("p1", "p2"))  # the family stays
    assert "baseline" in keyed["p1"]["selection_rule"] and "day 0" in keyed["p1"]["selection_rule"]
    rule = keyed["p2"]["selection_rule"]
    assert "follow-up" in rule and "psma2" in rule and "day 120" in rule and "only candidate" in rule


def test_time_points_follow_the_days_not_the_record_order():
    recs = [pet("late", "psma", 300), pet("mid", "psma", 100), pet("first", "psma", 0)]
    problems, _, keyed = run(recs)
    assert problems == [] and selected(keyed) == {"psma": "first", "psma2": "mid", "psma3": "late"}


def test_reconstructions_of_a_follow_up_pick_one():
    recs = [pet("base", "psma", 0),
            pet("coarse", "psma", 90, study="st", frame="fr", spacing=4.0),
            pet("fine", "psma", 90, minute=5, study="st", frame="fr", spacing=2.0)]
    problems, _, keyed = run(recs)
    assert problems == [] and selected(keyed) == {"psma": "base", "psma2": "fine"}
    assert "reconstructions" in keyed["fine"]["selection_rule"] and "psma2" in keyed["fine"]["selection_rule"]
    assert keyed["coarse"]["session"] == "psma2" and not keyed["coarse"]["selected"]
    assert "another reconstruction" in keyed["coarse"]["selection_rule"]


def test_same_day_acquisitions_stay_ambiguous_for_that_time_point_only():
    recs = [pet("a", "psma", 0), pet("b", "psma", 0, minute=240), pet("c", "psma", 90), pet("f", "fapi", 1)]
    problems, ambiguous, keyed = run(recs)
    assert list(ambiguous) == [("s1", "psma")] and problems == [ambiguous[("s1", "psma")]]
    msg = problems[0]
    assert "subject s1, session psma:" in msg and "a (" in msg and "b (" in msg and "c (" not in msg
    assert "override" in msg
    # the later day is still psma2, whatever resolves the duplicate
    assert selected(keyed) == {"psma2": "c", "fapi": "f"}
    assert "ambiguous" in keyed["a"]["selection_rule"] and "ambiguous" in keyed["b"]["selection_rule"]
    for choice, other in (("a", "b"), ("b", "a")):
        problems, _, keyed = run([dict(r, selected=False, selection_rule=None, session=r["tracer_session"]) for r in recs],
                                 {("s1", "psma"): choice})
        assert problems == [] and selected(keyed) == {"psma": choice, "psma2": "c", "fapi": "f"}
        assert keyed[choice]["selection_rule"] == "override" and not keyed[other]["selected"]


def test_a_duplicate_at_a_follow_up_names_the_follow_up():
    recs = [pet("a", "fapi", 0), pet("b", "fapi", 60), pet("c", "fapi", 60, minute=120), pet("d", "fapi", 200)]
    problems, ambiguous, keyed = run(recs)
    assert list(ambiguous) == [("s1", "fapi2")] and "session fapi2" in problems[0] and "day 60" in problems[0]
    assert selected(keyed) == {"fapi": "a", "fapi3": "d"}
    assert keyed["b"]["session"] == keyed["c"]["session"] == "fapi2"
    problems, _, keyed = run([pet("a", "fapi", 0), pet("b", "fapi", 60), pet("c", "fapi", 60, minute=120),
                              pet("d", "fapi", 200)], {("s1", "fapi2"): "c"})
    assert problems == [] and selected(keyed) == {"fapi": "a", "fapi2": "c", "fapi3": "d"}


def test_without_a_day_several_acquisitions_stay_ambiguous():
    recs = [pet("a", "psma", 0), pet("b", "psma", None)]
    problems, ambiguous, keyed = run(recs)
    assert list(ambiguous) == [("s1", "psma")] and not selected(keyed)
    problems, _, keyed = run([pet("a", "psma", None)])
    assert problems == [] and selected(keyed) == {"psma": "a"}


def test_an_override_is_not_also_a_follow_up():
    # the later scan named the baseline: the earlier one is left out, nothing becomes psma2
    problems, _, keyed = run([pet("a", "psma", 0), pet("c", "psma", 90)], {("s1", "psma"): "c"})
    assert problems == [] and selected(keyed) == {"psma": "c"} and keyed["c"]["selection_rule"] == "override"
    assert not keyed["a"]["selected"]
    # the baseline named by hand: the later scan is still the follow-up
    problems, _, keyed = run([pet("a", "psma", 0), pet("c", "psma", 90)], {("s1", "psma"): "a"})
    assert selected(keyed) == {"psma": "a", "psma2": "c"}
    # a baseline of an unknown tracer named by hand counts as a day of its family
    problems, _, keyed = run([pet("x", None, 0), pet("c", "psma", 90)], {("s1", "psma"): "x"})
    assert selected(keyed) == {"psma": "x", "psma2": "c"} and keyed["x"]["session"] == "psma"
    # a follow-up named by hand
    problems, _, keyed = run([pet("a", "psma", 0), pet("c", "psma", 90), pet("d", "psma", 90, minute=90)],
                             {("s1", "psma2"): "d"})
    assert problems == [] and selected(keyed) == {"psma": "a", "psma2": "d"} and not keyed["c"]["selected"]


def test_check_overrides_accepts_follow_up_sessions_and_names_the_forms():
    recs = [pet("a", "psma", 0), pet("f", "fapi", 3), pet("c", "psma", 90)]
    by_subject, keyed = {"s1": recs}, {r["series_key"]: r for r in recs}
    check_overrides({("s1", "psma2"): "c", ("s1", "fapi12"): "f"}, by_subject, keyed)
    for bad in ("psma1", "fdg", "PSMA", "psma02"):
        with pytest.raises(UserError, match="unknown session") as exc:
            check_overrides({("s1", bad): "a"}, by_subject, keyed)
        assert "psma2" in str(exc.value) and "fapi" in str(exc.value)
    with pytest.raises(UserError, match="not a psma tracer"):
        check_overrides({("s1", "psma3"): "f"}, by_subject, keyed)
    with pytest.raises(UserError, match="sessions psma and psma2"):
        check_overrides({("s1", "psma"): "a", ("s1", "psma2"): "a"}, by_subject, keyed)

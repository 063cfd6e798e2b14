"""Per-gland segmentation confidence (glandpet.segmentation.confidence) and the review queue it feeds:
gland_stats columns, qc rows, the report table and the montage's marks. The relation of the
confidence to the true Dice is measured by benchmarks/seg_confidence.py and asserted on real
segmentations in tests/test_segmentation_real_ct.py and tests/test_segmentation_accuracy.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from glandpet.segmentation import confidence as SC
from glandpet import tables

REPO = Path(__file__).resolve().parents[1]


def _ball(shape, c, r):
    idx = np.indices(shape)
    return sum((idx[i] - c[i]) ** 2 for i in range(3)) <= r * r


def _signals(shifts, r=6, n_holders=None, ncc=0.7):
    shape = (40, 40, 40)
    fused = _ball(shape, (20, 20, 20), r)
    voters = [_ball(shape, (20 + s, 20, 20), r) for s in shifts]
    e = SC.region_signals(voters, fused, [ncc] * len(voters), n_holders or len(voters), 0.001)
    ct = np.where(fused, 30.0, -90.0) + np.random.default_rng(0).normal(0, 10, shape)
    return SC.final_signals(e, fused, ct, (1.0, 1.0, 1.0), 0.001)


def test_agreement_is_the_voters_dice_to_the_fusion_and_confidence_falls_with_disagreement():
    tight, loose = _signals([0, 1, -1]), _signals([0, 4, -4, 5, -5])
    assert tight["signals"]["agreement"] > 0.8 > loose["signals"]["agreement"]
    assert len(loose["signals"]["atlas_dice_to_fusion"]) == 5
    assert tight["volume_ml"] == pytest.approx(tight["atlas_volumes_ml"][0])
    ct_, cl = SC.confidence(tight["signals"])[0], SC.confidence(loose["signals"])[0]
    assert 0 <= cl < ct_ <= 1
    assert tight["signals"]["boundary_contrast"] > 3  # 120 HU step over 10 HU noise


def test_each_penalty_lowers_confidence_each_note_only_names_its_reason():
    base = _signals([0, 1, -1])["signals"]
    c0, r0 = SC.confidence(base)
    assert r0 == []
    words = {"voter_fraction": "few atlases", "volume_cv": "volumes spread", "volume_log_ratio": "off the atlases"}
    assert set(SC.PENALTIES) | set(SC.NOTES) == set(words)
    for key, word in words.items():
        good, bad = {**SC.PENALTIES, **SC.NOTES}[key]
        c, reasons = SC.confidence({**base, key: bad + (bad - good)})
        assert any(word in r for r in reasons), (key, c, reasons)
        assert (c < c0) if key in SC.PENALTIES else (c == c0), (key, c, c0)
    assert SC.confidence(base, volume_ml=0.0) == (0.0, ["empty label"])
    assert SC.confidence({**base, "n_voters": 0})[0] == 0.0


def test_the_per_gland_cap_on_voters_is_not_reported_as_few_atlases_voting():
    """With the default ``atlases_per_gland`` 5 and a library of 10, every gland has 5 voters by
    design; the reason "few atlases voted (5 of 10)" was given to every such gland (both parotids of
    okbp-train-1 in the real-CT leave-one-out with 10 atlases), drowning the review queue's real reasons.
    The fraction counts against the voters expected: the holders, at most the cap."""
    shape = (40, 40, 40)
    fused = _ball(shape, (20, 20, 20), 6)
    five = [_ball(shape, (20 + s, 20, 20), 6) for s in (0, 1, -1, 1, 0)]
    capped = SC.region_signals(five, fused, [0.7] * 5, 10, 0.001, max_voters=5)["signals"]
    assert capped["voter_fraction"] == 1.0 and capped["n_expected_voters"] == 5
    assert not any("few atlases" in r for r in SC.confidence(capped)[1])
    # 2 of the 5 expected voted (3 lost at registration or dropped as dissimilar): still reported
    two = SC.region_signals(five[:2], fused, [0.7] * 2, 10, 0.001, max_voters=5)["signals"]
    assert two["voter_fraction"] == pytest.approx(0.4)
    assert "few atlases voted (2 of 5)" in SC.confidence(two)[1]
    # no cap (0 or None): against every holder, as before
    assert SC.region_signals(five, fused, [0.7] * 5, 10, 0.001, max_voters=0)["signals"]["voter_fraction"] == 0.5
    assert SC.region_signals(five, fused, [0.7] * 5, 3, 0.001, max_voters=5)["signals"]["n_expected_voters"] == 3


def test_one_voter_has_no_confidence_and_is_flagged():
    """A gland one atlas voted on agrees with its own fusion whatever its placement (the README
    walkthrough's one-atlas run: 0.87-1.00 on every gland, submandibular Dice 0.12 / 0.22): its
    confidence is unknown and the gland goes to review."""
    one = _signals([0])
    assert one["signals"]["n_voters"] == 1 and one["signals"]["agreement"] > 0.9
    c, reasons = SC.confidence(one["signals"], one["volume_ml"])
    assert c is None and reasons == ["one atlas voted: no second atlas to check it against"]
    e = SC.gland_entry(one)
    assert e["confidence"] is None and json.loads(json.dumps(e))["confidence"] is None
    assert SC.flag(e["confidence"]) == "review"
    assert SC.confidence(_signals([0, 1])["signals"])[0] is not None
    # ranked first for review, below an empty gland's 0
    assert [SC.rank_key(c) for c in (None, float("nan"), 0.0, 0.3)] == [-1.0, -1.0, 0.0, 0.3]


def test_gland_entry_is_json_and_flag_uses_the_threshold():
    e = SC.gland_entry(_signals([0, 3, -3]))
    json.dumps(e)
    assert set(e) == {"confidence", "reasons", "volume_ml", "atlas_volumes_ml", "signals"}
    assert SC.flag(0.3, 0.5) == "review" and SC.flag(0.7, 0.5) == "ok" and SC.flag(None, 0.5) == "review"
    assert SC.flag(float("nan"), 0.5) == "review"


def test_boundary_contrast_is_zero_without_an_edge():
    m = _ball((30, 30, 30), (15, 15, 15), 5)
    flat = np.random.default_rng(1).normal(20, 10, m.shape)
    assert SC.boundary_contrast(m, flat, (1, 1, 1)) < 0.5
    assert SC.boundary_contrast(np.zeros_like(m), flat, (1, 1, 1)) == 0.0


def test_config_default_is_the_module_default():
    import yaml

    schema = yaml.safe_load((REPO / "config.schema.yaml").read_text())
    assert schema["properties"]["segmentation"]["properties"]["review_below"]["default"] == SC.REVIEW_BELOW


# ------------------------------------------------------------------ gland_stats columns
def _qc_json(tmp_path, glands, name="sub-A_ses-psma_desc-segment_qc.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"stage": "segment", "status": "ok", "metrics": {"glands": glands} if glands is not None
                             else {"method": "x"}}))
    return p


def test_measure_columns_from_the_segment_qc(tmp_path):
    from glandpet.segmentation.confidence import seg_confidence_columns

    p = _qc_json(tmp_path, {"parotid_left": {"confidence": 0.42, "reasons": ["x"]},
                            "parotid_right": {"confidence": 0.91, "reasons": []}})
    assert seg_confidence_columns(p, "parotid", "left", 0.6) == dict(
        seg_confidence=0.42, seg_flag="review", segmentation_source="atlas")
    assert seg_confidence_columns(p, "parotid", "right", 0.6)["seg_flag"] == "ok"
    # a person corrected it: trusted
    assert seg_confidence_columns(p, "parotid", "left", 0.6, "corrected") == dict(
        seg_confidence=1.0, seg_flag="ok", segmentation_source="corrected")
    # older results: no per-gland block -> no confidence, review
    old = _qc_json(tmp_path, None, "old.json")
    assert seg_confidence_columns(old, "parotid", "left", 0.6) == dict(
        seg_confidence=None, seg_flag="review", segmentation_source="atlas")


def _stats():
    rows = []
    for sub, conf in (("A", 0.42), ("B", 0.9), ("C", None)):
        for side in ("left", "right"):
            c = conf if side == "left" else 0.95
            rows.append(dict(subject_id=sub, session="psma", gland="parotid", side=side, volume_ml=20.0,
                             seg_confidence=c, seg_flag=SC.flag(c, 0.6), segmentation_source="atlas"))
    return pd.DataFrame(rows)


def test_flagged_glands_become_warning_qc_rows_worst_first_and_the_review_table(tmp_path):
    from glandpet.cohort.report_tables import qc_view, review_queue
    from glandpet.workflow.steps import review_rows

    qa = _qc_json(tmp_path, {"parotid_left": {"confidence": 0.42, "reasons": ["atlases disagree (Dice to fusion 0.50)"],
                                              "volume_ml": 31.0, "atlas_volumes_ml": [18.0, 22.5, 25.0]}})
    rows = review_rows(_stats(), [str(qa)])
    assert [(r["subject_id"], r["stage"], r["status"]) for r in rows] == [
        ("C", "segment_review", "warning"), ("A", "segment_review", "warning")]  # no confidence first
    assert "no confidence recorded" in rows[0]["message"] and "atlases disagree" in rows[1]["message"]
    qc = tables.to_table(pd.DataFrame(rows).assign(pipeline_version="x", config_hash="y"), tables.QC).to_pandas()
    q = review_queue(qc)
    assert list(q.subject_id) == ["C", "A"]
    a = q.iloc[1]
    assert (a.confidence, a.volume_ml, a.atlas_min_ml, a.atlas_max_ml) == (0.42, 31.0, 18.0, 25.0)
    page = qc_view(qc)
    assert "Review queue" in page and "href='../../figures/qc/sub-A_qc.png'" in page
    assert page.index("sub-C_qc.png") < page.index("sub-A_qc.png")
    assert "31.00 (18.00-25.00)" in page


def test_montage_marks_flagged_glands(tmp_path):
    from test_cohort_figures import _phantom

    from glandpet.cohort import figures
    from glandpet.workflow.steps import flagged_glands

    st = _stats()
    st.to_parquet(tmp_path / "sub-A_ses-psma_gland_stats.parquet")
    got = flagged_glands([tmp_path / "sub-A_ses-psma_gland_stats.parquet"], "x/sub-A_ses-psma_space-ct_dseg.nii.gz")
    assert got == {"parotid_left": None}  # C's (last row per gland wins); A's 0.42 before it
    assert flagged_glands([tmp_path / "sub-A_ses-psma_gland_stats.parquet"], "sub-A_ses-fapi_space-ct_dseg.nii.gz") == {}
    ct, _, dseg = _phantom(tmp_path)
    plain = figures.qc_montage(ct, {}, dseg, tmp_path / "plain.png")
    marked = figures.qc_montage(ct, {}, dseg, tmp_path / "marked.png", review={"parotid_left": 0.42})
    from PIL import Image

    def red(p):
        a = np.asarray(Image.open(p).convert("RGB")).astype(int)
        return int(((a[..., 0] > 200) & (a[..., 1] < 80) & (a[..., 2] < 80)).sum())

    assert red(marked) > red(plain) + 200


# ------------------------------------------------------------------ the benchmark's scoring
def test_benchmark_figures_and_leave_one_scan_out_threshold(load_benchmark):
    b = load_benchmark("seg_confidence")
    conf = [0.9, 0.8, 0.3, 0.85, 0.2, 0.7]
    dice = [0.85, 0.8, 0.4, 0.9, 0.5, 0.75]
    ff = b.flag_figures(conf, dice, 0.5)
    assert ff == {"n": 6, "n_low": 2, "recall": 1.0, "flagged": pytest.approx(2 / 6)}
    assert b.spearman(conf, dice) == pytest.approx(31 / 35)  # one swapped pair of six
    loo = b.loo_threshold(conf, dice, ["a", "a", "b", "b", "c", "c"])
    # scan b's threshold comes from c's low gland only (0.2), so b's 0.3 is missed
    assert loo["thresholds"]["b"] == pytest.approx(0.2 + 1e-6) and loo["recall"] == 0.5

"""Parotid segmentation on real planning CTs: a fixed small split of the OpenKBP scans.

Two held-out scans, four atlases from other patients (default settings; one ITK thread per scan, as
the workflow segments, the two scans side by side: the same labels every run). The scans
share no world frame and their fields of view differ (okbp-train-33 stops 5 mm above the parotids
and 30 mm below them; okbp-train-24 runs from the chest to above the head), so the atlases must be
found from the images (:func:`glandpet.registration.sessions.anatomy_translation`) and a lost one must not
vote (:func:`glandpet.segmentation.atlas_registration.lost_atlases`). The bounds below were set from
the measurement of this split (see BOUNDS) and are not to be loosened. Skips where ../shared/data is absent.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from glandpet.segmentation import multi_atlas as S
from glandpet.glands import label_value
from glandpet.segmentation.params import SegmentationParams

OKBP = "openkbp-parotid-ct"
HELD_OUT = ("okbp-train-33", "okbp-train-24")
ATLASES = ("okbp-train-2", "okbp-train-16", "okbp-train-22", "okbp-train-35")
#: bounds on the medians over the four glands (both sides of both scans), set from this split as
#: measured when the test was written (defaults, 2 threads, loaded machine): Dice 0.788 / 0.711
#: (okbp-train-33 right / left), 0.759 / 0.760 (okbp-train-24), median 0.760; volume error -12 /
#: -39 / +22 / +17 %, median |error| 19 %; one of the four atlases lost at registration and
#: rejected on each scan. Margins: 0.04 Dice and 8 points of volume for run-to-run differences
#: (ITK's threaded Mattes MI). 305 CPU-s for the two scans. A later run found all four atlases
#: 'lost' on okbp-train-24 (the per-axis median of two pairs) and Dice 0.00 there; after the
#: strict-majority consensus (test_lost_atlases_never_rejects_without_a_majority): 0.797 / 0.722 /
#: 0.736 / 0.743, median 0.740, volume error -12 / -37 / +12 / +4 %, median |error| 12.1 %. On 2 threads
#: the confidences moved run to run across the review threshold (okbp-train-33 left 0.68 in one run,
#: 0.585 in the next: 3 of 4 flagged, a failure); on one thread per scan (session 12, bit-reproducible):
#: Dice 0.796 / 0.698 / 0.737 / 0.744, median 0.741, volume error -12 / -36 / +18 / +12 %, confidence
#: 0.809 / 0.694 / 0.569 / 0.537 (okbp-train-24's two flagged), 343 s wall for the two scans (313 s in
#: the CI run of 2026-12-07). With ``linear_stage: gland_box`` (atlas_registration.register_atlas_linear,
#: the default since): Dice 0.800 / 0.769 / 0.774 / 0.769, median 0.771, volume error +4 / -14 / +23 / +13 %,
#: no atlas lost, confidence 0.768 / 0.691 / 0.804 / 0.760 (none flagged), 221 s wall.
MIN_MEDIAN_DICE = 0.72
MAX_MEDIAN_ABS_VOLUME_ERROR_PCT = 27.0


def _atlas(d):
    return {"name": d.name, "ct": d / "ct.nii.gz", "labels": d / "labels.nii.gz", "label_table": d / "labels.tsv"}


def _segment(ct: str, atlases: list[dict], out: str, table: str) -> dict:
    """One held-out scan, on one ITK thread as the workflow segments (bit-reproducible); runs in a
    worker process (ITK fixes its thread count at first use)."""
    m = S.segment_subject(ct, atlases, out, table, SegmentationParams.from_config(None), threads=1)
    return {"atlases": m["atlases"], "glands": m["glands"]}


def test_parotid_on_real_ct_small_split(shared_data, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = shared_data / OKBP
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    atlases = [_atlas(root / a) for a in ATLASES]
    dice, verr, lost, conf = [], [], {}, []
    outs = {subj: tmp_path / f"{subj}_dseg.nii.gz" for subj in HELD_OUT}
    # the two scans side by side, one thread each: both cores busy, and the same labels every run
    with ProcessPoolExecutor(len(HELD_OUT), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip(HELD_OUT, pool.map(_segment, [str(root / s / "ct.nii.gz") for s in HELD_OUT],
                                              [atlases] * len(HELD_OUT), [str(outs[s]) for s in HELD_OUT],
                                              [str(tmp_path / f"{s}_dseg.tsv") for s in HELD_OUT])))
    for subj in HELD_OUT:
        m, out = results[subj], outs[subj]
        lost[subj] = {n: a.get("lost_at_stage_a") for n, a in m["atlases"].items() if a.get("lost_at_stage_a")}
        seg = np.asarray(nib.load(str(out)).dataobj)
        truth = np.asarray(nib.load(str(root / subj / "labels.nii.gz")).dataobj)
        for t, side in ((1, "right"), (2, "left")):  # the scans' own label values
            a, b = seg == label_value("parotid", side), truth == t
            dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
            conf.append(m["glands"][f"parotid_{side}"]["confidence"])
            verr.append(100.0 * (a.sum() / b.sum() - 1.0))
    msg = (f"Dice {np.round(dice, 3).tolist()}, volume error % {np.round(verr, 1).tolist()}, lost {lost}, "
           f"confidence {np.round(conf, 3).tolist()}")
    print(msg)
    assert np.median(dice) >= MIN_MEDIAN_DICE, msg
    assert np.median(np.abs(verr)) <= MAX_MEDIAN_ABS_VOLUME_ERROR_PCT, msg
    # issue 18: the per-gland confidence (no truth involved) flags every parotid under Dice 0.6 for
    # review, and at most two of the four. benchmarks/seg_confidence.py (8 held-out scans x 5 atlases):
    # the 4 parotids under Dice 0.6 flagged (confidence <= 0.52), none of the 12 above it (session 9;
    # a re-run of the same scans on 2026-12-06: 3 of the 4, okbp-train-34's right parotid at Dice
    # 0.57 / confidence 0.68 missed, and 1 of the 12 flagged: the registrations differ run to run); this split
    # (4 atlases, loaded machine): confidence 0.807 / 0.682 / 0.578 / 0.556 for Dice 0.791 / 0.709 /
    # 0.753 / 0.755 -- okbp-train-24's two parotids flagged although fine (its atlases agree less)
    from glandpet.segmentation.confidence import REVIEW_BELOW

    flagged = [c < REVIEW_BELOW for c in conf]
    assert all(0.0 <= c <= 1.0 for c in conf), msg
    assert all(f for f, d in zip(flagged, dice) if d < 0.6), msg
    assert sum(flagged) <= 2, msg


#: (subject, atlas) pairs whose unmasked rigid + affine, started from the whole-scan search, ended
#: far from the parotids (error at their midpoint: 88.9 mm, 62.6 mm, 43.5 mm): okbp-train-17 runs
#: from the chest to mid-head, okbp-train-33 is blanked outside a slab around its parotids.
LINEAR_PAIRS = (("okbp-train-17", "okbp-train-33"), ("okbp-train-24", "okbp-train-14"), ("okbp-train-4", "okbp-train-14"))


@pytest.mark.parametrize("subject,atlas", LINEAR_PAIRS)
def test_atlas_linear_stage_lands_on_the_glands_of_a_scan_with_another_field_of_view(shared_data, tmp_path,
                                                                                     subject, atlas):
    """Stage A's linear part (:func:`glandpet.segmentation.atlas_registration.register_atlas_linear`)
    brings the atlas's parotid midpoint within 30 mm of the subject's, in world coordinates, where
    stage A's SyN and stage B can take it on (measured 27.1, 8.2, 6.7 mm; before the gland-box masks
    and the second start: 88.9, 62.6, 43.5 mm, and that atlas's parotids then came out at Dice 0.00
    on okbp-train-17, 0.31 / 0.35 after)."""
    import ants
    import pandas as pd

    from glandpet.registration import field_of_view as F
    from glandpet.registration import transforms
    from glandpet.segmentation import atlas_registration as A

    root = shared_data / OKBP
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    transforms.set_threads(1)

    def midpoint(lab):
        idx = np.argwhere(lab.numpy() > 0)
        return F.world_coords(lab, idx.mean(0)[None])[0]

    s_ct = ants.image_read(str(root / subject / "ct.nii.gz")).clone("float")
    lo, hi = F.head_neck_box(s_ct)
    s_glob = F.resample_iso(F.crop(s_ct, lo, hi), A.ATLAS_SPACING_MM)
    a_ct = ants.image_read(str(root / atlas / "ct.nii.gz")).clone("float")
    a_lab = ants.image_read(str(root / atlas / "labels.nii.gz"))
    alo, ahi = A.atlas_head_neck_box(a_ct)
    a_ct, a_lab = F.crop(a_ct, alo, ahi), F.crop(a_lab, alo, ahi)
    r = A.register_atlas_linear(s_glob, F.resample_iso(a_ct, A.ATLAS_SPACING_MM), a_lab, str(tmp_path / "a_"))
    mapped = ants.apply_transforms_to_points(3, pd.DataFrame([midpoint(ants.image_read(str(root / subject / "labels.nii.gz")))],
                                                             columns=["x", "y", "z"]), r["fwdtransforms"]).values[0]
    err = float(np.linalg.norm(mapped - midpoint(a_lab)))
    assert err < 30.0, f"{subject} <- {atlas}: parotid midpoint {err:.1f} mm off (start {r['start']}, NCC {r['ncc']})"

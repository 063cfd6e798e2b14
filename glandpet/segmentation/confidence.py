"""Per-gland confidence of a multi-atlas segmentation, from what the segmentation already knows.

No truth is involved: every signal is measured on the subject's own CT, the atlases' warped labels
and the fused label (:func:`glandpet.segmentation.multi_atlas.segment_subject` calls :func:`region_signals`
in its region loop and :func:`final_signals` after the intensity refinement, then
:func:`confidence`).

Signals (``signals`` of a gland in the segmentation metrics):

``agreement``
    median over the gland's voters of the Dice of each voter's warped label with the fused label
    (before the intensity refinement). Where the atlases agree, the fusion is where they all put
    the gland; where they scatter, the fusion is a compromise none of them supports.
``volume_cv``
    spread of the voters' warped volumes: robust coefficient of variation of their logarithms
    (1.4826 MAD of log-volume).
``local_ncc``
    median over the voters of the local normalised cross-correlation of the warped atlas CT with
    the subject around the gland (the same score the atlas selection uses).
``voter_fraction``
    voters / the voters expected: the atlases holding the gland, at most ``atlases_per_gland``
    (atlases lost at registration, low-similarity or truncated ones do not vote; the ones the
    per-gland cap leaves out were never meant to).
``volume_log_ratio``
    log of the final fused volume over the median of the voters' warped volumes: the intensity
    refinement (or the fusion) moved the gland away from what the atlases say, or the size
    correction (:mod:`glandpet.segmentation.size_calibration`) found the patient's gland far from
    the atlases' typical one, where their shapes fit it least (on real CT the over-segmented
    small parotids).
``boundary_contrast``
    CT evidence at the final boundary: |median HU of the 2 mm inside - median HU of the 2 mm
    outside| over the pooled robust spread.

:func:`confidence` is a fixed function of these (no weights fitted to truth): the agreement is
the base -- an estimate of the overlap a second, independent fusion would have with this one --
multiplied by penalties in (0, 1] that are 1 while a signal is in its normal range
(:data:`PENALTIES`: the volume ratio only; the voter fraction and the volume spread are reported
as reasons, :data:`NOTES`; the local NCC and the boundary contrast are recorded but not used: the
measurements that decided this are in the notes there). The measured relation to the
true Dice is in ``benchmarks/seg_confidence.py``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from pathlib import Path
import json

#: default of ``segmentation.review_below`` (config.schema.yaml): a gland under this confidence
#: is flagged ``review``.
REVIEW_BELOW = 0.6

#: penalty parameters, each ``(good, bad)``: the penalty is 1 at or beyond ``good`` and falls
#: linearly (in the signal) to 0.5 at ``bad`` and on to a floor of 0.25.
PENALTIES = {
    # |log(final / voters' median volume)|: the refinement or the size correction moved the gland
    # far from the atlases
    "volume_log_ratio": (math.log(1.35), math.log(2.0)),
}
#: signals reported as reasons (beyond the ``good`` end) without lowering the confidence. As
#: penalties (the first version, with the same ends) they lowered the Spearman correlation with the
#: Dice: real CT (8 held-out OpenKBP scans, 16 parotids) 0.71 with the agreement alone -> 0.57
#: (a parotid of Dice 0.80 on which 2 of 5 atlases voted; three of Dice 0.76-0.80 whose atlases'
#: volumes spread 0.34-0.38 log-SD); phantom (30 glands) 0.79 -> 0.74.
NOTES = {
    # voters over the voters expected (the atlases holding the gland, at most atlases_per_gland)
    "voter_fraction": (0.6, 0.3),
    # robust CV of the voters' log-volumes
    "volume_cv": (0.25, 0.6),
}
#: the voters' local NCC (``local_ncc``) is recorded but not a penalty: on real planning CTs (4 mm
#: in-plane, other scanners than the atlases') well-segmented parotids (Dice 0.68-0.82) had NCCs of
#: 0.09-0.70, and on the phantom it did not rank the glands by Dice (Spearman alone -0.4..+0.2).
#: The CT contrast across the final boundary (``boundary_contrast``) is recorded but not a penalty:
#: on the real-anatomy phantom it ranks the glands by Dice (Spearman 0.81 alone; as a penalty
#: (0.8, 0.3) it lifted the confidence's Spearman there from 0.74 to 0.84), but real planning CTs'
#: parotids are nearly as dense as their surroundings: on 6 held-out OpenKBP scans its Spearman
#: with the Dice was -0.06: well-segmented parotids (Dice 0.72-0.83) had contrasts of 0.06-0.37.
#: reasons reported under these levels (the penalty's ``good`` ends) or above them
AGREEMENT_LOW = 0.6
#: a gland on which fewer atlases voted has no agreement to measure: one voter's Dice to a fusion
#: of itself is ~1 wherever it put the gland. Its confidence is unknown (None: flagged ``review``,
#: first in the review queue). Measured on the README walkthrough's one-atlas segmentation (a
#: parametric phantom subject): confidences 0.87-1.00 on all 10 glands while the submandibular
#: glands had Dice 0.12 / 0.22 against the phantom's truth.
MIN_VOTERS = 2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / s if s else 0.0


def region_signals(voter_labels: list[np.ndarray], fused: np.ndarray, ncc: list[float], n_holders: int,
                   voxel_ml: float, max_voters: int | None = None) -> dict:
    """Signals of one gland from its voters' warped masks (``voter_labels``: bool arrays on the
    output grid), the fused mask (bool, same grid), the voters' local NCC, the number of atlases
    holding the gland and the per-gland cap on voters (``segmentation.atlases_per_gland``; None or
    0: none). Returns ``signals`` and ``atlas_volumes_ml`` (the voters')."""
    expected = min(n_holders, max_voters) if max_voters else n_holders
    vols = [float(m.sum()) * voxel_ml for m in voter_labels]
    dices = [_dice(m, fused) for m in voter_labels]
    pos = [v for v in vols if v > 0]
    if len(pos) >= 2:
        lv = np.log(pos)
        cv = float(1.4826 * np.median(np.abs(lv - np.median(lv))))
        if cv == 0.0:  # two voters: MAD of two values is half their distance
            cv = float(np.std(lv))
    else:
        cv = 0.0
    sig = {
        "agreement": float(np.median(dices)) if dices else 0.0,
        "atlas_dice_to_fusion": [round(d, 4) for d in dices],
        "volume_cv": cv,
        "local_ncc": float(np.median(ncc)) if len(ncc) else 0.0,
        "n_voters": len(voter_labels),
        "n_holders": int(n_holders),
        "n_expected_voters": int(expected),
        "voter_fraction": len(voter_labels) / expected if expected else 0.0,
        "fused_ml_before_refine": float(fused.sum()) * voxel_ml,
    }
    return {"signals": sig, "atlas_volumes_ml": vols}


def boundary_contrast(mask: np.ndarray, ct: np.ndarray, spacing, width_mm: float = 2.0) -> float:
    """|median HU inside - median HU outside| within ``width_mm`` of the mask's boundary (at least
    one voxel: the width is raised to the largest voxel size), over the pooled robust spread
    (1.4826 MAD) of the two shells; 0 for an empty mask."""
    if not mask.any():
        return 0.0
    sp = np.asarray(spacing, float)
    width_mm = max(float(width_mm), float(sp.max()))
    idx = np.argwhere(mask)
    pad = np.ceil((width_mm + 1) / sp).astype(int) + 1
    lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, np.array(mask.shape))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    m, c = mask[sl], ct[sl].astype(np.float32)
    d_in = ndi.distance_transform_edt(m, sampling=sp)
    d_out = ndi.distance_transform_edt(~m, sampling=sp)
    inner, outer = c[m & (d_in <= width_mm)], c[~m & (d_out <= width_mm)]
    if inner.size < 5 or outer.size < 5:
        return 0.0
    mi, mo = float(np.median(inner)), float(np.median(outer))
    spread = 1.4826 * float(np.median(np.abs(np.concatenate([inner - mi, outer - mo]))))
    return abs(mi - mo) / max(spread, 1.0)


def final_signals(entry: dict, mask: np.ndarray, ct: np.ndarray, spacing, voxel_ml: float) -> dict:
    """Add the final (refined) volume and the boundary contrast to a gland's ``entry`` (as
    :func:`region_signals` returned it); returns the entry."""
    vol = float(mask.sum()) * voxel_ml
    entry["volume_ml"] = vol
    pos = [v for v in entry.get("atlas_volumes_ml", []) if v > 0]
    med = float(np.median(pos)) if pos else 0.0
    sig = entry.setdefault("signals", {})
    sig["volume_log_ratio"] = float(math.log(vol / med)) if vol > 0 and med > 0 else float("inf")
    sig["boundary_contrast"] = boundary_contrast(mask, ct, spacing)
    return entry


def _num(v, none: float) -> float:
    return none if v is None else float(v)


def _penalty(value: float, good: float, bad: float) -> float:
    """1 at or beyond ``good``; linear to 0.5 at ``bad`` (either direction); floor 0.25."""
    if not math.isfinite(value):
        return 0.25
    span = bad - good
    t = (value - good) / span  # 0 at good, 1 at bad
    if t <= 0:
        return 1.0
    return max(0.25, 1.0 - 0.5 * t)


def confidence(signals: dict, volume_ml: float | None = None) -> tuple[float | None, list[str]]:
    """Confidence in [0, 1] and the reasons it is low, from a gland's ``signals``.

    The agreement (median voter Dice to the fusion) times the penalties of :data:`PENALTIES`
    (reasons also from :data:`NOTES`); an empty gland has confidence 0; a gland fewer than
    :data:`MIN_VOTERS` atlases voted on has none (None: nothing to judge it by)."""
    reasons: list[str] = []
    if volume_ml is not None and volume_ml <= 0:
        return 0.0, ["empty label"]
    if not signals.get("n_voters"):
        return 0.0, ["no atlas voted"]
    if int(signals["n_voters"]) < MIN_VOTERS:
        return None, ["one atlas voted: no second atlas to check it against"]
    agr = float(signals.get("agreement", 0.0))
    conf = agr
    if agr < AGREEMENT_LOW:
        reasons.append(f"atlases disagree (Dice to fusion {agr:.2f})")
    vals = {"local_ncc": _num(signals.get("local_ncc"), 0.0),
            "voter_fraction": _num(signals.get("voter_fraction"), 1.0),
            "volume_cv": _num(signals.get("volume_cv"), 0.0),
            "volume_log_ratio": abs(_num(signals.get("volume_log_ratio", 0.0), float("inf"))),
            "boundary_contrast": _num(signals.get("boundary_contrast"), 1.0)}
    text = {"local_ncc": lambda v: f"low image similarity (NCC {v:.2f})",
            "voter_fraction": lambda v: (f"few atlases voted ({signals.get('n_voters')} of "
                                         f"{signals.get('n_expected_voters', signals.get('n_holders'))})"),
            "volume_cv": lambda v: f"atlas volumes spread ({v:.2f} log-SD)",
            "boundary_contrast": lambda v: f"weak CT edge at the boundary (contrast {v:.2f})",
            "volume_log_ratio": lambda v: f"volume {math.exp(v) if math.isfinite(v) else float('inf'):.2f}x off the atlases' median"}
    for name, (good, bad) in PENALTIES.items():
        p = _penalty(vals[name], good, bad)
        if p < 1.0:
            conf *= p
            reasons.append(text[name](vals[name]))
    for name, (good, bad) in NOTES.items():
        if _penalty(vals[name], good, bad) < 1.0:
            reasons.append(text[name](vals[name]))
    return float(min(1.0, max(0.0, conf))), reasons


def rank_key(conf: float | None) -> float:
    """A confidence as a sort key, worst first: a gland without one (None or NaN: one voter, or no
    record) is flagged review and ranks below every gland that has one (-1). The review queue,
    the QC montage's list and the confidence benchmarks all rank by it."""
    return -1.0 if conf is None or not math.isfinite(float(conf)) else float(conf)


def flag(conf: float | None, review_below: float = REVIEW_BELOW) -> str:
    """``'review'`` for a confidence under ``review_below`` (or none recorded), else ``'ok'``."""
    return "review" if conf is None or not math.isfinite(conf) or conf < review_below else "ok"


def gland_entry(entry: dict) -> dict:
    """Finish a gland's metrics entry: round the signals, add ``confidence`` and ``reasons``."""
    sig = entry.get("signals", {})
    conf, reasons = confidence(sig, entry.get("volume_ml"))
    out = {"confidence": None if conf is None else round(conf, 4), "reasons": reasons,
           "volume_ml": round(float(entry.get("volume_ml", 0.0)), 4),
           "atlas_volumes_ml": [round(v, 4) for v in entry.get("atlas_volumes_ml", [])],
           **({"voters": list(entry["voters"])} if "voters" in entry else {}),
           **({"atlas_native_ml": [round(v, 4) for v in entry["atlas_native_ml"]]} if "atlas_native_ml" in entry else {}),
           "signals": {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else
                           (None if isinstance(v, float) else v)) for k, v in sig.items()}}
    return out


def seg_confidence_columns(seg_qc_path: str | None, gland: str, side: str, review_below: float | None = None,
                           segmentation_source: str = "atlas") -> dict:
    """``seg_confidence``, ``seg_flag``, ``segmentation_source`` of one gland from the session's
    segment QC JSON (``metrics.glands``, :mod:`glandpet.segmentation.confidence`). A corrected segmentation
    was reviewed by a person: confidence 1, flag ok. A QC JSON without the per-gland block (older
    results) or without this gland: no confidence, flag review."""
    review_below = REVIEW_BELOW if review_below is None else float(review_below)
    if segmentation_source == "corrected":
        return dict(seg_confidence=1.0, seg_flag="ok", segmentation_source="corrected")
    glands = {}
    if seg_qc_path and Path(seg_qc_path).is_file():
        glands = (json.loads(Path(seg_qc_path).read_text()).get("metrics") or {}).get("glands") or {}
    conf = (glands.get(f"{gland}_{side}") or {}).get("confidence")
    conf = None if conf is None else float(conf)
    return dict(seg_confidence=conf, seg_flag=flag(conf, review_below), segmentation_source="atlas")

"""Does the per-gland segmentation confidence predict the true Dice? (issue 18)

    python benchmarks/seg_confidence.py [--real K] [--real-atlases 5] [--phantom S] [--phantom-atlases 3]
                                        [--cache DIR] [--rescore] [--review-below T] [--threads 2]

Two sets, each segmented with the workflow's default settings
(:func:`glandpet.segmentation.multi_atlas.segment_subject`):

* real CT: K held-out OpenKBP planning CTs (seeded draw, :func:`glandpet.segmentation.atlas_validate.choose_subjects`),
  each segmented with N atlases drawn from the other scans; parotids only (the scans' contours);
* real-anatomy phantom: S phantom subjects rendered from real label maps (the phantom's atlas
  renderer, :func:`glandpet.phantom.cohort.make_atlas`, on the first cases of the collection) segmented
  with N phantom atlases of other individuals (the last cases); all glands.

Each scan's metrics (``glands``: confidence, reasons, signals) and true Dice per gland are cached
as JSON in ``--cache`` (default ``~/.cache/glandpet/seg_confidence``); a scan already there is not
segmented again, and ``--rescore`` only scores the cache (the confidence recomputed from the cached
signals with the current :func:`glandpet.segmentation.confidence.confidence`). Printed per set: the Spearman
correlation of confidence with Dice, the recall of the glands with Dice < 0.6 by the ``review``
flag, the flagged fraction; the same with the threshold chosen leave-one-scan-out (for each scan,
the lowest threshold that catches >= 90 % of the other scans' Dice < 0.6 glands); and what each
signal contributes (its own Spearman with Dice, and the figures with its penalty left out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
LOW_DICE = 0.6
TARGET_SPEARMAN, TARGET_RECALL, TARGET_FLAGGED = 0.6, 0.9, 0.25


# ------------------------------------------------------------------ scoring (pure, tested)
def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


def flag_figures(conf, dice, review_below: float, low: float = LOW_DICE) -> dict:
    """Recall of the glands with Dice < ``low`` by conf < ``review_below``, flagged fraction."""
    conf, dice = np.asarray(conf, float), np.asarray(dice, float)
    flagged = ~(conf >= review_below)
    bad = dice < low
    return {"n": int(len(dice)), "n_low": int(bad.sum()),
            "recall": float(flagged[bad].mean()) if bad.any() else float("nan"),
            "flagged": float(flagged.mean()) if len(dice) else float("nan")}


def loo_threshold(conf, dice, scan, recall: float = TARGET_RECALL, low: float = LOW_DICE) -> dict:
    """Leave-one-scan-out: for each scan, the threshold is the lowest one catching ``recall`` of
    the OTHER scans' Dice < ``low`` glands (just above their confidences); the held-out scan's
    glands are flagged with it. Returns the pooled figures and the thresholds."""
    conf, dice, scan = np.asarray(conf, float), np.asarray(dice, float), np.asarray(scan)
    flagged = np.zeros(len(conf), bool)
    thr = {}
    for s in np.unique(scan):
        o = scan != s
        bad = np.sort(conf[o & (dice < low)])
        if len(bad):
            k = int(math.ceil(recall * len(bad))) - 1
            t = float(bad[k]) + 1e-6
        else:
            t = 0.0
        thr[str(s)] = t
        flagged[~o] = conf[~o] < t
    bad = dice < low
    return {"recall": float(flagged[bad].mean()) if bad.any() else float("nan"),
            "flagged": float(flagged.mean()), "thresholds": thr}


# ------------------------------------------------------------------ running
def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _segment_and_score(key: str, ct, truth, truth_tsv, atlases: list[dict], cache: Path, threads: int) -> dict:
    f = cache / f"{key}.json"
    if f.is_file():
        return json.loads(f.read_text())
    import tempfile

    from glandpet.segmentation.atlas_validate import score_scan
    from glandpet.segmentation.multi_atlas import segment_subject
    from glandpet.segmentation.params import SegmentationParams

    with tempfile.TemporaryDirectory(prefix="gp_conf_") as tmp:
        t0, c0 = time.perf_counter(), _cpu()
        m = segment_subject(ct, atlases, Path(tmp) / "dseg.nii.gz", Path(tmp) / "dseg.tsv",
                            SegmentationParams.from_config(None), threads=threads)
        rows = score_scan(truth, truth_tsv, Path(tmp) / "dseg.nii.gz")
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "dseg.nii.gz", cache / f"{key}_dseg.nii.gz")
    rec = {"key": key, "ct": str(ct), "atlases": [a["name"] for a in atlases], "seconds": time.perf_counter() - t0,
           "cpu_seconds": _cpu() - c0, "glands": m.get("glands", {}),
           "dice": {f"{r['gland']}_{r['side']}": r["dice"] for r in rows}}
    cache.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(rec, indent=1))
    print(f"  {key}: {rec['seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} CPU-s", flush=True)
    return rec


def run_real(k: int, n_atlases: int, seed: int, cache: Path, threads: int) -> list[dict]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from real_ct import read_cases

    from glandpet.segmentation.atlas_validate import choose_library, choose_subjects
    from glandpet.segmentation.segment_command import read_atlas_dir

    data = DATA / "openkbp-parotid-ct"
    names = read_cases(data)
    by = {n: read_atlas_dir(data / n) for n in names}
    out = []
    for h in choose_subjects(names, k, seed):
        lib = choose_library(h, names, n_atlases, seed)
        atl = [{x: by[n][x] for x in ("name", "ct", "labels", "label_table")} for n in lib]
        out.append(_segment_and_score(f"real_{h}_{n_atlases}at_s{seed}", by[h]["ct"], by[h]["labels"],
                                      by[h]["label_table"], atl, cache / "real", threads))
    return out


def run_phantom(n_subjects: int, n_atlases: int, seed: int, cache: Path, threads: int) -> list[dict]:
    from glandpet.phantom.cohort import assign_real_cases, make_atlas

    labels = DATA / "tcia-hn-oar-labels"
    build = cache / "phantom_build" / f"s{seed}"
    subj_cases, atl_cases = assign_real_cases(str(labels), n_subjects, n_atlases)
    atl = []
    for j, c in enumerate(atl_cases):
        d = build / "atlases" / f"atlas{j + 1:02d}"
        if not (d / "labels.tsv").is_file():
            make_atlas(build, j, seed, anatomy_from=str(labels), case_id=c)
        atl.append({"name": d.name, "ct": str(d / "ct.nii.gz"), "labels": str(d / "labels.nii.gz"),
                    "label_table": str(d / "labels.tsv")})
    out = []
    for i, c in enumerate(subj_cases):
        j = 100 + i  # subjects: the atlas renderer with other seeds, on other individuals
        d = build / "atlases" / f"atlas{j + 1:02d}"
        if not (d / "labels.tsv").is_file():
            make_atlas(build, j, seed, anatomy_from=str(labels), case_id=c)
        out.append(_segment_and_score(f"phantom_{i}_{n_atlases}at_s{seed}", d / "ct.nii.gz", d / "labels.nii.gz",
                                      d / "labels.tsv", atl, cache / "phantom", threads))
    return out


def recompute_final(rec: dict, cache_dir: Path) -> dict:
    """Recompute the final-label signals (boundary contrast, volume ratio) of a cached scan from its
    kept label map and CT, so a change of :func:`glandpet.segmentation.confidence.final_signals` re-scores
    without re-segmenting. A record without its label map is returned unchanged."""
    import nibabel as nib

    from glandpet.segmentation import confidence as SC
    from glandpet.glands import DEFAULT_LABELS
    from glandpet.segmentation.metrics import spacing_of_affine

    dseg = cache_dir / f"{rec['key']}_dseg.nii.gz"
    if not dseg.is_file() or not rec.get("ct"):
        return rec
    lab = np.asarray(nib.load(str(dseg)).dataobj)
    img = nib.load(rec["ct"])
    ct = np.asarray(img.dataobj, dtype=np.float32)
    sp = spacing_of_affine(img.affine)
    vox_ml = float(np.prod(sp)) / 1000.0
    for L in DEFAULT_LABELS:
        e = rec["glands"].get(L.name)
        if e is not None:
            SC.final_signals(e, lab == L.index, ct, sp, vox_ml)
    return rec


def gland_rows(records: list[dict], conf_fn=None) -> list[dict]:
    """One row per gland with truth: scan, gland, dice, confidence (recomputed from the signals by
    ``conf_fn(signals, volume_ml)`` when given), signals."""
    from glandpet.segmentation import confidence as SC

    rows = []
    for r in records:
        for g, d in r["dice"].items():
            e = r["glands"].get(g)
            if e is None:
                rows.append({"scan": r["key"], "gland": g, "dice": d, "conf": 0.0, "signals": {}})
                continue
            c = conf_fn(e["signals"], e.get("volume_ml"))[0] if conf_fn else e["confidence"]
            # one voter: no confidence, flagged review and ranked lowest (as the review queue does)
            rows.append({"scan": r["key"], "gland": g, "dice": d, "conf": SC.rank_key(c), "signals": e["signals"],
                         "reasons": e.get("reasons", [])})
    return rows


def report(name: str, records: list[dict], review_below: float) -> dict:
    from glandpet.segmentation import confidence as SC

    rows = gland_rows(records, SC.confidence)
    if not rows:
        print(f"{name}: no scans")
        return {}
    conf = [r["conf"] for r in rows]
    dice = [r["dice"] for r in rows]
    scan = [r["scan"] for r in rows]
    rho = spearman(conf, dice)
    ff = flag_figures(conf, dice, review_below)
    loo = loo_threshold(conf, dice, scan)
    print(f"\n== {name}: {len(records)} scans, {ff['n']} glands, {ff['n_low']} with Dice < {LOW_DICE} ==")
    for r in sorted(rows, key=lambda r: r["conf"]):
        print(f"  {r['scan']:<34} {r['gland']:<20} Dice {r['dice']:.3f}  conf {r['conf']:.3f}  "
              f"{'; '.join(SC.confidence(r['signals'], None)[1]) if r['signals'] else 'no confidence'}")
    met = (rho >= TARGET_SPEARMAN, ff["recall"] >= TARGET_RECALL if ff["n_low"] else True,
           ff["flagged"] <= TARGET_FLAGGED)
    print(f"Spearman(confidence, Dice) {rho:.3f} (target >= {TARGET_SPEARMAN})")
    print(f"review_below {review_below}: recall of Dice < {LOW_DICE} {ff['recall']:.2f} ({ff['n_low']} glands; "
          f"target >= {TARGET_RECALL}), flagged {ff['flagged']:.2f} (target <= {TARGET_FLAGGED}); "
          f"all met: {'yes' if all(met) else 'no'}")
    print(f"threshold leave-one-scan-out: recall {loo['recall']:.2f}, flagged {loo['flagged']:.2f}, thresholds "
          f"{min(loo['thresholds'].values()):.3f}..{max(loo['thresholds'].values()):.3f}")
    # what each signal contributes
    print("signal contributions (Spearman of the signal alone with Dice; figures with its penalty left out):")
    c1 = [SC.confidence({**r["signals"], "agreement": 1.0}, None)[0] if r["signals"] else 0.0 for r in rows]
    print(f"  penalties alone (agreement set to 1): Spearman {spearman(c1, dice):.3f}")
    for s in ("agreement", "local_ncc", "voter_fraction", "volume_cv", "volume_log_ratio", "boundary_contrast"):
        v = [r["signals"].get(s) if r["signals"] else None for r in rows]
        v = [abs(x) if (x is not None and s == "volume_log_ratio") else (np.nan if x is None else x) for x in v]
        line = f"  {s:<18} alone {spearman(v, dice):+.3f}"
        if s in SC.PENALTIES:
            saved = SC.PENALTIES.pop(s)
            try:
                c2 = [SC.confidence(r["signals"], None)[0] if r["signals"] else 0.0 for r in rows]
            finally:
                SC.PENALTIES[s] = saved
            f2 = flag_figures(c2, dice, review_below)
            line += (f"; without it: Spearman {spearman(c2, dice):.3f}, recall {f2['recall']:.2f}, "
                     f"flagged {f2['flagged']:.2f}")
        print(line)
    return {"spearman": rho, **ff, "loo": loo}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=int, default=8, metavar="K", help="held-out OpenKBP scans (default 8)")
    ap.add_argument("--real-atlases", type=int, default=5)
    ap.add_argument("--phantom", type=int, default=3, metavar="S", help="phantom subjects (default 3)")
    ap.add_argument("--phantom-atlases", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "glandpet" / "seg_confidence")
    ap.add_argument("--rescore", action="store_true", help="score the cached scans only; segment nothing")
    ap.add_argument("--review-below", type=float, default=None, help="threshold (default: the config's default)")
    args = ap.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    from glandpet.segmentation import confidence as SC

    thr = SC.REVIEW_BELOW if args.review_below is None else args.review_below
    if args.rescore:
        recs = {s: [recompute_final(json.loads(f.read_text()), args.cache / s)
                    for f in sorted((args.cache / s).glob("*.json"))] for s in ("phantom", "real")}
    else:
        recs = {"real": run_real(args.real, args.real_atlases, args.seed, args.cache, args.threads) if args.real else []}
        recs["phantom"] = (run_phantom(args.phantom, args.phantom_atlases, args.seed, args.cache, args.threads)
                           if args.phantom else [])
    out = {}
    for name, r in recs.items():
        if r:
            out[name] = report({"phantom": "real-anatomy phantom, all glands",
                                "real": "real CT (OpenKBP, leave-one-out), parotids"}[name], r, thr)
    allr = recs["phantom"] + recs["real"]
    if recs["phantom"] and recs["real"]:
        report("both sets pooled", allr, thr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

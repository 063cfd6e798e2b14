"""Atlases from RTSTRUCT vs atlases from label maps: segmentation Dice on other phantom subjects.

    python benchmarks/rtstruct_atlas.py [--workdir DIR] [--subjects 2] [--atlases 3] [--seed 11]
                                        [--threads 2]

1. ``glandpet phantom`` cohort with ``atlas_dicom=True``: each atlas individual is written as
   NIfTI (ct, labels: the label-map atlas) and as an RT planning export (DICOM CT + RTSTRUCT).
2. ``glandpet atlas add`` (:func:`glandpet.dicom.rtstruct.build_atlas`) on each export: the
   RTSTRUCT-built atlas. Reports the per-gland Dice between the two atlases' label maps (the
   contour round trip) and whether the CT voxels and affines agree.
3. :func:`glandpet.segmentation.multi_atlas.segment_subject` of every subject's first-session CT with each
   atlas set; prints the per-gland Dice against the phantom truth for both sets and their difference.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int((a & b).sum()) / s


def _first_ct(ph: Path, sid: str) -> tuple[str, str]:
    sesdir = min(glob.glob(f"{ph}/dicom/{sid}/*"))
    ses = "psma" if "PSMA" in sesdir.upper() else "fapi"
    series = sorted(glob.glob(sesdir + "/*"))
    ctd = [d for d in series if Path(d).name[:2] == "02"]  # the phantom writes the CT as series 2
    return ctd[0], ses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--atlases", type=int, default=3)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(a.threads))
    import nibabel as nib

    from glandpet.dicom.convert import convert_series
    from glandpet.glands import DEFAULT_LABELS
    from glandpet.phantom.cohort import generate_cohort
    from glandpet.dicom.rtstruct import build_atlas
    from glandpet.segmentation.multi_atlas import segment_subject

    work = Path(a.workdir or tempfile.mkdtemp(prefix="gp_rtbench_"))
    ph = work / "phantom"
    t0 = time.perf_counter()
    if not (ph / "subjects.tsv").exists():
        generate_cohort(ph, a.subjects, a.seed, n_atlases=a.atlases, jobs=1, progress=False, atlas_dicom=True)
    print(f"phantom: {time.perf_counter() - t0:.1f} s -> {ph}")

    lm_atlases, rt_atlases = [], []
    print("\n## contour round trip (RTSTRUCT-built vs label-map atlas)")
    for adir in sorted((ph / "atlases").iterdir()):
        t = time.perf_counter()
        out = work / "rt_atlases" / adir.name
        res = build_atlas(out, adir / "dicom" / "ct", adir / "dicom" / "rtstruct.dcm", force=True)
        secs = time.perf_counter() - t
        A = np.asarray(nib.load(str(adir / "labels.nii.gz")).dataobj)
        B = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
        ca, cb = nib.load(str(adir / "ct.nii.gz")), nib.load(str(out / "ct.nii.gz"))
        d = {lab.name: dice(A == lab.index, B == lab.index) for lab in DEFAULT_LABELS}
        print(f"{adir.name}: atlas add {secs:.1f} s; CT voxels equal {np.array_equal(np.asarray(ca.dataobj), np.asarray(cb.dataobj))}, "
              f"max |affine diff| {np.abs(ca.affine - cb.affine).max():.2e} mm, labels equal {np.array_equal(A, B)}; "
              f"ROIs: {', '.join(res['roi_of'].values())}; unmapped: {res['unmapped']}")
        print("   Dice " + " ".join(f"{k}={v:.4f}" for k, v in d.items()))
        lm_atlases.append({"name": adir.name, "ct": str(adir / "ct.nii.gz"), "labels": str(adir / "labels.nii.gz"),
                           "label_table": str(adir / "labels.tsv")})
        rt_atlases.append({"name": f"rt_{adir.name}", "ct": res["ct"], "labels": res["labels"],
                           "label_table": res["label_table"]})

    print("\n## segmentation of the phantom subjects (Dice vs truth)")
    rows = []
    for sid in sorted(p.name for p in (ph / "dicom").iterdir()):
        ctd, ses = _first_ct(ph, sid)
        ct = work / f"{sid}_ses-{ses}_ct.nii.gz"
        if not ct.exists():
            convert_series(ctd, ct)
        truth = np.asarray(nib.load(str(ph / "truth" / f"sub-{sid}" / f"ses-{ses}" /
                                        f"sub-{sid}_ses-{ses}_space-ct_dseg.nii.gz")).dataobj)
        for kind, atl in (("labelmap", lm_atlases), ("rtstruct", rt_atlases)):
            t = time.perf_counter()
            out = work / f"{sid}_{kind}_dseg.nii.gz"
            segment_subject(str(ct), atl, str(out), str(out).replace(".nii.gz", ".tsv"), threads=a.threads)
            seg = np.asarray(nib.load(str(out)).dataobj)
            d = {lab.name: dice(truth == lab.index, seg == lab.index) for lab in DEFAULT_LABELS}
            rows.append({"subject": sid, "atlases": kind, "seconds": time.perf_counter() - t, **d})
            print(f"{sid} {kind:8s} {rows[-1]['seconds']:6.1f} s  " + " ".join(f"{k}={v:.3f}" for k, v in d.items()),
                  flush=True)
    print("\n## mean Dice per gland (over subjects and sides)")
    glands = sorted({lab.gland for lab in DEFAULT_LABELS}, key=[lab.gland for lab in DEFAULT_LABELS].index)
    print(f"{'gland':14s} {'labelmap':>9s} {'rtstruct':>9s} {'diff':>8s}")
    summary = {}
    for g in glands:
        m = {}
        for kind in ("labelmap", "rtstruct"):
            vals = [r[f"{g}_{s}"] for r in rows if r["atlases"] == kind for s in ("left", "right")]
            m[kind] = float(np.nanmean(vals))
        summary[g] = m
        print(f"{g:14s} {m['labelmap']:9.3f} {m['rtstruct']:9.3f} {m['rtstruct'] - m['labelmap']:+8.3f}")
    (work / "rtstruct_atlas.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print(f"\n(results: {work / 'rtstruct_atlas.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

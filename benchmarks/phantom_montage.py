"""Montage of the phantom's CT, PSMA PET and FAPI PET (alone and fused), read back from the DICOM.

    python benchmarks/phantom_montage.py [--dir COHORT] [--out montage.png] [--subjects 2] [--seed 0]

Without --dir a small cohort is generated in a temporary folder (timed). For one pSS subject
(both sessions) and one control (FAPI only) it shows axial slices through the parotids and the
submandibular glands and a coronal slice through the parotids: CT (soft-tissue window), PET in
SUVbw (inverted grey, as read in nuclear medicine) and PET fused on the CT. The slices are found
from the truth label maps (world coordinates), the images are read with pydicom only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def read_series(folder: Path):
    """(volume (x, y, z) float32, LPS affine, first dataset) of an axial series, rescale applied."""
    import pydicom

    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    dss = [d for d in dss if "ImagePositionPatient" in d]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    r, c = iop[:3], iop[3:]
    n = np.cross(r, c)
    dss.sort(key=lambda d: float(np.dot(n, np.array(d.ImagePositionPatient, float))))
    vol = []
    for d in dss:
        a = d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0))
        if getattr(d, "Units", "") == "CNTS" and (0x7053, 0x1009) in d:
            a = a * float(d[0x7053, 0x1009].value)
        vol.append(a.T)  # (cols=x, rows=y)
    vol = np.stack(vol, axis=-1)
    ps = [float(v) for v in dss[0].PixelSpacing]
    p0 = np.array(dss[0].ImagePositionPatient, float)
    p1 = np.array(dss[-1].ImagePositionPatient, float)
    A = np.eye(4)
    A[:3, 0] = r * ps[1]
    A[:3, 1] = c * ps[0]
    A[:3, 2] = (p1 - p0) / max(len(dss) - 1, 1)
    A[:3, 3] = p0
    return vol, A, dss[0]


def _dt(date: str, time_: str) -> dt.datetime:
    t = time_.split(".")[0].ljust(6, "0")
    return dt.datetime.strptime(date + t, "%Y%m%d%H%M%S")


def suv_factor(ds) -> float:
    """Bq/mL -> SUVbw for a series decay-corrected to its start (reads the vendor's scan-start field)."""
    info = ds.RadiopharmaceuticalInformationSequence[0]
    dose = float(info.RadionuclideTotalDose)
    half = float(info.RadionuclideHalfLife)
    if "RadiopharmaceuticalStartDateTime" in info:
        inj = _dt(info.RadiopharmaceuticalStartDateTime[:8], info.RadiopharmaceuticalStartDateTime[8:])
    else:
        inj = _dt(ds.SeriesDate, info.RadiopharmaceuticalStartTime)
    if (0x0009, 0x100D) in ds:
        v = str(ds[0x0009, 0x100D].value)
        scan = _dt(v[:8], v[8:])
    else:
        scan = _dt(ds.SeriesDate, ds.SeriesTime)
        if hasattr(ds, "AcquisitionTime"):
            scan = min(scan, _dt(getattr(ds, "AcquisitionDate", ds.SeriesDate), ds.AcquisitionTime))
    delay = (scan - inj).total_seconds()
    return float(ds.PatientWeight) * 1000.0 / (dose * math.exp(-math.log(2) * delay / half))


def resample_to(vol, A_src, shape, A_dst, order=1):
    from scipy import ndimage

    M = np.linalg.inv(A_src) @ A_dst
    return ndimage.affine_transform(vol, M, output_shape=shape, order=order, mode="constant", cval=0.0)


def find_session_dirs(cohort: Path, sid: str) -> dict:
    out = {}
    for ses in sorted((cohort / "dicom" / sid).iterdir()):
        tag = ses.name.split("_")[-1].lower()
        series = {}
        for s in sorted(ses.iterdir()):
            import pydicom

            f = next(p for p in sorted(s.iterdir()) if p.is_file())
            d = pydicom.dcmread(f, stop_before_pixels=True)
            itype = "\\".join(d.get("ImageType", []))
            if d.Modality == "CT" and "LOCALIZER" not in itype:
                series["ct"] = s
            elif d.Modality == "PT" and "ATTN" in "\\".join(d.get("CorrectedImage", [])):
                series["pet"] = s
        out[tag] = series
    return out


def load_session(cohort: Path, sid: str, ses: str, dirs: dict):
    import nibabel as nib

    ct, A_ct, _ = read_series(dirs["ct"])
    pet, A_pet, ds = read_series(dirs["pet"])
    pet = pet * np.float32(suv_factor(ds))
    pet_on_ct = resample_to(pet, A_pet, ct.shape, A_ct)
    lab = np.asarray(nib.load(cohort / "truth" / f"sub-{sid}" / f"ses-{ses}" / f"sub-{sid}_ses-{ses}_space-ct_dseg.nii.gz").dataobj)
    return ct, pet_on_ct, lab, A_ct, ds


def make_montage(cohort: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    sheet = pd.read_csv(cohort / "subjects.tsv", sep="\t")
    pss = sheet[sheet.group == "pss"].subject_id.tolist()
    ctl = sheet[sheet.group == "control"].subject_id.tolist()
    panels = []  # (title, list of (ct, pet, label, tracer, vmax))
    for sid in pss[:1] + ctl[:1]:
        dirs = find_session_dirs(cohort, sid)
        for ses in ("psma", "fapi"):
            if ses in dirs:
                ct, pet, lab, A, ds = load_session(cohort, sid, ses, dirs[ses])
                panels.append((sid, ses, ct, pet, lab, A, ds))
    views = [("axial, parotids", 1, 2), ("axial, submandibular", 3, 2), ("coronal, parotids", 1, 1)]
    ncol = 3 * len(panels)
    fig, axes = plt.subplots(len(views), ncol, figsize=(3.0 * ncol, 3.3 * len(views)), facecolor="black")
    for pcol, (sid, ses, ct, pet, lab, A, ds) in enumerate(panels):
        vmax = 12.0 if ses == "psma" else 5.0
        for row, (vname, labv, axis) in enumerate(views):
            m = (lab == labv) | (lab == labv + 1)
            c = np.argwhere(m).mean(0).round().astype(int) if m.any() else np.array(ct.shape) // 2
            if axis == 2:
                sl = (slice(None), slice(None), c[2])
                cti, peti = ct[sl].T, pet[sl].T
                aspect = abs(A[1, 1] / A[0, 0])
            else:
                sl = (slice(None), c[1], slice(None))
                cti, peti = ct[sl].T[::-1], pet[sl].T[::-1]
                aspect = abs(A[2, 2] / A[0, 0])
            ax = axes[row, 3 * pcol:3 * pcol + 3]
            ax[0].imshow(cti, cmap="gray", vmin=-160, vmax=240, aspect=aspect)
            ax[1].imshow(peti, cmap="gray_r", vmin=0, vmax=vmax, aspect=aspect)
            ax[2].imshow(cti, cmap="gray", vmin=-160, vmax=240, aspect=aspect)
            ax[2].imshow(np.ma.masked_less(peti, 0.05 * vmax), cmap="hot", vmin=0, vmax=vmax, alpha=0.55, aspect=aspect)
            for a in ax:
                a.set_xticks([])
                a.set_yticks([])
            if row == 0:
                tr = ds.RadiopharmaceuticalInformationSequence[0].get("Radiopharmaceutical", ses)
                ax[0].set_title(f"{sid} {ses.upper()} CT ({ds.Manufacturer.split()[0]})", color="w", fontsize=8)
                ax[1].set_title(f"{tr} SUV 0-{vmax:g}", color="w", fontsize=8)
                ax[2].set_title("fused", color="w", fontsize=8)
            ax[0].set_ylabel(vname, color="w")
    plt.subplots_adjust(wspace=0.02, hspace=0.08, left=0.01, right=0.99, top=0.95, bottom=0.01)
    fig.savefig(out, dpi=90, facecolor="black")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=None, help="existing phantom cohort (default: generate one)")
    p.add_argument("--out", default="phantom_montage.png")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    tmp = None
    if a.dir is None:
        from glandpet.phantom.cohort import generate_cohort

        tmp = tempfile.TemporaryDirectory(prefix="glandpet-montage-")
        cohort = Path(tmp.name)
        t = time.perf_counter()
        cpu = time.process_time()
        generate_cohort(cohort, a.subjects, a.seed, n_atlases=1, jobs=a.jobs, progress=False)
        print(f"generate {a.subjects} subjects + 1 atlas: {time.perf_counter() - t:.1f} s wall (jobs={a.jobs})")
    else:
        cohort = Path(a.dir)
    t = time.perf_counter()
    make_montage(cohort, Path(a.out))
    print(f"read DICOM + montage: {time.perf_counter() - t:.1f} s -> {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

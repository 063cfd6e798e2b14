"""Accuracy yardsticks computed against the phantom's ground truth (used by tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def pvc_errors(cohort: str | Path, fwhm_mm: float | None = None) -> pd.DataFrame:
    """Uncorrected and GTM SUVmean of every gland against the true SUVmean, with the TRUE gland
    masks and the true PET-to-CT transform, so the figures measure the method, not the
    segmentation. ``fwhm_mm``: the PSF given to GTM (None: the PSF the phantom blurred with).
    One row per subject x session x gland x side with ``raw_err_pct`` and ``gtm_err_pct``."""
    import nibabel as nib

    from ..glands import read_label_table
    from ..measure import label_fractions_on_grid, voxel_sizes
    from ..pvc import background_regions, gtm, region_means

    cohort = Path(cohort)
    truth = pd.read_parquet(cohort / "truth" / "gland_truth.parquet")
    xfm = pd.read_parquet(cohort / "truth" / "transforms.parquet")
    rows = []
    for (sub, ses), t in truth.groupby(["subject_id", "session"]):
        tdir = cohort / "truth" / f"sub-{sub}" / f"ses-{ses}"
        lab_img = nib.load(tdir / f"sub-{sub}_ses-{ses}_space-ct_dseg.nii.gz")
        suv_img = nib.load(tdir / f"sub-{sub}_ses-{ses}_desc-suvbw_pet.nii.gz")
        table = read_label_table(tdir / f"sub-{sub}_ses-{ses}_space-ct_dseg.tsv")
        sel = xfm[(xfm.subject_id == sub) & (xfm.session == ses) & (xfm.from_space == "pet") & (xfm.to_space == "ct")]
        pet_to_ct = np.asarray(sel.iloc[0]["matrix_lps"], float).reshape(4, 4)
        ct_in_pet = FLIP @ np.linalg.inv(pet_to_ct) @ FLIP @ lab_img.affine
        suv = np.asarray(suv_img.dataobj, dtype=np.float32)
        fr = label_fractions_on_grid(np.asarray(lab_img.dataobj).astype(np.int16), ct_in_pet, suv.shape,
                                     suv_img.affine, [lab.index for lab in table])
        glands = {f"{lab.gland}_{lab.side}": fr[lab.index] for lab in table if fr[lab.index].sum() > 0}
        body = (suv > 0.05).astype(np.float32)
        regions = {**glands, **background_regions(glands, body)}
        psf = float(t["psf_fwhm_mm"].iloc[0]) if fwhm_mm is None else float(fwhm_mm)
        raw = region_means(suv, glands)
        corrected = gtm(suv, regions, psf, voxel_sizes(suv_img.affine))
        for r in t.itertuples():
            key = f"{r.gland}_{r.side}"
            if key in glands:
                rows.append(dict(subject_id=sub, session=ses, gland=r.gland, side=r.side, true_suv_mean=r.true_suv_mean,
                                 suv_mean=raw[key], suv_mean_pvc=corrected[key], fwhm_mm=psf))
    df = pd.DataFrame(rows)
    df["raw_err_pct"] = 100 * (df["suv_mean"] - df["true_suv_mean"]) / df["true_suv_mean"]
    df["gtm_err_pct"] = 100 * (df["suv_mean_pvc"] - df["true_suv_mean"]) / df["true_suv_mean"]
    return df

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


def voxel_correlations(cohort: str | Path) -> pd.DataFrame:
    """Within-gland PSMA~FAPI voxel Spearman rho of every pSS gland, computed as the pipeline does
    (:func:`glandpet.gland_index.voxel_spearman`, PSMA PET grid) but with the TRUE masks and the
    true transforms, beside the gland's planted fibrotic fraction."""
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    from ..gland_index import voxel_spearman
    from ..glands import read_label_table
    from ..measure import label_fractions_on_grid

    cohort = Path(cohort)
    truth = pd.read_parquet(cohort / "truth" / "gland_truth.parquet")
    xfm = pd.read_parquet(cohort / "truth" / "transforms.parquet")

    def matrix(sub, ses, frm, to):
        sel = xfm[(xfm.subject_id == sub) & (xfm.session == ses) & (xfm.from_space == frm) & (xfm.to_space == to)]
        return np.asarray(sel.iloc[0]["matrix_lps"], float).reshape(4, 4)

    rows = []
    both = truth.groupby("subject_id")["session"].nunique()
    for sub in both[both == 2].index:
        t = truth[(truth.subject_id == sub) & (truth.session == "psma")]
        d = {s: cohort / "truth" / f"sub-{sub}" / f"ses-{s}" for s in ("psma", "fapi")}
        psma_img = nib.load(d["psma"] / f"sub-{sub}_ses-psma_desc-suvbw_pet.nii.gz")
        fapi_img = nib.load(d["fapi"] / f"sub-{sub}_ses-fapi_desc-suvbw_pet.nii.gz")
        # PSMA PET voxel -> PSMA PET world -> anatomy -> FAPI PET world -> FAPI PET voxel (LPS inside)
        psma_pet_lps = FLIP @ psma_img.affine
        fapi_pet_lps = FLIP @ fapi_img.affine
        to_fapi_vox = (np.linalg.inv(fapi_pet_lps) @ matrix(sub, "fapi", "anatomy", "pet")
                       @ np.linalg.inv(matrix(sub, "psma", "anatomy", "pet")) @ psma_pet_lps)
        shape = psma_img.shape
        ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
        src = to_fapi_vox[:3, :3] @ ijk + to_fapi_vox[:3, 3:4]
        fapi_on_psma = map_coordinates(np.asarray(fapi_img.dataobj, np.float32), src, order=1, cval=np.nan).reshape(shape)
        lab_img = nib.load(d["psma"] / f"sub-{sub}_ses-psma_space-ct_dseg.nii.gz")
        table = read_label_table(d["psma"] / f"sub-{sub}_ses-psma_space-ct_dseg.tsv")
        ct_in_pet = FLIP @ np.linalg.inv(matrix(sub, "psma", "pet", "ct")) @ FLIP @ lab_img.affine
        fr = label_fractions_on_grid(np.asarray(lab_img.dataobj).astype(np.int16), ct_in_pet, shape,
                                     psma_img.affine, [lab.index for lab in table])
        psma = np.asarray(psma_img.dataobj, np.float32)
        for lab in table:
            rho, n = voxel_spearman(psma, fapi_on_psma, fr[lab.index] >= 0.5)
            planted = t[(t.gland == lab.gland) & (t.side == lab.side)]["fibrotic_fraction"]
            rows.append(dict(subject_id=sub, gland=lab.gland, side=lab.side, voxel_spearman_rho=rho, n_voxels=n,
                             fibrotic_fraction=float(planted.iloc[0]) if len(planted) else np.nan))
    return pd.DataFrame(rows)

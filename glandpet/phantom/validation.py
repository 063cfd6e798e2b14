"""Accuracy yardsticks computed against the phantom's ground truth (used by tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from glandpet import layout
from glandpet.geometry import ras_to_lps, transform_lps_to_ras


def pet_sidecars(cohort: str | Path) -> dict[tuple[str, str], dict]:
    """What the sidecar of each phantom session's attenuation-corrected PET would record for the
    PSF (:func:`glandpet.measure.pvc.auto_fwhm_mm`): ``{(subject, session): {TracerRadionuclide,
    ConvolutionKernel}}``, read from one DICOM header per series of ``cohort/dicom/<subject>``."""
    import pydicom

    from glandpet.dicom.tracers import classify_dataset

    out: dict[tuple[str, str], dict] = {}
    for sub_dir in sorted(p for p in (Path(cohort) / "dicom").iterdir() if p.is_dir()):
        seen = set()
        for f in sorted(sub_dir.rglob("*")):
            if not f.is_file() or f.parent in seen:
                continue
            seen.add(f.parent)
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM
                continue
            if ds.get("Modality") != "PT" or "ATTN" not in [str(v) for v in (ds.get("CorrectedImage") or [])]:
                continue
            m = classify_dataset(ds)
            if m.session:
                out[(sub_dir.name, m.session)] = {"TracerRadionuclide": m.radionuclide,
                                                  "ConvolutionKernel": str(ds.get("ConvolutionKernel") or "")}
    return out


def pvc_errors(cohort: str | Path, fwhm_mm: float | str | None = None) -> pd.DataFrame:
    """Uncorrected and GTM SUVmean of every gland against the true SUVmean, with the TRUE gland
    masks and the true PET-to-CT transform, so the figures measure the method, not the
    segmentation. ``fwhm_mm``: the PSF given to GTM (None: the PSF the phantom blurred with;
    ``"auto"``: :func:`glandpet.measure.pvc.auto_fwhm_mm` of what the session's DICOM header records).
    One row per subject x session x gland x side with ``raw_err_pct`` and ``gtm_err_pct``."""
    import nibabel as nib

    from glandpet.glands import read_label_table
    from glandpet.measure.gland_stats import label_fractions_on_grid, voxel_sizes
    from glandpet.measure.pvc import background_regions, gtm, region_means

    from glandpet.measure.pvc import auto_fwhm_mm

    cohort = Path(cohort)
    truth = pd.read_parquet(cohort / "truth" / "gland_truth.parquet")
    xfm = pd.read_parquet(cohort / "truth" / "transforms.parquet")
    sidecars = pet_sidecars(cohort) if fwhm_mm == "auto" else {}
    rows = []
    for (sub, ses), t in truth.groupby(["subject_id", "session"]):
        truth_dir = cohort / "truth"
        lab_img = nib.load(layout.path(truth_dir, sub, ses, "dseg.nii.gz", space="ct"))
        suv_img = nib.load(layout.path(truth_dir, sub, ses, "pet.nii.gz", desc="suvbw"))
        table = read_label_table(layout.path(truth_dir, sub, ses, "dseg.tsv", space="ct"))
        sel = xfm[(xfm.subject_id == sub) & (xfm.session == ses) & (xfm.from_space == "pet") & (xfm.to_space == "ct")]
        pet_to_ct = np.asarray(sel.iloc[0]["matrix_lps"], float).reshape(4, 4)
        ct_in_pet = transform_lps_to_ras(np.linalg.inv(pet_to_ct)) @ lab_img.affine
        suv = np.asarray(suv_img.dataobj, dtype=np.float32)
        fr = label_fractions_on_grid(np.asarray(lab_img.dataobj).astype(np.int16), ct_in_pet, suv.shape,
                                     suv_img.affine, [lab.index for lab in table])
        glands = {f"{lab.gland}_{lab.side}": fr[lab.index] for lab in table if fr[lab.index].sum() > 0}
        body = (suv > 0.05).astype(np.float32)
        regions = {**glands, **background_regions(glands, body)}
        if fwhm_mm == "auto":
            psf = auto_fwhm_mm(sidecars.get((sub, ses))).fwhm_mm
        else:
            psf = float(t["psf_fwhm_mm"].iloc[0]) if fwhm_mm is None else float(fwhm_mm)
        raw = region_means(suv, glands)
        corrected = gtm(suv, regions, psf, voxel_sizes(suv_img.affine))
        for r in t.itertuples():
            key = f"{r.gland}_{r.side}"
            if key in glands:
                rows.append(dict(subject_id=sub, session=ses, gland=r.gland, side=r.side, true_suv_mean=r.true_suv_mean,
                                 suv_mean=raw[key], suv_mean_pvc=corrected[key], fwhm_mm=psf,
                                 true_fwhm_mm=float(t["psf_fwhm_mm"].iloc[0])))
    df = pd.DataFrame(rows)
    df["raw_err_pct"] = 100 * (df["suv_mean"] - df["true_suv_mean"]) / df["true_suv_mean"]
    df["gtm_err_pct"] = 100 * (df["suv_mean_pvc"] - df["true_suv_mean"]) / df["true_suv_mean"]
    return df


def voxel_correlations(cohort: str | Path) -> pd.DataFrame:
    """Within-gland PSMA~FAPI voxel Spearman rho of every pSS gland, computed as the pipeline does
    (:func:`glandpet.measure.gland_index.voxel_spearman`, PSMA PET grid) but with the TRUE masks and the
    true transforms, beside the gland's planted fibrotic fraction."""
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    from glandpet.measure.gland_index import voxel_spearman
    from glandpet.glands import read_label_table
    from glandpet.measure.gland_stats import label_fractions_on_grid

    cohort = Path(cohort)
    truth = pd.read_parquet(cohort / "truth" / "gland_truth.parquet")
    xfm = pd.read_parquet(cohort / "truth" / "transforms.parquet")

    def matrix(sub, ses, frm, to):
        sel = xfm[(xfm.subject_id == sub) & (xfm.session == ses) & (xfm.from_space == frm) & (xfm.to_space == to)]
        return np.asarray(sel.iloc[0]["matrix_lps"], float).reshape(4, 4)

    rows = []
    sessions = truth.groupby("subject_id")["session"].agg(set)
    for sub in sessions[sessions.map(lambda s: {"psma", "fapi"} <= s)].index:  # baseline pairs (follow-ups aside)
        t = truth[(truth.subject_id == sub) & (truth.session == "psma")]
        truth_dir = cohort / "truth"
        psma_img = nib.load(layout.path(truth_dir, sub, "psma", "pet.nii.gz", desc="suvbw"))
        fapi_img = nib.load(layout.path(truth_dir, sub, "fapi", "pet.nii.gz", desc="suvbw"))
        # PSMA PET voxel -> PSMA PET world -> anatomy -> FAPI PET world -> FAPI PET voxel (LPS inside)
        psma_pet_lps = ras_to_lps(psma_img.affine)
        fapi_pet_lps = ras_to_lps(fapi_img.affine)
        to_fapi_vox = (np.linalg.inv(fapi_pet_lps) @ matrix(sub, "fapi", "anatomy", "pet")
                       @ np.linalg.inv(matrix(sub, "psma", "anatomy", "pet")) @ psma_pet_lps)
        shape = psma_img.shape
        ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
        src = to_fapi_vox[:3, :3] @ ijk + to_fapi_vox[:3, 3:4]
        fapi_on_psma = map_coordinates(np.asarray(fapi_img.dataobj, np.float32), src, order=1, cval=np.nan).reshape(shape)
        lab_img = nib.load(layout.path(truth_dir, sub, "psma", "dseg.nii.gz", space="ct"))
        table = read_label_table(layout.path(truth_dir, sub, "psma", "dseg.tsv", space="ct"))
        ct_in_pet = transform_lps_to_ras(np.linalg.inv(matrix(sub, "psma", "pet", "ct"))) @ lab_img.affine
        fr = label_fractions_on_grid(np.asarray(lab_img.dataobj).astype(np.int16), ct_in_pet, shape,
                                     psma_img.affine, [lab.index for lab in table])
        psma = np.asarray(psma_img.dataobj, np.float32)
        for lab in table:
            rho, n = voxel_spearman(psma, fapi_on_psma, fr[lab.index] >= 0.5)
            planted = t[(t.gland == lab.gland) & (t.side == lab.side)]["fibrotic_fraction"]
            rows.append(dict(subject_id=sub, gland=lab.gland, side=lab.side, voxel_spearman_rho=rho, n_voxels=n,
                             fibrotic_fraction=float(planted.iloc[0]) if len(planted) else np.nan))
    return pd.DataFrame(rows)


def pipeline_pvc_errors(results: str | Path, truth_dir: str | Path, pvc: dict | None = None) -> pd.DataFrame:
    """PVC accuracy with the pipeline's OWN masks and registrations: the workflow's gland
    statistics of every session against the phantom truth.

    ``pvc`` None: the ``gland_stats`` rows as the run wrote them. Else a ``pvc`` config section
    (e.g. ``{"method": "gtm", "fwhm_mm": {"psma": "auto", "fapi": "auto"}}``): every session is
    measured again from the run's images (:func:`glandpet.measure.session.measure_session`, the PSF from
    :func:`glandpet.measure.pvc.session_fwhm_mm` of the session's PET sidecar). One row per subject x
    session x gland x side with ``volume_err_pct``, ``raw_err_pct`` and ``pvc_err_pct``."""
    import json

    import nibabel as nib

    from glandpet.glands import read_label_table
    from glandpet.measure.session import measure_session
    from glandpet.measure.pvc import session_fwhm_mm
    from glandpet.registration.transforms import ct_to_pet_affine

    results, truth_dir = Path(results), Path(truth_dir)
    truth = pd.read_parquet(truth_dir / "gland_truth.parquet")
    if pvc is None:
        stats = pd.read_parquet(results / "tables" / "gland_stats.parquet")
    else:
        parts = []
        for stats_path in sorted(results.glob("sub-*/ses-*/sub-*_ses-*_gland_stats.parquet")):
            m = layout.parse(stats_path)
            sub, ses = m["subject"], m["session"]
            suv = sorted(stats_path.parent.glob(layout.name(sub, ses) + "_trc-*_desc-suv*_pet.nii.gz"))[0]
            sidecar_path = Path(layout.path(results, sub, ses, "pet.json", trc=layout.parse(suv)["trc"]))
            sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else None
            cfg = {"method": pvc.get("method", "gtm"), "fwhm_mm": {ses: session_fwhm_mm(pvc, ses, sidecar).fwhm_mm}}
            dseg = layout.path(results, sub, ses, "dseg.nii.gz", space="ct")
            measured = measure_session(
                nib.load(suv), nib.load(layout.path(results, sub, ses, "ct.nii.gz")), nib.load(dseg),
                read_label_table(layout.label_table_of(dseg)),
                ct_to_pet_affine(layout.path(results, sub, ses, "xfm.mat", from_="pet", to="ct")), cfg, ses, sidecar)
            parts.append(pd.DataFrame(measured.rows).assign(subject_id=sub, session=ses))
        stats = pd.concat(parts, ignore_index=True)
    keys = ["subject_id", "session", "gland", "side"]
    df = stats.merge(truth[keys + ["true_volume_ml", "true_suv_mean", "psf_fwhm_mm"]], on=keys, how="inner")
    df["volume_err_pct"] = 100 * (df["volume_ml"] - df["true_volume_ml"]) / df["true_volume_ml"]
    df["raw_err_pct"] = 100 * (df["suv_mean"] - df["true_suv_mean"]) / df["true_suv_mean"]
    df["pvc_err_pct"] = 100 * (df["suv_mean_pvc"] - df["true_suv_mean"]) / df["true_suv_mean"]
    return df


#: Fat on CT for the ring statistics: below this CT number (HU) a voxel counts as fat.
FAT_BELOW_HU = -30.0


def ct_ring_stats(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, block_mm: float = 4.0,
                  body_above_hu: float = -300.0) -> pd.DataFrame:
    """Gland and surrounding-tissue CT numbers measured the way they were measured on real
    planning CTs (docs/phantom_calibration.md): the CT and the label map are first brought to
    about ``block_mm`` in-plane voxels (block mean of the HU; a coarse voxel belongs to a gland
    when at least half of its fine voxels do), as on the real scans (3.8-5.1 mm in-plane), then
    per gland label: the gland's median HU, the median HU of its one-voxel ring (6-connected
    dilation of the coarse gland, without any gland and without air outside the body, i.e.
    HU > ``body_above_hu``), their difference (ring - gland) and the ring's fat fraction (HU below
    :data:`FAT_BELOW_HU`). Slices are kept as they are (2-3 mm, like the real ones). ``block_mm``
    None or 0 measures on the CT's own voxels (as the gland means of the 1 mm PSMA PET/CT
    study were)."""
    from scipy import ndimage

    from glandpet.glands import DEFAULT_LABELS

    sp = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    k = [max(1, int(round(block_mm / s))) if i < 2 and block_mm else 1 for i, s in enumerate(sp)]
    s = tuple((n // kk) * kk for n, kk in zip(hu.shape, k))

    def blocks(a):
        a = a[: s[0], : s[1], : s[2]]
        return a.reshape(s[0] // k[0], k[0], s[1] // k[1], k[1], s[2] // k[2], k[2])

    coarse = blocks(np.asarray(hu, np.float32)).mean(axis=(1, 3, 5), dtype=np.float32)
    lab = blocks(np.asarray(labels))
    body = coarse > body_above_hu
    rows = []
    masks = {L.index: (lab == L.index).mean(axis=(1, 3, 5)) >= 0.5 for L in DEFAULT_LABELS}
    anyg = np.zeros(coarse.shape, bool)
    for m in masks.values():
        anyg |= m
    for L in DEFAULT_LABELS:
        g = masks[L.index]
        if not g.any():
            continue
        ring = ndimage.binary_dilation(g) & ~anyg & body
        gv, rv = coarse[g], coarse[ring]
        row = {"gland": L.gland, "side": L.side, "voxels": int(g.sum()), "gland_median_hu": float(np.median(gv)),
               "gland_mean_hu": float(gv.mean()),
               "ring_median_hu": float(np.median(rv)) if rv.size else float("nan"),
               "ring_fat_fraction": float(np.mean(rv < FAT_BELOW_HU)) if rv.size else float("nan")}
        row["ring_minus_gland_hu"] = row["ring_median_hu"] - row["gland_median_hu"]
        rows.append(row)
    return pd.DataFrame(rows)

"""One session measured: its CT labels carried onto the PET grid, per-gland SUV statistics and partial-volume correction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = ["SessionMeasurement", "measure_session", "majority_label_map"]


@dataclass
class SessionMeasurement:
    """``rows``: one dict per gland and side (:func:`glandpet.measure.gland_stats.gland_statistics`
    plus ``pvc_method``, ``pvc_fwhm_mm``, ``suv_mean_pvc``); ``pet_labels``: the majority label map on
    the PET grid (uint8); ``psf``: the PSF the correction used (:func:`glandpet.measure.pvc.session_fwhm_mm`);
    ``measured``: the glands with any label fraction on the PET grid."""

    rows: list[dict]
    pet_labels: np.ndarray
    psf: Any
    measured: list[str]


def majority_label_map(fractions: Mapping[int, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The label of each PET voxel whose largest label fraction is at least one half (else 0)."""
    pet_labels = np.zeros(shape, dtype=np.uint8)
    best = np.zeros(shape, dtype=np.float32)
    for value, frac in fractions.items():
        take = (frac >= 0.5) & (frac > best)
        pet_labels[take], best[take] = value, frac[take]
    return pet_labels


def measure_session(suv_img: Any, ct_img: Any, lab_img: Any, table: list, ct_to_pet: np.ndarray,
                    pvc: Mapping[str, Any], session: str, sidecar: Mapping[str, Any] | None = None) -> SessionMeasurement:
    """Per-gland statistics of one session in its PET space (NIfTI images: SUV, CT and the CT-space
    label map with its label ``table``), with partial-volume correction.

    The CT labels are carried onto the PET grid as per-voxel label fractions through ``ct_to_pet``
    (4x4, RAS mm: a CT point to the PET point of the same tissue; no interpolation of label values);
    volumes come from the CT labels. ``pvc``: the config section (``method`` gtm | rbv | none, the
    PSF); the PSF of ``session`` comes from it or the PET ``sidecar``.
    """
    from glandpet.measure.gland_stats import gland_statistics, label_fractions_on_grid, volume_ml_from_labels, voxel_sizes
    from glandpet.measure.pvc import background_regions, body_fraction_from_ct, gtm, rbv_region_means, session_fwhm_mm

    suv = np.asarray(suv_img.dataobj, dtype=np.float32)
    labels = np.asarray(lab_img.dataobj).astype(np.int16)
    ct_in_pet = ct_to_pet @ lab_img.affine
    values = [lab.index for lab in table]
    fractions = label_fractions_on_grid(labels, ct_in_pet, suv.shape, suv_img.affine, values)
    volumes = volume_ml_from_labels(labels, lab_img.affine, values)
    rows = gland_statistics(suv, fractions, suv_img.affine, table, volumes_ml=volumes)

    method = pvc.get("method", "gtm")
    psf = session_fwhm_mm(pvc, session, sidecar)
    by_name = {f"{lab.gland}_{lab.side}": fractions[lab.index] for lab in table if fractions[lab.index].sum() > 0}
    corrected: dict[str, float] = {}
    if method != "none" and by_name:
        ct = np.asarray(ct_img.dataobj, dtype=np.float32)
        body = body_fraction_from_ct(ct, ct_to_pet @ ct_img.affine, suv.shape, suv_img.affine)
        regions = dict(by_name)
        regions.update(background_regions(by_name, body))
        corrected = (gtm if method == "gtm" else rbv_region_means)(suv, regions, psf.fwhm_mm, voxel_sizes(suv_img.affine))
    for row in rows:
        row.update(pvc_method=method, pvc_fwhm_mm=psf.fwhm_mm if method != "none" else None,
                   suv_mean_pvc=corrected.get(f"{row['gland']}_{row['side']}"))
    return SessionMeasurement(rows, majority_label_map(fractions, suv.shape), psf, sorted(by_name))

"""Segmentation agreement between two binary masks on the same grid: Dice, symmetric mean surface
distance and HD95 in millimetres, and volumes.

Surfaces are voxel surfaces: the mask's voxels with a 6-neighbour outside it (the image border
counts as outside). Distances are Euclidean between voxel centres in world millimetres, with the
voxel spacing of each axis (anisotropic grids are exact; a rotated direction matrix does not change
distances). From the directed distances ``d(A->B)`` (each surface voxel of A to the nearest surface
voxel of B) and ``d(B->A)``:

- mean surface distance (MSD, also "average symmetric surface distance"): the mean of both sets
  together, ``(sum d(A->B) + sum d(B->A)) / (|dA| + |dB|)``;
- HD95: the larger of the two directed 95th percentiles (the convention of the DeepMind
  ``surface-distance`` package and MONAI); HD (100th percentile) likewise.

An empty mask has no surface: with one mask empty Dice is 0 and the distances are NaN (undefined);
with both empty Dice is NaN too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "dice",
    "directed_surface_distances_mm",
    "hausdorff_mm",
    "mask_metrics",
    "mean_surface_distance_mm",
    "spacing_of_affine",
    "surface",
    "volume_ml",
]

_SIX = ndi.generate_binary_structure(3, 1)


def spacing_of_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) of each array axis from a NIfTI affine (the columns' lengths)."""
    a = np.asarray(affine, float)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(a, axis=0))


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks on different grids: shape {a.shape} vs {b.shape}")
    return a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); NaN when both are empty."""
    a, b = _check(a, b)
    n = int(a.sum()) + int(b.sum())
    return float("nan") if n == 0 else 2.0 * float(np.logical_and(a, b).sum()) / n


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Voxel count x voxel volume, in mL."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's voxels with at least one 6-neighbour outside it (outside the image counts)."""
    m = np.asarray(mask, bool)
    if m.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got {m.ndim}-D")
    return m & ~ndi.binary_erosion(m, structure=_SIX, border_value=0)


def _crop_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both masks, +1 voxel (distances inside it are those of the full grid)."""
    idx = np.argwhere(a | b)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, a.shape)
    return tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))


def directed_surface_distances_mm(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``
    (empty array if ``a`` is empty; NaN for each of them if ``b`` is empty)."""
    a, b = _check(a, b)
    if not a.any():
        return np.zeros(0)
    if not b.any():
        return np.full(int(surface(a).sum()), np.nan)
    box = _crop_box(a, b)
    a, b = a[box], b[box]
    # surfaces on the cropped grid: crop kept a 1-voxel margin, so only masks touching the image
    # border differ from the full grid, and those voxels are surface in both (border = outside)
    sa = surface(a)
    sb = surface(b)
    dist = ndi.distance_transform_edt(~sb, sampling=[float(s) for s in spacing])
    return dist[sa]


def _both(a, b, spacing) -> tuple[np.ndarray, np.ndarray]:
    return directed_surface_distances_mm(a, b, spacing), directed_surface_distances_mm(b, a, spacing)


def mean_surface_distance_mm(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric mean surface distance (mm); NaN if either mask is empty."""
    dab, dba = _both(a, b, spacing)
    return _msd(dab, dba)


def hausdorff_mm(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """Symmetric Hausdorff distance at ``percentile`` (95: HD95; 100: HD), mm; NaN if either mask is empty."""
    dab, dba = _both(a, b, spacing)
    return _hd(dab, dba, percentile)


def _msd(dab: np.ndarray, dba: np.ndarray) -> float:
    if dab.size == 0 or dba.size == 0:
        return float("nan")
    return float((dab.sum() + dba.sum()) / (dab.size + dba.size))


def _hd(dab: np.ndarray, dba: np.ndarray, percentile: float) -> float:
    if dab.size == 0 or dba.size == 0:
        return float("nan")
    return float(max(np.percentile(dab, percentile), np.percentile(dba, percentile)))


def mask_metrics(truth: np.ndarray, auto: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, MSD and HD95 (mm), both volumes (mL) and the automatic volume's relative error (%,
    (auto - truth) / truth; NaN for an empty truth) of an automatic mask against a reference one."""
    truth, auto = _check(truth, auto)
    dab, dba = _both(truth, auto, spacing)
    v_t, v_a = volume_ml(truth, spacing), volume_ml(auto, spacing)
    return {
        "dice": dice(truth, auto),
        "msd_mm": _msd(dab, dba),
        "hd95_mm": _hd(dab, dba, 95.0),
        "volume_contour_ml": v_t,
        "volume_auto_ml": v_a,
        "volume_error_pct": 100.0 * (v_a - v_t) / v_t if v_t > 0 else float("nan"),
    }

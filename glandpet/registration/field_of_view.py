"""The head-and-neck field of a CT or PET image: body mask and centre, head-neck box, crops and isotropic
resampling.
"""

from __future__ import annotations

import math

import numpy as np

from glandpet.registration.transforms import load_ants

#: head-and-neck crop: this far below the top of the body (vertex), with this margin around the body.
HEAD_NECK_DEPTH_MM = 280.0


HEAD_NECK_MARGIN_MM = 10.0


BODY_HU = -500.0


def world_coords(img, index: np.ndarray) -> np.ndarray:
    """LPS coordinates (N, 3) of voxel indices (N, 3) of an ANTs image."""
    d = np.asarray(img.direction, float)
    sp = np.asarray(img.spacing, float)
    org = np.asarray(img.origin, float)
    return (np.asarray(index, float) * sp) @ d.T + org


def body_mask(img, threshold: float = BODY_HU) -> np.ndarray:
    """Largest connected body component of a CT (HU > threshold), as a numpy bool array."""
    from scipy import ndimage as ndi

    m = img.numpy() > threshold
    lab, n = ndi.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    return m


def head_neck_box(img, depth_mm: float = HEAD_NECK_DEPTH_MM, margin_mm: float = HEAD_NECK_MARGIN_MM,
                  body: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index box (lower, upper inclusive) of the head and neck: the body within ``depth_mm``
    below its most superior point (LPS +z), plus ``margin_mm`` all round, clipped to the image."""
    if body is None:
        body = body_mask(img)
    idx = np.argwhere(body)
    if len(idx) == 0:
        return np.zeros(3, int), np.array(img.shape) - 1
    sub = idx[:: max(1, len(idx) // 200000)]
    z = world_coords(img, sub)[:, 2]
    ztop = z.max()
    zall = world_coords(img, idx)[:, 2]
    keep = idx[zall >= ztop - depth_mm]
    sp = np.asarray(img.spacing, float)
    marg = np.ceil(margin_mm / sp).astype(int)
    lo = np.maximum(keep.min(0) - marg, 0)
    hi = np.minimum(keep.max(0) + marg, np.array(img.shape) - 1)
    return lo, hi


def crop(img, lo, hi):
    return load_ants().crop_indices(img, [int(v) for v in lo], [int(v) + 1 for v in hi])


def resample_iso(img, spacing_mm: float, interp: str = "linear", smooth: bool = True):
    """Resample to an isotropic grid (anti-aliasing Gaussian first when downsampling)."""
    ants = load_ants()
    sp = np.asarray(img.spacing, float)
    if smooth and np.any(spacing_mm > sp * 1.2):
        sig = [max(0.0, 0.5 * math.sqrt(max(spacing_mm**2 - s**2, 0.0))) for s in sp]
        img = ants.smooth_image(img, sig, sigma_in_physical_coordinates=True)
    return ants.resample_image(img, (spacing_mm,) * 3, use_voxels=False,
                               interp_type=0 if interp == "linear" else 1)


def body_com(img, threshold: float = BODY_HU) -> np.ndarray:
    m = body_mask(img, threshold)
    idx = np.argwhere(m)
    if len(idx) == 0:
        return world_coords(img, (np.array(img.shape) - 1)[None] / 2.0)[0]
    return world_coords(img, idx.mean(0)[None])[0]


def head_centre(img, depth_mm: float = 180.0) -> np.ndarray:
    """Centroid (LPS mm) of the body in the ``depth_mm`` below the vertex (a head-centre proxy)."""
    m = body_mask(img)
    idx = np.argwhere(m)
    if len(idx) == 0:
        return world_coords(img, (np.array(img.shape) - 1)[None] / 2.0)[0]
    w = world_coords(img, idx)
    w = w[w[:, 2] >= w[:, 2].max() - depth_mm]
    return w.mean(0)

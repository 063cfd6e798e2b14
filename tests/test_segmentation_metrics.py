"""Segmentation metrics (glandpet.segmentation.metrics) on shapes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glandpet.segmentation.metrics import dice, directed_surface_distances_mm, hausdorff_mm, mask_metrics, mean_surface_distance_mm, spacing_of_affine, surface, volume_ml


def _sphere(shape, spacing, centre_mm, r_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= r_mm**2


def test_parallel_plates_anisotropic_exact():
    """Two one-voxel plates 3 voxels apart along axis 0: every surface voxel is 3 x 0.8 mm from the other."""
    sp = (0.8, 1.1, 2.0)
    a = np.zeros((12, 9, 7), bool)
    b = np.zeros_like(a)
    a[4, 2:7, 1:6] = True
    b[7, 2:7, 1:6] = True
    d = directed_surface_distances_mm(a, b, sp)
    assert d.size == 25 and np.allclose(d, 2.4)
    assert mean_surface_distance_mm(a, b, sp) == pytest.approx(2.4)
    assert hausdorff_mm(a, b, sp) == pytest.approx(2.4)
    assert hausdorff_mm(a, b, sp, 100) == pytest.approx(2.4)
    assert dice(a, b) == 0.0
    # along axis 2 instead: 2 voxels x 2.0 mm
    c = np.zeros_like(a)
    e = np.zeros_like(a)
    c[2:9, 2:7, 1] = True
    e[2:9, 2:7, 3] = True
    assert mean_surface_distance_mm(c, e, sp) == pytest.approx(4.0)


def test_identical_masks():
    sp = (0.7, 0.7, 1.5)
    a = _sphere((40, 40, 20), sp, (14, 14, 15), 8.0)
    m = mask_metrics(a, a.copy(), sp)
    assert m["dice"] == 1.0 and m["msd_mm"] == 0.0 and m["hd95_mm"] == 0.0
    assert m["volume_error_pct"] == 0.0
    assert m["volume_contour_ml"] == pytest.approx(a.sum() * 0.7 * 0.7 * 1.5 / 1000)


def test_shifted_boxes_dice_and_volume():
    """Boxes of 10 voxels along axis 1, shifted by 3: Dice (10 - 3) / 10; volumes equal."""
    sp = (1.0, 0.5, 2.0)
    a = np.zeros((20, 30, 20), bool)
    b = np.zeros_like(a)
    a[5:13, 8:18, 4:10] = True
    b[5:13, 11:21, 4:10] = True
    assert dice(a, b) == pytest.approx(0.7)
    m = mask_metrics(a, b, sp)
    assert m["volume_error_pct"] == pytest.approx(0.0)
    assert m["volume_contour_ml"] == pytest.approx(8 * 10 * 6 * 1.0 * 0.5 * 2.0 / 1000)
    # the far faces (axis 1) are 3 x 0.5 mm apart, nothing on either surface is farther
    assert hausdorff_mm(a, b, sp, 100) == pytest.approx(1.5)


def test_concentric_spheres():
    """Radii 8 and 11 mm: every surface point is 3 mm from the other surface; Dice 2 r1^3 / (r1^3 + r2^3).
    Discretisation (0.5 mm voxels) may move a surface voxel by up to half a voxel diagonal (0.43 mm)."""
    sp = (0.5, 0.5, 0.5)
    shape = (56, 56, 56)
    c = (14.0, 14.0, 14.0)
    a, b = _sphere(shape, sp, c, 8.0), _sphere(shape, sp, c, 11.0)
    m = mask_metrics(a, b, sp)
    tol = 0.5 * math.sqrt(3) * 0.5
    assert m["msd_mm"] == pytest.approx(3.0, abs=tol)
    assert m["hd95_mm"] == pytest.approx(3.0, abs=2 * tol)
    assert m["dice"] == pytest.approx(2 * 8**3 / (8**3 + 11**3), abs=0.02)
    assert m["volume_contour_ml"] == pytest.approx(4 / 3 * math.pi * 8**3 / 1000, rel=0.02)
    assert m["volume_error_pct"] == pytest.approx(100 * (11**3 / 8**3 - 1), rel=0.03)


def test_offset_spheres_against_analytic():
    """Two 10 mm spheres 4 mm apart (anisotropic voxels). Overlap volume pi/12 (4r + d)(2r - d)^2;
    a surface point at polar angle t (cos t = u, uniform on the sphere) lies |r - sqrt(r^2 + d^2 -
    2 r d u)| from the other surface: the symmetric MSD is its mean over u, the HD its maximum (d)."""
    r, d = 10.0, 4.0
    sp = (0.5, 0.6, 0.4)
    shape = (60, 45, 70)
    ca = (12.0, 13.5, 12.0)
    cb = (12.0 + d, 13.5, 12.0)
    a, b = _sphere(shape, sp, ca, r), _sphere(shape, sp, cb, r)
    u = np.linspace(-1, 1, 200001)
    dist = np.abs(r - np.sqrt(r**2 + d**2 - 2 * r * d * u))
    msd_true = float(dist.mean())
    hd95_true = float(np.percentile(dist, 95))
    dice_true = (math.pi / 12 * (4 * r + d) * (2 * r - d) ** 2) / (4 / 3 * math.pi * r**3)
    m = mask_metrics(a, b, sp)
    tol = 0.5 * math.sqrt(sum(s**2 for s in sp))  # half a voxel diagonal
    assert m["dice"] == pytest.approx(dice_true, abs=0.02)
    assert m["msd_mm"] == pytest.approx(msd_true, abs=tol)
    assert m["hd95_mm"] == pytest.approx(hd95_true, abs=2 * tol)
    assert hausdorff_mm(a, b, sp, 100) == pytest.approx(d, abs=2 * tol)


def test_distances_match_brute_force_including_the_image_border():
    rng = np.random.default_rng(3)
    sp = (0.9, 1.3, 2.2)
    from scipy import ndimage as ndi

    a = ndi.binary_opening(rng.random((14, 12, 10)) > 0.45)
    b = ndi.binary_opening(rng.random((14, 12, 10)) > 0.5)
    a[0, :4, :4] = True  # touches the border: border voxels are surface
    assert a.any() and b.any()
    pa = np.argwhere(surface(a)) * sp
    pb = np.argwhere(surface(b)) * sp
    brute = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)
    got = directed_surface_distances_mm(a, b, sp)
    assert np.allclose(np.sort(got), np.sort(brute))
    assert surface(a)[0, 0, 0]


def test_empty_masks():
    sp = (1.0, 1.0, 1.0)
    a = np.zeros((5, 5, 5), bool)
    b = np.zeros_like(a)
    b[1:3, 1:3, 1:3] = True
    m = mask_metrics(b, a, sp)  # automatic mask empty
    assert m["dice"] == 0.0 and math.isnan(m["msd_mm"]) and math.isnan(m["hd95_mm"])
    assert m["volume_auto_ml"] == 0.0 and m["volume_error_pct"] == -100.0
    assert math.isnan(dice(a, a))
    assert math.isnan(mask_metrics(a, b, sp)["volume_error_pct"])
    with pytest.raises(ValueError, match="different grids"):
        dice(a, np.zeros((5, 5, 4), bool))


def test_spacing_of_affine_and_volume():
    rot = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.2, 3.0])
    assert spacing_of_affine(aff) == pytest.approx((0.8, 1.2, 3.0))
    m = np.ones((10, 10, 10), bool)
    assert volume_ml(m, (0.8, 1.2, 3.0)) == pytest.approx(2.88)

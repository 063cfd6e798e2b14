"""Per-gland statistics: hand-computed values on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glandpet.glands import DEFAULT_LABELS, Label
from glandpet.measure.gland_stats import PEAK_RADIUS_MM, gland_statistics, label_fractions_on_grid, sphere_kernel, suv_peak, volume_ml_from_labels, weighted_quantile

R = PEAK_RADIUS_MM
SPHERE = 4.0 / 3.0 * math.pi * R**3


def _cap(h: float) -> float:
    """Volume of a spherical cap of height h of the peak sphere."""
    h = min(max(h, 0.0), 2 * R)
    return math.pi * h * h * (3 * R - h) / 3.0


def _slab_overlap(a: float, b: float) -> float:
    """Volume of the peak sphere (centre 0) between the planes x=a and x=b (a<b)."""
    def below(x):  # volume with X < x
        return _cap(R + x) if x < 0 else SPHERE - _cap(R - x)

    return below(b) - below(a)


def test_peak_radius_is_one_ml():
    assert SPHERE == pytest.approx(1000.0, rel=1e-12)
    assert R == pytest.approx(6.2035, abs=1e-4)


@pytest.mark.parametrize("vs", [(2.0, 2.0, 2.0), (4.0, 4.0, 2.0), (2.7, 2.7, 3.27), (1.0, 1.0, 1.0)])
def test_sphere_kernel_volume_and_symmetry(vs):
    k = sphere_kernel(vs)
    assert k.sum() * np.prod(vs) == pytest.approx(1000.0, rel=1e-9)
    assert np.all((k >= 0) & (k <= 1))
    np.testing.assert_allclose(k, k[::-1, ::-1, ::-1], atol=1e-12)
    c = tuple(n // 2 for n in k.shape)
    assert k[c] == 1.0  # the centre voxel lies wholly inside the sphere for these sizes


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_sphere_kernel_matches_analytic_caps(axis):
    """2-mm voxels along one axis, 20 mm (wider than the sphere) along the others: every slab's
    overlap with the sphere is a difference of spherical caps."""
    vs = [20.0, 20.0, 20.0]
    vs[axis] = 2.0
    k = np.moveaxis(sphere_kernel(vs), axis, 0)
    c = k.shape[0] // 2
    for i in range(-4, 5):
        got = k[c + i].sum() * 2.0 * 400.0
        assert got == pytest.approx(_slab_overlap(2 * i - 1, 2 * i + 1), abs=1e-3)


def test_uniform_block_peak_equals_value():
    suv = np.full((20, 20, 20), 3.5)
    labels = np.zeros(suv.shape, np.uint8)
    labels[8:12, 8:12, 8:12] = 1
    (row,) = gland_statistics(suv, labels, (2.0, 2.0, 3.0), [Label(1, "parotid", "left")])
    assert row["suv_peak"] == pytest.approx(3.5, rel=1e-12)
    assert row["suv_max"] == 3.5 and row["suv_mean"] == pytest.approx(3.5)
    assert row["suv_sd"] == pytest.approx(0.0, abs=1e-12)
    assert row["n_voxels"] == 64
    assert row["volume_ml"] == pytest.approx(64 * 12 / 1000)


def test_single_hot_voxel_peak_isotropic():
    """4-mm voxels: the hot voxel lies wholly inside the sphere centred on it; the sphere
    centred on a neighbour covers less of it. Peak = value x voxel volume / 1 mL."""
    suv = np.zeros((15, 15, 15))
    suv[7, 7, 7] = 50.0
    labels = np.zeros(suv.shape, np.uint8)
    labels[5:10, 5:10, 5:10] = 1
    (row,) = gland_statistics(suv, labels, np.diag([4.0, 4.0, 4.0, 1.0]), [Label(1, "lacrimal", "right")])
    assert row["suv_peak"] == pytest.approx(50.0 * 64.0 / 1000.0, rel=1e-9)
    assert row["suv_max"] == 50.0
    assert row["suv_mean"] == pytest.approx(50.0 / 125)


def test_single_hot_voxel_peak_partial_overlap():
    """Slab voxels 2 x 20 x 20 mm: the centre must sit on a gland voxel two voxels away from the
    hot voxel, so the peak is value x (cap-difference volume) / 1 mL."""
    suv = np.zeros((21, 3, 3))
    suv[12, 1, 1] = 10.0
    labels = np.zeros(suv.shape, np.uint8)
    labels[5:11, 1, 1] = 1  # nearest centre to the hot voxel: i = 10, offset 2 voxels = 4 mm
    (row,) = gland_statistics(suv, labels, (2.0, 20.0, 20.0), [Label(1, "lacrimal", "left")])
    assert row["suv_peak"] == pytest.approx(10.0 * _slab_overlap(3.0, 5.0) / 1000.0, rel=1e-5)
    assert row["suv_max"] == 0.0  # the hot voxel is not a gland voxel


def test_peak_sphere_outside_image_is_mean_over_inside_part():
    suv = np.full((6, 6, 6), 2.0)
    mask = np.zeros(suv.shape, bool)
    mask[0, 0, 0] = True  # corner: 7/8 of the sphere is outside the image
    assert suv_peak(suv, mask, (2.0, 2.0, 2.0)) == pytest.approx(2.0, rel=1e-12)
    suv2 = suv.copy()
    suv2[1:, :, :] = np.nan  # non-finite voxels are outside valid data too
    assert suv_peak(suv2, mask, (2.0, 2.0, 2.0)) == pytest.approx(2.0, rel=1e-12)


def test_peak_anisotropic_gradient_known_value():
    """A linear ramp along x: the sphere mean at a centre equals the ramp there (symmetry)."""
    x = np.arange(30, dtype=float)
    suv = np.broadcast_to(1.0 + 0.1 * x[:, None, None], (30, 12, 10)).copy()
    mask = np.zeros(suv.shape, bool)
    mask[10:20, 6, 5] = True
    assert suv_peak(suv, mask, (1.5, 2.5, 3.5)) == pytest.approx(1.0 + 0.1 * 19, rel=1e-9)


def test_statistics_hand_computed_binary():
    suv = np.zeros((5, 5, 5))
    labels = np.zeros(suv.shape, np.int16)
    vals = np.array([1.0, 2.0, 4.0, 8.0, 10.0])
    suv[1:4, 2, 2] = vals[:3]
    suv[2, 1, 2], suv[2, 3, 2] = vals[3], vals[4]
    labels[1:4, 2, 2] = 3
    labels[2, 1, 2] = labels[2, 3, 2] = 3
    (row,) = gland_statistics(suv, labels, (2.0, 2.0, 2.0), [Label(3, "submandibular", "left")])
    assert row["suv_mean"] == pytest.approx(5.0)
    assert row["suv_median"] == pytest.approx(4.0)
    assert row["suv_sd"] == pytest.approx(np.std(vals, ddof=1))
    assert row["suv_p90"] == pytest.approx(np.percentile(vals, 90))
    assert row["suv_max"] == 10.0
    assert row["volume_ml"] == pytest.approx(5 * 8 / 1000)
    assert row["total_uptake_ml"] == pytest.approx(5.0 * 0.04)
    assert row["n_voxels"] == 5
    assert (row["gland"], row["side"]) == ("submandibular", "left")


def test_statistics_fractional_weights():
    suv = np.zeros((4, 4, 4))
    suv[1, 1, 1], suv[2, 1, 1], suv[1, 2, 1] = 10.0, 20.0, 100.0
    f = np.zeros(suv.shape, np.float32)
    f[1, 1, 1], f[2, 1, 1], f[1, 2, 1] = 1.0, 0.5, 0.25
    (row,) = gland_statistics(suv, {1: f}, (2.0, 2.0, 2.0), [Label(1, "parotid", "left")], volumes_ml={1: 0.02})
    mean = (10 + 0.5 * 20 + 0.25 * 100) / 1.75
    assert row["suv_mean"] == pytest.approx(mean)
    v1, v2 = 1.75, 1 + 0.25 + 0.0625
    var = (1 * (10 - mean) ** 2 + 0.5 * (20 - mean) ** 2 + 0.25 * (100 - mean) ** 2) / (v1 - v2 / v1)
    assert row["suv_sd"] == pytest.approx(math.sqrt(var))
    assert row["suv_max"] == 20.0  # the 25 % voxel is not a majority voxel
    assert row["n_voxels"] == 2
    assert row["volume_ml"] == 0.02 and row["total_uptake_ml"] == pytest.approx(0.02 * mean)
    # weighted median: positions 0, 1/1.5, 1.5/1.5 -> 10, 20, 100; q=0.5 -> 10 + 0.75*10
    assert row["suv_median"] == pytest.approx(17.5)


def test_weighted_quantile_equals_numpy_for_equal_weights():
    rng = np.random.default_rng(1)
    v = rng.normal(size=37)
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert weighted_quantile(v, np.ones_like(v), q) == pytest.approx(np.quantile(v, q))


def test_missing_and_thin_glands():
    suv = np.ones((6, 6, 6))
    f = np.zeros(suv.shape)
    f[2, 2, 2], f[3, 2, 2] = 0.3, 0.2  # no majority voxel
    rows = gland_statistics(suv * 4, {7: f}, (3.0, 3.0, 3.0), [Label(7, "lacrimal", "left"), Label(8, "lacrimal", "right")])
    assert rows[0]["n_voxels"] == 0 and rows[0]["suv_max"] == 4.0 and rows[0]["suv_peak"] == pytest.approx(4.0)
    assert rows[0]["volume_ml"] == pytest.approx(0.5 * 27 / 1000)
    assert rows[1]["suv_mean"] is None and rows[1]["n_voxels"] == 0


def test_default_label_table_gives_ten_rows():
    suv = np.ones((8, 8, 8))
    lab = np.zeros(suv.shape, np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    rows = gland_statistics(suv, lab, (2.0, 2.0, 2.0))
    assert [(r["gland"], r["side"]) for r in rows] == [(l.gland, l.side) for l in DEFAULT_LABELS]
    assert rows[0]["n_voxels"] == 8 and all(r["n_voxels"] == 0 for r in rows[1:])


def test_volume_ml_from_labels():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[:2, :5, :5] = 1
    lab[5, 5, 5] = 4
    aff = np.diag([0.5, 0.8, 2.0, 1.0])
    assert volume_ml_from_labels(lab, aff) == {1: pytest.approx(50 * 0.8 / 1000), 4: pytest.approx(0.8 / 1000)}
    assert volume_ml_from_labels(lab, aff, [1, 2])[2] == 0.0


def _ct_sphere(centre, radius, n=96, h=1.0):
    aff = np.diag([h, h, h, 1.0])
    aff[:3, 3] = -n * h / 2
    idx = np.indices((n, n, n)).reshape(3, -1).T.astype(float)
    world = idx * h + aff[:3, 3]
    lab = (np.sum((world - np.asarray(centre)) ** 2, axis=1) <= radius**2).reshape(n, n, n).astype(np.uint8)
    return lab, aff


def test_fractions_aligned_grids_exact():
    """PET voxels of exactly 2x2x2 CT voxels: the fractions are the CT voxel counts / 8."""
    lab, aff_ct = _ct_sphere((3.3, -2.1, 0.7), 9.0, n=48)
    aff_pet = np.diag([2.0, 2.0, 2.0, 1.0])
    aff_pet[:3, 3] = aff_ct[:3, 3] + 0.5  # PET voxel (0,0,0) covers CT voxels 0..1
    fr = label_fractions_on_grid(lab, aff_ct, (24, 24, 24), aff_pet, [1, 2], supersample=2)
    expect = lab.reshape(24, 2, 24, 2, 24, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(fr[1], expect, atol=1e-7)
    assert not fr[2].any()


def test_fractions_rotated_grid_volume_and_sum():
    lab1, aff_ct = _ct_sphere((10.0, 0.0, 0.0), 8.0)
    lab2, _ = _ct_sphere((-6.0, 0.0, 0.0), 8.0)
    lab = np.where(lab2 > 0, 2, lab1).astype(np.uint8)  # touching, overlapping: 2 wins there
    th = math.radians(20)
    rot = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    aff_pet = np.eye(4)
    aff_pet[:3, :3] = rot @ np.diag([3.0, 3.0, 2.5])
    aff_pet[:3, 3] = [-1.3, -40.0, -39.0]
    aff_pet[:3, 3] = aff_pet[:3, 3] - aff_pet[:3, :3] @ np.array([10.0, 0.0, 0.0])
    shape = (40, 30, 32)
    fr = label_fractions_on_grid(lab, aff_ct, shape, aff_pet, [1, 2])
    vols = volume_ml_from_labels(lab, aff_ct, [1, 2])
    for v in (1, 2):
        assert fr[v].sum() * 3 * 3 * 2.5 / 1000 == pytest.approx(vols[v], rel=0.01)
    total = fr[1] + fr[2]
    assert total.max() <= 1.0 + 1e-6 and total.min() >= 0.0
    assert fr[1].dtype == np.float32


def _nifti(data, spacing_mm, origin_mm=(0.0, 0.0, 0.0)):
    import nibabel as nib

    aff = np.diag([*spacing_mm, 1.0])
    aff[:3, 3] = origin_mm
    return nib.Nifti1Image(np.asarray(data), aff)


def test_measure_session_of_a_block_gland():
    """measure_session (the measurement step's maths): a 20 mm cube of parotid_left on a 2 mm CT grid,
    uniform SUV 6 inside and 1 outside on a 4 mm PET grid covering the same world box. The volume is
    the cube's, SUVmean inside is 6 where the PET voxels lie wholly in the gland, the label map on the
    PET grid holds the gland where at least half a PET voxel is gland, and a shift of the CT->PET
    transform moves the PET labels by the shift."""
    from glandpet.measure.session import majority_label_map, measure_session

    lab = next(lab for lab in DEFAULT_LABELS if (lab.gland, lab.side) == ("parotid", "left"))
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[10:20, 10:20, 10:20] = lab.index  # voxel edges on both grids: world 20..40 mm on each axis
    ct = _nifti(np.zeros((40, 40, 40), np.int16), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0))
    suv = np.ones((20, 20, 20), np.float32)
    suv[5:10, 5:10, 5:10] = 6.0  # PET voxels 5..9 (4 mm): world 20..40 mm
    pet = _nifti(suv, (4.0, 4.0, 4.0), (2.0, 2.0, 2.0))
    m = measure_session(pet, ct, _nifti(labels, (2.0, 2.0, 2.0), (1.0, 1.0, 1.0)), [lab], np.eye(4), {"method": "none"}, "psma")
    (row,) = m.rows
    assert (row["gland"], row["side"]) == ("parotid", "left")
    assert row["volume_ml"] == pytest.approx(8.0)  # (20 mm)^3
    assert row["suv_mean"] == pytest.approx(6.0) and row["suv_max"] == pytest.approx(6.0)
    assert row["pvc_method"] == "none" and row["pvc_fwhm_mm"] is None and row["suv_mean_pvc"] is None
    assert m.measured == ["parotid_left"]
    assert m.pet_labels.dtype == np.uint8 and np.argwhere(m.pet_labels == lab.index).min(0).tolist() == [5, 5, 5]
    assert (m.pet_labels == lab.index).sum() == 125
    # CT point -> PET point 8 mm further along x: the gland's PET voxels move by 2
    shift = np.eye(4)
    shift[0, 3] = 8.0
    m2 = measure_session(pet, ct, _nifti(labels, (2.0, 2.0, 2.0), (1.0, 1.0, 1.0)), [lab], shift, {"method": "none"}, "psma")
    assert np.argwhere(m2.pet_labels == lab.index).min(0).tolist() == [7, 5, 5]
    # the majority map: a voxel goes to the label with the largest fraction, when it is >= 1/2
    fr = {1: np.array([0.5, 0.4, 0.2]), 2: np.array([0.5, 0.6, 0.3])}
    assert majority_label_map(fr, (3,)).tolist() == [1, 2, 0]

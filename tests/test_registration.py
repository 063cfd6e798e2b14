"""Registration: PET->CT rigid, CT->CT session alignment, transform conventions, robustness.

Small analytic head phantoms (3-4 mm grids) keep each test to seconds. A moved image is made by
evaluating the phantom at M^-1 y for each grid point y: tissue at x (reference frame) then appears
at M x, so the true fixed->moving point map of a registration is x -> M x.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import nibabel as nib
import pytest
from scipy import ndimage as ndi

from glandpet.registration import field_of_view
from glandpet.registration import pet_to_ct
from glandpet.registration import sessions
from glandpet.registration import transforms

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------ analytic phantom
def _ell(p, c, r):
    return (((p - np.asarray(c, float)) / np.asarray(r, float)) ** 2).sum(1) <= 1.0


def phantom_values(p: np.ndarray):
    """HU, activity and gland label (DEFAULT_LABELS values) at LPS points p (N, 3)."""
    n = len(p)
    hu = np.full(n, -1000.0)
    act = np.zeros(n)
    lab = np.zeros(n, np.uint8)
    head = _ell(p, (0, 0, 30), (70, 85, 80))
    neck = ((p[:, 0] / 55) ** 2 + ((p[:, 1] - 10) / 50) ** 2 <= 1) & (p[:, 2] < 10) & (p[:, 2] > -110)
    body = head | neck
    hu[body] = -100.0
    act[body] = 0.5
    inner = _ell(p, (0, 0, 30), (63, 78, 73)) | (((p[:, 0] / 48) ** 2 + ((p[:, 1] - 10) / 43) ** 2 <= 1)
                                                 & (p[:, 2] < 10) & (p[:, 2] > -110))
    hu[inner] = 50.0
    act[inner] = 1.0
    skull = _ell(p, (0, 0, 40), (62, 76, 66)) & (p[:, 2] > 5)
    brain = _ell(p, (0, 0, 42), (55, 69, 59)) & (p[:, 2] > 8)
    hu[skull] = 700.0
    hu[brain] = 35.0
    act[brain] = 3.0
    spine = ((p[:, 0] / 12) ** 2 + ((p[:, 1] - 35) / 12) ** 2 <= 1) & (p[:, 2] < 8)
    hu[spine] = 500.0
    airway = ((p[:, 0] / 8) ** 2 + ((p[:, 1] - 5) / 8) ** 2 <= 1) & (p[:, 2] < -5) & (p[:, 2] > -100)
    hu[airway] = -950.0
    mand = _ell(p, (0, -25, -20), (45, 45, 9)) & ~_ell(p, (0, -25, -20), (37, 37, 12)) & (p[:, 1] < -20)
    hu[mand] = 1000.0
    for s, x in ((1, 52.0), (2, -52.0)):  # patient left = +x
        fat = _ell(p, (x, 8, -5), (16, 23, 25))
        hu[fat & inner] = -100.0
        g = _ell(p, (x, 8, -5), (11, 18, 20))
        hu[g], act[g], lab[g] = 10.0, 10.0, s
    for s, x in ((3, 30.0), (4, -30.0)):
        g = _ell(p, (x, -20, -42), (9, 12, 9))
        fat = _ell(p, (x, -20, -42), (12, 15, 12))
        hu[fat & inner & ~g] = -90.0
        hu[g], act[g], lab[g] = 45.0, 8.0, s
    for s, x in ((7, 33.0), (8, -33.0)):
        fat = _ell(p, (x, -55, 45), (9, 9, 7))
        hu[fat & body] = -100.0
        g = _ell(p, (x, -58, 47), (6, 4, 4))
        hu[g], act[g], lab[g] = 40.0, 6.0, s
    return hu, act, lab


def grid(shape, spacing, centre=(0.0, 0.0, -10.0)):
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def render(shape, spacing, M=np.eye(4), noise=10.0, seed=0, what="ct", fwhm=6.0):
    """Render the phantom moved by M (tissue at x appears at M x) on an LPS grid (PET: voxel
    averages of a 2x finer grid, so partial volume does not bias the registration)."""
    if what == "pet":
        fine, _ = render(tuple(2 * s for s in shape), tuple(s / 2 for s in spacing), M, what="act", fwhm=fwhm)
        arr = fine.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean((1, 3, 5))
        rng = np.random.default_rng(seed)
        arr = arr + rng.normal(0, 0.05, shape) * (arr > 0.1)
        return arr.astype(np.float32), grid(shape, spacing)
    aff = grid(shape, spacing)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    y = idx @ aff[:3, :3].T + aff[:3, 3]
    Minv = np.linalg.inv(M)
    x = y @ Minv[:3, :3].T + Minv[:3, 3]
    hu, act, lab = phantom_values(x)
    rng = np.random.default_rng(seed)
    if what == "ct":
        arr = ndi.gaussian_filter(hu.reshape(shape), 0.5) + rng.normal(0, noise, shape)
    elif what == "act":
        arr = ndi.gaussian_filter(act.reshape(shape), fwhm / 2.355 / np.asarray(spacing))
    else:
        arr = lab.reshape(shape)
        return arr.astype(np.uint8), aff
    return arr.astype(np.float32), aff


def save(arr, aff_lps, path):
    img = nib.Nifti1Image(arr, LPS_TO_RAS @ aff_lps)
    img.set_qform(LPS_TO_RAS @ aff_lps, 1)
    img.set_sform(LPS_TO_RAS @ aff_lps, 1)
    nib.save(img, str(path))
    return str(path)


def rigid(angles_deg, trans_mm, centre=(0.0, 0.0, -10.0)):
    from scipy.spatial.transform import Rotation

    M = np.eye(4)
    M[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    c = np.asarray(centre, float)
    M[:3, 3] = np.asarray(trans_mm, float) + c - M[:3, :3] @ c
    return M


GLAND_POINTS = np.array([[52, 8, -5], [-52, 8, -5], [30, -20, -42], [-30, -20, -42], [33, -58, 47], [-33, -58, 47]],
                        float)
CT_SHAPE, CT_SP = (64, 72, 68), (3.0, 3.0, 3.0)
PET_SHAPE, PET_SP = (48, 54, 52), (4.0, 4.0, 4.0)


def _err(xfm, M):
    A, b = transforms.transform_matrix(str(xfm))
    est = GLAND_POINTS @ A.T + b
    true = GLAND_POINTS @ M[:3, :3].T + M[:3, 3]
    return np.linalg.norm(est - true, axis=1)


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def ct_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg")
    return save(*render(CT_SHAPE, CT_SP), d / "ct.nii.gz")


def test_pet_to_ct_recovers_known_rigid(ct_path, tmp_path):
    M = rigid((2.0, -1.5, 1.0), (3.0, -2.5, 2.0))
    pet = save(*render(PET_SHAPE, PET_SP, M, what="pet"), tmp_path / "pet.nii.gz")
    m = pet_to_ct.register_pet_to_ct(ct_path, pet, tmp_path / "x.mat", threads=2)
    e = _err(tmp_path / "x.mat", M)
    assert e.max() < 1.0, e
    assert m["warning"] is None
    assert m["mi_after"] > m["mi_before"]
    assert abs(m["rotation_deg"] - transforms.rotation_angle_deg(M[:3, :3])) < 0.5
    assert m["seconds"] < 30


def test_pet_to_ct_identity_stays_identity(ct_path, tmp_path):
    pet = save(*render(PET_SHAPE, PET_SP, what="pet"), tmp_path / "pet.nii.gz")
    m = pet_to_ct.register_pet_to_ct(ct_path, pet, tmp_path / "x.mat", threads=1)
    assert _err(tmp_path / "x.mat", np.eye(4)).max() < 1.0
    assert m["displacement_mm"] < 1.0


def test_pet_to_ct_is_bit_reproducible(ct_path, tmp_path):
    """One ITK thread (the workflow's setting): the same inputs give the same transform, bit for bit.
    Each run in a fresh process, as a workflow job is (ITK fixes its thread count at first use)."""
    M = rigid((1.0, 0.5, -1.0), (1.5, -1.0, 2.0))
    pet = save(*render(PET_SHAPE, PET_SP, M, what="pet"), tmp_path / "pet.nii.gz")
    maps = []
    for k in range(2):
        out = tmp_path / f"x{k}.mat"
        code = ("import sys; from glandpet.registration.pet_to_ct import register_pet_to_ct as r; "
                "r(sys.argv[1], sys.argv[2], sys.argv[3], threads=1)")
        subprocess.run([sys.executable, "-c", code, str(ct_path), str(pet), str(out)], check=True)
        maps.append(transforms.transform_matrix(str(out)))
    np.testing.assert_array_equal(maps[0][0], maps[1][0])
    np.testing.assert_array_equal(maps[0][1], maps[1][1])
    assert _err(tmp_path / "x0.mat", M).max() < 1.0


def test_large_correction_warns(ct_path, tmp_path):
    M = rigid((0, 0, 0), (0, 0, 14.0))
    pet = save(*render(PET_SHAPE, PET_SP, M, what="pet"), tmp_path / "pet.nii.gz")
    m = pet_to_ct.register_pet_to_ct(ct_path, pet, tmp_path / "x.mat", threads=2)
    assert m["warning"] and "implausibly large" in m["warning"]
    assert _err(tmp_path / "x.mat", M).max() < 1.5


def test_transform_direction_convention(tmp_path):
    """The written transform maps fixed (CT) points to moving (PET) points: a PET whose content sits
    at x + t reads back at x after warping into CT space; labels go the other way onto the PET grid."""
    from glandpet.segmentation.multi_atlas import labels_to_pet

    shape, sp = (41, 41, 41), (2.0, 2.0, 2.0)
    aff = grid(shape, sp, centre=(0, 0, 0))
    t = np.array([6.0, -4.0, 10.0])
    xfm = transforms.translation_transform(t, str(tmp_path / "t.mat"), centre=(0, 0, 0))
    # point map check
    import ants

    tx = ants.read_transform(xfm)
    assert np.allclose(tx.apply_to_point((1.0, 2.0, 3.0)), np.array([1.0, 2.0, 3.0]) + t, atol=1e-4)
    # a bright voxel in "PET" at world x0 + t
    x0 = np.array([0.0, 0.0, 0.0])
    pet = np.zeros(shape, np.float32)
    ijk = np.rint(np.linalg.solve(aff[:3, :3], x0 + t - aff[:3, 3])).astype(int)
    pet[tuple(ijk)] = 1.0
    pet_p = save(pet, aff, tmp_path / "pet.nii.gz")
    ct_p = save(np.zeros(shape, np.float32), aff, tmp_path / "ct.nii.gz")
    out = transforms.warp(pet_p, ct_p, [xfm], interpolation="nearestNeighbor").numpy()
    got = np.argwhere(out > 0.5)[0]
    assert np.allclose(got @ aff[:3, :3].T + aff[:3, 3], x0, atol=1e-3)
    # labels in CT space at x0 land on the PET grid at x0 + t
    lab = np.zeros(shape, np.uint8)
    lab[tuple(np.rint(np.linalg.solve(aff[:3, :3], x0 - aff[:3, 3])).astype(int))] = 5
    lab = ndi.binary_dilation(lab > 0, iterations=2).astype(np.uint8) * 5
    lab_p = save(lab, aff, tmp_path / "lab.nii.gz")
    labels_to_pet(lab_p, pet_p, xfm, tmp_path / "lab_pet.nii.gz")
    lp = np.asarray(nib.load(str(tmp_path / "lab_pet.nii.gz")).dataobj)
    centre = np.argwhere(lp == 5).mean(0)
    assert np.allclose(centre @ aff[:3, :3].T + aff[:3, 3], x0 + t, atol=1.0)


@pytest.mark.parametrize("angles,trans", [((10, 0, 0), (15, 0, 0)), ((0, -10, 8), (-15, 10, 0)),
                                          ((-8, 6, -10), (0, -15, 15))])
def test_perturbed_starts_converge(ct_path, angles, trans, tmp_path):
    """Rigid -> affine from a body centre-of-mass start recovers +-10 deg / +-15 mm poses."""
    import ants

    M = rigid(angles, trans)
    mov = save(*render(CT_SHAPE, CT_SP, M, seed=1), tmp_path / "mov.nii.gz")
    f, _ = sessions.prepare_ct(ants.image_read(ct_path), 3.0)
    m, _ = sessions.prepare_ct(ants.image_read(mov), 3.0, margin_mm=30)
    r = sessions.register_ct_to_ct(f, m, str(tmp_path / "p_"), [sessions.CT_CT_RIGID, sessions.CT_CT_AFFINE])
    e = _err(r["fwdtransforms"][-1], M)
    assert e.max() < 1.5, e


def test_align_sessions_files_and_roundtrip(ct_path, tmp_path):
    import ants

    M = rigid((4, -3, 2), (5, -6, 4))
    mov = save(*render(CT_SHAPE, CT_SP, M, seed=2), tmp_path / "mov.nii.gz")
    out = sessions.align_sessions(ct_path, mov, tmp_path / "sub-1_from-fapi_to-psma", threads=2, spacing_mm=3.0)
    for k in ("affine", "warp", "inverse_warp"):
        assert (tmp_path / out[k].split("/")[-1]).exists()
    assert out["cc_after"] > out["cc_before"]
    # fixed -> moving point map of the composed transform ~ M at the glands
    import pandas as pd

    df = pd.DataFrame(GLAND_POINTS, columns=["x", "y", "z"])
    est = ants.apply_transforms_to_points(3, df, [out["warp"], out["affine"]])[["x", "y", "z"]].to_numpy()
    true = GLAND_POINTS @ M[:3, :3].T + M[:3, 3]
    assert np.linalg.norm(est - true, axis=1).max() < 1.5
    # moving labels -> fixed space and back stay labels
    lab_m = save(*render(CT_SHAPE, CT_SP, M, what="lab"), tmp_path / "lab_mov.nii.gz")
    back = transforms.apply_session_transform(lab_m, ct_path, tmp_path / "sub-1_from-fapi_to-psma", tmp_path / "lab_fix.nii.gz",
                                     interpolation="genericLabel")
    vals = set(np.unique(back.numpy()).astype(int))
    assert vals <= {0, 1, 2, 3, 4, 7, 8}
    ref, _ = render(CT_SHAPE, CT_SP, what="lab")
    got = np.asarray(nib.load(str(tmp_path / "lab_fix.nii.gz")).dataobj)
    d = 2 * ((got == 1) & (ref == 1)).sum() / ((got == 1).sum() + (ref == 1).sum())
    assert d > 0.8
    fw = transforms.apply_inverse_session_transform(tmp_path / "lab_fix.nii.gz", mov, tmp_path / "sub-1_from-fapi_to-psma")
    assert set(np.unique(fw.numpy()).astype(int)) <= vals


def test_transform_matrix_reads_ants_affine_files_without_ants(tmp_path):
    """The .mat reader (no ANTs import) gives the map ITK applies: rotation about a centre plus a
    translation, as ANTs writes it; a text transform goes through ANTs."""
    import ants

    M = rigid((3.0, -2.0, 4.0), (5.0, -7.0, 2.5), centre=(10.0, -20.0, 30.0))
    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="float", dimension=3,
                                    matrix=M[:3, :3], translation=tuple(M[:3, 3]))
    tx.set_fixed_parameters((4.0, -6.0, 8.0))  # a centre: ITK folds it into the offset
    for name in ("t.mat", "t.txt"):
        ants.write_transform(tx, str(tmp_path / name))
        A, b = transforms.transform_matrix(str(tmp_path / name))
        for p in GLAND_POINTS:
            np.testing.assert_allclose(A @ p + b, tx.apply_to_point(tuple(p)), atol=1e-3)


# ------------------------------------------------------------------ QC: mutual information
# Real PET/CT hold intensities far beyond the body's: a hot focus (PSMA/FAPI uptake 10-50x the
# background; the demo's PET maximum is 9x its 99th percentile) and dental metal (CT 2,500+ HU).
HOT_LPS, METAL_LPS = np.array([0.0, -30.0, -60.0]), np.array([12.0, -66.0, -20.0])


def _ball(shape, spacing, centre, radius_mm):
    aff = grid(shape, spacing)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return (np.linalg.norm(idx @ aff[:3, :3].T + aff[:3, 3] - centre, axis=1) <= radius_mm).reshape(shape)


def _hot_pet(M, seed=0):
    """The phantom PET moved by M, plus a hot focus (15x the glands) that moves with the anatomy."""
    arr, aff = render(PET_SHAPE, PET_SP, M, what="pet", seed=seed)
    fine = _ball(tuple(2 * s for s in PET_SHAPE), tuple(s / 2 for s in PET_SP), M[:3, :3] @ HOT_LPS + M[:3, 3], 6.0)
    arr = arr + 150.0 * fine.reshape(PET_SHAPE[0], 2, PET_SHAPE[1], 2, PET_SHAPE[2], 2).mean((1, 3, 5))
    return arr.astype(np.float32), aff


@pytest.fixture(scope="module")
def ct_metal_path(tmp_path_factory):
    arr, aff = render(CT_SHAPE, CT_SP)
    arr = arr + 2500.0 * ndi.gaussian_filter(_ball(CT_SHAPE, CT_SP, METAL_LPS, 4.0).astype(float), 0.5)
    return save(arr.astype(np.float32), aff, tmp_path_factory.mktemp("reg_metal") / "ct.nii.gz")


def test_qc_mi_is_largest_when_aligned(ct_metal_path, tmp_path):
    """The QC MI falls as the PET moves off its CT (0 -> 3 mm): larger = better aligned."""
    import ants

    ct3 = field_of_view.resample_iso(transforms.as_float(ants.image_read(ct_metal_path)), pet_to_ct.PET_CT_SPACING_MM)
    mi = []
    for s in (0.0, 1.0, 2.0, 3.0):
        pet = save(*_hot_pet(rigid((0, 0, 0), (s, -s / 2, s / 2))), tmp_path / f"pet{s}.nii.gz")
        on_ct = ants.resample_image_to_target(transforms.as_float(ants.image_read(pet)), ct3, interp_type="linear")
        mi.append(pet_to_ct.mutual_information(ct3, on_ct))
    assert all(a > b for a, b in zip(mi, mi[1:])), mi


@pytest.mark.parametrize("seed,angles,trans", [(1, (-0.3, 0.6, -0.2), (-0.9, 1.1, 1.0)),
                                               (2, (0.8, 0.2, -0.5), (0.5, 1.5, -1.0)),
                                               (3, (0.2, -0.6, 0.4), (-1.4, -0.6, -0.8))])
def test_pet_to_ct_qc_reports_the_improvement(ct_metal_path, tmp_path, seed, angles, trans):
    """Issue 17: a registration that brings the PET 2-2.5 mm nearer its CT (the demo's size of
    correction) reports mi_after > mi_before, as documented. Before the fix (ANTs' Mattes MI, 32 bins
    over each image's full range and the whole field) two of these three reported no gain or a loss."""
    M = rigid(angles, trans)
    pet = save(*_hot_pet(M, seed=seed), tmp_path / "pet.nii.gz")
    m = pet_to_ct.register_pet_to_ct(ct_metal_path, pet, tmp_path / "x.mat", threads=1)
    before = _err(transforms.translation_transform((0, 0, 0), str(tmp_path / "id.mat")), M).max()
    after = _err(tmp_path / "x.mat", M).max()
    assert after < 1.0 and before > 1.8, (before, after)  # the registration did improve the alignment
    assert m["mi_after"] > m["mi_before"], (m["mi_before"], m["mi_after"])


# ------------------------------------------------------------------ threads
_THREAD_VARS = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.mark.parametrize("threads, expected", [(3, "3"), (0, "1"), (-2, "1"), (None, "1"), ("4", "4")])
def test_set_threads_sets_itk_only_by_default(monkeypatch, threads, expected):
    for var in _THREAD_VARS:
        monkeypatch.setenv(var, "untouched")
    assert transforms.set_threads(threads) == int(expected)
    assert [transforms.os.environ[v] for v in _THREAD_VARS] == [expected] + ["untouched"] * 3


@pytest.mark.parametrize("threads, expected", [(3, "3"), (0, "1"), (-2, "1"), (2.7, "2")])
def test_set_threads_with_blas_sets_every_variable(monkeypatch, threads, expected):
    """The workflow's steps (glandpet.workflow.steps imports this one function) limit ITK and BLAS."""
    from glandpet.workflow import steps

    for var in _THREAD_VARS:
        monkeypatch.setenv(var, "untouched")
    assert steps.set_threads is transforms.set_threads
    assert transforms.set_threads(threads, blas=True) == int(expected)
    assert [transforms.os.environ[v] for v in _THREAD_VARS] == [expected] * 4

"""glandpet.geometry: the one home of the RAS <-> LPS world-coordinate flip."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine

from glandpet import geometry
from glandpet.geometry import LPS_TO_RAS, lps_to_ras, ras_to_lps

PACKAGE = Path(geometry.__file__).resolve().parent

#: an oblique, anisotropic affine with a translation: nothing in it is symmetric under the flip
AFFINE = np.array([
    [0.97, -0.12, 0.05, -101.5],
    [0.11, 0.95, -0.21, 37.25],
    [-0.03, 0.2, 2.9, -412.0],
    [0.0, 0.0, 0.0, 1.0],
])


def test_flip_is_its_own_inverse():
    assert LPS_TO_RAS.shape == (4, 4)
    assert np.array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))
    assert np.array_equal(np.linalg.inv(LPS_TO_RAS), LPS_TO_RAS)
    assert np.array_equal(LPS_TO_RAS, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_flip_is_read_only():
    assert not LPS_TO_RAS.flags.writeable


def test_helpers_round_trip_an_affine():
    assert np.array_equal(lps_to_ras(ras_to_lps(AFFINE)), AFFINE)
    assert np.array_equal(ras_to_lps(lps_to_ras(AFFINE)), AFFINE)
    assert not np.allclose(ras_to_lps(AFFINE), AFFINE)


def test_helpers_are_the_inline_product_bit_for_bit():
    inline = np.diag([-1.0, -1.0, 1.0, 1.0])
    for a in (AFFINE, AFFINE.astype(np.float32), np.round(AFFINE).astype(int), AFFINE.tolist()):
        for helper in (ras_to_lps, lps_to_ras):
            out = helper(a)
            assert out.dtype == np.float64
            assert out.tobytes() == (inline @ np.asarray(a, dtype=float)).tobytes()
    out = ras_to_lps(AFFINE)
    assert out is not AFFINE and out.flags.writeable  # a new array: callers may edit it


def test_world_points_agree_up_to_the_sign_of_x_and_y():
    img = nib.Nifti1Image(np.zeros((5, 6, 7), dtype=np.float32), AFFINE)  # NIfTI: RAS
    ijk = np.array([[0, 0, 0], [4, 5, 6], [1.5, 2.25, 3.0]])
    ras = apply_affine(img.affine, ijk)
    lps = apply_affine(ras_to_lps(img.affine), ijk)
    assert np.allclose(lps, ras * [-1.0, -1.0, 1.0], rtol=0, atol=1e-12)
    assert np.allclose(lps[:, 2], ras[:, 2], rtol=0, atol=0)


def test_transform_conjugated_by_the_flip_acts_on_ras_points():
    """``LPS_TO_RAS @ T @ LPS_TO_RAS`` is an LPS-point transform ``T`` acting on RAS points."""
    t_lps = AFFINE
    t_ras = LPS_TO_RAS @ t_lps @ LPS_TO_RAS
    p_ras = np.array([[10.0, -20.0, 30.0], [-5.0, 7.5, -80.0]])
    p_lps = p_ras * [-1.0, -1.0, 1.0]
    assert np.allclose(apply_affine(t_ras, p_ras), apply_affine(t_lps, p_lps) * [-1.0, -1.0, 1.0])


#: np.diag([-1.0, -1.0, 1.0, 1.0]), np.diag([-1, -1, 1, 1]), np.diag((-1., -1, 1, 1)), ...
_INLINE_FLIP = re.compile(r"np\.diag\(\s*[\[(]\s*-1(?:\.0*)?\s*,\s*-1(?:\.0*)?\s*,\s*1(?:\.0*)?\s*,\s*1(?:\.0*)?\s*[\])]")

def test_the_flip_is_written_only_in_geometry():
    assert _INLINE_FLIP.search("np.diag([-1.0, -1.0, 1.0, 1.0])") and _INLINE_FLIP.search("np.diag([-1, -1, 1, 1])")
    assert _INLINE_FLIP.search("np.diag([-1.0, -1, 1, 1])") and _INLINE_FLIP.search("np.diag((-1., -1., 1., 1.))")
    found = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if _INLINE_FLIP.search(path.read_text(encoding="utf-8"))
    )
    assert found == ["geometry.py"]


def test_re_exported_names_are_the_one_matrix():
    from glandpet.dicom import series
    from glandpet.phantom import model

    assert series.LPS_TO_RAS is LPS_TO_RAS
    assert model.LPS_TO_RAS is LPS_TO_RAS


def test_transform_lps_to_ras_is_the_flip_conjugate_exactly():
    from glandpet.geometry import transform_lps_to_ras

    t = np.array(AFFINE, dtype=float)
    got = transform_lps_to_ras(t)
    assert np.array_equal(got, LPS_TO_RAS @ t @ LPS_TO_RAS)
    assert np.array_equal(transform_lps_to_ras(got), t)

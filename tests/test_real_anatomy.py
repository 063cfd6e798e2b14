"""Phantom individuals from the real TCIA head-and-neck label maps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from glandpet.glands import label_value
from glandpet.phantom.model import Tissue
from glandpet.phantom.real_anatomy import (
    CONTEXT_FILES,
    GLAND_FILES,
    REQUIRED_CONTEXT,
    build_real_anatomy,
    list_real_cases,
    load_annotator_pair,
)

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
LABELS = DATA / "tcia-hn-oar-labels"
CASE = "0522c0017"

needs_data = pytest.mark.skipif(
    not LABELS.is_dir(), reason=f"real label maps not available ({LABELS} is absent): skipping real-anatomy tests"
)


@pytest.fixture(scope="module")
def built():
    t0 = time.perf_counter()
    anat = build_real_anatomy(LABELS, CASE, np.random.default_rng(7))
    return anat, time.perf_counter() - t0


def _world(anat, mask):
    idx = np.argwhere(mask)
    return idx @ anat.affine[:3, :3].T + anat.affine[:3, 3]


def _centroid(anat, mask):
    return _world(anat, mask).mean(0)


def _vol(anat, gland, side):
    return float((anat.glands == label_value(gland, side)).sum() * anat.voxel_volume_ml)


# ----------------------------------------------------------------------------------------------
# listing and missing / empty files (synthetic tree: fast, no shared data needed)


def _write_nrrd(path: Path, data: np.ndarray):
    import nrrd

    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.98, 0.98, 2.5]),
        "space origin": np.array([-10.0, 20.0, -100.0]),
        "encoding": "gzip",
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(path), data.astype(np.uint8), hdr)


def test_list_cases_skips_missing_and_empty(tmp_path):
    full = np.zeros((8, 8, 4), np.uint8)
    full[2:4, 2:4, 1:3] = 1
    for annot in ("oncologist", "radiographer"):
        for case in ("good", "missing", "empty", "fallback"):
            for name in (*GLAND_FILES, *REQUIRED_CONTEXT):
                if case == "missing" and name == "Parotid-Lt":
                    continue
                if case == "fallback" and annot == "oncologist" and name == "Lacrimal-Rt":
                    continue  # only the radiographer drew it: usable via the fallback
                data = np.zeros_like(full) if (case == "empty" and name == "Submandibular-Rt") else full
                _write_nrrd(tmp_path / "nrrds" / "test" / annot / case / "segmentations" / f"{name}.nrrd", data)
    assert list_real_cases(tmp_path) == ["fallback", "good"]
    assert list_real_cases(tmp_path, annotator="radiographer") == ["fallback", "good"]
    pair = load_annotator_pair(tmp_path, "fallback")
    assert "Lacrimal-Rt" not in pair and "Parotid-Lt" in pair
    m_o, m_r, aff = pair["Parotid-Lt"]
    assert m_o.dtype == bool and m_o.shape == (8, 8, 4) and np.allclose(np.diag(aff)[:3], [0.98, 0.98, 2.5])
    with pytest.raises(ValueError, match="lacks"):
        build_real_anatomy(tmp_path, "empty", np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# the real data


@needs_data
def test_list_real_cases(tmp_path):
    # three real cases linked into a small tree (listing all 35 scans reads ~400 files: slow)
    for case in (CASE, "0522c0057", "TCGA-CV-7243"):
        for annot in ("oncologist", "radiographer"):
            src = LABELS / "nrrds" / "test" / annot / case
            dst = tmp_path / "nrrds" / "test" / annot / case
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src, target_is_directory=True)
    cases = list_real_cases(tmp_path)
    assert cases == sorted(cases)
    assert CASE in cases and len(cases) >= 2


@needs_data
def test_build_fast(built):
    _, seconds = built
    assert seconds < 30.0, f"building one real anatomy took {seconds:.1f} s"


@needs_data
def test_affine_exact(built):
    import nrrd

    anat, _ = built
    hdr = nrrd.read_header(str(LABELS / "nrrds" / "test" / "oncologist" / CASE / "segmentations" / "Brain.nrrd"))
    dirs = np.asarray(hdr["space directions"], float)
    np.testing.assert_allclose(anat.affine[:3, :3], dirs.T, atol=0)
    # the crop origin lies exactly on the NRRD grid
    ijk = np.linalg.solve(dirs.T, anat.affine[:3, 3] - np.asarray(hdr["space origin"], float))
    np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-6)
    # the real glands are unchanged by the crop: parotid voxels equal the NRRD's, in world space
    full, h2 = nrrd.read(str(LABELS / "nrrds" / "test" / "oncologist" / CASE / "segmentations" / "Parotid-Lt.nrrd"))
    w_full = np.argwhere(full > 0) @ dirs + np.asarray(h2["space origin"], float)
    w_anat = _world(anat, anat.glands == label_value("parotid", "left"))
    assert len(w_full) == len(w_anat)
    np.testing.assert_allclose(np.sort(w_full, axis=0), np.sort(w_anat, axis=0), atol=1e-6)


@needs_data
def test_arrays_and_tissues(built):
    anat, _ = built
    assert anat.tissue.dtype == np.uint8 and anat.glands.dtype == np.uint8
    assert anat.tissue.shape == anat.glands.shape
    assert anat.source.endswith(CASE)
    n = anat.tissue.size
    assert n < 12e6, "crop too large"
    present = set(np.unique(anat.tissue))
    for t in (Tissue.AIR, Tissue.FAT, Tissue.SOFT, Tissue.MUSCLE, Tissue.BONE_CORTICAL, Tissue.BONE_SPONGY,
              Tissue.BRAIN, Tissue.CSF, Tissue.AIRWAY, Tissue.EYE, Tissue.TONGUE, Tissue.TEETH,
              Tissue.SPINAL_CORD, Tissue.VESSEL, Tissue.MUCOSA):
        assert t in present, Tissue(t).name
    # every gland voxel is inside the body, and the body does not touch the lateral crop edges
    assert np.all(anat.tissue[anat.glands > 0] != Tissue.AIR)
    body = anat.tissue != Tissue.AIR
    assert not body[0].any() and not body[-1].any() and not body[:, 0].any() and not body[:, -1].any()
    # head-and-neck extent: 18-30 cm craniocaudal
    zext = anat.tissue.shape[2] * abs(anat.affine[2, 2])
    assert 180 <= zext <= 320
    # skull: bone around the brain's top
    vox = anat.voxel_volume_ml
    assert 150 < (anat.tissue == Tissue.BONE_CORTICAL).sum() * vox + (anat.tissue == Tissue.BONE_SPONGY).sum() * vox < 1500
    assert 900 < (anat.tissue == Tissue.BRAIN).sum() * vox < 1800


@needs_data
def test_gland_volumes(built):
    anat, _ = built
    for side in ("left", "right"):
        assert 5 < _vol(anat, "parotid", side) < 60
        assert 2 < _vol(anat, "submandibular", side) < 20
        assert 0.2 < _vol(anat, "lacrimal", side) < 2.0
        assert 1.9 < _vol(anat, "sublingual", side) < 4.1
        assert 0.45 < _vol(anat, "tubarial", side) < 1.55


@needs_data
def test_sides(built):
    anat, _ = built
    for gland in ("parotid", "submandibular", "lacrimal", "sublingual", "tubarial"):
        cl = _centroid(anat, anat.glands == label_value(gland, "left"))
        cr = _centroid(anat, anat.glands == label_value(gland, "right"))
        assert cl[0] > cr[0], f"{gland}: patient left must be at larger LPS x"


@needs_data
def test_added_glands_positions(built):
    anat, _ = built
    mand = np.isin(anat.tissue, (Tissue.BONE_CORTICAL, Tissue.BONE_SPONGY, Tissue.TEETH))
    mid_x = np.mean([_centroid(anat, anat.glands == label_value("parotid", s))[0] for s in ("left", "right")])
    canal = _world(anat, anat.tissue == Tissue.SPINAL_CORD)
    for side, sgn in (("left", 1), ("right", -1)):
        sl = anat.glands == label_value("sublingual", side)
        smg = anat.glands == label_value("submandibular", side)
        par = anat.glands == label_value("parotid", side)
        tub = anat.glands == label_value("tubarial", side)
        c_sl, c_smg, c_par, c_tub = (_centroid(anat, m) for m in (sl, smg, par, tub))
        w_smg = _world(anat, smg)
        # sublingual: on its side, anterior to and above the submandibular gland's centre,
        # medial to it, and close to the inner surface of the mandible
        assert (c_sl[0] - mid_x) * sgn > 3
        assert c_sl[1] < c_smg[1] - 5, "sublingual must lie anterior to the submandibular gland"
        assert c_sl[2] > np.percentile(w_smg[:, 2], 50), "sublingual must lie above the submandibular's mid-level"
        assert abs(c_sl[0] - mid_x) < abs(c_smg[0] - mid_x), "sublingual must lie medial to the submandibular"
        from scipy import ndimage as ndi

        sp = np.abs(np.diag(anat.affine)[:3])
        box = tuple(slice(max(i.min() - 12, 0), i.max() + 13) for i in np.nonzero(sl))
        d_mand = ndi.distance_transform_edt(~mand[box], sampling=sp)
        assert np.median(d_mand[sl[box]]) < 8.0, "sublingual must hug the mandible"
        # tubarial: medial to the parotid, anterior to the spinal canal, above the sublingual,
        # close to the nasopharyngeal airway
        assert abs(c_tub[0] - mid_x) < abs(c_par[0] - mid_x) - 10
        assert (c_tub[0] - mid_x) * sgn > 3
        near = canal[np.abs(canal[:, 2] - c_tub[2]) < 15]
        if len(near):
            assert c_tub[1] < near[:, 1].min() - 10, "tubarial must lie anterior to the spine"
        assert c_tub[2] > c_sl[2] + 20
        w_par = _world(anat, par)
        assert c_tub[2] > np.percentile(w_par[:, 2], 25), "tubarial above the parotid's lower quarter"
        box = tuple(slice(max(i.min() - 12, 0), i.max() + 13) for i in np.nonzero(tub))
        d_air = ndi.distance_transform_edt(~(anat.tissue[box] == Tissue.AIRWAY), sampling=sp)
        assert np.median(d_air[tub[box]]) < 10.0


@needs_data
def test_deterministic(built):
    a, _ = built
    b = build_real_anatomy(LABELS, CASE, np.random.default_rng(7))
    assert np.array_equal(a.tissue, b.tissue) and np.array_equal(a.glands, b.glands)


@needs_data
def test_annotator_pair():
    pair = load_annotator_pair(LABELS, CASE)
    assert "Parotid-Lt" in pair and "Submandibular-Rt" in pair
    m_o, m_r, aff = pair["Parotid-Lt"]
    assert m_o.shape == m_r.shape and m_o.dtype == bool
    dice = 2 * (m_o & m_r).sum() / (m_o.sum() + m_r.sum())
    assert 0.5 < dice <= 1.0
    assert set(pair) <= set(GLAND_FILES) | set(CONTEXT_FILES)

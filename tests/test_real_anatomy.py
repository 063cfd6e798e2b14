"""Phantom individuals from the real TCIA head-and-neck label maps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from glandpet.glands import label_value
from glandpet.phantom.model import Tissue
from glandpet.phantom.real_anatomy import (
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
    names = ("Parotid-Lt", "Submandibular-Rt", "Mandible")
    pair = load_annotator_pair(LABELS, CASE, names)
    assert set(pair) == set(names)
    m_o, m_r, aff = pair["Parotid-Lt"]
    assert m_o.shape == m_r.shape and m_o.dtype == bool
    dice = 2 * (m_o & m_r).sum() / (m_o.sum() + m_r.sum())
    assert 0.5 < dice <= 1.0


# ----------------------------------------------------------------------------------------------
# choosing cases without reading every case (synthetic tree: fast)


def test_select_real_cases_reads_only_what_it_takes(tmp_path, monkeypatch):
    from glandpet.phantom import real_anatomy as ra

    full = np.zeros((8, 8, 4), np.uint8)
    full[2:4, 2:4, 1:3] = 1
    for case in ("a_empty", "b_good", "c_good", "d_missing", "e_good"):
        for name in (*GLAND_FILES, *REQUIRED_CONTEXT):
            if case == "d_missing" and name == "Parotid-Lt":
                continue
            data = np.zeros_like(full) if (case == "a_empty" and name == "Submandibular-Rt") else full
            _write_nrrd(tmp_path / "nrrds" / "test" / "oncologist" / case / "segmentations" / f"{name}.nrrd", data)
    seen = set()
    real = ra._nonempty

    def spy(path):
        seen.add(path.parent.parent.name)
        return real(path)

    monkeypatch.setattr(ra, "_nonempty", spy)
    assert ra.select_real_cases(tmp_path, 1) == (["b_good"], [])
    assert seen == {"a_empty", "b_good"}  # the unusable first case skipped, nothing after read
    seen.clear()
    # atlases from the end (skipping the unusable d_missing), subjects from the start, disjoint
    assert ra.select_real_cases(tmp_path, 5, 2) == (["b_good"], ["e_good", "c_good"])
    assert ra.is_usable_case(tmp_path, "c_good") and not ra.is_usable_case(tmp_path, "d_missing")

    from glandpet.phantom.cohort import assign_real_cases

    subj, atl = assign_real_cases(tmp_path, 3, 1)
    assert subj == ["b_good", "c_good", "b_good"] and atl == ["e_good"]


# ----------------------------------------------------------------------------------------------
# cohort parts on a real anatomy


@needs_data
def test_lesion_in_real_neck_soft_tissue(built):
    """A control's lesion is placed from the real individual's own landmarks (its frame is the
    scan's world, not the parametric head-centred frame), in soft tissue, clear of the glands."""
    import copy

    from glandpet.phantom.anatomy import add_lesion

    anat0, _ = built
    fr = anat0.extra["frame"]
    kinds = set()
    for seed in range(6):
        anat = copy.copy(anat0)
        anat.tissue = anat0.tissue.copy()
        d = add_lesion(anat, np.random.default_rng(seed))
        kinds.add(d["kind"])
        m = anat.tissue == Tissue.TUMOUR
        assert m.sum() == d["n_voxels"]
        vol = m.sum() * anat.voxel_volume_ml
        ball = 4 / 3 * np.pi * (d["radius_mm"] / 10) ** 3
        assert 0.55 * ball < vol < 1.4 * ball, (d, vol, ball)
        prev = anat0.tissue[m]
        soft = np.isin(prev, (Tissue.FAT, Tissue.SOFT, Tissue.MUSCLE, Tissue.MUCOSA, Tissue.TONGUE, Tissue.LYMPH_NODE))
        assert soft.all() and not (anat.glands[m] > 0).any()
        assert d["gland_clearance_mm"] >= 5.0
        c = _centroid(anat, m)
        # in the neck: between the palate and 25 mm below the submandibular glands, within 55 mm
        # of the midline, and in front of the spinal canal's back
        assert min(fr["smg_bottom_z"].values()) - 25 < c[2] < fr["palate_z"], d
        assert abs(c[0] - fr["mid_x"]) < 55, d
        assert np.array_equal(anat0.glands, anat.glands)
    assert kinds == {"node", "tongue_base"}


@needs_data
def test_head_centre_is_the_individuals(built):
    from glandpet.phantom.cohort import head_centre

    anat, _ = built
    c = np.array(head_centre(anat))
    # on the midline between the parotids, at the parotids' level, inside the head
    par = [_centroid(anat, anat.glands == label_value("parotid", s)) for s in ("left", "right")]
    assert abs(c[0] - (par[0][0] + par[1][0]) / 2) < 1e-6
    assert abs(c[2] - (par[0][2] + par[1][2]) / 2) < 35
    i = np.rint(np.linalg.solve(anat.affine[:3, :3], c - anat.affine[:3, 3])).astype(int)
    assert anat.tissue[tuple(i)] != Tissue.AIR


def test_pet_psf_isotropic_on_anisotropic_grid():
    """The PET PSF is in mm: a point on a 1 x 1 x 2.5 mm anatomy grid blurs equally in x and z."""
    from glandpet.phantom.uptake import render_pet

    suv = np.zeros((96, 96, 40), np.float32)
    suv[48, 48, 20] = 1000.0
    A = np.diag([1.0, 1.0, 2.5, 1.0])
    P = np.diag([2.0, 2.0, 2.0, 1.0])
    P[:3, 3] = [-2.0, -2.0, -2.0]
    pet = render_pet(suv, A, (50, 50, 52), P, np.eye(4), 7.0, 0.0, np.random.default_rng(0), add_noise=False)
    idx = np.argwhere(pet > 0)
    w = pet[pet > 0]
    mu = (idx * w[:, None]).sum(0) / w.sum()
    sd_mm = np.sqrt(((idx - mu) ** 2 * w[:, None]).sum(0) / w.sum()) * 2.0
    assert sd_mm[2] == pytest.approx(sd_mm[0], rel=0.2), sd_mm
    assert 2.4 < sd_mm[0] < 4.5  # 7 mm FWHM ~ 3 mm SD (+ voxelisation)


# ----------------------------------------------------------------------------------------------
# a real-anatomy cohort end to end: 1 pSS subject (two sessions) + 1 atlas


@pytest.fixture(scope="module")
def real_cohort(tmp_path_factory):
    from glandpet.phantom.cohort import generate_cohort

    out = tmp_path_factory.mktemp("real_cohort")
    t0 = time.perf_counter()
    generate_cohort(out, 1, 3, anatomy_from=LABELS, n_atlases=1, pss_fraction=1.0, jobs=2, progress=False)
    return out, time.perf_counter() - t0


def _dicom_box(folder: Path):
    """(lo, hi) LPS corners of the voxel centres of an axial DICOM series (headers only)."""
    import pydicom

    ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]
    pos = np.array([d.ImagePositionPatient for d in ds], float)
    ps = np.array(ds[0].PixelSpacing, float)
    assert np.allclose(np.array(ds[0].ImageOrientationPatient, float), [1, 0, 0, 0, 1, 0])
    ext = np.array([ps[1] * (int(ds[0].Columns) - 1), ps[0] * (int(ds[0].Rows) - 1), 0.0])
    return pos.min(0), pos.max(0) + ext


@needs_data
def test_real_cohort_truth_on_the_glands(real_cohort):
    """Truth label maps sit exactly on the real glands in world coordinates (through each
    session's pose), the CT and PET series cover every gland with margin, the atlas is another
    individual, and the truth table is sensible."""
    import nibabel as nib
    import pandas as pd

    from glandpet.glands import DEFAULT_LABELS
    from glandpet.phantom.cohort import assign_real_cases
    from glandpet.phantom.model import LPS_TO_RAS
    from glandpet.phantom.real_anatomy import load_case_labels

    out, seconds = real_cohort
    print(f"real-anatomy cohort (1 subject, 2 sessions, 1 atlas, jobs=2): {seconds:.1f} s")
    (case,), (atlas_case,) = assign_real_cases(LABELS, 1, 1)
    assert case != atlas_case
    assert (out / "atlases" / "atlas01" / "ct.nii.gz").is_file()
    alab = np.asarray(nib.load(out / "atlases" / "atlas01" / "labels.nii.gz").dataobj)
    assert set(np.unique(alab)) == {0} | {L.index for L in DEFAULT_LABELS}
    masks, aff, _ = load_case_labels(LABELS, case, names=list(GLAND_FILES))
    gt = pd.read_parquet(out / "truth" / "gland_truth.parquet")
    xf = pd.read_parquet(out / "truth" / "transforms.parquet")
    assert set(gt.session) == {"psma", "fapi"}
    poses = {}
    for ses in ("psma", "fapi"):
        x = xf[(xf.session == ses) & (xf.from_space == "anatomy")]
        pose = np.array(x[x.to_space == "ct"].matrix_lps.iloc[0]).reshape(4, 4)
        to_pet = np.array(x[x.to_space == "pet"].matrix_lps.iloc[0]).reshape(4, 4)
        poses[ses] = pose
        img = nib.load(out / "truth" / "sub-S001" / f"ses-{ses}" / f"sub-S001_ses-{ses}_space-ct_dseg.nii.gz")
        lab = np.asarray(img.dataobj)
        A = LPS_TO_RAS @ img.affine
        sdir = next((out / "dicom" / "S001").glob(f"*_{ses.upper()}"))
        ct_lo, ct_hi = _dicom_box(next(sdir.glob("02_*")))
        pet_lo, pet_hi = _dicom_box(next(p for p in sdir.iterdir() if p.name[:3] in ("03_", "04_") and "NAC" not in p.name))
        # the CT grid is the truth label map's grid
        np.testing.assert_allclose(A[:3, 3], ct_lo, atol=1e-3)
        rows = gt[gt.session == ses]
        for name, (gland, side) in GLAND_FILES.items():
            m = masks[name] > 0
            w = np.argwhere(m) @ aff[:3, :3].T + aff[:3, 3]  # real label voxels, anatomy (NRRD) world
            v = label_value(gland, side)
            lw = np.argwhere(lab == v) @ A[:3, :3].T + A[:3, 3]
            # every truth voxel, mapped back through the pose, falls on a real label voxel
            back = np.c_[lw, np.ones(len(lw))] @ (np.linalg.inv(aff) @ np.linalg.inv(pose)).T
            bi = np.rint(back[:, :3]).astype(int)
            inside = np.all((bi >= 0) & (bi < m.shape), axis=1)
            assert inside.all() and m[tuple(bi.T)].mean() > 0.999, (ses, name)
            wc = w @ pose[:3, :3].T + pose[:3, 3]
            assert np.linalg.norm(lw.mean(0) - wc.mean(0)) < 1.0, (ses, name)
            # CT and PET cover the gland with >= 10 mm margin
            wp = w @ to_pet[:3, :3].T + to_pet[:3, 3]
            assert (wc.min(0) - ct_lo).min() > 10 and (ct_hi - wc.max(0)).min() > 10, (ses, name)
            assert (wp.min(0) - pet_lo).min() > 10 and (pet_hi - wp.max(0)).min() > 10, (ses, name)
            # the true volume is the real label's (voxels kept inside the body)
            true_ml = rows[(rows.gland == gland) & (rows.side == side)].true_volume_ml.iloc[0]
            assert true_ml == pytest.approx(m.sum() * abs(np.linalg.det(aff[:3, :3])) / 1000, rel=0.02)
        # every gland (added ones too) whole in the CT truth map
        vox_ml = abs(np.linalg.det(A[:3, :3])) / 1000
        for r in rows.itertuples():
            got = (lab == label_value(r.gland, r.side)).sum() * vox_ml
            assert got == pytest.approx(r.true_volume_ml, rel=0.2), (ses, r.gland, r.side)
        # realistic truth values
        par = rows[rows.gland == "parotid"]
        assert par.true_volume_ml.between(5, 60).all()
        lo, hi = (3.0, 25.0) if ses == "psma" else (1.0, 8.0)
        assert rows.true_suv_mean.between(lo * 0.3, hi).all() and par.true_suv_mean.between(lo, hi).all(), rows
    # the poses rotate about the real head centre, not about the NRRD world's origin: a point
    # in the middle of the head moves by at most the translation drawn (<= 15 mm) plus a
    # <= 10 degree turn about a centre a few cm away
    par = [masks[n] > 0 for n in ("Parotid-Lt", "Parotid-Rt")]
    mid = np.mean([np.argwhere(m).mean(0) @ aff[:3, :3].T + aff[:3, 3] for m in par], axis=0)
    for pose in poses.values():
        assert np.linalg.norm(pose[:3, :3] @ mid + pose[:3, 3] - mid) < 25.0

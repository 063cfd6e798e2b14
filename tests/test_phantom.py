"""Tests of the digital phantom: anatomy, uptake physics, cohort layout, ground truth, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from glandpet.glands import DEFAULT_LABELS, label_value
from glandpet.phantom.model import LPS_TO_RAS

SEED = 7
RANGES_ML = {"parotid": (15, 35), "submandibular": (5, 12), "sublingual": (2, 4), "lacrimal": (0.5, 0.9),
             "tubarial": (0.5, 1.5)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from glandpet.phantom.cohort import generate_cohort

    out = tmp_path_factory.mktemp("phantom")
    generate_cohort(out, 2, SEED, n_atlases=1, pss_fraction=0.6, jobs=2, progress=False)
    return out


@pytest.fixture(scope="module")
def anatomy():
    from glandpet.phantom.anatomy import build_parametric_anatomy

    return build_parametric_anatomy(np.random.default_rng(123))


def _centroid_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


# ---------------------------------------------------------------------------------------------
# layout and tables


def test_layout_groups_and_sessions(cohort):
    sheet = pd.read_csv(cohort / "subjects.tsv", sep="\t", dtype={"subject_id": str})
    assert list(sheet.columns[:5]) == ["subject_id", "group", "dicom_dir", "sex", "age"]
    assert {"essdai", "esspri", "usf_ml_min", "schirmer_mm"} <= set(sheet.columns)
    assert sheet.subject_id.tolist() == ["S001", "S002"]
    assert set(sheet.group) == {"pss", "control"}
    for _, row in sheet.iterrows():
        sessions = sorted(p.name.split("_")[-1].lower() for p in (cohort / "dicom" / row.dicom_dir).iterdir())
        if row.group == "pss":
            assert sessions == ["fapi", "psma"]
            assert not pd.isna(row.essdai)
        else:
            assert sessions == ["fapi"]
            assert pd.isna(row.essdai) and not pd.isna(row.schirmer_mm)
    atlas = cohort / "atlases" / "atlas01"
    assert (atlas / "ct.nii.gz").exists() and (atlas / "labels.nii.gz").exists() and (atlas / "labels.tsv").exists()


def test_patient_identifiers_are_not_subject_ids(cohort):
    import pydicom

    ids = set()
    for sdir in sorted((cohort / "dicom").iterdir()):
        f = next(p for p in sorted(sdir.rglob("*")) if p.is_file())
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.PatientID and ds.PatientID != sdir.name
        assert str(ds.PatientName) and ds.PatientBirthDate
        ids.add(ds.PatientID)
    assert len(ids) == 2


def test_truth_tables(cohort):
    from glandpet.tables import GLAND_TRUTH, TRANSFORMS
    import pyarrow.parquet as pq

    gt = pq.read_table(cohort / "truth" / "gland_truth.parquet")
    assert gt.schema.equals(GLAND_TRUTH)
    tf = pq.read_table(cohort / "truth" / "transforms.parquet")
    assert tf.schema.equals(TRANSFORMS)
    g = gt.to_pandas()
    # pSS: 2 sessions x 10 glands; control: 1 x 10
    assert len(g) == 30
    for gland, (lo, hi) in RANGES_ML.items():
        v = g[g.gland == gland].true_volume_ml
        assert v.between(lo * 0.97, hi * 1.03).all(), (gland, v.tolist())
    assert (g[g.group == "control"].severity == 0).all()
    assert (g[g.group == "pss"].severity > 0).all()
    fapi = g[g.session == "fapi"]
    assert fapi.true_suv_mean.between(0.8, 12).all()
    psma = g[g.session == "psma"]
    assert psma[psma.gland == "parotid"].true_suv_mean.between(2.0, 16).all()
    t = tf.to_pandas()
    pss = t[t.subject_id == "S001"]
    assert set(zip(pss.session.fillna("-"), pss.from_space, pss.to_space)) >= {
        ("psma", "anatomy", "ct"), ("psma", "anatomy", "pet"), ("psma", "pet", "ct"),
        ("fapi", "anatomy", "ct"), ("-", "fapi_ct", "psma_ct")}
    # consistency: pet->ct = (anatomy->ct) (anatomy->pet)^-1 ; fapi_ct->psma_ct = P_psma P_fapi^-1
    M = {(r.session, r.from_space, r.to_space): np.array(r.matrix_lps).reshape(4, 4) for r in pss.itertuples()}
    for s in ("psma", "fapi"):
        np.testing.assert_allclose(M[(s, "pet", "ct")], M[(s, "anatomy", "ct")] @ np.linalg.inv(M[(s, "anatomy", "pet")]),
                                   atol=1e-9)
        assert M[(s, "anatomy", "ct")][:3, :3].T @ M[(s, "anatomy", "ct")][:3, :3] == pytest.approx(np.eye(3), abs=1e-9)
    np.testing.assert_allclose(M[(None, "fapi_ct", "psma_ct")] if (None, "fapi_ct", "psma_ct") in M else
                               M[(np.nan, "fapi_ct", "psma_ct")],
                               M[("psma", "anatomy", "ct")] @ np.linalg.inv(M[("fapi", "anatomy", "ct")]), atol=1e-9)


def test_label_maps_match_anatomy_through_pose(cohort):
    """Gland world coordinates in the truth label maps = anatomy centroids mapped by the pose."""
    import nibabel as nib

    from glandpet.phantom.cohort import subject_anatomy

    t = pd.read_parquet(cohort / "truth" / "transforms.parquet")
    gt = pd.read_parquet(cohort / "truth" / "gland_truth.parquet")
    for i, (sid, group) in enumerate((("S001", "pss"), ("S002", "control"))):
        anat = subject_anatomy(i, group, SEED)
        for ses in (("psma", "fapi") if group == "pss" else ("fapi",)):
            pose = np.array(t[(t.subject_id == sid) & (t.session == ses) & (t.from_space == "anatomy")
                              & (t.to_space == "ct")].matrix_lps.iloc[0]).reshape(4, 4)
            img = nib.load(cohort / "truth" / f"sub-{sid}" / f"ses-{ses}" / f"sub-{sid}_ses-{ses}_space-ct_dseg.nii.gz")
            lab = np.asarray(img.dataobj)
            aff_lps = LPS_TO_RAS @ img.affine  # LPS_TO_RAS is its own inverse
            vox_ml = abs(np.linalg.det(aff_lps[:3, :3])) / 1000
            for L in DEFAULT_LABELS:
                a = _centroid_world(anat.glands == L.index, anat.affine)
                expected = (pose @ np.r_[a, 1.0])[:3]
                got = _centroid_world(lab == L.index, aff_lps)
                assert np.linalg.norm(got - expected) < 1.5, (sid, ses, L.name, got, expected)
                true_ml = gt[(gt.subject_id == sid) & (gt.session == ses) & (gt.gland == L.gland)
                             & (gt.side == L.side)].true_volume_ml.iloc[0]
                assert (lab == L.index).sum() * vox_ml == pytest.approx(true_ml, rel=0.15 if L.gland in ("lacrimal", "tubarial") else 0.06)
                # patient left is +x in LPS
                assert (a[0] > 0) == (L.side == "left")


def test_determinism(cohort, tmp_path):
    """Subject 2 regenerated alone (another cohort size) is identical: pixels and truth rows."""
    import nibabel as nib
    import pydicom

    from glandpet.phantom.cohort import make_subject

    res = make_subject(tmp_path, 1, "control", SEED)
    gt = pd.read_parquet(cohort / "truth" / "gland_truth.parquet")
    mine = pd.DataFrame(res["truth"])
    theirs = gt[gt.subject_id == "S002"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[theirs.columns].reset_index(drop=True), theirs, check_dtype=False)
    a = sorted(p for p in (cohort / "dicom" / "S002").rglob("*") if p.is_file())
    b = sorted(p for p in (tmp_path / "dicom" / "S002").rglob("*") if p.is_file())
    assert [p.relative_to(cohort) for p in a] == [p.relative_to(tmp_path) for p in b]
    for pa, pb in list(zip(a, b))[::7]:
        da, db = pydicom.dcmread(pa), pydicom.dcmread(pb)
        assert da.SOPInstanceUID == db.SOPInstanceUID
        np.testing.assert_array_equal(da.pixel_array, db.pixel_array)
    f = "truth/sub-S002/ses-fapi/sub-S002_ses-fapi_space-ct_dseg.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(cohort / f).dataobj), np.asarray(nib.load(tmp_path / f).dataobj))


# ---------------------------------------------------------------------------------------------
# anatomy and uptake physics


def test_anatomy_volumes_and_positions(anatomy):
    from glandpet.phantom.model import Tissue

    vox = anatomy.voxel_volume_ml
    for L in DEFAULT_LABELS:
        m = anatomy.glands == L.index
        lo, hi = RANGES_ML[L.gland]
        assert lo * 0.97 <= m.sum() * vox <= hi * 1.03, L.name
        c = _centroid_world(m, anatomy.affine)
        assert (c[0] > 0) == (L.side == "left"), L.name
    cen = {L.name: _centroid_world(anatomy.glands == L.index, anatomy.affine) for L in DEFAULT_LABELS}
    # parotid above the submandibular, lacrimal highest, sublingual most anterior of the salivary glands
    assert cen["parotid_left"][2] > cen["submandibular_left"][2]
    assert cen["lacrimal_left"][2] > cen["parotid_left"][2] + 30
    assert cen["sublingual_left"][1] < cen["submandibular_left"][1] < cen["parotid_left"][1]
    assert abs(cen["tubarial_left"][0]) < abs(cen["parotid_left"][0])
    # glands sit in soft tissue, never in bone or air
    assert not np.isin(anatomy.tissue[anatomy.glands > 0], [Tissue.BONE_CORTICAL, Tissue.AIR, Tissue.AIRWAY]).any()
    for t in (Tissue.BRAIN, Tissue.BONE_CORTICAL, Tissue.AIRWAY, Tissue.EYE, Tissue.VESSEL, Tissue.THYROID):
        assert (anatomy.tissue == t).any(), t


def test_individuals_differ():
    from glandpet.phantom.anatomy import build_parametric_anatomy

    a = build_parametric_anatomy(np.random.default_rng(1))
    b = build_parametric_anatomy(np.random.default_rng(2))
    va = [(a.glands == L.index).sum() for L in DEFAULT_LABELS]
    vb = [(b.glands == L.index).sum() for L in DEFAULT_LABELS]
    assert va != vb
    assert a.extra["flexion_deg"] != b.extra["flexion_deg"]


def test_psma_normal_parotid_suv(anatomy):
    from glandpet.phantom.uptake import draw_tracer_params, render_pet, resample_labels, suv_map

    p = label_value("parotid", "left")
    shape, aff = (80, 80, 90), np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = [-118.5, -118.5, -180]
    lab = resample_labels(anatomy.glands, anatomy.affine, shape, aff, np.eye(4))
    means, maxes = [], []
    for k in range(3):
        rng = np.random.default_rng(100 + k)
        tp = draw_tracer_params("psma", 0.0, rng)
        suv, m = suv_map(anatomy, tp, None, rng)
        means.append(m[p])
        img = render_pet(suv, anatomy.affine, shape, aff, np.eye(4), tp.psf_fwhm_mm, tp.noise_alpha, rng)
        maxes.append(float(img[lab == p].max()))
        # low brain, muscle ~0.7
        assert tp.tissue_suv[6] < 0.3 and 0.4 < tp.tissue_suv[3] < 1.0
    assert all(8.0 <= v <= 18.0 for v in means), means
    assert all(9.0 <= v <= 25.0 for v in maxes), maxes


def test_fibrotic_zones_negative_correlation(anatomy):
    from scipy.stats import spearmanr

    from glandpet.phantom.uptake import draw_tracer_params, plant_fibrosis, suv_map

    fib = plant_fibrosis(anatomy, 0.8, np.random.default_rng(5))
    r1, r2 = np.random.default_rng(6), np.random.default_rng(7)
    psma, _ = suv_map(anatomy, draw_tracer_params("psma", 0.8, r1), fib, r1)
    fapi, _ = suv_map(anatomy, draw_tracer_params("fapi", 0.8, r2), fib, r2)
    for L in DEFAULT_LABELS:
        m = anatomy.glands == L.index
        rho = spearmanr(psma[m], fapi[m]).statistic
        if fib.fraction[L.index] > 0.02:
            assert rho < -0.3, (L.name, rho)
        elif L.index not in fib.weights:
            assert abs(rho) < 0.5, (L.name, rho)  # small glands: few independent samples
    assert any(f > 0.02 for f in fib.fraction.values())
    # controls: no zones, independent heterogeneity -> no correlation
    c1, c2 = np.random.default_rng(8), np.random.default_rng(9)
    psma, _ = suv_map(anatomy, draw_tracer_params("psma", 0.0, c1), None, c1)
    fapi, _ = suv_map(anatomy, draw_tracer_params("fapi", 0.0, c2), None, c2)
    m = anatomy.glands == label_value("parotid", "right")
    assert abs(spearmanr(psma[m], fapi[m]).statistic) < 0.35


def test_suv_to_bqml_formula():
    from glandpet.phantom.uptake import suv_to_bqml

    v = suv_to_bqml(np.array([2.0], np.float32), 150e6, 75.0, 3600.0, 4062.6)
    assert v[0] == pytest.approx(2.0 * 150e6 * np.exp(-np.log(2) * 3600 / 4062.6) / 75000.0, rel=1e-6)

"""RTSTRUCT -> label map (glandpet.dicom.rtstruct), the phantom's RTSTRUCT writer, and `glandpet atlas add`."""

from __future__ import annotations

import datetime as dt

import nibabel as nib
import numpy as np
import pydicom
import pytest

from glandpet.errors import UserError
from glandpet.glands import DEFAULT_LABELS, label_value, read_label_table
from glandpet.phantom.dicom_writer import write_ct_series
from glandpet.phantom.model import PatientInfo, StudyInfo
from glandpet.phantom.rtstruct_writer import (
    N_STYLES,
    _style_name,
    mask_contours,
    write_rtstruct,
)
from glandpet.dicom.rtstruct import RoiNameMap, ct_grid, fill_polygons, normalise_roi_name, read_rtstruct, rtstruct_to_labels, self_intersection


# ------------------------------------------------------------------------------ fill rule
def test_fill_even_odd_hole_and_half_open_edges():
    outer = np.array([[0.5, 0.5], [8.5, 0.5], [8.5, 8.5], [0.5, 8.5]])
    inner = np.array([[2.5, 2.5], [6.5, 2.5], [6.5, 6.5], [2.5, 6.5]])
    m = fill_polygons([outer, inner], 10, 10)
    assert m[1:9, 1:9].sum() == 64 - 16 and not m[3:7, 3:7].any() and m.sum() == 48
    # two squares sharing the edge x = 2 (through pixel centres): no voxel claimed twice, none lost
    a = fill_polygons([np.array([[0, 0], [2, 0], [2, 2], [0, 2]], float)], 6, 6)
    b = fill_polygons([np.array([[2, 0], [4, 0], [4, 2], [2, 2]], float)], 6, 6)
    assert a.sum() == 4 and b.sum() == 4 and not (a & b).any()
    assert a[0:2, 0:2].all() and b[2:4, 0:2].all()
    # overlapping polygons of one ROI combine by XOR (even-odd)
    c = fill_polygons([np.array([[0.5, 0.5], [4.5, 0.5], [4.5, 4.5], [0.5, 4.5]]),
                       np.array([[2.5, 0.5], [6.5, 0.5], [6.5, 4.5], [2.5, 4.5]])], 8, 8)
    assert c[1:3, 1:5].all() and not c[3:5, 1:5].any() and c[5:7, 1:5].all()


def test_fill_matches_point_in_polygon_reference():
    from matplotlib.path import Path as MplPath

    rng = np.random.default_rng(3)
    ang = np.sort(rng.uniform(0, 2 * np.pi, 40))
    r = rng.uniform(6, 14, 40)
    poly = np.c_[20.3 + r * np.cos(ang), 18.7 + r * np.sin(ang)]  # star-shaped, no vertex on a centre
    m = fill_polygons([poly], 40, 40)
    ii, jj = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    ref = MplPath(poly).contains_points(np.c_[ii.ravel(), jj.ravel()]).reshape(40, 40)
    assert np.array_equal(m, ref) and m.sum() > 100


def test_self_intersection():
    assert self_intersection(np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)) is None
    assert self_intersection(np.array([[0, 0], [4, 4], [4, 0], [0, 4]], float)) is not None  # bow tie
    # a polygon touching itself at a vertex (figure eight through one point) is refused too
    assert self_intersection(np.array([[0, 0], [2, 2], [4, 0], [4, 4], [2, 2], [0, 4]], float)) is not None


def test_mask_contours_round_trip_with_holes_saddles_and_borders():
    rng = np.random.default_rng(0)
    m = rng.random((30, 25)) < 0.45  # speckle: saddles, holes, islands, pixels on the border
    polys = mask_contours(m)
    assert np.array_equal(fill_polygons(polys, 30, 25), m)
    assert all(self_intersection(p) is None for p in polys)


# ------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name, expected", [
    ("Parotid_L", ("parotid", "left")), ("Parotid_R", ("parotid", "right")),
    ("Glnd_Submand_R", ("submandibular", "right")), ("Glnd_Lacrimal_L", ("lacrimal", "left")),
    ("Glnd_Sublingual_L", ("sublingual", "left")), ("PAROTID LT", ("parotid", "left")),
    ("Lt Parotid", ("parotid", "left")), ("parotid left", ("parotid", "left")), ("L_Parotid", ("parotid", "left")),
    ("SMG_R", ("submandibular", "right")), ("Submandibular R", ("submandibular", "right")),
    ("Lacrimal_L", ("lacrimal", "left")), ("Tubarial_R", ("tubarial", "right")),
    ("Glnd_Tubarial_L", ("tubarial", "left")), ("LtParotid", ("parotid", "left")),
    ("Right Submandibular Gland", ("submandibular", "right")), ("Parotid (L)", ("parotid", "left")),
    ("left SMG", ("submandibular", "left")), ("RT LACRIMAL GLAND", ("lacrimal", "right")),
    ("Parotis re", ("parotid", "right")), ("Parotide G", ("parotid", "left")),
    # not glands of one side: listed, never guessed
    ("Parotids", None), ("Parotid_L_PRV", None), ("z_Parotid_L", None), ("Glnd_Sublingual", None),
    ("PTV_70", None), ("External", None), ("Parotid_Low", None), ("SpinalCord", None),
])
def test_default_name_map(name, expected):
    assert RoiNameMap().lookup(name) == expected


def test_normalise_and_writer_styles_all_map():
    assert normalise_roi_name("Glnd_Submand_R") == "glnd submand r"
    assert normalise_roi_name("PAROTID  LT.") == "parotid lt"
    nm = RoiNameMap()
    for lab in DEFAULT_LABELS:
        for style in range(N_STYLES):
            assert nm.lookup(_style_name(style, lab.gland, lab.side)) == (lab.gland, lab.side)


def test_user_map_overrides(tmp_path):
    p = tmp_path / "map.tsv"
    p.write_text("roi_name\tgland\tside\nGL_PAR_1\tparotid\tright\nParotid_L\tignore\t\nParotid_R\tparotid\tleft\n")
    nm = RoiNameMap(p)
    assert nm.lookup("GL_PAR_1") == ("parotid", "right")
    assert nm.lookup("Parotid_L") == ("ignore", "")
    assert nm.lookup("Parotid_R") == ("parotid", "left")  # the user map wins, even against the default
    assert nm.lookup("SMG_L") == ("submandibular", "left")  # the default still applies to the rest
    bad = tmp_path / "bad.tsv"
    bad.write_text("roi_name\tgland\tside\nX\tparotid\tup\n")
    with pytest.raises(UserError, match="unknown side 'up'"):
        RoiNameMap(bad)


# ------------------------------------------------------------------------------ a small CT + RTSTRUCT
NX, NY, NZ = 40, 36, 8


def _affine():
    A = np.diag([2.0, 2.0, 3.0, 1.0])
    A[:3, 3] = [-39.0, -30.0, 100.0]
    return A


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct")
    pat = PatientInfo(name="TEST^RT", patient_id="RT001", birth_date="19600101", sex="F", weight_kg=60.0,
                      height_m=1.65, age_years=60)
    study = StudyInfo(study_uid="1.2.826.0.1.3680043.8.498.777", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.778",
                      study_datetime=dt.datetime(2024, 5, 6, 9, 0), study_description="RT", accession_number="A1",
                      institution_name="H", referring_physician="R^R", vendor="ge")
    hu = np.full((NX, NY, NZ), -50, np.int16)
    write_ct_series(d / "ct", hu, _affine(), pat, study, 2, "RT CT")
    lab = np.zeros((NX, NY, NZ), np.uint8)
    lab[25:33, 10:20, 2:6] = label_value("parotid", "left")  # patient's left: +x in LPS
    lab[6:14, 10:20, 2:6] = label_value("parotid", "right")
    lab[8:12, 13:17, 3:5] = 0  # a hole in the right parotid
    lab[20:22, 28:30, 4] = label_value("lacrimal", "left")
    write_rtstruct(d / "rs.dcm", lab, _affine(), d / "ct", names={1: "Parotid_L", 2: "PAROTID RT", 7: "Lt Lacrimal"})
    return d, lab


def _labels(d, rs_path):
    res = rtstruct_to_labels(read_rtstruct(rs_path), ct_grid(d / "ct"), RoiNameMap())
    return res


def test_small_round_trip(small_ct):
    d, lab = small_ct
    res = _labels(d, d / "rs.dcm")
    assert np.array_equal(res.labels, lab)
    assert [t.name for t in res.table] == ["parotid_left", "parotid_right", "lacrimal_left"]
    assert res.unmapped == ["Parotids"]
    # the toy contours are far smaller than real glands: the volume sanity check says so, nothing else
    assert sorted(w.split(":")[0] for w in res.warnings) == ["lacrimal_left", "parotid_left", "parotid_right"]
    assert all("outside the plausible adult range" in w for w in res.warnings)
    assert res.volumes_ml["lacrimal_left"] == pytest.approx(4 * 12 / 1000.0)


def _mutate(d, fn, name):
    ds = pydicom.dcmread(d / "rs.dcm")
    fn(ds)
    out = d / name
    ds.save_as(out, enforce_file_format=True)
    return out


def _roi_contours(ds, roi_name):
    num = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == roi_name)
    return next(rc.ContourSequence for rc in ds.ROIContourSequence if int(rc.ReferencedROINumber) == num)


def _set_points(c, pts):
    c.ContourData = [f"{v:.4f}" for v in np.asarray(pts, float).ravel()]
    c.NumberOfContourPoints = len(pts)


def _pts(c):
    return np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3)


@pytest.mark.parametrize("case, pattern", [
    ("open", r"ROI 'Parotid_L' contour 1 at z = 106\.00 mm: contour type OPEN_PLANAR is not a closed polygon"),
    ("point", r"ROI 'Parotid_L' contour 1 .*POINT is not a closed polygon"),
    ("two_points", r"ROI 'Parotid_L' contour 1 at z = 106\.00 mm \(CT slice 2\): a closed contour needs at least 3"),
    ("bowtie", r"ROI 'PAROTID RT' contour 1 at z = 106\.00 mm \(CT slice 2\): the polygon intersects itself"),
    ("outside_xy", r"ROI 'Parotid_L' contour 1 at z = 106\.00 mm \(CT slice 2\): the contour reaches .* outside the CT"),
    ("outside_z", r"ROI 'Parotid_L' contour 1 at z = 130\.00 mm: outside the CT volume .*z = 100\.00 to 121\.00 mm"),
    ("between_slices", r"ROI 'Parotid_L' contour 1 at z = 107\.20 mm \(CT slice 2\): the contour plane is 1\.20 mm"),
    ("tilted", r"ROI 'Parotid_L' contour 1 .*not in one CT slice plane"),
    ("frame", r"ROI 'Parotid_L' is in frame of reference .* \(frame-of-reference mismatch\)"),
])
def test_refusals_name_roi_and_slice(small_ct, case, pattern):
    d, _ = small_ct

    def fn(ds):
        c = _roi_contours(ds, "PAROTID RT" if case == "bowtie" else "Parotid_L")[0]
        p = _pts(c)
        if case == "open":
            c.ContourGeometricType = "OPEN_PLANAR"
        elif case == "point":
            c.ContourGeometricType = "POINT"
        elif case == "two_points":
            _set_points(c, p[:2])
        elif case == "bowtie":
            x0, x1, y0, y1, z = p[:, 0].min(), p[:, 0].max(), p[:, 1].min(), p[:, 1].max(), p[0, 2]
            _set_points(c, [[x0, y0, z], [x1, y1, z], [x1, y0, z], [x0, y1, z]])
        elif case == "outside_xy":
            _set_points(c, p + [60.0, 0, 0])
        elif case == "outside_z":
            _set_points(c, p + [0, 0, 24.0])
        elif case == "between_slices":
            _set_points(c, p + [0, 0, 1.2])
        elif case == "tilted":
            q = p.copy()
            q[:, 2] += np.linspace(0, 2.0, len(q))
            _set_points(c, q)
        elif case == "frame":
            for r in ds.StructureSetROISequence:
                if r.ROIName == "Parotid_L":
                    r.ReferencedFrameOfReferenceUID = "1.2.3.4.5.6.7.8.9"

    with pytest.raises(UserError, match=pattern):
        _labels(d, _mutate(d, fn, f"rs_{case}.dcm"))


def test_other_series_warns_and_unmapped_broken_roi_is_not_checked(small_ct):
    d, lab = small_ct

    def fn(ds):
        ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0] \
            .SeriesInstanceUID = "1.2.3.999"
        c = _roi_contours(ds, "Parotids")[0]
        c.ContourGeometricType = "OPEN_PLANAR"  # broken, but not a gland: must not stop the atlas

    res = _labels(d, _mutate(d, fn, "rs_other_series.dcm"))
    assert np.array_equal(res.labels, lab)
    assert any("references another image series" in w for w in res.warnings)


def test_nothing_maps_duplicates_and_swapped_sides(small_ct, tmp_path):
    d, _ = small_ct
    m = tmp_path / "m.tsv"
    m.write_text("roi_name\tgland\tside\nParotid_L\tignore\t\nPAROTID RT\tignore\t\nLt Lacrimal\tignore\t\n")
    with pytest.raises(UserError, match="no ROI name maps to a gland .*--map"):
        rtstruct_to_labels(read_rtstruct(d / "rs.dcm"), ct_grid(d / "ct"), RoiNameMap(m))
    m.write_text("roi_name\tgland\tside\nLt Lacrimal\tparotid\tleft\n")
    with pytest.raises(UserError, match="'Parotid_L' and 'Lt Lacrimal' both map to parotid left"):
        rtstruct_to_labels(read_rtstruct(d / "rs.dcm"), ct_grid(d / "ct"), RoiNameMap(m))
    m.write_text("roi_name\tgland\tside\nParotid_L\tparotid\tright\nPAROTID RT\tparotid\tleft\n")
    res = rtstruct_to_labels(read_rtstruct(d / "rs.dcm"), ct_grid(d / "ct"), RoiNameMap(m))
    assert any("sides swapped?" in w for w in res.warnings)


# ------------------------------------------------------------------------------ a phantom atlas, end to end
@pytest.fixture(scope="module")
def phantom_atlas(tmp_path_factory):
    from glandpet.phantom.cohort import make_atlas

    out = tmp_path_factory.mktemp("phantom")
    make_atlas(out, 0, 4, dicom=True)
    return out / "atlases" / "atlas01"


def test_phantom_rtstruct_references_ct(phantom_atlas):
    rs = pydicom.dcmread(phantom_atlas / "dicom" / "rtstruct.dcm")
    grid = ct_grid(phantom_atlas / "dicom" / "ct")
    assert rs.Modality == "RTSTRUCT" and rs.FrameOfReferenceUID == grid.frame_of_reference_uid
    assert rs.StudyInstanceUID == grid.study_uid
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for rc in rs.ROIContourSequence for c in rc.ContourSequence}
    assert refs <= set(grid.sop_uids)
    # the contour's referenced slice is the slice the contour lies on
    c = rs.ROIContourSequence[0].ContourSequence[0]
    k = grid.sop_uids.index(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
    assert float(c.ContourData[2]) == pytest.approx(grid.slice_z(k), abs=1e-3)
    names = [r.ROIName for r in rs.StructureSetROISequence]
    assert len(names) == 11 and "Parotids" in names


def test_atlas_add_cli_end_to_end(phantom_atlas, tmp_path, capsys):
    from glandpet.cli import main

    out = tmp_path / "my_atlas"
    rc = main(["atlas", "add", str(out), "--ct", str(phantom_atlas / "dicom" / "ct"),
               "--rtstruct", str(phantom_atlas / "dicom" / "rtstruct.dcm")])
    text = capsys.readouterr().out
    assert rc == 0
    ct_path, lab_path = out / "ct.nii.gz", out / "labels.nii.gz"
    assert "not mapped (1): 'Parotids'" in text
    assert f'- {{name: my_atlas, ct: "{ct_path}", labels: "{lab_path}", ' in text
    ref_lab, new_lab = nib.load(phantom_atlas / "labels.nii.gz"), nib.load(out / "labels.nii.gz")
    ref_ct, new_ct = nib.load(phantom_atlas / "ct.nii.gz"), nib.load(out / "ct.nii.gz")
    # labels on exactly the converted CT's grid (same shape and affine, header geometry)
    assert new_lab.shape == new_ct.shape and np.array_equal(new_lab.affine, new_ct.affine)
    assert new_lab.get_data_dtype() == np.uint8
    assert int(new_lab.header["sform_code"]) == int(new_ct.header["sform_code"]) == 1
    # the same world grid as the phantom's NIfTI atlas, the same CT values
    assert np.allclose(new_ct.affine, ref_ct.affine, atol=1e-3)
    assert np.array_equal(np.asarray(new_ct.dataobj), np.asarray(ref_ct.dataobj))
    A, B = np.asarray(ref_lab.dataobj), np.asarray(new_lab.dataobj)
    for lab in DEFAULT_LABELS:
        a, b = A == lab.index, B == lab.index
        d = 2 * (a & b).sum() / (a.sum() + b.sum())
        # marching squares + centre-inside fill is exact: 1.0 for big and small glands alike
        assert d >= (0.95 if lab.gland in ("parotid", "submandibular") else 0.9), (lab.name, d)
        assert d == 1.0
    assert [(t.gland, t.side) for t in read_label_table(out / "labels.tsv")] == [(t.gland, t.side) for t in DEFAULT_LABELS]
    # a second run refuses to overwrite; --force does
    assert main(["atlas", "add", str(out), "--ct", str(phantom_atlas / "dicom" / "ct"),
                 "--rtstruct", str(phantom_atlas / "dicom" / "rtstruct.dcm")]) == 2
    assert "already holds an atlas" in capsys.readouterr().err


def test_atlas_add_frame_mismatch_cli(phantom_atlas, small_ct, tmp_path, capsys):
    from glandpet.cli import main

    d, _ = small_ct
    rc = main(["atlas", "add", str(tmp_path / "x"), "--ct", str(d / "ct"),
               "--rtstruct", str(phantom_atlas / "dicom" / "rtstruct.dcm")])
    err = capsys.readouterr().err
    assert rc == 2 and "frame-of-reference mismatch" in err and err.count("\n") == 1
    assert not (tmp_path / "x" / "labels.nii.gz").exists()


def test_atlas_dicom_option_leaves_the_nifti_atlas_unchanged(phantom_atlas, tmp_path):
    from glandpet.phantom.cohort import make_atlas

    make_atlas(tmp_path, 0, 4, dicom=False)
    plain = tmp_path / "atlases" / "atlas01"
    assert not (plain / "dicom").exists()
    for f in ("ct.nii.gz", "labels.nii.gz", "labels.tsv"):
        assert (plain / f).read_bytes() == (phantom_atlas / f).read_bytes(), f


def test_phantom_cli_option():
    from glandpet.cli import build_parser

    assert build_parser().parse_args(["phantom", "out", "--atlas-dicom"]).atlas_dicom is True
    assert build_parser().parse_args(["phantom", "out"]).atlas_dicom is False

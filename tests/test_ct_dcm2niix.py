"""CT series glandpet's reader refuses (gantry tilt, unequal slice spacing) are converted through
nipype + dcm2niix (glandpet.dicom.ct_dcm2niix) into the right place of the DICOM patient frame; a tilted or
irregular PET stays refused; and dcm2niix, as an independent converter, agrees with glandpet's PET
converter on two real PET series once their conventions are undone."""

from __future__ import annotations

import datetime as dt
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from glandpet.dicom.convert import convert_series
from glandpet.dicom.series import GeometryError, load_series
from glandpet.errors import UserError
from glandpet.phantom.dicom_writer import make_uid, write_ct_series
from glandpet.phantom.model import PatientInfo, StudyInfo

pytest.importorskip("nipype")
pytest.importorskip("dcm2niix")

PATIENT = PatientInfo(name="TESTPERSON^ALMA", patient_id="PID-7731", birth_date="19650412", sex="F",
                      weight_kg=63.5, height_m=1.64, age_years=58)
# Spheres (centre LPS mm, radius mm, HU) in water (0 HU): the untilted truth, sampled analytically.
SPHERES = [(np.array([10.0, -20.0, 20.0]), 8.0, 1000.0), (np.array([-25.0, 5.0, 55.0]), 8.0, 600.0),
           (np.array([25.0, 15.0, 40.0]), 8.0, -500.0)]
SHAPE = (64, 64, 30)  # columns, rows, slices
PIXEL = 2.0
STEP = 3.0


def truth(world_lps: np.ndarray) -> np.ndarray:
    v = np.zeros(world_lps.shape[:-1])
    for c, rad, hu in SPHERES:
        v = np.where(np.linalg.norm(world_lps - c, axis=-1) < rad, hu, v)
    return v


def edge_distance(world_lps: np.ndarray) -> np.ndarray:
    return np.min([np.abs(np.linalg.norm(world_lps - c, axis=-1) - rad) for c, rad, _ in SPHERES], axis=0)


def _study(vendor: str) -> StudyInfo:
    return StudyInfo(study_uid=make_uid("study", vendor), frame_of_reference_uid=make_uid("for", vendor),
                     study_datetime=dt.datetime(2023, 6, 14, 10, 31, 5), study_description="PET/CT",
                     accession_number="ACC000123", institution_name="Test University Hospital",
                     referring_physician="REFERRER^ROB", vendor=vendor)


def write_phantom_ct(folder, vendor: str, tilt_deg: float = 0.0, z_positions=None):
    """A CT of the spheres. Tilt: the image columns tilt about the x axis by `tilt_deg` while the
    table steps STEP mm along z (a gantry-tilted acquisition). `z_positions`: unequal slice z."""
    t = np.radians(tilt_deg)
    a = np.eye(4)
    a[:3, 0] = [PIXEL, 0, 0]
    a[:3, 1] = [0, PIXEL * np.cos(t), PIXEL * np.sin(t)]
    a[:3, 2] = [0, 0, STEP]
    a[:3, 3] = [-64.0, -64.0, 0.0]
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij")
    z = np.arange(SHAPE[2]) * STEP if z_positions is None else np.asarray(z_positions, dtype=float)
    w = a[:3, 0] * i[..., None] + a[:3, 1] * j[..., None] + a[:3, 3]
    w[..., 2] += z[k.astype(int)]
    pos = None if z_positions is None else np.array([a[:3, 3] + [0, 0, zz] for zz in z])
    write_ct_series(folder, truth(w).astype(np.float32), a, PATIENT, _study(vendor), 2, "CT tilt test",
                    slice_positions=pos)
    return folder


def check_world(path, min_hu_match: float = 0.99, centroid_mm: float = 0.3):
    """The NIfTI is a rectangular RAS grid; sphere centroids within `centroid_mm` of the truth; voxel
    values away from sphere surfaces equal the analytic phantom at the voxel's world position."""
    img = nib.load(path)
    data = np.asarray(img.get_fdata())
    aff = img.affine
    cols = aff[:3, :3]
    gram = cols.T @ cols
    assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-6), "grid is not rectangular"
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.header.get_qform(), aff, atol=1e-4)
    ijk = np.argwhere(np.ones(data.shape, bool))
    lps = (ijk @ cols.T + aff[:3, 3]) * [-1, -1, 1]
    for c, rad, hu in SPHERES:
        sel = (np.abs(data.ravel() - hu) < 0.5 * abs(hu)) & (np.linalg.norm(lps - c, axis=1) < rad + 6)
        assert sel.sum() > 50
        err = np.linalg.norm(lps[sel].mean(0) - c)
        assert err < centroid_mm, f"sphere {hu} HU: centroid {err:.2f} mm from the truth"
    # values inside the scanned region, > 3 mm from any sphere surface: the truth exactly
    inside = (lps[:, 2] > 2.0) & (lps[:, 2] < 82.0) & (np.abs(lps[:, 0]) < 60) & (lps[:, 1] > -55) & (lps[:, 1] < 50)
    far = inside & (edge_distance(lps) > 3.0)
    match = np.abs(data.ravel()[far] - truth(lps[far])) <= 1.0
    assert far.sum() > 10000 and match.mean() >= min_hu_match, (far.sum(), match.mean())
    return img


def no_identifiers(out_dir):
    for f in out_dir.iterdir():
        raw = f.read_bytes()
        for s in (PATIENT.name, PATIENT.patient_id, PATIENT.birth_date, "ACC000123", "Test University Hospital",
                  "Time="):
            assert s.encode() not in raw, f"{s} in {f.name}"


@pytest.mark.parametrize("vendor", ["ge", "philips"])  # slices numbered from the head / from the feet
@pytest.mark.parametrize("tilt", [15.0, -15.0])
def test_tilted_ct_converted_in_place(tmp_path, vendor, tilt):
    """A gantry-tilted CT (as a scanner writes it: tilted column cosines, positions along the table,
    signed GantryDetectorTilt) is de-sheared by glandpet from its slice positions: a rectangular grid,
    sphere centroids within 0.5 mm of the untilted truth (measured 0.02-0.37 mm; the thresholded
    centroid of the DICOM pixels themselves, on their tilted 2 x 2 x 3 mm lattice, is 0.05-0.31 mm off),
    values the analytic phantom away from edges. (dcm2niix's tilt-corrected header put them 0.1-24.6 mm
    off on these phantoms.)"""
    src = write_phantom_ct(tmp_path / "dicom", vendor, tilt)
    assert float(pydicom.dcmread(next(src.iterdir()), stop_before_pixels=True).GantryDetectorTilt) == tilt
    with pytest.raises(GeometryError, match="gantry tilt") as ei:
        load_series(src)
    assert ei.value.kind == "tilt" and ei.value.modality == "CT"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    sc = convert_series(src, out_dir / "ct.nii.gz")
    assert sc["ConversionNotes"][0].startswith(f"gantry tilt {abs(tilt):.1f} deg corrected by glandpet"), sc
    assert sc["ConversionSoftware"] == "glandpet"
    img = check_world(out_dir / "ct.nii.gz", centroid_mm=0.5)
    assert np.allclose(img.header.get_zooms(), [PIXEL, PIXEL, STEP * np.cos(np.radians(tilt))], atol=1e-4)
    assert json.loads((out_dir / "ct.json").read_text())["ConversionNotes"] == sc["ConversionNotes"]
    no_identifiers(out_dir)


def _centroids(data: np.ndarray) -> np.ndarray:
    """Voxel-index centroid of each sphere: the component of its exact value with the size of a sphere
    (dcm2niix pads with the darkest value, which can be a sphere's)."""
    from scipy import ndimage

    out = []
    for _, _, hu in SPHERES:
        lab, n = ndimage.label(np.abs(data - hu) < 2)
        sizes = ndimage.sum(np.ones_like(data), lab, range(1, n + 1))
        out.append(np.argwhere(lab == int(np.argmin(np.abs(sizes - 180))) + 1).mean(0))
    return np.array(out)


@pytest.mark.parametrize("vendor,tilt", [("ge", 15.0), ("philips", -15.0)])
def test_tilt_correction_agrees_with_dcm2niix_voxels(tmp_path, vendor, tilt):
    """dcm2niix's tilt-corrected voxels (its own de-shear, placed by its header's axes but not its
    origin, which is off on these phantoms) as an independent check of glandpet's: the vectors
    between the sphere centroids agree within 0.5 mm, and with the truth."""
    from glandpet.dicom.ct_dcm2niix import run_dcm2niix

    src = write_phantom_ct(tmp_path / "dicom", vendor, tilt)
    convert_series(src, tmp_path / "ct.nii")
    ours = nib.load(tmp_path / "ct.nii")
    written, _ = run_dcm2niix(sorted(src.iterdir()), tmp_path / "d2n", name="ct")
    tilt_files = [f for f in written if "_Tilt" in f.name]
    assert len(tilt_files) == 1, written
    theirs = nib.load(tilt_files[0])
    truth_vec = np.array([SPHERES[1][0] - SPHERES[0][0], SPHERES[2][0] - SPHERES[0][0]])
    vecs = []
    for img in (ours, theirs):
        cen = _centroids(np.asarray(img.get_fdata()))
        lps_axes = np.diag([-1.0, -1.0, 1.0]) @ img.affine[:3, :3]
        vecs.append((cen[1:] - cen[0]) @ lps_axes.T)
    assert np.abs(vecs[0] - truth_vec).max() < 0.5, vecs[0] - truth_vec
    assert np.abs(vecs[0] - vecs[1]).max() < 0.5, vecs[0] - vecs[1]


def test_unequally_spaced_ct_converted_in_place(tmp_path):
    z = np.r_[np.arange(0, 30, 2.0), np.arange(30, 88, 4.0)][: SHAPE[2]]
    src = write_phantom_ct(tmp_path / "dicom", "siemens", z_positions=z)
    with pytest.raises(GeometryError, match="unequal slice spacing"):
        load_series(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    sc = convert_series(src, out_dir / "ct.nii.gz")
    assert sc["ConversionNotes"][0].startswith("unequal slice spacing (2.0-4.0 mm) resampled by dcm2niix")
    img = check_world(out_dir / "ct.nii.gz", min_hu_match=0.98)  # slices between 4 mm gaps are interpolated
    assert np.allclose(img.header.get_zooms(), [2.0, 2.0, 2.0])
    no_identifiers(out_dir)


def test_tilted_or_irregular_pet_stays_refused(tmp_path):
    from test_convert import write_series

    pos = [np.array([0, 0.8 * k, 3.0 * k]) for k in range(5)]
    with pytest.raises(UserError, match="gantry tilt"):
        convert_series(write_series(tmp_path / "t", positions=pos, modality="PT", intercept=0.0), tmp_path / "t.nii")
    pos = [np.array([0, 0, z]) for z in (0.0, 3.0, 6.0, 12.0, 15.0)]
    with pytest.raises(UserError, match="unequal slice spacing"):
        convert_series(write_series(tmp_path / "m", positions=pos, modality="PT", intercept=0.0), tmp_path / "m.nii")
    assert not list(tmp_path.glob("*.nii"))


@pytest.mark.parametrize("name", ["qin-headneck-0139-fdg-wb", "sts001-fdg-wb-ge"])
def test_pet_converter_agrees_with_dcm2niix(shared_data, tmp_path, name):
    """glandpet's PET (float32 Bq/mL, rows as stored, slices along the normal) and dcm2niix's
    (rows flipped, its own slice order, stored values x scl_slope/inter) of the same series: every
    glandpet voxel centre is a dcm2niix voxel centre, and the values there agree."""
    from glandpet.dicom.ct_dcm2niix import run_dcm2niix

    src = shared_data / "real-pet" / name / "image"
    files = sorted(src.iterdir())
    ours = nib.load(convert_series(src, tmp_path / "pet.nii") and tmp_path / "pet.nii")
    written, _ = run_dcm2niix(files, tmp_path / "d2n", name="pet")
    assert len(written) == 1, written
    theirs = nib.load(written[0])
    a, b = np.asarray(ours.get_fdata(dtype=np.float32)), np.asarray(theirs.get_fdata(dtype=np.float32))
    assert a.shape == b.shape
    # voxel (i, j, k) of ours -> dcm2niix's voxel index: a permutation with flips and an integer shift
    m = np.linalg.inv(theirs.affine) @ ours.affine
    perm = np.rint(m[:3, :3])
    assert np.allclose(m[:3, :3], perm, atol=1e-3) and np.allclose(np.abs(perm).sum(0), 1)
    assert np.allclose(m[:3, 3], np.rint(m[:3, 3]), atol=1e-2)
    # world coordinates of matching voxel centres (corners and a random sample) agree; dcm2niix's
    # header is float32 (0.013 mm seen over the 1.6 m whole-body extent)
    rng = np.random.default_rng(0)
    ijk = np.r_[np.array(np.meshgrid(*[[0, n - 1] for n in a.shape], indexing="ij")).reshape(3, -1).T,
                rng.integers(0, a.shape, size=(2000, 3))]
    tj = np.rint(ijk @ m[:3, :3].T + m[:3, 3]).astype(int)
    assert (tj.min(0) >= 0).all() and (tj.max(0) < np.array(b.shape)).all()
    w_ours = ijk @ ours.affine[:3, :3].T + ours.affine[:3, 3]
    w_theirs = tj @ theirs.affine[:3, :3].T + theirs.affine[:3, 3]
    assert np.abs(w_ours - w_theirs).max() < 0.05
    # values at every voxel: dcm2niix's array brought into our index order (its rows are flipped)
    axes = [int(np.argmax(np.abs(perm[:, ax]))) for ax in range(3)]
    bv = np.transpose(b, axes)
    flips = [ax for ax in range(3) if perm[axes[ax], ax] < 0]
    bv = np.flip(bv, axis=flips) if flips else bv
    assert bv.shape == a.shape
    scale = float(np.abs(a).max())
    diff = float(np.abs(a - bv).max())
    assert diff <= 1e-5 * scale, (diff, scale)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(ds.Units).upper() == "BQML"  # both are Bq/mL: no unit conversion between them

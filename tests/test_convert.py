"""Geometry exactness and refusal rules of the DICOM reader / converter on synthetic series."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from glandpet.dicom.convert import convert_series
from glandpet.dicom.series import load_series
from glandpet.errors import UserError

SECRET = {
    "PatientName": "Zzyzx^Quillfeather7731",
    "PatientID": "PID-ZQ-99817",
    "PatientBirthDate": "19410203",
    "AccessionNumber": "ACC-7731-QQ",
    "InstitutionName": "Hospital Quillfeather Unique",
    "ReferringPhysicianName": "Dr^Vexmoor4410",
    "OtherPatientIDs": "OPID-55123",
}


def write_series(folder: Path, *, rows=6, cols=4, n=5, spacing=(2.0, 0.5), dz=3.0, iop=(1, 0, 0, 0, 1, 0),
                 origin=(-10.0, 20.0, 30.0), positions=None, modality="CT", series_uid=None, order=None,
                 slope=1.0, intercept=-1024.0, extra=None):
    """Write a synthetic series; pixel value at (row r, col c, slice k) = 100*k + 10*r + c."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    r = np.array(iop[:3], float)
    c = np.array(iop[3:], float)
    nrm = np.cross(r, c)
    if positions is None:
        positions = [np.array(origin) + k * dz * nrm for k in range(n)]
    order = order if order is not None else list(range(len(positions)))
    for idx, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.128"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"f{idx:03d}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = study_uid[:-2] + ".9"
        ds.Modality = modality
        ds.SeriesNumber = 3
        ds.InstanceNumber = idx + 1
        for key, v in SECRET.items():
            setattr(ds, key, v)
        ds.StudyDate = ds.SeriesDate = "20240102"
        ds.ImageOrientationPatient = [float(x) for x in iop]
        ds.ImagePositionPatient = [float(x) for x in positions[k]]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        rr, cc = np.mgrid[0:rows, 0:cols]
        px = (100 * k + 10 * rr + cc).astype(np.int16)
        ds.PixelData = px.tobytes()
        if extra:
            for key, v in extra.items():
                setattr(ds, key, v)
        ds.save_as(folder / f"f{idx:03d}", enforce_file_format=True)
    return folder


def expected_world(iop, spacing, origin_first, dz, i, j, k):
    r = np.array(iop[:3], float)
    c = np.array(iop[3:], float)
    n = np.cross(r, c)
    return np.array(origin_first) + i * spacing[1] * r + j * spacing[0] * c + k * dz * n


def test_axial_geometry_and_values(tmp_path):
    d = write_series(tmp_path / "s", spacing=(2.0, 0.5))
    s = load_series(d)
    assert s.data.shape == (4, 6, 5)  # (columns, rows, slices)
    # value at voxel (i=col, j=row, k) = 100k + 10 row + col - 1024
    assert s.data[3, 5, 4] == 400 + 50 + 3 - 1024
    iop = (1, 0, 0, 0, 1, 0)
    for ijk in [(0, 0, 0), (3, 0, 0), (0, 5, 0), (3, 5, 4), (1, 2, 3)]:
        w = s.affine_lps @ np.array([*ijk, 1.0])
        assert np.allclose(w[:3], expected_world(iop, (2.0, 0.5), (-10, 20, 30), 3.0, *ijk))
    # column step = column spacing (PixelSpacing[1]); row step = row spacing (PixelSpacing[0])
    assert np.allclose(np.linalg.norm(s.affine_lps[:3, :3], axis=0), [0.5, 2.0, 3.0])


def test_nifti_is_ras_and_ct_int16(tmp_path):
    d = write_series(tmp_path / "s", spacing=(2.0, 0.5))
    out = tmp_path / "ct.nii.gz"
    sc = convert_series(d, out)
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16 and sc["Units"] == "HU"
    s = load_series(d)
    assert np.allclose(img.affine, np.diag([-1, -1, 1, 1]) @ s.affine_lps)
    # a world point (LPS) maps to the same value through the NIfTI
    lps = expected_world((1, 0, 0, 0, 1, 0), (2.0, 0.5), (-10, 20, 30), 3.0, 2, 4, 1)
    ras = lps * [-1, -1, 1]
    ijk = np.rint(np.linalg.inv(img.affine) @ [*ras, 1])[:3].astype(int)
    assert np.asarray(img.dataobj)[tuple(ijk)] == 100 + 40 + 2 - 1024


def test_reversed_slice_order(tmp_path):
    a = load_series(write_series(tmp_path / "a"))
    b = load_series(write_series(tmp_path / "b", order=[4, 2, 0, 3, 1]))
    assert np.allclose(a.affine_lps, b.affine_lps)
    assert np.array_equal(a.data, b.data)


def test_oblique_and_sagittal_geometry(tmp_path):
    th = np.radians(20)
    iop = (np.cos(th), np.sin(th), 0, 0, 0, -1)  # oblique sagittal-ish
    d = write_series(tmp_path / "o", iop=iop, spacing=(1.5, 0.8), dz=2.5)
    s = load_series(d)
    for ijk in [(0, 0, 0), (3, 5, 4), (2, 1, 3)]:
        w = s.affine_lps @ np.array([*ijk, 1.0])
        assert np.allclose(w[:3], expected_world(iop, (1.5, 0.8), (-10, 20, 30), 2.5, *ijk), atol=1e-6)


def test_missing_slice_refused(tmp_path):
    pos = [np.array([0, 0, 3.0 * k]) for k in (0, 1, 2, 4, 5)]
    d = write_series(tmp_path / "m", positions=pos)
    with pytest.raises(UserError, match="unequal slice spacing"):
        load_series(d)


def test_tilt_refused(tmp_path):
    pos = [np.array([0, 0.5 * k, 3.0 * k]) for k in range(5)]  # positions drift along y: gantry tilt
    d = write_series(tmp_path / "t", positions=pos)
    with pytest.raises(UserError, match="gantry tilt") as ei:
        load_series(d)
    assert str(d) in str(ei.value)


def test_mixed_series_refused(tmp_path):
    d = tmp_path / "mix"
    write_series(d / "x", n=3)
    write_series(d / "y", n=2, modality="PT")
    for f in list((d / "y").iterdir()):
        f.rename(d / ("y_" + f.name))
    for f in list((d / "x").iterdir()):
        f.rename(d / ("x_" + f.name))
    with pytest.raises(UserError, match="mixes 2 series"):
        load_series(d)


def test_duplicates_and_junk(tmp_path):
    d = write_series(tmp_path / "dup")
    first = sorted(d.iterdir())[0]
    (d / "copy_of_first").write_bytes(first.read_bytes())
    (d / "notes.txt").write_text("not dicom")
    s = load_series(d)
    assert s.data.shape[2] == 5
    assert any("duplicate" in x for x in s.notes) and any("notes.txt" in x for x in s.notes)


def test_same_position_different_instances_refused(tmp_path):
    pos = [np.array([0, 0, 0.0]), np.array([0, 0, 0.0]), np.array([0, 0, 3.0])]
    d = write_series(tmp_path / "s", positions=pos, n=3)
    with pytest.raises(UserError, match="same slice position"):
        load_series(d)


def test_per_slice_rescale(tmp_path):
    d = write_series(tmp_path / "r", slope=2.0, intercept=0.5)
    s = load_series(d)
    assert s.data.dtype == np.float32 and s.data[1, 2, 3] == pytest.approx(2.0 * (300 + 20 + 1) + 0.5)
    out = tmp_path / "r.nii.gz"
    convert_series(d, out)
    assert nib.load(out).get_data_dtype() == np.float32  # non-integer HU stays float


def _pet_extra():
    rp = pydicom.Dataset()
    rp.Radiopharmaceutical = "PSMA-11"
    rp.RadiopharmaceuticalStartDateTime = "20240102100000"
    rp.RadionuclideTotalDose = 150e6
    rp.RadionuclideHalfLife = 4057.7
    code = pydicom.Dataset()
    code.CodeMeaning = "^68^Gallium"
    rp.RadionuclideCodeSequence = [code]
    return {
        "Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
        "SeriesTime": "110000", "AcquisitionDate": "20240102", "AcquisitionTime": "110000",
        "PatientWeight": 80, "PatientSize": 1.8, "PatientSex": "F", "Manufacturer": "SIEMENS",
        "RadiopharmaceuticalInformationSequence": [rp], "ActualFrameDuration": 120000,
        "PatientAge": "083Y",
    }


def test_no_identifiers_in_outputs(tmp_path):
    d = write_series(tmp_path / "pet", modality="PT", slope=1.0, intercept=0.0, extra=_pet_extra())
    uids = set()
    for f in d.iterdir():
        ds = pydicom.dcmread(f)
        uids |= {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID}
    out = tmp_path / "o" / "pet.nii.gz"
    for suv in ("none", "bw", "lbm"):
        sc = convert_series(d, out, suv=suv)
        blobs = [out.read_bytes(), nib.load(out).to_bytes(), (tmp_path / "o" / "pet.json").read_bytes()]
        for b in blobs:
            for secret in [*SECRET.values(), *uids, "20240102", "2024-01-02", "083Y"]:
                assert secret.encode() not in b, (suv, secret)
                assert secret.replace("^", " ").encode() not in b
    j = json.loads((tmp_path / "o" / "pet.json").read_text())
    assert j["TracerName"] == "PSMA-11" and j["TracerRadionuclide"] == "Ga68"
    assert j["InjectionStart"] == -3600.0 and j["ScanStart"] == 0.0
    assert j["InjectedRadioactivity"] == 150.0 and j["InjectedRadioactivityUnits"] == "MBq"
    assert j["Units"] == "g/mL" and j["ImageDecayCorrected"] is True
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pet.json", "pet.nii.gz"]


def test_compressed_without_decoder_is_refused_clearly(tmp_path):
    d = write_series(tmp_path / "c", n=2)
    from pydicom.uid import JPEG2000Lossless
    for f in d.iterdir():
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51junk"])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)
    try:
        load_series(d)
    except UserError as exc:
        assert "JPEG 2000" in str(exc) or "decode" in str(exc)
    else:  # a decoder is installed and decoded junk: that cannot happen
        pytest.fail("junk JPEG 2000 data decoded")


def test_enhanced_multiframe(tmp_path):
    """A minimal enhanced multi-frame CT (per-frame plane positions) gives the same geometry."""
    classic = load_series(write_series(tmp_path / "cl", n=3))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("mf", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 6, 4, 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    sh = pydicom.Dataset()
    po = pydicom.Dataset()
    po.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    pm = pydicom.Dataset()
    pm.PixelSpacing = [2.0, 0.5]
    pm.SliceThickness = 3.0
    pvt = pydicom.Dataset()
    pvt.RescaleSlope = 1.0
    pvt.RescaleIntercept = -1024.0
    pvt.RescaleType = "HU"
    sh.PlaneOrientationSequence = [po]
    sh.PixelMeasuresSequence = [pm]
    sh.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [sh]
    frames = []
    rr, cc = np.mgrid[0:6, 0:4]
    for k in (2, 0, 1):  # frames out of order
        it = pydicom.Dataset()
        pp = pydicom.Dataset()
        pp.ImagePositionPatient = [-10.0, 20.0, 30.0 + 3.0 * k]
        it.PlanePositionSequence = [pp]
        frames.append((it, (100 * k + 10 * rr + cc).astype(np.int16)))
    ds.PerFrameFunctionalGroupsSequence = [f[0] for f in frames]
    ds.PixelData = b"".join(f[1].tobytes() for f in frames)
    (tmp_path / "mf").mkdir()
    ds.save_as(tmp_path / "mf" / "mf.dcm", enforce_file_format=True)
    s = load_series(tmp_path / "mf")
    assert np.allclose(s.affine_lps, classic.affine_lps)
    assert np.array_equal(s.data, classic.data)

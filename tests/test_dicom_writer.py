"""The phantom's DICOM writer: geometry, values and vendor header conventions read back with pydicom."""

from __future__ import annotations

import datetime as dt
import math
import time

import numpy as np
import pydicom
import pytest

from glandpet.phantom.dicom_writer import (
    GE_PRIVATE_CREATOR,
    PHILIPS_PRIVATE_CREATOR,
    VENDORS,
    make_uid,
    write_ct_series,
    write_localizer,
    write_pet_series,
)
from glandpet.phantom.model import PatientInfo, PetInfo, StudyInfo

PATIENT = PatientInfo(
    name="TESTPERSON^ALMA", patient_id="PID-7731", birth_date="19650412", sex="F",
    weight_kg=63.5, height_m=1.64, age_years=58,
)


def _study(vendor: str) -> StudyInfo:
    return StudyInfo(
        study_uid=make_uid("study", vendor),
        frame_of_reference_uid=make_uid("for", vendor),
        study_datetime=dt.datetime(2023, 6, 14, 10, 31, 5),
        study_description="PET/CT PSMA head neck",
        accession_number="ACC000123",
        institution_name="Test University Hospital",
        referring_physician="REFERRER^ROB",
        vendor=vendor,
    )


def _pet(ac: bool = True, tracer="Ga-68 PSMA-11", nuclide="Ga-68", half=4057.74) -> PetInfo:
    return PetInfo(
        tracer=tracer, radionuclide=nuclide, half_life_s=half, injected_activity_bq=151.3e6,
        injection_datetime=dt.datetime(2023, 6, 14, 9, 35, 12),
        scan_start=dt.datetime(2023, 6, 14, 10, 34, 40), frame_duration_s=600.0,
        psf_fwhm_mm=6.5, attenuation_corrected=ac,
    )


def _affine(spacing, origin, flip_z=False):
    a = np.eye(4)
    a[0, 0], a[1, 1], a[2, 2] = spacing
    if flip_z:
        a[2, 2] = -spacing[2]
    a[:3, 3] = origin
    return a


def read_series(paths):
    """Read a series the standard way: sort by position along the slice normal, rescale, build the
    (x, y, z) volume and the voxel -> LPS affine from IPP/IOP/PixelSpacing only."""
    dss = [pydicom.dcmread(p) for p in paths]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    r, c = iop[:3], iop[3:]
    n = np.cross(r, c)
    dss.sort(key=lambda d: float(np.array(d.ImagePositionPatient, float) @ n))
    ps = np.array(dss[0].PixelSpacing, float)
    ipp0 = np.array(dss[0].ImagePositionPatient, float)
    aff = np.eye(4)
    aff[:3, 0] = r * ps[1]
    aff[:3, 1] = c * ps[0]
    aff[:3, 2] = (np.array(dss[1].ImagePositionPatient, float) - ipp0) if len(dss) > 1 else n
    aff[:3, 3] = ipp0
    vol = np.stack(
        [d.pixel_array.T.astype(float) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss],
        axis=2,
    )
    return vol, aff, dss


def _world_equal(vol_in, aff_in, vol_out, aff_out, atol_val):
    """Every voxel of the input lands at the same world position with the same value."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in vol_in.shape], indexing="ij"), -1).reshape(-1, 3)
    world = aff_in[:3, :3] @ ijk.T + aff_in[:3, 3:4]
    ijk2 = np.linalg.solve(aff_out[:3, :3], world - aff_out[:3, 3:4]).T
    assert np.allclose(ijk2, np.rint(ijk2), atol=1e-4), "voxel centres moved"
    ijk2 = np.rint(ijk2).astype(int)
    v_in = vol_in[tuple(ijk.T)]
    v_out = vol_out[tuple(ijk2.T)]
    np.testing.assert_allclose(v_out, v_in, atol=atol_val)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("flip_z", [False, True])
def test_ct_geometry_values(tmp_path, vendor, flip_z):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 2500, size=(23, 17, 9)).astype(np.float32)
    aff = _affine((0.9765625, 0.9765625, 2.5), (-11.2, -130.4, 55.25), flip_z)
    st = _study(vendor)
    paths = write_ct_series(tmp_path / "ct", hu, aff, PATIENT, st, 3, "CT HEAD NECK 2.5mm")
    assert len(paths) == 9
    vol, aff2, dss = read_series(paths)
    assert vol.shape == hu.shape
    _world_equal(hu, aff, vol, aff2, 1e-6)
    d = dss[0]
    assert d.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(d.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert float(d.RescaleIntercept) == -1024 and float(d.RescaleSlope) == 1
    assert float(d.SliceThickness) == pytest.approx(2.5)
    assert [float(v) for v in d.PixelSpacing] == pytest.approx([0.9765625, 0.9765625])
    assert d.Rows == 17 and d.Columns == 23
    assert float(d.KVP) == 120
    assert d.FrameOfReferenceUID == st.frame_of_reference_uid
    assert d.StudyInstanceUID == st.study_uid
    assert d.PixelRepresentation == (1 if vendor == "ge" else 0)
    assert len({x.SOPInstanceUID for x in dss}) == 9
    assert len({x.SeriesInstanceUID for x in dss}) == 1


def test_ct_clipping_and_identifiers(tmp_path):
    hu = np.full((4, 4, 2), -3000.0)
    hu[0, 0, 0] = 5000
    paths = write_ct_series(tmp_path, hu, np.eye(4), PATIENT, _study("siemens"), 2, "CT")
    vol, _, dss = read_series(paths)
    assert vol.min() == -1024 and vol.max() == 3071  # 12-bit unsigned range
    d = dss[0]
    assert str(d.PatientName) == PATIENT.name and d.PatientID == PATIENT.patient_id
    assert d.PatientBirthDate == PATIENT.birth_date and d.PatientSex == "F" and d.PatientAge == "058Y"
    assert float(d.PatientWeight) == pytest.approx(63.5) and float(d.PatientSize) == pytest.approx(1.64)
    for kw in ("AccessionNumber", "InstitutionName", "ReferringPhysicianName", "OperatorsName", "StudyDate"):
        assert str(d.get(kw, "")), kw


def _uptake_s(pet):
    return (pet.scan_start - pet.injection_datetime).total_seconds()


@pytest.mark.parametrize("vendor", VENDORS)
def test_pet_values_and_geometry(tmp_path, vendor):
    rng = np.random.default_rng(2)
    bq = rng.gamma(2.0, 4000.0, size=(19, 21, 11))
    bq[:, :, 4] = 0.0  # an empty slice
    bq[3, 5, 6] = 2.5e5  # a hot voxel
    aff = _affine((2.0364, 2.0364, 2.027), (-150.1, -170.3, -40.0))
    st, pet = _study(vendor), _pet()
    paths = write_pet_series(tmp_path / "pet", bq, aff, PATIENT, st, pet, 4, "PET AC 3D")
    vol, aff2, dss = read_series(paths)
    slopes = np.array([float(d.RescaleSlope) for d in dss])
    d = dss[0]
    assert d.SOPClassUID == pydicom.uid.PositronEmissionTomographyImageStorage
    assert d.DecayCorrection == "START"
    assert d.FrameOfReferenceUID == st.frame_of_reference_uid
    if vendor == "philips":
        assert d.Units == "CNTS"
        act = float(d[0x7053, 0x1009].value)
        suvf = float(d[0x7053, 0x1000].value)
        _world_equal(bq, aff, vol * act, aff2, (slopes.max() * act) / 2 * 1.0001)
        lam = math.log(2) / pet.half_life_s
        dose = pet.injected_activity_bq * math.exp(-lam * _uptake_s(pet))
        suv_true = bq * PATIENT.weight_kg * 1000 / dose
        vol_suv = vol * suvf
        # SUV factor consistent with the activity factor (to DS precision)
        assert suvf == pytest.approx(act * PATIENT.weight_kg * 1000 / dose, rel=1e-9)
        _world_equal(suv_true, aff, vol_suv, aff2, slopes.max() * suvf / 2 * 1.0001 + 1e-9)
    else:
        assert d.Units == "BQML"
        _world_equal(bq, aff, vol, aff2, slopes.max() / 2 * 1.0001)
    # per-slice slopes: each slice uses its own full int16 range
    assert len(set(slopes)) > 5
    for dd in dss:
        px = dd.pixel_array
        assert px.dtype == np.int16
        if px.any():
            assert np.abs(px).max() in (32766, 32767)
    # quantisation is relative: 1/65534 of each slice maximum
    assert np.max(np.abs(vol[:, :, 4])) == 0


@pytest.mark.parametrize("vendor", VENDORS)
def test_pet_common_header(tmp_path, vendor):
    pet = _pet()
    paths = write_pet_series(tmp_path, np.ones((5, 6, 3)), np.eye(4), PATIENT, _study(vendor), pet, 5, "PET")
    d = pydicom.dcmread(paths[0])
    assert list(d.CorrectedImage) == ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
    rp = d.RadiopharmaceuticalInformationSequence[0]
    assert rp.Radiopharmaceutical == "Ga-68 PSMA-11"
    assert float(rp.RadionuclideTotalDose) == pytest.approx(151.3e6)
    assert float(rp.RadionuclideHalfLife) == pytest.approx(4057.74)
    assert float(rp.RadionuclidePositronFraction) == pytest.approx(0.889, abs=1e-3)
    assert rp.RadionuclideCodeSequence[0].CodeMeaning == "^68^Gallium"
    assert rp.RadionuclideCodeSequence[0].CodeValue in ("C-131A3", "35337001")
    assert rp.RadiopharmaceuticalCodeSequence[0].CodeValue == "C118961"
    assert rp.RadiopharmaceuticalStartTime.startswith("093512")
    assert int(d.ActualFrameDuration) == 600000
    # frame reference time: the average-activity time within the frame, decay factor to match
    lam = math.log(2) / pet.half_life_s
    t_ref = float(d.FrameReferenceTime) / 1000
    assert 290 < t_ref < 300  # a little before mid-frame: activity decays during the frame
    assert float(d.DecayFactor) == pytest.approx(math.exp(lam * t_ref), rel=1e-9)
    assert d.AcquisitionTime.startswith("103440")
    assert d.AcquisitionDate == "20230614"
    assert d.NumberOfSlices == 3
    assert sorted(int(pydicom.dcmread(p).ImageIndex) for p in paths) == [1, 2, 3]


def test_siemens_conventions(tmp_path):
    pet = _pet()
    paths = write_pet_series(tmp_path, np.ones((5, 6, 3)), np.eye(4), PATIENT, _study("siemens"), pet, 5, "PET")
    d = pydicom.dcmread(paths[0])
    assert d.Manufacturer == "SIEMENS"
    assert d.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert d.SeriesTime == d.AcquisitionTime and d.SeriesTime.startswith("103440")
    assert d.SeriesDate == "20230614"
    rp = d.RadiopharmaceuticalInformationSequence[0]
    assert rp.RadiopharmaceuticalStartDateTime.startswith("20230614093512")
    assert rp.RadionuclideCodeSequence[0].CodeValue == "C-131A3"
    assert rp.RadionuclideCodeSequence[0].CodingSchemeDesignator == "SRT"
    assert all(p.suffix == ".IMA" for p in paths)


def test_ge_conventions(tmp_path):
    pet = _pet()
    paths = write_pet_series(tmp_path, np.ones((5, 6, 3)), np.eye(4), PATIENT, _study("ge"), pet, 5, "PET AC")
    d = pydicom.dcmread(paths[0])
    assert d.Manufacturer == "GE MEDICAL SYSTEMS"
    assert d[0x0009, 0x0010].value == GE_PRIVATE_CREATOR
    scan_dt = d[0x0009, 0x100D].value
    assert d[0x0009, 0x100D].VR == "DT" and scan_dt.startswith("20230614103440")
    # series time after the end of the acquisition (a reprocessed series)
    series = dt.datetime.strptime(d.SeriesDate + d.SeriesTime[:6], "%Y%m%d%H%M%S")
    assert series > pet.scan_start + dt.timedelta(seconds=pet.frame_duration_s)
    assert d.AcquisitionTime.startswith("103440")
    rp = d.RadiopharmaceuticalInformationSequence[0]
    assert "RadiopharmaceuticalStartDateTime" not in rp
    assert rp.RadiopharmaceuticalStartTime.startswith("093512")
    assert all(p.suffix == "" and p.name.startswith("IM") for p in paths)
    # GE numbers instances from the head: instance 1 is the most superior slice
    dss = sorted((pydicom.dcmread(p) for p in paths), key=lambda x: int(x.InstanceNumber))
    z = [float(x.ImagePositionPatient[2]) for x in dss]
    assert z == sorted(z, reverse=True)


def test_philips_conventions(tmp_path):
    pet = _pet()
    paths = write_pet_series(tmp_path, np.ones((5, 6, 3)), np.eye(4), PATIENT, _study("philips"), pet, 5, "PET")
    d = pydicom.dcmread(paths[0])
    assert d.Manufacturer.startswith("Philips")
    assert d.Units == "CNTS"
    assert d[0x7053, 0x0010].value == PHILIPS_PRIVATE_CREATOR
    assert d[0x7053, 0x1000].VR == "DS" and d[0x7053, 0x1009].VR == "DS"
    assert d.SeriesTime == d.AcquisitionTime
    assert d.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert all(p.name.isdigit() for p in paths)


def test_nac(tmp_path):
    pet = _pet(ac=False)
    paths = write_pet_series(tmp_path, np.ones((5, 6, 3)), np.eye(4), PATIENT, _study("siemens"), pet, 6, "PET")
    d = pydicom.dcmread(paths[0])
    assert "ATTN" not in d.CorrectedImage and "SCAT" not in d.CorrectedImage
    assert "DECY" in d.CorrectedImage
    assert "NAC" in d.SeriesDescription
    assert "AttenuationCorrectionMethod" not in d


def test_f18_fapi_no_radiopharmaceutical_code(tmp_path):
    pet = _pet(tracer="F-18 FAPI-74", nuclide="F-18", half=6586.2)
    paths = write_pet_series(tmp_path, np.ones((5, 6, 2)), np.eye(4), PATIENT, _study("ge"), pet, 5, "PET")
    rp = pydicom.dcmread(paths[0]).RadiopharmaceuticalInformationSequence[0]
    assert rp.Radiopharmaceutical == "F-18 FAPI-74"
    assert "RadiopharmaceuticalCodeSequence" not in rp
    assert rp.RadionuclideCodeSequence[0].CodeValue == "C-111A1"
    assert float(rp.RadionuclideHalfLife) == pytest.approx(6586.2)


@pytest.mark.parametrize("vendor", VENDORS)
def test_localizer(tmp_path, vendor):
    hu = np.full((30, 20, 12), -1000.0)
    hu[5:25, 5:15, :] = 40.0
    aff = _affine((1.5, 1.5, 3.0), (-20, -15, 10))
    paths = write_localizer(tmp_path, PATIENT, _study(vendor), 1, hu=hu, affine_lps=aff)
    assert len(paths) == 1
    d = pydicom.dcmread(paths[0])
    assert list(d.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert d.Modality == "CT"
    iop = np.array(d.ImageOrientationPatient, float)
    assert np.allclose(iop, [1, 0, 0, 0, 0, -1])  # coronal
    assert d.pixel_array.shape == (12, 30)
    paths2 = write_localizer(tmp_path / "b", PATIENT, _study(vendor), 1)
    assert pydicom.dcmread(paths2[0]).pixel_array.shape == (512, 512)


def test_deterministic(tmp_path):
    bq = np.random.default_rng(3).gamma(2.0, 1000.0, size=(8, 9, 4))
    st, pet = _study("ge"), _pet()
    a = write_pet_series(tmp_path / "a", bq, np.eye(4), PATIENT, st, pet, 4, "PET")
    b = write_pet_series(tmp_path / "b", bq, np.eye(4), PATIENT, st, pet, 4, "PET")
    assert [p.name for p in a] == [p.name for p in b]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b))
    uid = pydicom.dcmread(a[0]).SeriesInstanceUID
    assert uid == make_uid(st.study_uid, "PT", 4, "PET") and len(uid) <= 64
    c = write_pet_series(tmp_path / "c", bq, np.eye(4), PATIENT, st, pet, 4, "PET", series_uid="1.2.3.4")
    assert pydicom.dcmread(c[0]).SeriesInstanceUID == "1.2.3.4"


def test_valid_files_for_strict_readers(tmp_path):
    """Files have preamble + file meta, parse without force, and round-trip through dcmwrite."""
    paths = write_pet_series(tmp_path, np.ones((4, 4, 2)), np.eye(4), PATIENT, _study("philips"), _pet(), 4, "PET")
    for p in paths:
        raw = p.read_bytes()
        assert raw[128:132] == b"DICM"
        d = pydicom.dcmread(p)  # no force=True
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        d.save_as(tmp_path / "copy.dcm", enforce_file_format=True)


def test_write_speed(tmp_path):
    bq = np.random.default_rng(4).gamma(2.0, 1000.0, size=(128, 128, 100))
    t0 = time.perf_counter()
    write_pet_series(tmp_path / "pet", bq, np.eye(4), PATIENT, _study("siemens"), _pet(), 4, "PET")
    t_pet = time.perf_counter() - t0
    hu = np.random.default_rng(5).integers(-1000, 1500, size=(256, 256, 100)).astype(np.float32)
    t0 = time.perf_counter()
    write_ct_series(tmp_path / "ct", hu, np.eye(4), PATIENT, _study("ge"), 2, "CT")
    t_ct = time.perf_counter() - t0
    assert t_pet < 1.0, t_pet
    assert t_ct < 1.5, t_ct


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("tilt", [15.0, -15.0])
@pytest.mark.parametrize("table_down", [False, True])
def test_ct_gantry_tilt_as_a_scanner_writes_it(tmp_path, vendor, tilt, table_down):
    """A gantry-tilted CT as scanners write it: the image columns tilt in the y-z plane
    (ImageOrientationPatient 1\\0\\0\\0\\cos t\\sin t), ImagePositionPatient advances along the table
    (z) only, and GantryDetectorTilt carries the SIGNED angle. DICOM PS3.3 (Gantry/Detector Tilt):
    "negative degrees are when the top of the gantry is tilted away from where the table enters the
    gantry". Head first supine, the table enters from the feet side and the top of the gantry is
    anterior (the first image row): a column vector with +z (top of the image towards the feet) is a
    positive tilt, whichever way the table steps. The writer wrote |t| for both signs."""
    t = math.radians(tilt)
    a = np.eye(4)
    a[:3, 1] = [0.0, 2.0 * math.cos(t), 2.0 * math.sin(t)]
    a[:3, 2] = [0.0, 0.0, -3.0 if table_down else 3.0]
    a[:3, 3] = [-10.0, -20.0, 40.0]
    paths = write_ct_series(tmp_path / "ct", np.zeros((8, 6, 5), np.float32), a, PATIENT, _study(vendor), 2, "CT")
    dss = [pydicom.dcmread(p) for p in paths]
    assert {d.PatientPosition for d in dss} == {"HFS"}
    assert float(dss[0].GantryDetectorTilt) == pytest.approx(tilt, abs=1e-3)
    iop = [float(v) for v in dss[0].ImageOrientationPatient]
    assert iop == pytest.approx([1, 0, 0, 0, math.cos(t), math.sin(t)], abs=1e-9)
    ipp = np.array(sorted([[float(v) for v in d.ImagePositionPatient] for d in dss], key=lambda p: p[2]))
    assert np.allclose(ipp[:, :2], ipp[0, :2]) and np.allclose(np.diff(ipp[:, 2]), 3.0)
    # the slice planes are 3 cos(t) mm apart
    assert float(dss[0].SliceThickness) == pytest.approx(3.0 * math.cos(t))


def test_ct_untilted_writes_zero_tilt(tmp_path):
    paths = write_ct_series(tmp_path / "ct", np.zeros((4, 4, 3), np.float32), _affine((1, 1, 2), (0, 0, 0), True),
                            PATIENT, _study("siemens"), 2, "CT")
    assert float(pydicom.dcmread(paths[0]).GantryDetectorTilt) == 0.0

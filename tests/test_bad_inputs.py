"""The bad-input matrix (issue 7): every kind of broken input gives a clear message naming the subject
(pseudonymous id), the series (number and description, never an identifier) and the cause, and breaks
only that subject or session: the index lists it in its failures (the workflow leaves it out of the DAG
and writes it to qc.parquet, see test_keep_going_* at the end), the other subject goes on.

Each test builds its input from the 2-subject phantom (fixture ``small_cohort``, never edited: files
are hard-linked, and a file that a test edits is unlinked before it is rewritten) as a "mini cohort" of
two subjects with a short CT and PET each:

    A  (control)  the GE FAPI session of phantom subject S002
    B  (pss)      the Siemens PSMA session of phantom subject S001

Rows covered elsewhere (not repeated here):
- subject sheet with duplicate ids: tests/test_subjects.py::test_row_errors
  ("line 3, column subject_id: duplicate subject id 'pss001' (also on line 2)");
- bad config values: tests/test_config.py::test_bad_values_name_the_key (the schema error names the key);
- a folder that mixes series given straight to the converter: tests/test_convert.py::test_mixed_series_refused.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from glandpet.errors import SUVError, UserError
from glandpet.dicom.catalog import index_tree

N_SLICES = 12  # per series of the mini cohort: enough for geometry checks, fast to read


# ------------------------------------------------------------------------------------------ building
def _series_dirs(subject_dir: Path, session: str) -> dict[str, Path]:
    sess = next(d for d in subject_dir.iterdir() if d.name.upper().endswith(session.upper()))
    out = {}
    for d in sorted(sess.iterdir()):
        ds = pydicom.dcmread(next(iter(sorted(d.iterdir()))), stop_before_pixels=True)
        kind = {"CT": "ct", "PT": "pet"}.get(ds.Modality)
        ci = [str(x) for x in ds.get("CorrectedImage", [])]
        if kind == "ct" and int(ds.get("Rows", 0)) > 0 and len(list(d.iterdir())) > 1:
            out["ct"] = d
        elif kind == "pet" and "ATTN" in ci:
            out["pet"] = d
    return out


def _sorted_by_position(files: list[Path]) -> list[Path]:
    z = {f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files}
    return sorted(files, key=lambda f: -z[f])


@functools.lru_cache(maxsize=2)
def _mini_sources(cohort_dicom: Path) -> dict[tuple[str, str], list[Path]]:
    out = {}
    for sid, (phantom, session) in {"A": ("S002", "fapi"), "B": ("S001", "psma")}.items():
        for kind, d in _series_dirs(cohort_dicom / phantom, session).items():
            out[(sid, kind)] = _sorted_by_position(sorted(d.iterdir()))[:N_SLICES]
    return out


@pytest.fixture
def mini(small_cohort, tmp_path) -> Path:
    """tmp_path/dicom/{A,B}/{ct,pet}/ (N_SLICES hard-linked files each, the top slices) + subjects.tsv."""
    for (sid, kind), srcs in _mini_sources(small_cohort / "dicom").items():
        dst = tmp_path / "dicom" / sid / kind
        dst.mkdir(parents=True)
        for f in srcs:
            os.link(f, dst / f.name)
    (tmp_path / "subjects.tsv").write_text("subject_id\tgroup\tdicom_dir\nA\tcontrol\tA\nB\tpss\tB\n")
    return tmp_path


def files(mini: Path, sid: str, kind: str) -> list[Path]:
    return _sorted_by_position(sorted((mini / "dicom" / sid / kind).iterdir()))


def edit(paths, fn) -> None:
    """Rewrite each file after fn(ds, k) (unlinked first: the originals are hard links into the fixture)."""
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        fn(ds, k)
        p.unlink()
        ds.save_as(p)


def index(mini: Path, **kw):
    return index_tree(mini / "dicom", mini / "subjects.tsv", on_ambiguity="report", **kw)


def failed(result, sid: str) -> pd.DataFrame:
    f = result.failures
    return f[(f["subject_id"] == sid) & (f["status"] == "failed")]


def usable_sessions(result, sid: str) -> set[str]:
    s = result.series
    ok = s[(s["subject_id"] == sid) & s["selected"] & (s["role"] == "pet_ac") & s["problem"].isna()]
    return set(ok["session"])


def assert_fails(result, sid: str, session: str | None, *needles: str, series: str | None = "PET series #") -> str:
    """`sid` (and only it) fails, with one message naming the subject, session, series and cause;
    the other subject keeps its session. Returns the message."""
    rows = failed(result, sid)
    assert len(rows) >= 1, result.failures.to_string()
    msg = " | ".join(rows["message"])
    assert msg.startswith(f"sub-{sid}") or msg.startswith(f"subject {sid}"), msg
    if session is not None:
        assert session in set(rows["session"]), rows.to_string()
        assert f"ses-{session}" in msg or f"session {session}" in msg, msg
        assert session not in usable_sessions(result, sid)
    if series:
        assert series in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    other = "A" if sid == "B" else "B"
    assert failed(result, other).empty, result.failures.to_string()
    assert usable_sessions(result, other) == {"A": {"fapi"}, "B": {"psma"}}[other]
    return msg


def assert_clean(result) -> None:
    assert result.failures[result.failures["status"] == "failed"].empty, result.failures.to_string()
    assert usable_sessions(result, "A") == {"fapi"} and usable_sessions(result, "B") == {"psma"}


# ------------------------------------------------------------------------------------------ the matrix
def test_clean_mini_cohort_has_no_failures(mini):
    assert_clean(index(mini))


def test_truncated_pixel_data(mini):
    f = files(mini, "B", "pet")[5]
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data[: len(data) - 5000])
    r = index(mini)
    msg = assert_fails(r, "B", "psma", "truncated", "pixel data has")
    assert "1 of its files is truncated" in msg
    assert (r.skipped["reason"] == "truncated").sum() == 1


def test_unreadable_file_inside_a_series(mini):
    f = files(mini, "B", "pet")[5]
    f.unlink()
    f.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)  # a DICOM preamble, then garbage
    r = index(mini)
    assert_fails(r, "B", "psma", "unequal slice spacing", "missing slices?")
    warn = r.failures[(r.failures["subject_id"] == "B") & (r.failures["status"] == "warning")]
    assert any("skipped" in m and "series_skipped.parquet" in m for m in warn["message"])


def test_non_dicom_files_are_skipped(mini):
    (mini / "dicom" / "B" / "pet" / "README.txt").write_text("exported by PACS\n")
    (mini / "dicom" / "B" / "Thumbs.db").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    r = index(mini)
    assert_clean(r)
    assert set(r.skipped["reason"]) == {"not DICOM"} and len(r.skipped) == 2


def test_only_non_dicom_files(mini):
    shutil.rmtree(mini / "dicom" / "B")
    (mini / "dicom" / "B").mkdir()
    (mini / "dicom" / "B" / "report.pdf").write_bytes(b"%PDF-1.4\n" + b"x" * 100)
    (mini / "dicom" / "B" / "notes.txt").write_text("x")
    assert_fails(index(mini), "B", None, "no DICOM image series in its dicom_dir folder", "2 not DICOM", series=None)


def test_empty_folder(mini):
    shutil.rmtree(mini / "dicom" / "B")
    (mini / "dicom" / "B").mkdir()
    assert_fails(index(mini), "B", None, "its dicom_dir folder holds no files", series=None)


def test_subject_folder_missing(mini):
    shutil.rmtree(mini / "dicom" / "B")
    msg = assert_fails(index(mini), "B", None, "its dicom_dir folder (subject sheet line 3) does not exist", series=None)
    assert "'B'" not in msg and "/B" not in msg  # the folder name is not repeated (it may be a patient's name)
    # the sheet reader still refuses it by default (glandpet check), and names the line
    from glandpet.study.subjects import read_subject_sheet

    with pytest.raises(UserError, match=r"line 3 \(subject B\), column dicom_dir"):
        read_subject_sheet(mini / "subjects.tsv", mini / "dicom")


def test_pet_without_ct(mini):
    shutil.rmtree(mini / "dicom" / "B" / "ct")
    assert_fails(index(mini), "B", "psma", "the PET series has no CT", "export the CT")


def test_ct_without_pet(mini):
    shutil.rmtree(mini / "dicom" / "B" / "pet")
    assert_fails(index(mini), "B", None, "no attenuation-corrected PET series (found: CT series #", series=None)


def test_two_candidate_pet_series_for_one_tracer(mini):
    from pydicom.uid import generate_uid

    src = files(mini, "B", "pet")
    dst = mini / "dicom" / "B" / "pet_repeat"
    dst.mkdir()
    for f in src:
        shutil.copy(f, dst / f.name)
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()

    def repeat(ds, k):  # the same tracer scanned again the same day (another study): a true duplicate
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = uid, study, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 7
        ds.SeriesDescription = "PET AC repeat"

    edit(sorted(dst.iterdir()), repeat)
    r = index(mini)
    msg = assert_fails(r, "B", "psma", "2 attenuation-corrected PET series from different acquisitions on day 0",
                       "'PET AC repeat'", "override", series=None)
    with pytest.raises(UserError, match="subject B, session psma"):
        index_tree(mini / "dicom", mini / "subjects.tsv")  # the CLI default: refuse
    assert msg


def test_a_scan_of_the_same_tracer_on_another_day_is_a_follow_up_session(mini):
    """Issue 19: a later scan of the tracer is psma2, not an ambiguity; its own faults name that session."""
    from datetime import datetime, timedelta

    from pydicom.uid import generate_uid

    src = files(mini, "B", "pet")
    dst = mini / "dicom" / "B" / "pet_followup"
    dst.mkdir()
    for f in src:
        shutil.copy(f, dst / f.name)
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()

    def follow_up(ds, k):  # 90 days later, another study; its CT was not exported
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = uid, study, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            if kw in ds:
                ds[kw].value = (datetime.strptime(ds[kw].value, "%Y%m%d") + timedelta(days=90)).strftime("%Y%m%d")
        ds.SeriesNumber = 7
        ds.SeriesDescription = "PET AC follow-up"

    edit(sorted(dst.iterdir()), follow_up)
    r = index(mini)
    assert r.problems == []
    assert_fails(r, "B", "psma2", "'PET AC follow-up'", "the PET series has no CT")
    assert usable_sessions(r, "B") == {"psma"}


def test_unknown_tracer(mini):
    def unknown(ds, k):
        ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "Ga-68 XYZ-123"
        if "RadiopharmaceuticalCodeSequence" in ds.RadiopharmaceuticalInformationSequence[0]:
            del ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalCodeSequence
        ds.StudyDescription = "PET CT"
        ds.SeriesDescription = "PET AC"

    edit(files(mini, "B", "pet"), unknown)
    r = index(mini)
    assert_fails(r, "B", None, "no PET series of a PSMA or FAPI tracer", series=None)
    warn = r.failures[(r.failures["subject_id"] == "B") & (r.failures["status"] == "warning")]
    assert len(warn) == 1
    m = warn["message"].iloc[0]
    assert "PET series #3 'PET AC'" in m and "tracer not recognised" in m and "XYZ-123" in m and "series_overrides" in m


def _del_rp(kw):
    def fn(ds, k):
        rp = ds.RadiopharmaceuticalInformationSequence[0]
        for name in (kw if isinstance(kw, tuple) else (kw,)):
            if name in rp:
                delattr(rp, name)
    return fn


def _set(kw, value):
    def fn(ds, k):
        setattr(ds, kw, value)
    return fn


@pytest.mark.parametrize("change, needles", [
    (_set("PatientWeight", None), ["PatientWeight (0010,1030) missing or not positive"]),
    (_set("PatientWeight", "0"), ["PatientWeight (0010,1030) missing or not positive"]),
    (_del_rp("RadionuclideTotalDose"), ["RadionuclideTotalDose (0018,1074) missing"]),
    (_del_rp(("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime")),
     ["RadiopharmaceuticalStartDateTime/RadiopharmaceuticalStartTime (0018,1078/1072) missing"]),
    (_del_rp("RadionuclideHalfLife"), ["RadionuclideHalfLife (0018,1075) missing"]),
    (_set("Units", "CNTS"), ["Units CNTS without the Philips scale factors"]),
], ids=["no-weight", "weight-0", "no-dose", "no-injection-time", "no-half-life", "cnts-without-philips"])
def test_pet_header_cannot_give_suv(mini, change, needles):
    edit(files(mini, "B", "pet"), change)
    assert_fails(index(mini), "B", "psma", "cannot give SUV", *needles)


@pytest.mark.parametrize("datetime_field", [True, False], ids=["start-datetime", "start-time-only"])
def test_injection_after_scan(mini, datetime_field):
    def late(ds, k):
        rp = ds.RadiopharmaceuticalInformationSequence[0]
        if datetime_field:
            rp.RadiopharmaceuticalStartDateTime = ds.SeriesDate + "130000.000000"  # series at 12:01
        else:
            if "RadiopharmaceuticalStartDateTime" in rp:
                del rp.RadiopharmaceuticalStartDateTime
            rp.RadiopharmaceuticalStartTime = "130000.000"

    edit(files(mini, "B", "pet"), late)
    needle = "uptake time is negative" if datetime_field else "is longer than 10 half-lives"
    assert_fails(index(mini), "B", "psma", "cannot give SUV", needle)


@pytest.mark.parametrize("change, rule", [
    (lambda ds, k: setattr(ds, "PatientWeight", str(float(ds.PatientWeight) * 1000)), "PatientWeight > 350 read as grams"),
    (lambda ds, k: setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideTotalDose",
                           str(round(float(ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose) / 1e6, 4))),
     "RadionuclideTotalDose < 1e4 read as MBq"),
], ids=["weight-in-grams", "dose-in-MBq"])
def test_units_recognised_and_suv_unchanged(mini, change, rule):
    from glandpet.suv.factors import suv_result

    before = suv_result([pydicom.dcmread(f, stop_before_pixels=True) for f in files(mini, "B", "pet")])
    edit(files(mini, "B", "pet"), change)
    assert_clean(index(mini))
    after = suv_result([pydicom.dcmread(f, stop_before_pixels=True) for f in files(mini, "B", "pet")])
    assert rule in after.rule
    assert after.factors["suvbw"] == pytest.approx(before.factors["suvbw"], rel=1e-4)


def test_suv_type_the_header_cannot_give(mini):
    """A header that gives SUVbw but not the configured type: the session fails, naming the type."""
    edit(files(mini, "B", "pet"), _set("PatientSize", None))
    assert_fails(index(mini, suv_type="bsa"), "B", "psma", "cannot give SUV type 'bsa'", "PatientSize")
    assert_clean(index(mini, suv_type="bw"))


def test_unequal_slice_spacing(mini):
    def shift(ds, k):
        if k == 6:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.2]

    edit(files(mini, "B", "pet"), shift)
    assert_fails(index(mini), "B", "psma", "unequal slice spacing (gap", "not one regular volume")


def test_missing_slices(mini):
    for f in files(mini, "B", "pet")[5:7]:
        f.unlink()
    assert_fails(index(mini), "B", "psma", "unequal slice spacing", "missing slices?")


def test_gantry_tilt(mini):
    """A tilted CT is converted (glandpet.dicom.ct_dcm2niix.deshear): a warning saying what is corrected, not a
    failure; a tilted PET stays refused."""
    def tilt(ds, k):  # ~10 degrees: positions drift along y
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.53 * k, z]

    edit(files(mini, "B", "ct"), tilt)
    r = index(mini)
    assert_clean(r)
    warn = r.failures[(r.failures["subject_id"] == "B") & (r.failures["status"] == "warning")]
    msg = " | ".join(warn["message"])
    assert "sub-B ses-psma: its CT series #2 'CT HeadNeck" in msg and "gantry tilt 10." in msg, msg
    assert "deg corrected" in msg, msg
    edit(files(mini, "B", "pet"), tilt)
    assert_fails(index(mini), "B", "psma", "gantry tilt", "about 10.", "PET is refused")


def test_unequally_spaced_ct_is_a_warning_not_a_failure(mini):
    """A CT whose only fault is unequal slice spacing is converted through dcm2niix (glandpet.dicom.ct_dcm2niix):
    the index keeps the session and says what will be corrected."""
    def shift(ds, k):
        if k >= 6:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) - 1.5]

    edit(files(mini, "B", "ct"), shift)
    r = index(mini)
    assert_clean(r)
    warn = r.failures[(r.failures["subject_id"] == "B") & (r.failures["status"] == "warning")]
    msg = " | ".join(warn["message"])
    assert "sub-B ses-psma: its CT series #2 'CT HeadNeck" in msg and "unequal slice spacing (" in msg, msg
    assert "resampled by dcm2niix" in msg, msg


def test_mixed_series_in_one_folder(mini):
    """The index splits a folder by series: a PET and its CT in one folder are processed as usual."""
    for f in files(mini, "B", "pet"):
        os.rename(f, mini / "dicom" / "B" / "ct" / f.name)
    shutil.rmtree(mini / "dicom" / "B" / "pet")
    r = index(mini)
    assert_clean(r)
    from glandpet.workflow.steps import session_selections

    sel = session_selections(r.series, r.files)["B"]["psma"]
    assert len(sel["pet_files"]) == N_SLICES and len(sel["ct_files"]) == N_SLICES


def test_duplicate_sop_instances(mini):
    f = files(mini, "B", "pet")[3]
    shutil.copy(f, f.with_name("copy_of_" + f.name))
    r = index(mini)
    assert_clean(r)
    dup = r.skipped[r.skipped["reason"] == "duplicate instance"]
    assert len(dup) == 1 and "copy_of_" in dup["path"].iloc[0]


def _enhanced_pet(classic: list[Path], out: Path) -> None:
    """One Enhanced PET Image Storage instance holding the frames of a classic PET series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dss = [pydicom.dcmread(f) for f in classic]
    first = dss[0]
    ds = Dataset()
    for elem in first:
        if elem.tag.group in (0x0008, 0x0010, 0x0018, 0x0020, 0x0054) and elem.keyword not in (
                "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "InstanceNumber"):
            ds.add(elem)
    for kw in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
               "HighBit", "PixelRepresentation"):
        setattr(ds, kw, first.get(kw))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.130"
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = len(dss)
    shared = Dataset()
    po, pm = Dataset(), Dataset()
    po.ImageOrientationPatient = first.ImageOrientationPatient
    pm.PixelSpacing, pm.SliceThickness = first.PixelSpacing, first.SliceThickness
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [po], [pm]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for d in dss:
        item, pp, pvt = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = d.ImagePositionPatient
        pvt.RescaleSlope, pvt.RescaleIntercept = d.RescaleSlope, d.RescaleIntercept
        item.PlanePositionSequence, item.PixelValueTransformationSequence = [pp], [pvt]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = b"".join(d.pixel_array.astype(first.pixel_array.dtype).tobytes() for d in dss)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(out, enforce_file_format=True)


def test_enhanced_multiframe_pet(mini, tmp_path):
    from glandpet.dicom.convert import convert_series
    import nibabel as nib

    classic = files(mini, "B", "pet")
    convert_series(classic, tmp_path / "classic.nii.gz")
    enh = mini / "dicom" / "B" / "pet_enhanced"
    enh.mkdir()
    _enhanced_pet(classic, enh / "enhanced.dcm")
    shutil.rmtree(mini / "dicom" / "B" / "pet")
    r = index(mini)
    row = r.series[(r.series["subject_id"] == "B") & (r.series["role"] == "pet_ac")].iloc[0]
    assert row["n_frames"] == N_SLICES and row["session"] == "psma"
    # its geometry and Bq/mL are read; SUV from the enhanced header is refused clearly
    assert_fails(r, "B", "psma", "cannot give SUV", "Enhanced PET Image Storage")
    convert_series([enh / "enhanced.dcm"], tmp_path / "enh.nii.gz", label="sub-B ses-psma PET series #3")
    a, b = nib.load(tmp_path / "enh.nii.gz"), nib.load(tmp_path / "classic.nii.gz")
    assert np.allclose(a.affine, b.affine) and np.array_equal(a.get_fdata(), b.get_fdata())
    with pytest.raises(SUVError, match="sub-B ses-psma PET series #3: Enhanced PET Image Storage"):
        convert_series([enh / "enhanced.dcm"], tmp_path / "enh_suv.nii.gz", suv="bw", label="sub-B ses-psma PET series #3")


COMPRESSED = {
    "JPEG 2000": "1.2.840.10008.1.2.4.90",
    "JPEG-LS": "1.2.840.10008.1.2.4.80",
    "RLE": "1.2.840.10008.1.2.5",
}


@pytest.mark.parametrize("name", list(COMPRESSED))
def test_compressed_transfer_syntax_is_decoded(mini, tmp_path, name):
    from pydicom.pixels.encoders.base import get_encoder
    from pydicom.uid import UID

    from glandpet.dicom.convert import convert_series
    import nibabel as nib

    uid = UID(COMPRESSED[name])
    if not get_encoder(uid).is_available:
        pytest.skip(f"no encoder for {name} here to build the test input (install pylibjpeg-openjpeg / pyjpegls)")
    pet = files(mini, "B", "pet")
    convert_series(pet, tmp_path / "raw.nii.gz")
    edit(pet, lambda ds, k: ds.compress(uid))
    assert pydicom.dcmread(pet[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    r = index(mini)
    assert_clean(r)
    convert_series(files(mini, "B", "pet"), tmp_path / "dec.nii.gz")
    assert np.array_equal(nib.load(tmp_path / "dec.nii.gz").get_fdata(), nib.load(tmp_path / "raw.nii.gz").get_fdata())


def test_compressed_without_decoder_is_refused_naming_syntax_and_package(mini, tmp_path, monkeypatch):
    from pydicom.pixels.decoders import base
    from pydicom.uid import RLELossless

    from glandpet.dicom import catalog_failures

    pet = files(mini, "B", "pet")
    edit(pet, lambda ds, k: ds.compress(RLELossless))

    class Unavailable:
        is_available = False

    monkeypatch.setattr(base, "get_decoder", lambda uid: Unavailable())
    monkeypatch.setattr(catalog_failures, "DECODER_CACHE", {})
    assert_fails(index(mini), "B", "psma", "compressed transfer syntax 'RLE Lossless' (1.2.840.10008.1.2.5)",
                 "no decoder for it is installed", "decompress the series")
    from glandpet.dicom.convert import convert_series

    with pytest.raises(UserError, match=r"sub-B ses-psma PET series #3: pixel data use the compressed transfer syntax "
                                        r"'RLE Lossless'"):
        convert_series(pet, tmp_path / "x.nii.gz", label="sub-B ses-psma PET series #3")
    assert not list(tmp_path.glob("x.*"))


def test_messages_hold_no_identifier(mini):
    """Break B in several ways at once: no message repeats a patient field or a UID."""
    shutil.rmtree(mini / "dicom" / "B" / "ct")
    edit(files(mini, "B", "pet"), _set("PatientWeight", None))
    ds = pydicom.dcmread(files(mini, "B", "pet")[0], stop_before_pixels=True)
    r = index(mini)
    text = " ".join(r.failures["message"])
    assert "sub-B ses-psma" in text
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "SeriesInstanceUID", "StudyInstanceUID"):
        v = str(ds.get(kw, "") or "")
        assert v and v not in text, kw


# ------------------------------------------------------------------------------------------ runtime failures
def test_job_failure_record_feeds_the_qc_table_and_the_dag(tmp_path):
    """A job that raises leaves a failure record; the next run leaves that session out and qc lists it;
    a job that then succeeds removes its record."""
    from glandpet.workflow import dag
    from glandpet.workflow import failures
    from glandpet.workflow import steps

    results = tmp_path / "results"
    log = results / "logs" / "convert_pet" / "sub-B_ses-psma_trc-ga68psma11.log"
    with pytest.raises(UserError):
        with failures.log_to(log):
            raise UserError("sub-B ses-psma PET series #3 'PET AC': cannot decode pixels of x (transfer syntax ?)")
    recs = [{k: v for k, v in r.items() if k not in ("fingerprint", "_mtime")} for r in failures.failure_records(results)]
    assert recs == [{"subject_id": "B", "session": "psma", "stage": "convert_pet", "status": "failed",
                     "message": "sub-B ses-psma PET series #3 'PET AC': cannot decode pixels of x (transfer syntax ?)",
                     "log": log.name}]
    assert "Traceback" in log.read_text()
    # the DAG: the session is left out
    series = results / "tables" / "series.parquet"
    from glandpet.dicom.catalog import SERIES_SCHEMA
    from glandpet.tables import write_table

    rows = [dict(subject_id="B", session=s, role="pet_ac", selected=True, tracer_slug=s, series_key=s) for s in
            ("psma", "fapi")]
    write_table(rows, SERIES_SCHEMA, series)
    dag.clear_caches()
    assert dag.selected_sessions(str(series), "B") == {"fapi": "fapi"}
    qc = steps.failure_rows(None, results)
    assert qc[0]["status"] == "failed" and qc[0]["stage"] == "convert_pet" and qc[0]["session"] == "psma"
    # success removes the record
    with failures.log_to(log):
        pass
    assert failures.failure_records(results) == []
    assert dag.selected_sessions(str(series), "B") == {"psma": "psma", "fapi": "fapi"}
    # cohort-level logs leave no record
    assert failures.failure_record_path(results / "logs" / "cohort_tables.log") is None


def test_cohort_tables_list_failures_even_when_every_subject_failed(small_cohort, tmp_path):
    """The cohort tables step copies the index failures and the job failure records into qc.parquet;
    with no subject left to measure it still writes (empty) gland tables and the qc table."""
    from types import SimpleNamespace as NS

    from glandpet.workflow import dag
    from glandpet.workflow import failures
    from glandpet.workflow import steps
    from glandpet.dicom.catalog import FAILURES_SCHEMA, SERIES_SCHEMA
    from glandpet.tables import GLAND_CHANGE, QC, write_table

    res = tmp_path / "results"
    (tmp_path / "s.tsv").write_text("subject_id\tgroup\tdicom_dir\nA\tpss\ta\nB\tcontrol\tb\n")
    write_table([dict(subject_id="A", role="ct", selected=False, series_key="k")], SERIES_SCHEMA,
                res / "tables" / "series.parquet")
    write_table([dict(subject_id="A", session=None, stage="index", status="failed",
                      message="sub-A: its dicom_dir folder holds no files")], FAILURES_SCHEMA,
                res / "work" / "index_failures.parquet")
    with pytest.raises(UserError):
        with failures.log_to(res / "logs" / "convert_ct" / "sub-B_ses-fapi.log"):
            raise UserError("sub-B ses-fapi CT series #2 'CT': unequal slice spacing")
    out = NS(gland_stats=res / "tables" / "gland_stats.parquet", gland_index=res / "tables" / "gland_index.parquet",
             gland_change=res / "tables" / "gland_change.parquet", qc=res / "tables" / "qc.parquet")
    steps.cohort_tables(NS(sheet=tmp_path / "s.tsv", series=res / "tables" / "series.parquet", stats=[], index=[],
                        qc=[res / "tables" / "series.parquet"], failures=res / "work" / "index_failures.parquet"),
                     out, "0123456789ab", [{"label_table": small_cohort / "atlases" / "atlas01" / "labels.tsv"}])
    qc = pd.read_parquet(out.qc)
    assert pq_schema_equals(out.qc, QC)
    got = {(r.subject_id, r.session if isinstance(r.session, str) else None, r.stage, r.status) for r in qc.itertuples()}
    assert got == {("A", None, "index", "failed"), ("B", "fapi", "convert_ct", "failed")}
    assert qc.set_index("subject_id").loc["B", "message"].startswith("sub-B ses-fapi CT series #2")
    assert len(pd.read_parquet(out.gland_stats)) == 0 and len(pd.read_parquet(out.gland_index)) == 0
    assert len(pd.read_parquet(out.gland_change)) == 0 and pq_schema_equals(out.gland_change, GLAND_CHANGE)


def pq_schema_equals(path, schema) -> bool:
    import pyarrow.parquet as pq

    return pq.read_schema(path).remove_metadata().equals(schema)


def test_convert_failure_leaves_no_output(mini, tmp_path):
    from glandpet.dicom.convert import convert_series

    pet = files(mini, "B", "pet")
    out = tmp_path / "o" / "pet.nii.gz"
    out.parent.mkdir()
    f = pet[4]
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data[:-3000])
    with pytest.raises(UserError, match="sub-B ses-psma PET series #3"):
        convert_series(pet, out, label="sub-B ses-psma PET series #3")
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------------------------ the workflow
@pytest.mark.slow
def test_keep_going_processes_the_other_subject_and_qc_names_the_broken_one(small_cohort, tmp_path):
    """A sheet-based run (1 atlas) where subject S001 is broken in both sessions (PSMA: no patient
    weight; FAPI: its CT is missing). The run (with --keep-going, up to the SUV images: segmentation
    costs minutes) ends without error and converts S002; S001 is not in the DAG at all, the cohort
    tables are reachable (dry run), and the qc rows name S001's sessions as failed with the cause.
    (Measured once to the end, qc.parquet included: docs in the helper's note.)"""
    import yaml

    from glandpet.workflow import dag
    from glandpet.workflow import failures
    from glandpet.workflow import steps
    from workflow_run import snakemake

    dicom = tmp_path / "dicom"
    shutil.copytree(small_cohort / "dicom", dicom, copy_function=os.link)
    s001 = dicom / "S001"
    psma = _series_dirs(s001, "psma")
    edit(sorted(psma["pet"].iterdir()), _set("PatientWeight", None))
    shutil.rmtree(_series_dirs(s001, "fapi")["ct"])
    shutil.copy(small_cohort / "subjects.tsv", tmp_path / "subjects.tsv")
    atlas = small_cohort / "atlases" / "atlas01"
    results = tmp_path / "results"
    cfg = {"results": str(results), "subjects": str(tmp_path / "subjects.tsv"), "dicom_root": str(dicom),
           "atlases": [{"name": "atlas01", "ct": str(atlas / "ct.nii.gz"), "labels": str(atlas / "labels.nii.gz"),
                        "label_table": str(atlas / "labels.tsv")}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    suv = results / "sub-S002" / "ses-fapi" / "sub-S002_ses-fapi_trc-fapi04_desc-suvbw_pet.nii.gz"
    snakemake(tmp_path, "--cores", "2", "--keep-going", str(suv))
    assert suv.is_file()
    assert not (results / "sub-S001").exists()  # nothing of S001 is written as if it were a result
    plan = snakemake(tmp_path, "-n", "--cores", "2", str(results / "tables" / "qc.parquet")).stdout
    assert "subject=S002" in plan and "subject=S001" not in plan and "rule cohort_tables" in plan
    qc = pd.DataFrame(steps.failure_rows(str(results / "work" / "index_failures.parquet"), results))
    bad = qc[(qc["subject_id"] == "S001") & (qc["status"] == "failed")].set_index("session")
    assert set(bad.index) == {"psma", "fapi"} and set(bad["stage"]) == {"index"}
    assert bad.loc["psma", "message"].startswith("sub-S001 ses-psma: PET series #3")
    assert "PatientWeight (0010,1030) missing" in bad.loc["psma", "message"]
    assert "the PET series has no CT" in bad.loc["fapi", "message"]
    assert qc[qc["subject_id"] == "S002"].empty

"""The series index on DICOM trees built here with pydicom (8x8 images), and on the real series."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from glandpet.cli import main
from glandpet.errors import UserError
from glandpet.dicom.catalog import index_tree, output_paths, read_header, salted_key, summary_text

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PET_CLASS = "1.2.840.10008.5.1.4.1.1.128"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"

# identifiers planted in every file: none may reach any table
PLANTED = {
    "PatientName": "Zyxwplanted^Qvbnmplanted",
    "PatientID": "PIDX98765Q",
    "PatientBirthDate": "19311127",
    "AccessionNumber": "ACCX55511Q",
    "InstitutionName": "Instituto Plantedqwerty",
    "ReferringPhysicianName": "Drplantedasdf^Hjkl",
    "PerformingPhysicianName": "Perfplantedzz^Yy",
    "OperatorsName": "Operplantedxx",
}


def write_series(folder: Path, *, modality="PT", n=5, patient=None, study=None, frame=None, series=None,
                 date="20240301", time="100000", tracer=None, nuclide_code=None, half_life=None,
                 corrected=("ATTN", "DECY"), image_type=("ORIGINAL", "PRIMARY", "AXIAL"), description="WB",
                 spacing=(4.0, 4.0), slice_step=3.0, iop=(1, 0, 0, 0, 1, 0), sop_class=None, series_number=1,
                 ext=".dcm", names=None, rows=8, z0=0.0, series_time=None):
    """Write an n-slice series; return (series_uid, list of paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    study = study or generate_uid()
    frame = frame or generate_uid()
    sop_class = sop_class or {"PT": PET_CLASS, "CT": CT_CLASS}.get(modality, SC_CLASS)
    ident = dict(PLANTED, **(patient or {}))
    normal = np.cross(iop[:3], iop[3:])
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        for key, v in ident.items():
            setattr(ds, key, v)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = modality, description, series_number, k + 1
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.AcquisitionTime = time
        ds.SeriesTime = series_time or time
        ds.Manufacturer = "ACME"
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = list(np.array([-16.0, -16.0, 0.0]) + (z0 + k * slice_step) * normal)
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = slice_step
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.full((rows, rows), k, np.int16).tobytes()
        if modality == "PT":
            ds.Units, ds.DecayCorrection = "BQML", "START"
            if corrected is not None:
                ds.CorrectedImage = list(corrected)
            item = Dataset()
            if tracer is not None:
                item.Radiopharmaceutical = tracer
            if nuclide_code:
                code = Dataset()
                code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = nuclide_code, "SRT", "nuclide"
                item.RadionuclideCodeSequence = [code]
            if half_life:
                item.RadionuclideHalfLife = half_life
            ds.RadiopharmaceuticalInformationSequence = [item]
        name = (names[k] if names else f"img{k:03d}{ext}")
        p = folder / name
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return series, paths


def petct(folder: Path, tracer, *, date="20240301", time="100000", patient=None, study=None, n=5,
          pet_spacing=(4.0, 4.0), pet_kwargs=None, ct=True):
    """A PET/CT study: CT and PET sharing a frame of reference. Returns (pet_uid, ct_uid, study)."""
    study = study or generate_uid()
    frame = generate_uid()
    ct_uid = None
    if ct:
        ct_uid, _ = write_series(folder / "ct", modality="CT", n=n, patient=patient, study=study, frame=frame,
                                 date=date, time=time, description="CT AC", spacing=(2.0, 2.0), series_number=2)
    pet_uid, _ = write_series(folder / "pet", modality="PT", n=n, patient=patient, study=study, frame=frame,
                              date=date, time=time, tracer=tracer, spacing=pet_spacing, series_number=3,
                              **(pet_kwargs or {}))
    return pet_uid, ct_uid, study


def key(uid):
    return salted_key(uid)


@pytest.fixture()
def tree(tmp_path):
    """pss001: PSMA (day 0) and FAPI (day 14) PET/CT, NAC PET, localizer, secondary capture, junk files.
    ctl002: FAPI-04 PET/CT, and an FDG PET/CT in another study."""
    root = tmp_path / "dicom"
    s1 = root / "pss001"
    p1 = {"PatientID": "PIDX98765Q"}
    psma_pet, psma_ct, psma_study = petct(s1 / "2024" / "psma", "68Ga-PSMA-11", patient=p1)
    nac_uid, _ = write_series(s1 / "2024" / "psma" / "nac", n=5, patient=p1, study=psma_study,
                              tracer="68Ga-PSMA-11", corrected=("DECY",), description="PET NAC", series_number=4)
    loc_uid, _ = write_series(s1 / "2024" / "psma" / "scout", modality="CT", n=1, patient=p1, study=psma_study,
                              image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="Topogram",
                              iop=(0, 1, 0, 0, 0, -1), series_number=1)
    sc_uid, _ = write_series(s1 / "2024" / "psma" / "sc", modality="OT", n=1, patient=p1, study=psma_study,
                             sop_class=SC_CLASS, description="Dose report", series_number=99)
    # FAPI two weeks later; files without extension, deeper nesting
    fapi_pet, fapi_ct, _ = petct(s1 / "x" / "y" / "fapi", "[68Ga]FAPI-46", date="20240315", patient=p1)
    for f in (s1 / "x" / "y" / "fapi" / "pet").iterdir():
        f.rename(f.with_suffix(""))
    # junk
    (s1 / "notes.txt").write_text("not a dicom file\n")
    (s1 / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (s1 / "empty").write_bytes(b"")
    good = sorted((s1 / "2024" / "psma" / "pet").iterdir())[0]
    (s1 / "trunc.dcm").write_bytes(good.read_bytes()[:-40])
    (s1 / "head_only.dcm").write_bytes(good.read_bytes()[:200])
    shutil.copy(sorted((s1 / "2024" / "psma" / "ct").iterdir())[0], s1 / "copy_of_ct_slice.dcm")
    # a DICOMDIR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dd = Dataset()
    dd.file_meta = meta
    dd.FileSetID = "X"
    dd.save_as(root / "pss001" / "DICOMDIR", enforce_file_format=True)

    s2 = root / "ctl002"
    p2 = {"PatientID": "PIDY24680Q", "PatientName": "Otherplanted^Pat"}
    c_fapi_pet, c_fapi_ct, _ = petct(s2 / "a", "68Ga-FAPI-04", patient=p2, date="20230101")
    c_fdg_pet, c_fdg_ct, _ = petct(s2 / "b", "FDG -- fluorodeoxyglucose", patient=p2, date="20230105")
    sheet = tmp_path / "subjects.tsv"
    sheet.write_text("subject_id\tgroup\tdicom_dir\npss001\tpss\tpss001\nctl002\tcontrol\tctl002\n")
    uids = dict(psma_pet=psma_pet, psma_ct=psma_ct, nac=nac_uid, loc=loc_uid, sc=sc_uid, fapi_pet=fapi_pet,
                fapi_ct=fapi_ct, c_fapi_pet=c_fapi_pet, c_fapi_ct=c_fapi_ct, c_fdg_pet=c_fdg_pet, c_fdg_ct=c_fdg_ct)
    return root, sheet, uids


def plain(r):
    """A table row with missing values as None (pandas may give NaN for missing strings)."""
    d = {k: (None if np.isscalar(v) and pd.isna(v) else v) for k, v in r.items()}
    return SimpleNamespace(**d)


def row(series, uid):
    r = series[series["series_key"] == key(uid)]
    assert len(r) == 1, uid
    return plain(r.iloc[0])


def test_mixed_tree(tree):
    root, sheet, u = tree
    res = index_tree(root, sheet)
    s = res.series
    assert set(s["subject_id"]) == {"pss001", "ctl002"}
    r = row(s, u["psma_pet"])
    assert (r.role, r.session, r.tracer, r.radionuclide, r.selected) == ("pet_ac", "psma", "PSMA-11", "Ga-68", True)
    assert r.paired_ct_key == key(u["psma_ct"]) and r.pairing_rule == "frame_of_reference"
    assert r.n_slices == 5 and r.slice_spacing_mm == pytest.approx(3.0) and r.slice_spacing_uniform
    assert r.days_from_first_scan == 0
    ct = row(s, u["psma_ct"])
    assert (ct.role, ct.selected, ct.session) == ("ct", True, "psma")
    r = row(s, u["fapi_pet"])
    assert (r.role, r.session, r.tracer, r.selected, r.days_from_first_scan) == ("pet_ac", "fapi", "FAPI-46", True, 14)
    assert row(s, u["nac"]).role == "pet_nac" and not row(s, u["nac"]).selected
    assert row(s, u["loc"]).role == "localizer"
    assert row(s, u["sc"]).role == "other"
    r = row(s, u["c_fdg_pet"])
    assert (r.role, r.tracer, r.session, r.selected) == ("pet_ac", "FDG", None, False)
    assert row(s, u["c_fdg_ct"]).selected == False  # noqa: E712 - its PET is not selected
    assert row(s, u["c_fapi_pet"]).selected
    # skipped files and reasons
    k = dict(zip(res.skipped["path"], res.skipped["reason"]))
    assert k["pss001/notes.txt"] == "not DICOM"
    assert k["pss001/blob.bin"] == "not DICOM"
    assert k["pss001/empty"] == "empty file"
    assert k["pss001/trunc.dcm"] == "truncated"
    assert k["pss001/head_only.dcm"] in ("truncated", "unreadable")
    assert k["pss001/DICOMDIR"] == "DICOMDIR"
    dup = [p for p, why in k.items() if why == "duplicate instance"]
    assert len(dup) == 1 and dup[0].startswith("pss001/")
    # files table: every indexed series, paths relative to the root, in slice order
    f = res.files.set_index("series_key")
    paths = f.loc[key(u["fapi_pet"]), "paths"]
    assert len(paths) == 5 and all(not Path(p).is_absolute() for p in paths)
    assert [Path(p).name for p in paths] == [f"img{k:03d}" for k in range(5)]
    assert set(f.index) == set(s["series_key"])


def test_pseudonyms_without_sheet_are_stable_and_not_the_patient_id(tree):
    root, _, u = tree
    a = index_tree(root)
    b = index_tree(root)
    ids = set(a.series["subject_id"])
    assert len(ids) == 2 and all(i.startswith("p") and i.isalnum() and len(i) == 11 for i in ids)
    assert not any("PIDX" in i or "PIDY" in i for i in ids)
    pd.testing.assert_frame_equal(a.series, b.series)
    assert index_tree(root, salt="other").series["subject_id"].iloc[0] not in ids


def test_patient_id_matching_in_a_shared_tree(tmp_path):
    root = tmp_path / "export"
    petct(root / "all", "Ga-68 PSMA-11", patient={"PatientID": "P1"})
    petct(root / "all2", "FAPI-46", patient={"PatientID": "P2"})
    petct(root / "all3", "FAPI-46", patient={"PatientID": "P3"}, n=3)
    sheet = tmp_path / "s.tsv"
    sheet.write_text("subject_id\tgroup\tpatient_id\nA1\tpss\tP1\nB2\tcontrol\tP2\n")
    res = index_tree(root, sheet)
    assert set(res.series["subject_id"]) == {"A1", "B2"}
    assert (res.skipped["reason"] == "patient not in subject sheet").sum() == 6
    sel = res.series[res.series["selected"] & (res.series["role"] == "pet_ac")]
    assert dict(zip(sel["subject_id"], sel["session"])) == {"A1": "psma", "B2": "fapi"}


def test_ambiguous_acquisitions_error_and_override(tmp_path):
    """Two PSMA acquisitions on one day (a repeat scan): ambiguous until an override names one."""
    root = tmp_path / "d"
    a, _, _ = petct(root / "s1" / "one", "68Ga-PSMA-11", date="20240301", time="100000")
    b, _, _ = petct(root / "s1" / "two", "68Ga-PSMA-11", date="20240301", time="150000")
    sheet = tmp_path / "s.tsv"
    sheet.write_text("subject_id\tgroup\tdicom_dir\ns1\tpss\ts1\n")
    with pytest.raises(UserError) as exc:
        index_tree(root, sheet)
    msg = str(exc.value)
    assert "subject s1, session psma" in msg and key(a) in msg and key(b) in msg and "override" in msg
    rep = index_tree(root, sheet, on_ambiguity="report")
    assert len(rep.problems) == 1 and not rep.series["selected"].any()
    res = index_tree(root, sheet, overrides={("s1", "psma"): key(b)})
    r = row(res.series, b)
    assert r.selected and r.selection_rule == "override"
    assert not row(res.series, a).selected
    with pytest.raises(UserError, match="is not a series of this subject"):
        index_tree(root, sheet, overrides={("s1", "psma"): "0000000000000000"})
    with pytest.raises(UserError, match="no such subject"):
        index_tree(root, sheet, overrides={("zz", "psma"): key(b)})
    with pytest.raises(UserError, match=r"unknown session 'psma1' \(expected psma or fapi \(baseline\), psma2"):
        index_tree(root, sheet, overrides={("s1", "psma1"): key(b)})


def _date(day: int) -> str:
    return (datetime(2024, 3, 1) + timedelta(days=day)).strftime("%Y%m%d")


def test_follow_up_scans_are_sessions_of_their_own(tmp_path, capsys):
    """PSMA on days 0 and 120, FAPI on days 1 and 121: psma, fapi, psma2, fapi2, each PET with its own CT."""
    root = tmp_path / "d"
    uids = {ses: petct(root / "s1" / ses, tracer, date=_date(day))
            for ses, tracer, day in (("psma", "68Ga-PSMA-11", 0), ("fapi", "FAPI-46", 1),
                                     ("psma2", "68Ga-PSMA-11", 120), ("fapi2", "FAPI-46", 121))}
    sheet = tmp_path / "s.tsv"
    sheet.write_text("subject_id\tgroup\tdicom_dir\ns1\tpss\ts1\n")
    res = index_tree(root, sheet)
    assert res.problems == []
    # (these tiny PETs cannot give SUV: each session's failure row names its own session)
    assert set(res.failures["session"]) == set(uids)
    for ses, (pet, ct, _) in uids.items():
        p, c = row(res.series, pet), row(res.series, ct)
        assert (p.selected, p.session, p.paired_ct_key) == (True, ses, key(ct)), ses
        assert (c.selected, c.session) == (True, ses), ses
    assert row(res.series, uids["psma2"][0]).days_from_first_scan == 120
    assert "follow-up psma2" in row(res.series, uids["psma2"][0]).selection_rule
    assert "day 121" in row(res.series, uids["fapi2"][0]).selection_rule
    assert "sessions selected: psma 1, fapi 1, follow-ups 2 (psma2 1, fapi2 1)" in summary_text(res)
    # the follow-up scan named by hand: still psma2, and psma stays the baseline
    res = index_tree(root, sheet, overrides={("s1", "psma2"): key(uids["psma2"][0])})
    assert row(res.series, uids["psma2"][0]).selection_rule == "override"
    assert row(res.series, uids["psma"][0]).session == "psma" and row(res.series, uids["psma"][0]).selected
    # the command line's summary
    out = tmp_path / "series.parquet"
    assert main(["index", str(root), "-o", str(out), "--subjects", str(sheet)]) == 0
    assert "follow-ups 2" in capsys.readouterr().out


def test_a_same_day_duplicate_does_not_hold_back_the_follow_up(tmp_path):
    """Two PSMA acquisitions on day 0 and one on day 90: psma needs an override, psma2 is selected."""
    root = tmp_path / "d"
    a, _, _ = petct(root / "s1" / "one", "68Ga-PSMA-11", date=_date(0), time="090000")
    b, _, _ = petct(root / "s1" / "two", "68Ga-PSMA-11", date=_date(0), time="140000")
    c, c_ct, _ = petct(root / "s1" / "three", "68Ga-PSMA-11", date=_date(90))
    sheet = tmp_path / "s.tsv"
    sheet.write_text("subject_id\tgroup\tdicom_dir\ns1\tpss\ts1\n")
    with pytest.raises(UserError, match="session psma:"):
        index_tree(root, sheet)
    rep = index_tree(root, sheet, on_ambiguity="report")
    assert len(rep.problems) == 1 and "session psma:" in rep.problems[0] and "on day 0" in rep.problems[0]
    assert key(a) in rep.problems[0] and key(b) in rep.problems[0] and key(c) not in rep.problems[0]
    failed = rep.failures[rep.failures["message"] == rep.problems[0]]
    assert list(zip(failed["subject_id"], failed["session"], failed["status"])) == [("s1", "psma", "failed")]
    r = row(rep.series, c)
    assert (r.selected, r.session) == (True, "psma2") and row(rep.series, c_ct).session == "psma2"
    assert not row(rep.series, a).selected and not row(rep.series, b).selected
    for choice in (a, b):
        res = index_tree(root, sheet, overrides={("s1", "psma"): key(choice)})
        sel = res.series[res.series["selected"] & (res.series["role"] == "pet_ac")]
        assert dict(zip(sel["session"], sel["series_key"])) == {"psma": key(choice), "psma2": key(c)}


def test_override_assigns_an_unknown_tracer(tmp_path):
    root = tmp_path / "d"
    pet, _, _ = petct(root / "s1", "XYZ-123")
    res = index_tree(root / "s1")
    r = plain(res.series[res.series["role"] == "pet_ac"].iloc[0])
    assert r.tracer is None and r.session is None and "XYZ-123" in r.tracer_note and not r.selected
    sid = r.subject_id
    res = index_tree(root / "s1", overrides={(sid, "fapi"): key(pet)})
    r = row(res.series, pet)
    assert (r.session, r.selected, r.selection_rule) == ("fapi", True, "override")


def test_two_reconstructions_of_one_acquisition_pick_finest(tmp_path):
    root = tmp_path / "d"
    study, frame = generate_uid(), generate_uid()
    write_series(root / "ct", modality="CT", study=study, frame=frame)
    coarse, _ = write_series(root / "wb", tracer="FAPI-46", study=study, frame=frame, spacing=(4.0, 4.0), series_number=3)
    fine, _ = write_series(root / "hn", tracer="FAPI-46", study=study, frame=frame, spacing=(2.0, 2.0),
                           series_number=4, rows=16)
    res = index_tree(root)
    assert row(res.series, fine).selected and not row(res.series, coarse).selected
    assert "reconstructions" in row(res.series, fine).selection_rule


def test_pairing_by_study_when_frames_differ(tmp_path):
    root = tmp_path / "d"
    study = generate_uid()
    ct_near, _ = write_series(root / "ct1", modality="CT", study=study, time="100500", series_number=2)
    write_series(root / "ct2", modality="CT", study=study, time="120000", series_number=5)
    pet, _ = write_series(root / "pet", tracer="PSMA-1007", study=study, time="101000")
    r = row(index_tree(root).series, pet)
    assert (r.paired_ct_key, r.pairing_rule) == (key(ct_near), "study_closest_time")


def test_mixed_geometry_series_is_split(tmp_path):
    root = tmp_path / "d"
    uid = generate_uid()
    study, frame = generate_uid(), generate_uid()
    write_series(root / "a", modality="CT", series=uid, study=study, frame=frame, n=4)
    write_series(root / "b", modality="CT", series=uid, study=study, frame=frame, n=3, rows=16,
                 names=[f"x{k}" for k in range(3)])
    s = index_tree(root).series
    assert sorted(s["split_part"].tolist()) == [1, 2]
    assert sorted(s["n_instances"].tolist()) == [3, 4]
    assert s["series_key"].nunique() == 2


def test_description_with_identifier_is_dropped(tmp_path):
    root = tmp_path / "d"
    pet, _ = write_series(root, tracer="FAPI-04", description="WB Zyxwplanted PIDX98765Q")
    r = plain(index_tree(root).series.iloc[0])
    assert r.series_description is None and r.tracer == "FAPI-04"


def test_no_identifier_in_written_tables(tree, tmp_path, capsys):
    root, sheet, _ = tree
    out = tmp_path / "out" / "series.parquet"
    assert main(["index", str(root), "-o", str(out), "--subjects", str(sheet)]) == 0
    printed = capsys.readouterr().out
    assert "series by role" in printed and "skipped files" in printed
    paths = output_paths(out)
    needles = set()
    for v in list(PLANTED.values()) + ["PIDY24680Q", "Otherplanted"]:
        needles |= {v, v.upper(), v.lower(), *v.split("^")}
    needles |= {"1931-11-27", "2024", "20240301"}  # birth date and calendar dates
    for p in paths:
        assert p.exists()
        blob = p.read_bytes()
        table = pq.read_table(p)
        text = "\n".join(str(x) for col in table.columns for x in col.to_pylist())
        text += str(table.schema) + str(table.schema.metadata)
        for n in needles:
            if n == "2024" and p.name.endswith("_files.parquet"):
                continue  # the test tree has a folder named 2024
            if n == "2024" and p.name.endswith("_skipped.parquet"):
                continue
            assert n.encode() not in blob, (p.name, n)
            assert n not in text, (p.name, n)
    s = pd.read_parquet(paths[0])
    assert {"subject_id", "series_key", "role", "selected", "pixel_spacing_mm"} <= set(s.columns)


def test_cli_ambiguity_exit_2(tmp_path, capsys):
    root = tmp_path / "d"
    petct(root / "one", "PSMA-11", date="20240301", time="100000")
    petct(root / "two", "PSMA-11", date="20240301", time="160000")
    out = tmp_path / "series.parquet"
    assert main(["index", str(root), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "session psma" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_read_header_of_non_dicom(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"\x08\x00" + b"\x00" * 300)
    assert read_header(str(p), "x")["skip"] in ("not DICOM", "unreadable", "truncated")


# ------------------------------------------------------------------------------------------ real data

DATA = Path(__file__).parents[1] / ".." / "shared" / "data" / "real-pet"


@pytest.fixture(scope="module")
def real():
    if not DATA.is_dir():
        pytest.skip(f"real PET series not found at {DATA.resolve()} (shared data folder absent)")
    return index_tree(DATA, jobs=2)


def test_real_series(real):
    s = real.series
    pet = s[s["role"] == "pet_ac"]
    # Siemens (qin-headneck): 545 slices, F-18, no tracer named anywhere in its header
    q = plain(pet[pet["n_slices"] == 545].iloc[0])
    assert (q.radionuclide, q.session, q.manufacturer) == ("F-18", None, "SIEMENS")
    assert q.tracer is None and q.tracer_note == "no tracer named"
    # GE whole body: FDG
    g = plain(pet[pet["n_slices"] == 267].iloc[0])
    assert (g.tracer, g.session, g.series_description) == ("FDG", None, "PET AC")
    # cropped PET/CT pair: by frame of reference
    c = plain(pet[pet["n_slices"] == 59].iloc[0])
    ct = s[s["role"] == "ct"].iloc[0]
    assert c.paired_ct_key == ct.series_key and c.pairing_rule == "frame_of_reference"
    assert c.units == "GML" and ct.n_slices == 59
    # SEG and RTSTRUCT are 'other'
    other = s[s["role"] == "other"]
    assert set(other["modality"]) == {"SEG", "RTSTRUCT"}
    assert not s["selected"].any()  # FDG/unknown: no psma/fapi session
    # the one RTSTRUCT copied into two folders is a duplicate instance
    assert (real.skipped["reason"] == "duplicate instance").sum() == 1
    assert set(real.skipped["reason"]) <= {"not DICOM", "duplicate instance"}
    # the series description naming the patient (IBSI_1_STS_001_...) is dropped
    assert not s["series_description"].fillna("").str.contains("STS_001").any()

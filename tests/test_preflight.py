"""`glandpet check`: a good study passes; each bad input visible before the run is named by subject,
session, series and cause, and makes the command exit 1. Studies are built from the small phantom
cohort's headers (cloned with fewer slices and a tiny matrix), edited one fault at a time."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from glandpet.cli import main
from glandpet.errors import UserError
from glandpet.phantom.pacs_export import reduced_cohort
from glandpet.study.preflight import ERROR, WARNING, Problem, load_config, problems_table, raise_for_problems, run_check
from glandpet.study.draft import config_text

PATIENTS = {"A": ("S001", "PA1001"), "B": ("S002", "PB2002")}  # A: PSMA + FAPI; B: FAPI only


@pytest.fixture(scope="module")
def clones(small_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clones")
    reduced_cohort(small_cohort / "dicom", out, PATIENTS, slice_stride=10, matrix=16)
    return out


def make_study(tmp: Path, clones: Path, small_cohort: Path, rows: list[dict] | None = None, **cfg) -> tuple[Path, dict]:
    """A copy of the clone tree, a subject sheet and a config (the phantom's atlas configured)."""
    tree = tmp / "dicom"
    shutil.copytree(clones, tree)  # copies: the tests edit files
    rows = rows if rows is not None else [
        {"subject_id": "P01", "group": "pss", "dicom_dir": "A", "patient_id": ""},
        {"subject_id": "P02", "group": "control", "dicom_dir": "B", "patient_id": ""},
    ]
    sheet = tmp / "subjects.tsv"
    cols = ["subject_id", "group", "dicom_dir", "patient_id"]
    sheet.write_text("\t".join(cols) + "\n" + "".join("\t".join(r.get(c, "") for c in cols) + "\n" for r in rows))
    atlas = small_cohort / "atlases" / "atlas01"
    atlases = [{"name": "atlas01", "ct": str(atlas / "ct.nii.gz"), "labels": str(atlas / "labels.nii.gz"),
                "label_table": str(atlas / "labels.tsv")}]
    text = config_text(str(sheet), str(tree), str(tmp / "results"), atlases)
    config = yaml.safe_load(text)
    for k, v in cfg.items():
        config[k] = v
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tree, load_config(tmp / "config.yaml")


def series_dir(tree: Path, patient: str, pattern: str) -> Path:
    (d,) = [p for p in (tree / patient).glob(pattern) if p.is_dir()]
    return d


def edit(folder: Path, fn) -> None:
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        fn(ds)
        ds.save_as(f, enforce_file_format=False)


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.status == ERROR]


def test_good_study_passes(tmp_path, clones, small_cohort, capsys):
    _, config = make_study(tmp_path, clones, small_cohort)
    assert run_check(config) == []
    assert main(["check", str(tmp_path / "config.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no problems" in out and "0 error(s), 0 warning(s)" in out and "ready to run" in out


def test_patient_id_rows_pass_and_unknown_patient_id_is_named(tmp_path, clones, small_cohort):
    rows = [{"subject_id": "P01", "group": "pss", "patient_id": "PA1001"},
            {"subject_id": "P02", "group": "control", "patient_id": "PB2002"},
            {"subject_id": "P03", "group": "control", "patient_id": "NOSUCHID"}]
    _, config = make_study(tmp_path, clones, small_cohort, rows)
    probs = run_check(config)
    (p,) = probs
    assert (p.subject_id, p.session, p.status) == ("P03", None, ERROR) and "patient_id" in p.message
    assert "NOSUCHID" not in problems_table(probs)  # the PatientID is never echoed


def test_missing_pet(tmp_path, clones, small_cohort, capsys):
    tree, config = make_study(tmp_path, clones, small_cohort)
    shutil.rmtree(series_dir(tree, "B", "*/*PET*"))
    (p,) = errors(run_check(config))
    assert (p.subject_id, p.session) == ("P02", None)
    assert re.match(r"no attenuation-corrected (PSMA or FAPI )?PET series", p.message)
    assert main(["check", str(tmp_path / "config.yaml"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "P02" in out and "no attenuation-corrected" in out and "1 error(s)" in out


def test_two_candidate_pets(tmp_path, clones, small_cohort):
    tree, config = make_study(tmp_path, clones, small_cohort)
    pet = series_dir(tree, "A", "*PSMA/*PET_AC*")
    repeat = pet.parent / "99_PET_AC_repeat"
    shutil.copytree(pet, repeat)

    def another_acquisition(ds):  # a repeat scan: new study and series, same tracer
        ds.StudyInstanceUID = "2.25.1111" + ds.StudyInstanceUID[-8:].replace(".", "1")
        ds.SeriesInstanceUID = "2.25.2222"
        ds.SOPInstanceUID = "2.25.3333" + ds.SOPInstanceUID[-10:].replace(".", "1")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    edit(repeat, another_acquisition)
    (p,) = errors(run_check(config))
    assert (p.subject_id, p.session) == ("P01", "psma")
    assert "2 attenuation-corrected PET series from different acquisitions" in p.message
    assert len(p.about.split(", ")) == 2 and all(len(k) == 16 for k in p.about.split(", "))


def test_unknown_tracer(tmp_path, clones, small_cohort):
    tree, config = make_study(tmp_path, clones, small_cohort)

    def unknown(ds):
        item = ds.RadiopharmaceuticalInformationSequence[0]
        item.Radiopharmaceutical = "Ga-68 XYZ-99"
        for kw in ("RadiopharmaceuticalCodeSequence",):
            if kw in item:
                delattr(item, kw)
        for kw in ("StudyDescription", "SeriesDescription", "ProtocolName"):
            if kw in ds:
                setattr(ds, kw, "PET CT HEAD NECK")

    edit(series_dir(tree, "B", "*/*PET*"), unknown)
    probs = run_check(config)
    warn = [p for p in probs if p.status == WARNING]
    assert len(warn) == 1 and warn[0].subject_id == "P02" and len(warn[0].about) == 16
    assert "tracer not recognised" in warn[0].message and "XYZ-99" in warn[0].message
    (err,) = errors(probs)  # B has no other PET: nothing left to measure
    assert err.subject_id == "P02" and re.search(r"no (attenuation-corrected )?PSMA or FAPI PET|no PET series of a PSMA or "
                                               r"FAPI tracer", err.message)


@pytest.mark.parametrize("field", ["PatientWeight", "RadionuclideTotalDose"])
def test_missing_weight_or_dose(tmp_path, clones, small_cohort, field):
    tree, config = make_study(tmp_path, clones, small_cohort)

    def drop(ds):
        if field in ds:
            delattr(ds, field)
        item = ds.RadiopharmaceuticalInformationSequence[0]
        if field in item:
            delattr(item, field)

    edit(series_dir(tree, "A", "*FAPI/*PET_AC*"), drop)
    (p,) = errors(run_check(config))
    assert (p.subject_id, p.session) == ("P01", "fapi") and len(p.about) == 16
    assert "SUV" in p.message and field in p.message


def test_suv_type_needing_height(tmp_path, clones, small_cohort):
    tree, config = make_study(tmp_path, clones, small_cohort, suv_type="bsa")

    def no_height(ds):
        if "PatientSize" in ds:
            del ds.PatientSize

    edit(series_dir(tree, "B", "*/*PET*"), no_height)
    (p,) = errors(run_check(config))
    assert (p.subject_id, p.session) == ("P02", "fapi") and "bsa" in p.message and "PatientSize" in p.message


def test_sheet_problems_all_named(tmp_path, clones, small_cohort):
    rows = [{"subject_id": "P01", "group": "pss", "dicom_dir": "A"},
            {"subject_id": "P01", "group": "control", "dicom_dir": "B"},
            {"subject_id": "P03", "group": "sick", "dicom_dir": "A"},
            {"subject_id": "P04", "group": "", "dicom_dir": "nowhere"}]
    _, config = make_study(tmp_path, clones, small_cohort, rows)
    probs = run_check(config)
    causes = {(p.subject_id, p.message.split(": ", 1)[1]) for p in probs}
    assert ("P01", "duplicate subject id (also on line 2)") in causes
    assert ("P03", "unknown group 'sick' (expected pss or control)") in causes
    assert ("P04", "group is empty (fill in pss or control)") in causes
    assert ("P04", "dicom_dir folder 'nowhere' not found under dicom_root") in causes
    assert all(p.status == ERROR and p.about == "subject sheet" for p in probs)
    with pytest.raises(UserError, match="problem"):
        raise_for_problems(probs)


def test_bad_config_value_names_the_key(tmp_path, clones, small_cohort, capsys):
    _, config = make_study(tmp_path, clones, small_cohort, pvc={"method": "gtx"}, colour="blue")
    probs = run_check(config)
    text = problems_table(probs)
    assert "key pvc.method: 'gtx' is not one of" in text
    assert "unknown key colour" in text
    assert main(["check", str(tmp_path / "config.yaml"), "--quiet"]) == 1
    assert "pvc.method" in capsys.readouterr().out


def test_unreadable_atlas(tmp_path, clones, small_cohort):
    _, config = make_study(tmp_path, clones, small_cohort)
    atlas = tmp_path / "atlas_bad"
    shutil.copytree(small_cohort / "atlases" / "atlas01", atlas)
    (atlas / "labels.nii.gz").write_bytes(b"not a nifti at all")
    (atlas / "labels.tsv").write_text("index\tgland\tside\n1\tpancreas\tleft\n")
    config["atlases"] = [{"name": "bad", "ct": str(atlas / "ct.nii.gz"), "labels": str(atlas / "labels.nii.gz"),
                          "label_table": str(atlas / "labels.tsv")},
                         {"name": "gone", "ct": str(tmp_path / "no" / "ct.nii.gz"), "labels": "x", "label_table": "y"}]
    probs = errors(run_check(config))
    by = {(p.about, p.message.split(" ")[0]) for p in probs}
    assert ("atlas bad", "labels") in by and ("atlas bad", "label") in by and ("atlas gone", "ct") in by
    assert any("pancreas" in p.message for p in probs)


def test_truncated_atlas_contour_is_a_warning(tmp_path, clones, small_cohort):
    """An atlas whose contour of a gland is implausibly small is reported (warning, not fatal)."""
    import nibabel as nib

    _, config = make_study(tmp_path, clones, small_cohort)
    assert not [p for p in run_check(config) if p.about.startswith("atlas ")]
    atlas = tmp_path / "atlas_cut"
    shutil.copytree(small_cohort / "atlases" / "atlas01", atlas)
    img = nib.load(str(atlas / "labels.nii.gz"))
    lab = np.asarray(img.dataobj).copy()
    idx = np.argwhere(lab == 4)  # submandibular right: keep one tenth of it
    lab[tuple(idx[len(idx) // 10:].T)] = 0
    nib.save(nib.Nifti1Image(lab, img.affine, img.header), str(atlas / "labels.nii.gz"))
    config["atlases"].append({"name": "cut", "ct": str(atlas / "ct.nii.gz"), "labels": str(atlas / "labels.nii.gz"),
                              "label_table": str(atlas / "labels.tsv")})
    probs = [p for p in run_check(config) if p.about == "atlas cut"]
    assert probs and all(p.status == WARNING and p.message.startswith("submandibular_right") for p in probs)
    raise_for_problems(run_check(config), fatal_only=True)  # not fatal


def test_workflow_stage_stops_only_on_fatal_problems(tmp_path, clones, small_cohort):
    """The index stage's call: a session that fails is left out; a broken atlas stops the run."""
    tree, config = make_study(tmp_path, clones, small_cohort)
    shutil.rmtree(series_dir(tree, "B", "*/*PET*"))
    probs = run_check(config)
    raise_for_problems(probs, fatal_only=True)  # one subject without PET: not fatal
    with pytest.raises(UserError):
        raise_for_problems(probs)
    config["atlases"][0]["label_table"] = str(tmp_path / "missing.tsv")
    with pytest.raises(UserError, match="atlas atlas01"):
        raise_for_problems(run_check(config), fatal_only=True)


def test_clinical_values_checked_against_their_types(tmp_path, clones, small_cohort):
    """Every bad clinical cell is a problem naming the line and column; a declared column the sheet lacks is not."""
    _, config = make_study(tmp_path, clones, small_cohort)
    sheet = tmp_path / "subjects.tsv"
    lines = sheet.read_text().splitlines()
    lines[0] += "\tanti_ssa\tessdai"
    lines[1] += "\tweak\t12"
    lines[2] += "\tNEG\tn/a"
    sheet.write_text("\n".join(lines) + "\n")
    probs = errors(run_check(config))
    causes = sorted(p.message for p in probs)
    assert len(probs) == 2, causes
    assert any(c.startswith("line 2, column anti_ssa: 'weak' is not a binary value") for c in causes)
    assert any(c.startswith("line 3, column essdai: 'n/a' is not a number") for c in causes)
    assert {p.subject_id for p in probs} == {"P01", "P02"}

"""`glandpet init` on a PACS-style export of the small phantom cohort (headers of real phantom subjects,
cloned with fewer slices and a tiny matrix so that each init takes about a second)."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from glandpet.cli import main
from glandpet.errors import UserError
from glandpet.phantom.pacs_export import (
    build_pacs_export,
    clone_patient,
    reduced_cohort,
)
from glandpet.study.draft import FOUND_COLUMNS, LINKAGE_HEADER, patient_folders, read_linkage_key

# three patients: A (pSS, PSMA + FAPI), B and C (controls, FAPI only). A and C share a date folder
# of the export; B has a folder of its own.
PATIENTS = {"A": ("S001", "PA1001"), "B": ("S002", "PB2002"), "C": ("S002", "PC3003")}


@pytest.fixture(scope="module")
def export(small_cohort, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("clones")
    reduced_cohort(small_cohort / "dicom", src, PATIENTS, slice_stride=10, matrix=16)
    out = tmp_path_factory.mktemp("export")
    build_pacs_export(src, out, patients_per_date=2, own_folder=["B"], seed=3)
    return out


def _dates_and_names(root: Path) -> tuple[set[str], set[str]]:
    dates, names = set(), set()
    for f in root.rglob("IM*"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate"):
            v = str(ds.get(kw, "") or "")
            if v:
                dates |= {v, f"{v[:4]}-{v[4:6]}-{v[6:]}"}
        names |= {p for p in re.split(r"[\^ ]+", str(ds.PatientName)) if len(p) > 2} - {str(ds.PatientID)}
    return dates, names


def test_init_writes_sheet_key_and_config(export, tmp_path, capsys):
    study = tmp_path / "study"
    assert main(["init", str(export), str(study), "--quiet"]) == 0
    printed = capsys.readouterr().out
    sheet = pd.read_csv(study / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    from glandpet.study.subjects import DEFAULT_CLINICAL

    # the declared clinical columns (the registered outcomes by default), empty for the team to fill
    assert list(sheet.columns) == ["subject_id", "group", "dicom_dir", "patient_id", *FOUND_COLUMNS, *DEFAULT_CLINICAL]
    assert list(sheet["subject_id"]) == ["S0001", "S0002", "S0003"]
    assert (sheet["group"] == "").all() and (sheet[list(DEFAULT_CLINICAL)] == "").all().all()

    key = read_linkage_key(study / "linkage-key.tsv")
    assert set(key) == {pid for _, pid in PATIENTS.values()}
    row = {pid: sheet.set_index("subject_id").loc[sid] for pid, sid in key.items()}
    # B has a folder of its own: dicom_dir; A and C share the date folder: patient_id
    assert row["PB2002"]["dicom_dir"].startswith("DICOM/P") and row["PB2002"]["patient_id"] == ""
    assert (export / row["PB2002"]["dicom_dir"]).is_dir()
    for pid in ("PA1001", "PC3003"):
        assert row[pid]["patient_id"] == pid and row[pid]["dicom_dir"] == ""
    # what was found: A has both sessions 19 days apart (the phantom's schedule), C only FAPI
    a, c = row["PA1001"], row["PC3003"]
    assert a["sessions"] == "psma,fapi" and a["tracers"].count(",") == 1 and "PSMA" in a["tracers"].split(",")[0]
    # (which session came first is the phantom's random draw: the first is day 0, the other later)
    days = sorted([int(a["psma_day"]), int(a["fapi_day"])])
    assert days[0] == 0 and days[1] > 0
    assert c["sessions"] == "fapi" and c["psma_day"] == "" and c["fapi_day"] == "0"

    # linkage key: owner-only, a header line saying what it is
    mode = stat.S_IMODE(os.stat(study / "linkage-key.tsv").st_mode)
    assert mode == 0o600
    first = (study / "linkage-key.tsv").read_text().splitlines()[0]
    assert first == LINKAGE_HEADER and first.startswith("#") and "never reads" in first
    # the sheet holds PatientIDs (patient_id rows): private too
    assert stat.S_IMODE(os.stat(study / "subjects.tsv").st_mode) == 0o600

    # no calendar dates or names anywhere; PatientIDs only in the patient_id column of the sheet
    dates, names = _dates_and_names(export)
    sheet_text = (study / "subjects.tsv").read_text()
    cfg_text = (study / "config.yaml").read_text()
    for text in (sheet_text, cfg_text, printed):
        assert not any(d in text for d in dates)
        assert not any(n in text for n in names)
    assert not any(pid in cfg_text or pid in printed for pid in key)
    without_pid = sheet.drop(columns=["patient_id"]).to_csv(sep="\t")
    assert not any(pid in without_pid for pid in key)

    # the config: every key, valid against the schema, paths filled
    from glandpet.study.preflight import load_config, validate_config

    cfg = load_config(study / "config.yaml", defaults=False)
    assert {"results", "subjects", "dicom_root", "demo", "atlases", "series_overrides", "suv_type", "segmentation",
            "pvc", "index"} <= set(cfg)
    assert validate_config(cfg) == []
    assert Path(cfg["subjects"]) == (study / "subjects.tsv").resolve()
    assert Path(cfg["dicom_root"]) == export.resolve()
    assert cfg_text.count("\n# ") >= 8  # commented

    # the summary and the next commands
    assert re.search(r"patients\s+3 \(3 new, 0 kept\)", printed)
    assert re.search(r"matched by\s+dicom_dir 1, patient_id 2", printed)
    assert "psma 1" in printed and "fapi 3" in printed
    assert f"snakemake --cores all --configfile {study.resolve() / 'config.yaml'}" in printed
    assert "--workflow-profile profiles/slurm" in printed


def test_workflow_matches_the_drafted_sheet(export, tmp_path):
    """The index with the drafted sheet (patient_id and dicom_dir rows) finds the sessions init found."""
    from glandpet.dicom.catalog import index_tree
    from glandpet.study.subjects import read_subject_sheet

    study = tmp_path / "study"
    assert main(["init", str(export), str(study), "--quiet"]) == 0
    sheet_path = study / "subjects.tsv"
    sheet = pd.read_csv(sheet_path, sep="\t", dtype=str, keep_default_na=False)
    sheet["group"] = ["pss", "control", "control"]
    sheet.to_csv(sheet_path, sep="\t", index=False)
    subjects = read_subject_sheet(sheet_path, export)
    res = index_tree(export, subjects)
    assert res.skipped.empty
    sel = res.series[res.series["selected"] & (res.series["role"] == "pet_ac")]
    got = sel.groupby("subject_id")["session"].apply(lambda s: ",".join(x for x in ("psma", "fapi") if x in set(s)))
    assert got.to_dict() == dict(zip(sheet["subject_id"], sheet["sessions"]))


def test_rerun_keeps_ids_and_edits_and_adds_new_patients(export, small_cohort, tmp_path):
    tree = tmp_path / "export"
    shutil.copytree(export, tree, copy_function=os.link)
    study = tmp_path / "study"
    assert main(["init", str(tree), str(study), "--quiet"]) == 0
    first_key = read_linkage_key(study / "linkage-key.tsv")
    sheet = pd.read_csv(study / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["group"] = ["pss", "control", "control"]
    sheet["essdai"] = ["12", "", ""]
    sheet.to_csv(study / "subjects.tsv", sep="\t", index=False)
    (study / "config.yaml").write_text((study / "config.yaml").read_text() + "# edited by the team\n")

    # the study grows: a new patient arrives in a new date folder
    clone_patient(small_cohort / "dicom" / "S001", tree / "DICOM" / "20250301" / "NEWPAT", "PD4004",
                  slice_stride=10, matrix=16)
    assert main(["init", str(tree), str(study), "--quiet"]) == 0
    key = read_linkage_key(study / "linkage-key.tsv")
    assert {p: key[p] for p in first_key} == first_key
    assert key["PD4004"] == "S0004"
    new = pd.read_csv(study / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(new["subject_id"]) == ["S0001", "S0002", "S0003", "S0004"]
    assert list(new["group"]) == ["pss", "control", "control", ""]
    assert list(new["essdai"]) == ["12", "", "", ""]
    assert new.set_index("subject_id").loc["S0004", "sessions"] == "psma,fapi"
    assert (study / "config.yaml").read_text().endswith("# edited by the team\n")  # kept
    assert stat.S_IMODE(os.stat(study / "linkage-key.tsv").st_mode) == 0o600


def test_patient_folders():
    files = {
        "p1": ["A/x/1", "A/y/2"],            # own folder A
        "p2": ["D/h1/1", "D/h2/2"],          # shares D with p3
        "p3": ["D/h3/1"],                    # all its files in h3, which holds no one else's
        "p4": ["E/F/G/1"],                   # own: the highest folder with only p4 (E)
        "p5": ["top_level_file"],            # in the root: no folder
    }
    assert patient_folders(files) == {"p1": "A", "p2": None, "p3": "D/h3", "p4": "E", "p5": None}


def test_init_refuses_study_inside_the_tree(export):
    from glandpet.study.draft import init_study

    with pytest.raises(UserError, match="inside the DICOM root"):
        init_study(export, export / "study", progress=False)


def test_drafted_config_keeps_the_workflow_defaults(tmp_path):
    """Apart from the study's paths, the drafted config holds the workflow's default values."""
    import yaml

    from glandpet.study.draft import config_text

    repo = Path(__file__).resolve().parents[1]
    default = yaml.safe_load((repo / "config.yaml").read_text())
    drafted = yaml.safe_load(config_text("s.tsv", "/dicom", "/results"))
    assert set(drafted) == set(default)
    for k in set(default) - {"subjects", "dicom_root", "results"}:
        assert drafted[k] == default[k], k


def test_declared_clinical_follows_the_study_config(tmp_path):
    from glandpet.study.draft import declared_clinical
    from glandpet.study.subjects import DEFAULT_CLINICAL

    assert declared_clinical(tmp_path / "absent.yaml") == DEFAULT_CLINICAL
    cfg = tmp_path / "config.yaml"
    cfg.write_text("clinical:\n  tender_joints: ordinal\n  anti_ssa: categorical\n")
    got = declared_clinical(cfg)
    assert got["tender_joints"] == "ordinal" and got["anti_ssa"] == "categorical" and "essdai" in got


def test_drafted_config_copies_the_workflow_sections_with_their_comments():
    """The sections that are not the study's own come from config.yaml verbatim (comments included),
    so a default added there reaches every drafted study (the drafted copy once lacked two keys)."""
    from glandpet.study.draft import DEFAULT_CONFIG, STUDY_SECTIONS, config_sections, config_text

    default = config_sections(DEFAULT_CONFIG.read_text())
    drafted = config_sections(config_text("s.tsv", "/dicom", "/results"))
    assert list(drafted) == list(default)
    for key in set(default) - set(STUDY_SECTIONS):
        assert drafted[key] == default[key], key
    assert drafted["results"].rstrip().endswith('results: "/results"')


def test_config_sections_splits_top_level_keys():
    from glandpet.study.draft import config_sections

    text = "# head\n\n# about a\na: 1\n\n# about b\n# more\nb:\n  x: 2   # inline\n  # inner comment\n  y: 3\nc: []\n"
    assert config_sections(text) == {"a": "# about a\na: 1\n", "b": "# about b\n# more\nb:\n  x: 2   # inline\n  # inner comment\n  y: 3\n",
                                     "c": "c: []\n"}


def test_init_drafts_follow_up_sessions(tmp_path):
    """A patient with PSMA and FAPI at baseline and follow-up: its sessions and their days, a day column per
    follow-up session of the cohort; a patient without follow-ups has empty follow-up days."""
    from datetime import datetime, timedelta

    from test_dicom_catalog import petct

    from glandpet.study.draft import found_columns, init_study, summary_table

    def date(day: int) -> str:
        return (datetime(2024, 3, 1) + timedelta(days=day)).strftime("%Y%m%d")

    root = tmp_path / "dicom"
    one = {"PatientID": "PFOLLOW1"}
    for name, tracer, day in (("a", "68Ga-PSMA-11", 0), ("b", "FAPI-46", 1), ("c", "68Ga-PSMA-11", 120),
                              ("d", "FAPI-46", 121)):
        petct(root / "P1" / name, tracer, date=date(day), patient=one)
    petct(root / "P2" / "a", "FAPI-46", date=date(0), patient={"PatientID": "PBASE2"})
    # a third patient: a same-day duplicate at the follow-up (psma2 found, but ambiguous)
    three = {"PatientID": "PDUP3"}
    petct(root / "P3" / "a", "68Ga-PSMA-11", date=date(0), patient=three)
    petct(root / "P3" / "b", "68Ga-PSMA-11", date=date(60), time="090000", patient=three)
    petct(root / "P3" / "c", "68Ga-PSMA-11", date=date(60), time="150000", patient=three)

    res = init_study(root, tmp_path / "study", progress=False)
    assert found_columns(["psma", "fapi2", "psma2"]) == ("sessions", "tracers", "psma_day", "fapi_day", "psma2_day",
                                                          "fapi2_day", "n_series")
    sheet = pd.read_csv(tmp_path / "study" / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(sheet.columns)[4:11] == list(found_columns(["psma2", "fapi2"]))
    key = read_linkage_key(tmp_path / "study" / "linkage-key.tsv")
    rows = sheet.set_index("subject_id")
    p1, p2, p3 = (rows.loc[key[p]] for p in ("PFOLLOW1", "PBASE2", "PDUP3"))
    assert p1["sessions"] == "psma,fapi,psma2,fapi2" and p1["tracers"] == "PSMA-11,FAPI-46"
    assert [p1[f"{s}_day"] for s in ("psma", "fapi", "psma2", "fapi2")] == ["0", "1", "120", "121"]
    assert p2["sessions"] == "fapi" and (p2["fapi_day"], p2["psma2_day"], p2["fapi2_day"]) == ("0", "", "")
    assert p3["sessions"] == "psma,psma2" and p3["psma_day"] == "0" and p3["psma2_day"] == ""
    assert any("session psma2" in p and "on day 60" in p for p in res.problems)
    table = summary_table(res)
    assert "psma 2 (PSMA-11 2); fapi 2 (FAPI-46 2); psma2 1 (PSMA-11 1); fapi2 1 (FAPI-46 1)" in table
    assert re.search(r"follow-ups\s+2 follow-up sessions of 1 patient$", table, re.M)

    # a re-run after the follow-ups left the export: their day columns go, the team's columns stay
    sheet["essdai"] = ["3", "", ""]
    sheet.to_csv(tmp_path / "study" / "subjects.tsv", sep="\t", index=False)
    for name in ("c", "d"):
        shutil.rmtree(root / "P1" / name)
    shutil.rmtree(root / "P3")
    init_study(root, tmp_path / "study", progress=False)
    again = pd.read_csv(tmp_path / "study" / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert "psma2_day" not in again.columns and "fapi2_day" not in again.columns
    assert list(again.columns)[4:9] == list(FOUND_COLUMNS) and list(again["essdai"]) == ["3", "", ""]
    assert again.set_index("subject_id").loc[key["PFOLLOW1"], "sessions"] == "psma,fapi"

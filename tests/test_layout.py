"""glandpet.layout: the pipeline's file names, built and taken apart in one module.

The expected names are written out literally: they are the names the workflow wrote before the
module existed (rules/*.smk outputs, rules/common.smk input functions, glandpet.registration.transforms).
"""

import json
import re
from pathlib import Path

import pytest

from glandpet import layout
from glandpet.layout import label_table_of, name, parse, path, session_transform_paths, transform_prefix_of

ROOT = Path(__file__).resolve().parents[1]
R = "results"

# (path(...) arguments, the name the workflow writes)
NAMES = [
    ((R, "S001", "psma", "ct.nii.gz"), {}, "results/sub-S001/ses-psma/sub-S001_ses-psma_ct.nii.gz"),
    ((R, "S001", "psma", "pet.nii.gz"), {"trc": "PSMA11"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_trc-PSMA11_pet.nii.gz"),
    ((R, "S001", "fapi", "pet.json"), {"trc": "FAPI46"},
     "results/sub-S001/ses-fapi/sub-S001_ses-fapi_trc-FAPI46_pet.json"),
    ((R, "S001", "psma", "pet.nii.gz"), {"trc": "PSMA11", "desc": "suvbw"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_trc-PSMA11_desc-suvbw_pet.nii.gz"),
    ((R, "S001", "psma", "xfm.mat"), {"from_": "pet", "to": "ct"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_from-pet_to-ct_xfm.mat"),
    ((R, "S001", "psma", "qc.json"), {"desc": "register"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_desc-register_qc.json"),
    ((R, "S001", "psma", "dseg.nii.gz"), {"space": "ct"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_space-ct_dseg.nii.gz"),
    ((R, "S001", "psma", "dseg.tsv"), {"space": "ct"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_space-ct_dseg.tsv"),
    ((R, "S001", "psma", "dseg.ctbl"), {"space": "ct"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_space-ct_dseg.ctbl"),
    ((R, "S001", "psma", "dseg.itksnap.txt"), {"space": "ct"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_space-ct_dseg.itksnap.txt"),
    ((R, "S001", "psma", "qc.json"), {"desc": "segment"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_desc-segment_qc.json"),
    ((R, "S001", "fapi", "dseg.nii.gz"), {"desc": "corrected", "space": "ct"},
     "results/sub-S001/ses-fapi/sub-S001_ses-fapi_desc-corrected_space-ct_dseg.nii.gz"),
    ((R, "S001", "fapi", "qc.json"), {"desc": "correction"},
     "results/sub-S001/ses-fapi/sub-S001_ses-fapi_desc-correction_qc.json"),
    ((R, "S001", "psma", "gland_stats.parquet"), {},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_gland_stats.parquet"),
    ((R, "S001", "psma", "dseg.nii.gz"), {"space": "pet"},
     "results/sub-S001/ses-psma/sub-S001_ses-psma_space-pet_dseg.nii.gz"),
    ((R, "S001", None, "xfm.mat"), {"from_": "fapi", "to": "psma"},
     "results/sub-S001/sub-S001_from-fapi_to-psma_xfm.mat"),
    ((R, "S001", None, "qc.json"), {"desc": "align"}, "results/sub-S001/sub-S001_desc-align_qc.json"),
    ((R, "S001", None, "gland_index.parquet"), {}, "results/sub-S001/sub-S001_gland_index.parquet"),
    ((f"{R}/work", "S001", None, "series.json"), {}, "results/work/sub-S001/sub-S001_series.json"),
]


@pytest.mark.parametrize("args,entities,expected", NAMES, ids=[e.rsplit("/", 1)[1] for _, _, e in NAMES])
def test_path_gives_the_names_the_workflow_writes(args, entities, expected):
    assert path(*args, **entities) == expected


@pytest.mark.parametrize("args,entities,expected", NAMES, ids=[e.rsplit("/", 1)[1] for _, _, e in NAMES])
def test_parse_inverts_path(args, entities, expected):
    _, subject, session, suffix = args
    got = parse(path(*args, **entities))
    stem, _, ext = suffix.partition(".")
    want = {"subject": subject, "session": session, "suffix": stem, "extension": "." + ext}
    want.update({k.rstrip("_"): v for k, v in entities.items()})
    assert got == want
    # and back: the parsed entities name the same file
    again = {k: v for k, v in got.items() if k not in ("subject", "session", "suffix", "extension")}
    assert path(args[0], got["subject"], got["session"], got["suffix"] + got["extension"],
                **{("from_" if k == "from" else k): v for k, v in again.items()}) == expected


def test_entities_come_in_one_order_whatever_the_call_order():
    assert name("S001", "fapi", "dseg.nii.gz", space="ct", desc="corrected") == \
        "sub-S001_ses-fapi_desc-corrected_space-ct_dseg.nii.gz"
    assert name("S001", "psma", "xfm.mat", to="ct", from_="pet") == "sub-S001_ses-psma_from-pet_to-ct_xfm.mat"
    assert name("S001", suffix="qc.png") == "sub-S001_qc.png"  # figures/qc/sub-<id>_qc.png
    assert name("S001", "psma", desc=None) == "sub-S001_ses-psma"  # None: left out; no suffix: a log's stem


@pytest.mark.parametrize("bad", [dict(subject="S_01"), dict(subject="S-01"), dict(subject=""),
                                 dict(session="ps_ma"), dict(trc="PSMA-11"), dict(suffix="trc-X_pet.nii.gz"),
                                 dict(colour="red")])
def test_names_the_layout_cannot_take_apart_are_refused(bad):
    args = dict(subject="S001", session="psma", suffix="pet.nii.gz")
    args.update(bad)
    with pytest.raises(ValueError):
        name(**args)


def test_parse_log_names():
    assert parse("results/logs/convert_pet/sub-S001_ses-psma_trc-PSMA11.log") == {
        "subject": "S001", "session": "psma", "trc": "PSMA11", "suffix": None, "extension": ".log"}
    assert parse("results/logs/segment_glands/sub-S001_ses-fapi.log") == {
        "subject": "S001", "session": "fapi", "suffix": None, "extension": ".log"}
    assert parse(Path("results/logs/align_sessions/sub-S002.log")) == {
        "subject": "S002", "session": None, "suffix": None, "extension": ".log"}
    for cohort_log in ("results/logs/cohort_tables.log", "results/logs/index_dicom.log"):
        with pytest.raises(ValueError):
            parse(cohort_log)


def test_parse_qc_json_names():
    assert parse("results/sub-S001/ses-psma/sub-S001_ses-psma_desc-segment_qc.json") == {
        "subject": "S001", "session": "psma", "desc": "segment", "suffix": "qc", "extension": ".json"}
    assert parse("results/sub-S001/sub-S001_desc-align_qc.json") == {
        "subject": "S001", "session": None, "desc": "align", "suffix": "qc", "extension": ".json"}


@pytest.mark.parametrize("bad", ["dseg.nii.gz", "ses-psma_sub-S001_ct.nii.gz", "sub-S001_sub-S002_ct.nii.gz",
                                 "sub-S001_ses-psma_ses-fapi_ct.nii.gz", "sub-S001_extra_desc-x_qc.json",
                                 "sub-_ct.nii.gz", "sub-S 1_ct.nii.gz"])
def test_parse_refuses_other_names(bad):
    with pytest.raises(ValueError):
        parse(bad)


def test_label_table_and_transform_prefix():
    assert label_table_of("r/sub-S001/ses-psma/sub-S001_ses-psma_space-ct_dseg.nii.gz") == \
        "r/sub-S001/ses-psma/sub-S001_ses-psma_space-ct_dseg.tsv"
    assert label_table_of(Path("x/sub-A_ses-fapi_desc-corrected_space-ct_dseg.nii.gz")) == \
        "x/sub-A_ses-fapi_desc-corrected_space-ct_dseg.tsv"
    assert transform_prefix_of("r/sub-S001/sub-S001_from-fapi_to-psma_xfm.mat") == \
        "r/sub-S001/sub-S001_from-fapi_to-psma"
    with pytest.raises(ValueError):
        label_table_of("x/labels.nii")
    with pytest.raises(ValueError):
        transform_prefix_of("x/sub-A_from-fapi_to-psma_xfm.nii.gz")


def test_session_transform_paths():
    prefix = path(R, "S001", from_="fapi", to="psma")
    want = {"affine": "results/sub-S001/sub-S001_from-fapi_to-psma_xfm.mat",
            "warp": "results/sub-S001/sub-S001_from-fapi_to-psma_xfm.nii.gz",
            "inverse_warp": "results/sub-S001/sub-S001_from-fapi_to-psma_invxfm.nii.gz"}
    assert session_transform_paths(prefix) == want
    assert session_transform_paths(Path(prefix)) == want
    assert transform_prefix_of(want["affine"]) == prefix


def test_one_subject_id_pattern():
    from glandpet.segmentation.corrections import CORRECTION_PATTERN
    from glandpet.study.subjects import ID_PATTERN

    assert layout.SUBJECT_ID_PATTERN == "[A-Za-z0-9]+"
    assert ID_PATTERN.pattern == f"^{layout.SUBJECT_ID_PATTERN}$"
    assert f"(?P<subject>{layout.SUBJECT_ID_PATTERN})" in CORRECTION_PATTERN.pattern
    common = (ROOT / "rules" / "common.smk").read_text()
    assert "subject=layout.SUBJECT_ID_PATTERN," in common and "tracer=layout.ENTITY_VALUE_PATTERN," in common
    for f in ("rules/common.smk", "glandpet/study/subjects.py", "glandpet/workflow/steps.py", "glandpet/segmentation/corrections.py"):
        assert "[A-Za-z0-9]+" not in (ROOT / f).read_text(), f


def test_no_name_slicing_left_in_the_steps():
    pattern = re.compile(r'-\s*len\(\s*"(_xfm\.mat|\.nii\.gz)"\s*\)')
    for f in ("glandpet/workflow/steps.py", "glandpet/registration/transforms.py"):
        text = (ROOT / f).read_text()
        assert '-len("_xfm.mat")' not in text and '-len(".nii.gz")' not in text, f
        assert not pattern.search(text), f


def test_workflow_reads_subject_and_session_through_the_layout(tmp_path):
    from glandpet.workflow import failures
    from glandpet.workflow import steps

    logs = tmp_path / "logs"
    assert failures.failure_record_path(logs / "convert_pet" / "sub-S001_ses-psma_trc-PSMA11.log") == \
        tmp_path / "work" / "failed" / "convert_pet" / "sub-S001_ses-psma_trc-PSMA11.json"
    assert failures.failure_record_path(logs / "align_sessions" / "sub-S001.log") == \
        tmp_path / "work" / "failed" / "align_sessions" / "sub-S001.json"
    assert failures.failure_record_path(logs / "cohort_tables.log") is None
    assert failures.failure_record_path(logs / "report" / "cohort_tables.log") is None

    qc = {}
    for p, stage in ((path(tmp_path, "S001", "psma", "qc.json", desc="register"), "register"),
                     (path(tmp_path, "S001", None, "qc.json", desc="align"), "align")):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_text(json.dumps({"stage": stage, "status": "ok"}))
        qc[stage] = p
    other = tmp_path / "notes.json"
    other.write_text("{}")
    rows = steps._qc_rows([qc["register"], qc["align"], str(other), str(tmp_path / "tables" / "series.parquet")])
    assert [(r["subject_id"], r["session"], r["stage"]) for r in rows] == [
        ("S001", "psma", "register"), ("S001", None, "align"), ("?", None, "?")]

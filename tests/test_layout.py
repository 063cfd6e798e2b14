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
    ((R, "S001", None, "xfm.nii.gz"), {"from_": "psma2", "to": "psma"},
     "results/sub-S001/sub-S001_from-psma2_to-psma_xfm.nii.gz"),
    ((R, "S001", "fapi", "qc.json"), {"to": "psma", "desc": "align"},
     "results/sub-S001/ses-fapi/sub-S001_ses-fapi_to-psma_desc-align_qc.json"),
    ((R, "S001", "fapi2", "pet.nii.gz"), {"trc": "FAPI04", "desc": "suvbw"},
     "results/sub-S001/ses-fapi2/sub-S001_ses-fapi2_trc-FAPI04_desc-suvbw_pet.nii.gz"),
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
    # the session alignment's log is the moving session's: a failure leaves out that session
    assert parse("results/logs/align_sessions/sub-S002_ses-psma2_to-psma.log") == {
        "subject": "S002", "session": "psma2", "to": "psma", "suffix": None, "extension": ".log"}
    for cohort_log in ("results/logs/cohort_tables.log", "results/logs/catalog_dicom.log"):
        with pytest.raises(ValueError):
            parse(cohort_log)


def test_parse_qc_json_names():
    assert parse("results/sub-S001/ses-psma/sub-S001_ses-psma_desc-segment_qc.json") == {
        "subject": "S001", "session": "psma", "desc": "segment", "suffix": "qc", "extension": ".json"}
    assert parse("results/sub-S001/ses-fapi/sub-S001_ses-fapi_to-psma_desc-align_qc.json") == {
        "subject": "S001", "session": "fapi", "to": "psma", "desc": "align", "suffix": "qc", "extension": ".json"}


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


def _code_files():
    """The rules, scripts and package: every place a file name could be built or taken apart."""
    files = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk")), *sorted((ROOT / "scripts").glob("*.py")),
             *sorted((ROOT / "glandpet").rglob("*.py"))]
    return [f for f in files if f != ROOT / "glandpet" / "layout.py"]


def test_one_subject_id_pattern():
    from glandpet.segmentation.corrections import CORRECTION_PATTERN
    from glandpet.study.subjects import ID_PATTERN

    assert layout.SUBJECT_ID_PATTERN == "[A-Za-z0-9]+"
    assert ID_PATTERN.pattern == f"^{layout.SUBJECT_ID_PATTERN}$"
    assert f"(?P<subject>{layout.SUBJECT_ID_PATTERN})" in CORRECTION_PATTERN.pattern
    common = (ROOT / "rules" / "common.smk").read_text()
    assert "subject=layout.SUBJECT_ID_PATTERN," in common and "tracer=layout.ENTITY_VALUE_PATTERN," in common
    offenders = [str(f.relative_to(ROOT)) for f in _code_files() if "[A-Za-z0-9]+" in f.read_text()]
    assert offenders == []


#: Ways a path was assembled or taken apart outside the layout module before it existed (issue 20):
#: the rules' f-string names, fake wildcard objects, suffix slicing, file names spelled in folders.
FORBIDDEN = {
    "a rule's f-string name": re.compile(r"sub-\{\{subject\}\}|ses-\{\{session\}\}"),
    "a fake wildcards object": re.compile(r"""type\(\s*["']W["']"""),
    "suffix slicing": re.compile(r"""-\s*len\(\s*["'](_xfm\.mat|\.nii\.gz|\.nii|_gland_stats\.parquet|\.log)["']\s*\)"""),
    "a per-subject folder spelled out": re.compile(r"""/\s*f["']sub-\{|\}/sub-\{|f["']\{RESULTS\}/sub-"""),
    "a session file name spelled out": re.compile(r"""f["']sub-\{[^}]+\}_ses-"""),
}


def test_no_file_name_is_built_or_taken_apart_outside_the_layout():
    found = []
    for f in _code_files():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            found += [f"{f.relative_to(ROOT)}:{n}: {what}: {line.strip()}" for what, rx in FORBIDDEN.items()
                      if rx.search(line)]
    assert found == []


def test_the_grep_finds_what_it_looks_for():
    """The patterns above match the forms they forbid (a grep that matches nothing proves nothing)."""
    samples = {
        "a rule's f-string name": 'ct=f"{RESULTS}/sub-{{subject}}/ses-{{session}}/x"',
        "a fake wildcards object": 'sw = type("W", (), {"subject": s})',
        "suffix slicing": 'str(p)[: -len("_xfm.mat")]',
        "a per-subject folder spelled out": 'work / f"sub-{s}" / "x"',
        "a session file name spelled out": 'name = f"sub-{sub}_ses-{ses}_ct.nii.gz"',
    }
    for what, line in samples.items():
        assert FORBIDDEN[what].search(line), what


def test_patterns_are_the_paths_with_wildcards():
    assert layout.pattern("R", "ct.nii.gz") == "R/sub-{subject}/ses-{session}/sub-{subject}_ses-{session}_ct.nii.gz"
    assert layout.pattern("R", "pet.nii.gz", trc="{tracer}", desc="suvbw") == \
        "R/sub-{subject}/ses-{session}/sub-{subject}_ses-{session}_trc-{tracer}_desc-suvbw_pet.nii.gz"
    assert layout.pattern("R", "xfm.mat", session=None, from_="fapi", to="psma") == \
        "R/sub-{subject}/sub-{subject}_from-fapi_to-psma_xfm.mat"
    assert layout.pattern("R", "ct.nii.gz", session="psma") == "R/sub-{subject}/ses-psma/sub-{subject}_ses-psma_ct.nii.gz"
    assert layout.name_pattern() == "sub-{subject}_ses-{session}"
    assert layout.name_pattern("qc.png", session=None) == "sub-{subject}_qc.png"
    # filled in, a pattern is the path
    assert layout.pattern("R", "dseg.nii.gz", space="ct").format(subject="S1", session="psma") == \
        path("R", "S1", "psma", "dseg.nii.gz", space="ct")


def test_beside():
    assert layout.beside("a/x_dseg.nii.gz", ".tsv") == "a/x_dseg.tsv"
    assert layout.beside("a/x_pet.nii", ".json") == "a/x_pet.json"
    with pytest.raises(ValueError):
        layout.beside("a/x.mha", ".tsv")


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
    rows = steps.qc_rows([qc["register"], qc["align"], str(other), str(tmp_path / "tables" / "series.parquet")])
    assert [(r["subject_id"], r["session"], r["stage"]) for r in rows] == [
        ("S001", "psma", "register"), ("S001", None, "align"), ("?", None, "?")]


def test_sessions_name_the_tracer_family_and_the_time_point():
    """Baseline sessions keep the names of a study without follow-ups; follow-ups count from 2."""
    assert [layout.session_name("psma"), layout.session_name("fapi", 1)] == ["psma", "fapi"]
    assert layout.session_name("psma", 2) == "psma2" and layout.session_name("fapi", 12) == "fapi12"
    assert layout.session_parts("psma") == ("psma", 1) and layout.session_parts("fapi12") == ("fapi", 12)
    for bad in ("psma1", "psma0", "fdg", "fapi02", "PSMA", "psma2a", ""):
        assert not layout.is_session(bad)
        with pytest.raises(ValueError):
            layout.session_parts(bad)
    with pytest.raises(ValueError):
        layout.session_name("fdg")
    with pytest.raises(ValueError):
        layout.session_name("psma", 0)
    assert sorted(["fapi2", "psma10", "psma2", "fapi", "psma"], key=layout.session_order) == \
        ["psma", "fapi", "psma2", "fapi2", "psma10"]
    assert layout.session_transform_paths(layout.session_transform_prefix("results", "S001", "psma2", "psma")) == {
        "affine": "results/sub-S001/sub-S001_from-psma2_to-psma_xfm.mat",
        "warp": "results/sub-S001/sub-S001_from-psma2_to-psma_xfm.nii.gz",
        "inverse_warp": "results/sub-S001/sub-S001_from-psma2_to-psma_invxfm.nii.gz"}

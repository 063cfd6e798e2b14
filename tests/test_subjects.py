"""Subject sheet validation: each error names the line and column."""

import pytest

from glandpet.errors import UserError
from glandpet.study.subjects import read_subject_sheet, subject_folders


def _sheet(tmp_path, text, dirs=("a", "b")):
    root = tmp_path / "dicom"
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    p = tmp_path / "subjects.tsv"
    p.write_text(text)
    return p, root


def test_valid_sheet(tmp_path):
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\tpatient_id\tessdai\n"
                               "pss001\tPSS\ta\t\t12\nctl002\tcontrol\t\tPID77\t\n")
    df = read_subject_sheet(p, root)
    assert list(df["subject_id"]) == ["pss001", "ctl002"]
    assert list(df["group"]) == ["pss", "control"]
    assert df["dicom_dir"].iloc[1] is None and df["patient_id"].iloc[0] is None
    assert df["essdai"].iloc[0] == 12.0
    assert subject_folders(df, root) == {"pss001": (root / "a").resolve()}


def test_ids_keep_leading_zeros(tmp_path):
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\n007\tpss\ta\n")
    assert read_subject_sheet(p, root)["subject_id"].iloc[0] == "007"


@pytest.mark.parametrize("body,needle", [
    ("pss001\tpss\ta\npss001\tcontrol\tb\n", "line 3, column subject_id: duplicate subject id 'pss001' (also on line 2)"),
    ("pss-001\tpss\ta\n", "line 2, column subject_id: 'pss-001' is not usable in file names"),
    ("sub_1\tpss\ta\n", "column subject_id: 'sub_1'"),
    ("\tpss\ta\n", "line 2, column subject_id: empty subject id"),
    ("pss001\tsjogren\ta\n", "line 2 (subject pss001), column group: unknown group 'sjogren'"),
    ("pss001\t\ta\n", "column group: empty group"),
    ("pss001\tpss\tmissing\n", "line 2 (subject pss001), column dicom_dir: folder 'missing' not found"),
    ("pss001\tpss\ta\nctl002\tcontrol\ta\n", "line 3 (subject ctl002), column dicom_dir: folder 'a' overlaps"),
])
def test_row_errors(tmp_path, body, needle):
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\n" + body)
    with pytest.raises(UserError) as exc:
        read_subject_sheet(p, root)
    assert needle in str(exc.value)
    assert str(p) in str(exc.value)


def test_neither_or_both_locations(tmp_path):
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\tpatient_id\npss001\tpss\t\t\n")
    with pytest.raises(UserError, match=r"line 2 \(subject pss001\): neither dicom_dir nor patient_id"):
        read_subject_sheet(p, root)
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\tpatient_id\npss001\tpss\ta\tX1\n")
    with pytest.raises(UserError, match="both dicom_dir and patient_id"):
        read_subject_sheet(p, root)
    p, root = _sheet(tmp_path, "subject_id\tgroup\tpatient_id\npss001\tpss\tX1\nctl002\tcontrol\tX1\n")
    with pytest.raises(UserError, match=r"line 3 .*patient_id: the same patient id is also on line 2"):
        read_subject_sheet(p, root)


def test_sheet_level_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_subject_sheet(tmp_path / "nope.tsv", tmp_path)
    p, root = _sheet(tmp_path, "subject_id\tdicom_dir\npss001\ta\n")
    with pytest.raises(UserError, match="missing column 'group'"):
        read_subject_sheet(p, root)
    p, root = _sheet(tmp_path, "subject_id\tgroup\npss001\tpss\n")
    with pytest.raises(UserError, match="dicom_dir' or 'patient_id"):
        read_subject_sheet(p, root)
    p, root = _sheet(tmp_path, "subject_id,group,dicom_dir\npss001,pss,a\n")
    with pytest.raises(UserError, match="tab-separated"):
        read_subject_sheet(p, root)
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\n")
    with pytest.raises(UserError, match="no subjects"):
        read_subject_sheet(p, root)
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\tesspri\npss001\tpss\ta\thigh\n")
    with pytest.raises(UserError, match="line 2 .*column esspri: 'high' is not a number"):
        read_subject_sheet(p, root)


def test_empty_group_allowed_for_drafts(tmp_path):
    p, root = _sheet(tmp_path, "subject_id\tgroup\tdicom_dir\npss001\t\ta\n")
    assert read_subject_sheet(p, root, allow_empty_group=True)["group"].iloc[0] is None

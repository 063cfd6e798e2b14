import pytest

from glandpet.glands import (DEFAULT_LABELS, GLANDS, label_value, read_label_table, volume_outliers, volume_warnings,
                             write_label_table)


def test_default_labels_cover_every_gland_and_side_once():
    pairs = {(lab.gland, lab.side) for lab in DEFAULT_LABELS}
    assert len(pairs) == len(DEFAULT_LABELS) == 2 * len(GLANDS)
    assert [lab.index for lab in DEFAULT_LABELS] == list(range(1, 11))
    assert label_value("parotid", "left") == 1 and label_value("tubarial", "right") == 10


def test_label_table_round_trip(tmp_path):
    p = tmp_path / "labels.tsv"
    write_label_table(p)
    assert read_label_table(p) == list(DEFAULT_LABELS)


@pytest.mark.parametrize(
    "body, message",
    [
        ("index\tgland\tside\n1\tparotis\tleft\n", "unknown gland 'parotis'"),
        ("index\tgland\tside\n1\tparotid\tlt\n", "unknown side 'lt'"),
        ("index\tgland\n1\tparotid\n", "lacks column"),
        ("index\tgland\tside\n1\tparotid\tleft\n1\tparotid\tright\n", "repeated"),
        ("index\tgland\tside\nx\tparotid\tleft\n", "not an integer"),
    ],
)
def test_label_table_errors_name_the_problem(tmp_path, body, message):
    p = tmp_path / "labels.tsv"
    p.write_text(body)
    with pytest.raises(ValueError, match=message):
        read_label_table(p)


def test_volume_warnings_flag_truncated_and_implausible_contours():
    ok = {"parotid_left": 25.0, "parotid_right": 28.0, "submandibular_left": 8.0, "submandibular_right": 9.5,
          "lacrimal_left": 0.6, "lacrimal_right": 0.7}
    assert volume_warnings(ok) == []
    # one side truncated: below the plausible range AND under 40 % of the other side
    warn = volume_warnings({**ok, "submandibular_right": 1.0})
    assert len(warn) == 2 and all(w.startswith("submandibular_right") for w in warn)
    assert "plausible" in warn[0] and "other side" in warn[1]
    # a whole-head "parotid" (wrong ROI) is too large; a lone side is judged only against the range
    assert volume_warnings({"parotid_left": 400.0})[0].startswith("parotid_left: 400.00 mL")
    assert volume_warnings({"lacrimal_right": 0.5}) == []


def test_volume_outliers_exclude_a_truncated_atlas_contour_from_the_vote():
    sm_l, sm_r = label_value("submandibular", "left"), label_value("submandibular", "right")
    par_l = label_value("parotid", "left")
    vols = [{sm_l: 11.3, sm_r: 11.6, par_l: 25.0}, {sm_l: 6.2, sm_r: 1.0, par_l: 37.0},
            {sm_l: 11.1, sm_r: 13.4, par_l: 41.0}, {sm_l: 8.6, sm_r: 4.6}]
    out = volume_outliers(vols)
    assert out == [set(), {sm_r}, set(), set()]  # 4.6 mL is small but not an outlier (median 9.9)
    # with fewer than three atlases holding a gland nothing is judged
    assert volume_outliers(vols[:2]) == [set(), set()]

import pytest

from glandpet.glands import DEFAULT_LABELS, GLANDS, label_value, read_label_table, write_label_table


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

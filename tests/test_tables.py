import pandas as pd
import pyarrow.parquet as pq
import pytest

from glandpet import __version__
from glandpet.tables import GLAND_STATS, config_hash, provenance, write_table


def test_write_table_enforces_schema_and_is_readable(tmp_path):
    rows = [
        dict(subject_id="S001", group="pss", session="psma", tracer="psma11", gland="parotid", side="left",
             volume_ml=25.0, suv_mean=8.0, suv_type="bw", **provenance({"a": 1}))
    ]
    path = tmp_path / "t.parquet"
    write_table(rows, GLAND_STATS, path)
    table = pq.read_table(path)
    assert table.schema.equals(GLAND_STATS)
    df = pd.read_parquet(path)
    assert df.loc[0, "suv_mean"] == 8.0 and pd.isna(df.loc[0, "suv_peak"])
    assert df.loc[0, "pipeline_version"] == __version__
    assert not list(tmp_path.glob("*.part"))


def test_missing_required_column_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="subject_id"):
        write_table([dict(session="psma")], GLAND_STATS, tmp_path / "t.parquet")


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": {"c": 2}}) == config_hash({"b": {"c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})

import os

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


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask_linkage_key_stays_private(tmp_path, umask):
    """Parquet tables, QC JSON, NIfTI and the report's HTML tables get 0666 & ~umask like any other
    file (they were -rw------- whatever the umask); the linkage key stays 0600."""
    import stat

    import nibabel as nib
    import numpy as np

    from glandpet.cohort.report_tables import write_report_tables
    from glandpet.study.draft import write_linkage_key
    from glandpet.tables import COHORT_STATS, QC
    from glandpet.writers import write_json, write_nifti_like

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(umask)
    try:
        prov = provenance({})
        stats = tmp_path / "gland_stats.parquet"
        write_table([dict(subject_id="001", group="pss", session="psma", gland="parotid", side="left",
                          suv_mean=8.0, suv_type="bw", **prov)], GLAND_STATS, stats)
        cstats = tmp_path / "cohort_stats.parquet"
        write_table([dict(analysis="a", gland="parotid", statistic="n", value=3.0, **prov)], COHORT_STATS, cstats)
        qc = tmp_path / "qc.parquet"
        write_table([dict(subject_id="001", stage="index", status="ok", **prov)], QC, qc)
        write_json({"stage": "register", "status": "ok"}, tmp_path / "qc.json")
        ref = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
        write_nifti_like(np.ones((2, 2, 2), np.uint8), ref, tmp_path / "x.nii.gz")
        html = [tmp_path / f"{n}.html" for n in ("statistics", "gland_values", "qc")]
        write_report_tables(str(stats), str(cstats), str(qc), *map(str, html))
        write_linkage_key(tmp_path / "linkage.tsv", {"PID1": "001"})
    finally:
        os.umask(old)
    for p in [stats, cstats, qc, tmp_path / "qc.json", tmp_path / "x.nii.gz", *html]:
        assert mode(p) == 0o666 & ~umask, (p.name, oct(mode(p)))
    assert mode(tmp_path / "linkage.tsv") == 0o600
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.slow
def test_demo_run_tables_follow_the_umask(workflow_results):
    """The shared demo run (run with this process's umask): its tables, QC JSON and report tables
    are readable as the umask allows, not owner-only."""
    import stat

    mask = os.umask(0)
    os.umask(mask)
    files = [*(workflow_results / "tables").glob("*.parquet"), *(workflow_results / "tables" / "report").glob("*.html"),
             *workflow_results.glob("sub-*/ses-*/*_qc.json")]
    assert len(files) > 6
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, (p.name, oct(p.stat().st_mode))

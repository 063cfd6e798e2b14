"""HTML views of the cohort tables for the report."""

from __future__ import annotations

import pandas as pd

from glandpet import tables
from glandpet.report_tables import gland_values_view, statistics_view, write_report_tables


def _stats_rows():
    rows = []
    for gland, med in (("parotid", 2.5), ("lacrimal", 0.9)):
        for stat, v in (("n_pss", 4), ("median_pss", med), ("p_value", 0.03)):
            rows.append(dict(analysis="fapi_pss_vs_control", gland=gland, session="fapi", group=None,
                             variable="suv_mean", statistic=stat, value=v))
    return pd.DataFrame(rows)


def _gland_rows():
    rows = []
    for i, (group, suv) in enumerate((("pss", 3.0), ("pss", 5.0), ("pss", 7.0), ("control", 1.0))):
        for side in ("left", "right"):
            rows.append(dict(subject_id=f"S{i}", group=group, session="fapi", gland="parotid", side=side,
                             suv_mean=suv, suv_mean_pvc=suv * 1.3, volume_ml=20.0 + i))
    return pd.DataFrame(rows)


def test_statistics_pivot_one_row_per_gland():
    html = statistics_view(_stats_rows())
    assert html.count("<caption>fapi_pss_vs_control</caption>") == 1
    assert "<th>median_pss</th>" in html and "<th>p_value</th>" in html
    assert html.count("<td>parotid</td>") == 1 and html.count("<td>lacrimal</td>") == 1
    assert "<td>2.5</td>" in html and "<td>0.03</td>" in html


def test_gland_values_are_medians_by_group():
    html = gland_values_view(_gland_rows())
    # pss medians: SUVmean 5, PVC 6.5; control: 1 and 1.3; subjects counted once per group
    assert "<td>5</td>" in html and "<td>6.5</td>" in html and "<td>1.3</td>" in html
    assert "<td>3</td>" in html  # n_subjects pss


def test_write_views_from_parquet(tmp_path):
    tables.write_table(_stats_rows().assign(pipeline_version="x", config_hash="y"), "cohort_stats",
                       tmp_path / "cs.parquet")
    gs = _gland_rows()
    gs.to_parquet(tmp_path / "gs.parquet")
    qc = pd.DataFrame([dict(subject_id="S9", session="psma", stage="ingest", status="failed",
                            message="sub-S9 ses-psma: PET series #3 'PET AC': PatientWeight missing"),
                       dict(subject_id="S1", session="psma", stage="register", status="ok", message="")])
    tables.write_table(qc.assign(pipeline_version="x", config_hash="y"), "qc", tmp_path / "qc.parquet")
    outs = [tmp_path / "r" / n for n in ("s.html", "g.html", "q.html")]
    write_report_tables(tmp_path / "gs.parquet", tmp_path / "cs.parquet", tmp_path / "qc.parquet", *outs)
    assert all(o.read_text().startswith("<!DOCTYPE html>") for o in outs)
    q = outs[2].read_text()
    assert "PatientWeight missing" in q and "sub-S9" in q and "failures and warnings" in q
    assert not list((tmp_path / "r").glob(".*part"))

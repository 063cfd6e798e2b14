"""Cohort statistics on small frames with known answers, and Parquet aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from glandpet.cohort_stats import (
    aggregate_tables,
    bootstrap_spearman_ci,
    clinical_associations,
    compare_groups,
    index_by_group,
    psma_fapi_correlation,
)
from glandpet.tables import GLAND_STATS, provenance, write_table


def _stats_frame():
    """FAPI parotid: pSS subjects 5..8 (both sides equal), controls 1..3: complete separation.
    Submandibular: sides differ (left = value, right = value + 2): subject means used."""
    rows = []
    subjects = [(f"p{i}", "pss", v) for i, v in enumerate([5.0, 6.0, 7.0, 8.0])] + [
        (f"c{i}", "control", v) for i, v in enumerate([1.0, 2.0, 3.0])
    ]
    for sid, grp, v in subjects:
        for side in ("left", "right"):
            rows.append(dict(subject_id=sid, group=grp, session="fapi", gland="parotid", side=side, suv_mean=v))
            rows.append(dict(subject_id=sid, group=grp, session="fapi", gland="submandibular", side=side,
                             suv_mean=v + (2.0 if side == "right" else 0.0) if grp == "pss" else 10.0 - v))
            rows.append(dict(subject_id=sid, group=grp, session="psma", gland="parotid", side=side, suv_mean=100.0))
    return pd.DataFrame(rows)


def test_compare_groups_known_answer():
    out = compare_groups(_stats_frame())
    par = out[out.gland == "parotid"].iloc[0]
    assert (par.n_pss, par.n_control) == (4, 3)
    assert par.u_statistic == 12.0 and par.rank_biserial == pytest.approx(1.0)
    assert par.p_value == pytest.approx(stats.mannwhitneyu([5, 6, 7, 8], [1, 2, 3]).pvalue)
    assert par.median_pss == 6.5 and par.median_control == 2.0
    sub = out[out.gland == "submandibular"].iloc[0]
    # pSS subject means 6..9, controls 9, 8, 7: U = #(pss > ctrl) + 0.5 #ties
    u = stats.mannwhitneyu([6, 7, 8, 9], [9, 8, 7]).statistic
    assert sub.u_statistic == u and sub.rank_biserial == pytest.approx(2 * u / 12 - 1)
    assert list(out.columns[:4]) == ["gland", "session", "value", "n_pss"]
    per_side = compare_groups(_stats_frame(), combine_sides=False)
    assert len(per_side) == 4 and "side" in per_side.columns
    assert (per_side[per_side.gland == "parotid"].rank_biserial == 1.0).all()


def test_compare_groups_one_group_missing():
    df = _stats_frame()
    out = compare_groups(df[df.group == "pss"])
    assert (out.n_control == 0).all() and out.p_value.isna().all()


def _index_frame(n=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        grp = "pss" if i < n * 2 // 3 else "control"
        psma = rng.uniform(5, 15)
        for side in ("left", "right"):
            fapi = 20 - psma + rng.normal(0, 0.5)  # strongly negative in every group
            rows.append(dict(subject_id=f"s{i:02d}", group=grp, gland="parotid", side=side,
                             psma_suv_mean=psma, fapi_suv_mean=fapi, psma_fapi_index=fapi / psma))
    return pd.DataFrame(rows)


def test_psma_fapi_correlation_and_bootstrap():
    df = _index_frame()
    out = psma_fapi_correlation(df, n_boot=500, seed=1)
    row = out.iloc[0]
    assert row.n == 20 and row.group == "pss"
    sv = df[df.group == "pss"].groupby("subject_id")[["psma_suv_mean", "fapi_suv_mean"]].mean()
    assert row.rho == pytest.approx(stats.spearmanr(sv.psma_suv_mean, sv.fapi_suv_mean).statistic)
    assert row.ci_low <= row.rho <= row.ci_high and row.ci_high < -0.8
    again = psma_fapi_correlation(df, n_boot=500, seed=1)
    pd.testing.assert_frame_equal(out, again)  # seeded
    # the vectorised bootstrap equals a loop over the same resamples
    x, y = sv.psma_suv_mean.to_numpy(), sv.fapi_suv_mean.to_numpy()
    rng = np.random.default_rng(5)
    lo, hi = bootstrap_spearman_ci(x, y, n_boot=200, rng=np.random.default_rng(5))
    idx = rng.integers(0, x.size, size=(200, x.size))
    loop = np.array([stats.spearmanr(x[i], y[i]).statistic for i in idx])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(loop[np.isfinite(loop)], [0.025, 0.975])))
    # too few subjects
    small = df[df.subject_id.isin(["s00", "s01"])]
    assert psma_fapi_correlation(small).rho.isna().all()


def test_index_by_group():
    df = pd.DataFrame(dict(subject_id=list("abcdefgh"), group=["pss"] * 5 + ["control"] * 3, gland="lacrimal",
                           side="left", psma_fapi_index=[1.0, 2.0, 3.0, 4.0, np.nan, 0.5, 0.7, 0.9]))
    out = index_by_group(df).set_index("group")
    assert out.loc["pss", "n"] == 4 and out.loc["pss", "median"] == 2.5
    assert out.loc["pss", "q1"] == 1.75 and out.loc["pss", "iqr"] == pytest.approx(1.5)
    assert out.loc["control", "median"] == pytest.approx(0.7) and out.loc["control", "iqr"] == pytest.approx(0.2)


def test_clinical_associations():
    df = _index_frame(n=12)
    subjects = pd.DataFrame(dict(subject_id=[f"s{i:02d}" for i in range(12)], essdai=np.arange(12.0),
                                 usf_ml_min=np.r_[np.arange(8.0), [np.nan] * 4]))
    # index monotone in essdai by construction
    order = df.groupby("subject_id").psma_fapi_index.mean().rank().astype(int)
    subjects["esspri"] = subjects.subject_id.map(order).astype(float)
    out = clinical_associations(df, subjects, group="pss")
    assert set(out.clinical) == {"essdai", "esspri", "usf_ml_min"}  # schirmer absent: skipped
    es = out[out.clinical == "esspri"].iloc[0]
    assert es.rho == pytest.approx(1.0) and es.n == 8
    assert out[out.clinical == "usf_ml_min"].iloc[0].n == 8
    assert (out.n_tests == 3).all()
    none = clinical_associations(df, subjects[["subject_id"]])
    assert none.empty


def test_aggregate_tables(tmp_path):
    paths = []
    for i in range(25):
        rows = [dict(subject_id=f"s{i:02d}", group="pss", session="fapi", gland="parotid", side=s,
                     suv_mean=float(i), suv_type="bw", **provenance()) for s in ("left", "right")]
        p = tmp_path / f"sub-{i:02d}" / "gland_stats.parquet"
        p.parent.mkdir()
        write_table(rows, GLAND_STATS, p)
        paths.append(p)
    t = aggregate_tables(paths, schema="gland_stats")
    assert t.num_rows == 50 and t.schema.equals(GLAND_STATS)
    assert t.column("subject_id").to_pylist() == [f"s{i // 2:02d}" for i in range(50)]  # order of paths
    t2 = aggregate_tables(paths[::-1], columns=["subject_id", "suv_mean"])
    assert t2.column_names == ["subject_id", "suv_mean"] and t2.column("suv_mean")[0].as_py() == 24.0
    assert aggregate_tables([], schema=GLAND_STATS).num_rows == 0
    with pytest.raises(ValueError):
        aggregate_tables([])
    assert pq.read_table(paths[0]).num_rows == 2

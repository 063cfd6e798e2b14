"""Cohort statistics on small frames with known answers, and Parquet aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from glandpet.cohort.statistics import aggregate_tables, bootstrap_spearman_ci, clinical_associations, compare_groups, index_by_group, psma_fapi_correlation
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


def _exact_spearman_p(x, y):
    """Two-sided p of Spearman rho by a loop over every permutation of y (the reference)."""
    import itertools

    rho = stats.spearmanr(x, y).statistic
    perms = [stats.spearmanr(x, np.asarray(y)[list(p)]).statistic for p in itertools.permutations(range(len(y)))]
    return float(np.mean(np.abs(perms) >= abs(rho) - 1e-12))


def test_spearman_p_is_exact_for_small_n_never_zero():
    """rho = -1 with n = 4 was reported with p = 0 (scipy's t approximation): the exact permutation
    p is 2 / 4! (the observed order and its reverse)."""
    df = pd.DataFrame(dict(subject_id=list("abcd"), group="pss", gland="parotid", side="left",
                           psma_suv_mean=[1.0, 2.0, 3.0, 4.0], fapi_suv_mean=[9.0, 7.0, 5.0, 3.0]))
    row = psma_fapi_correlation(df, n_boot=100).iloc[0]
    assert row.rho == -1.0 and row.p_value == pytest.approx(2 / 24)
    # ties and n = 6: the loop over all 720 permutations
    x, y = [1.0, 2.0, 2.0, 4.0, 5.0, 7.0], [3.0, 1.0, 4.0, 4.0, 9.0, 8.0]
    df6 = pd.DataFrame(dict(subject_id=list("abcdef"), group="pss", gland="parotid", side="left",
                            psma_suv_mean=x, fapi_suv_mean=y))
    assert psma_fapi_correlation(df6, n_boot=100).iloc[0].p_value == pytest.approx(_exact_spearman_p(x, y))
    # clinical association: rho = 1 at n = 8 (esspri below) -> p = 2 / 8!, not 0
    d = _index_frame(n=12)
    subjects = pd.DataFrame(dict(subject_id=[f"s{i:02d}" for i in range(12)]))
    subjects["esspri"] = subjects.subject_id.map(d.groupby("subject_id").psma_fapi_index.mean().rank()).astype(float)
    es = clinical_associations(d, subjects, group="pss", clinical=["esspri"]).iloc[0]
    assert es.n == 8 and es.rho == pytest.approx(1.0) and es.p_value == pytest.approx(2 / 40320)


def test_spearman_p_by_permutation_for_larger_n():
    """n = 20, rho near -1: beyond the exact range the p comes from seeded permutations, at least
    1 / (permutations + 1) and never 0; for a moderate rho it agrees with the t approximation."""
    out = psma_fapi_correlation(_index_frame(), n_boot=100)
    assert out.iloc[0].rho < -0.9 and 0 < out.iloc[0].p_value <= 2e-4
    rng = np.random.default_rng(3)
    x = rng.normal(size=20)
    y = 0.4 * x + rng.normal(size=20)
    df = pd.DataFrame(dict(subject_id=[f"s{i}" for i in range(20)], group="pss", gland="parotid", side="left",
                           psma_suv_mean=x, fapi_suv_mean=y))
    row = psma_fapi_correlation(df, n_boot=100).iloc[0]
    assert row.p_value == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.02)
    pd.testing.assert_frame_equal(psma_fapi_correlation(df, n_boot=100), psma_fapi_correlation(df, n_boot=100))


def test_mann_whitney_p_exact_with_ties():
    """Ties at small n: the exact permutation distribution of U over every split of the pooled
    sample (scipy's default falls back to the normal approximation there)."""
    import itertools

    out = compare_groups(_stats_frame()).set_index("gland")
    a, b = np.array([6.0, 7.0, 8.0, 9.0]), np.array([9.0, 8.0, 7.0])  # submandibular subject means (ties)
    pooled = np.r_[a, b]
    u_obs = stats.mannwhitneyu(a, b).statistic
    us = [stats.mannwhitneyu(pooled[list(i)], np.delete(pooled, list(i))).statistic
          for i in itertools.combinations(range(7), 4)]
    exact = np.mean(np.abs(np.array(us) - 6.0) >= abs(u_obs - 6.0) - 1e-12)
    assert out.loc["submandibular", "p_value"] == pytest.approx(exact)
    assert out.loc["parotid", "p_value"] == pytest.approx(2 / 35)  # complete separation, no ties


@pytest.mark.slow
def test_demo_run_p_values_are_never_zero(workflow_results):
    cs = pd.read_parquet(workflow_results / "tables" / "cohort_stats.parquet")
    p = cs.loc[cs["statistic"] == "p_value", "value"].dropna()
    assert len(p) and (p > 0).all() and (p <= 1).all()


@pytest.mark.slow
def test_demo_run_writes_outcomes_diagnostic_results_and_figures(workflow_results):
    """The shared demo run: the registered-outcome and ROC tables with their schemas and notes, the results
    page, the ROC and forest figures."""
    from glandpet import tables

    for name in ("outcomes", "diagnostic"):
        t = pq.read_table(workflow_results / "tables" / f"{name}.parquet")
        assert t.schema.equals(tables.SCHEMAS[name]), name
    out = pd.read_parquet(workflow_results / "tables" / "outcomes.parquet")
    assert set(out.loc[out.family == "primary", "value"]) <= {"suv_max", "suv_mean"} and len(out)
    p, q = out["p_value"], out["q_value"]
    assert ((p > 0) | p.isna()).all() and ((q >= p) | p.isna()).all()
    notes = tables.table_notes(workflow_results / "tables" / "outcomes.parquet")
    assert set(notes["families"]) == {"primary", "secondary"}
    # the demo sheet holds every registered clinical variable (the phantom writes them)
    assert notes["clinical_absent"] == []
    assert "Primary outcome" in (workflow_results / "tables" / "report" / "results.html").read_text()
    for stem in ("roc", "clinical_forest"):
        assert (workflow_results / "figures" / "cohort" / f"{stem}.png").stat().st_size > 1000

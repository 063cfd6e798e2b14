"""Follow-up scans end to end (issue 19.4): a phantom pSS subject with a baseline and a follow-up of each
tracer (``demo.followups``: the follow-ups ~180 days later, with a planted change of the glands' uptake)
runs from the DICOM tree to `gland_change`. One run of a small config (1 subject, 1 atlas), shared by the
tests of this file; the run's targets are the cohort tables only (the report is tested on the demo run).

The change is recovered to within the test-retest variability of a repeated PSMA-11 scan (10 percentage
points, glandpet.cohort.change.TEST_RETEST_PCT): a pipeline whose change error were larger could not tell a
treatment effect from scanning the same gland twice. The true change comes from the phantom's truth table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from glandpet.cohort.change import TEST_RETEST_PCT
from workflow_run import snakemake

pytestmark = pytest.mark.slow

CONFIG = {"demo": {"subjects": 1, "seed": 3, "atlases": 1, "followups": 1}}
SESSIONS = ["psma", "fapi", "psma2", "fapi2"]
#: glands whose planted change is far above the phantom's noise (README "The phantom": small glands move
#: by up to +-0.3 with nothing planted)
CHANGED = ("parotid", "submandibular")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import yaml

    work = tmp_path_factory.mktemp("followup")
    (work / "config.yaml").write_text(yaml.safe_dump({"results": str(work / "results"), **CONFIG}))
    tables = work / "results" / "tables"
    snakemake(work, "--cores", "2", str(tables / "gland_change.parquet"), str(tables / "qc.parquet"))
    return work / "results"


def test_the_follow_ups_are_sessions_of_their_own(run):
    series = pd.read_parquet(run / "tables" / "series.parquet")
    pets = series[series["selected"].fillna(False).astype(bool) & (series["role"] == "pet_ac")]
    assert sorted(pets["session"]) == sorted(SESSIONS)
    days = dict(zip(pets["session"], pets["days_from_first_scan"]))
    assert days["psma2"] - days["psma"] > 150 and days["fapi2"] - days["fapi"] > 150
    cts = series[series["selected"].fillna(False).astype(bool) & (series["role"] == "ct")]
    assert sorted(cts["session"]) == sorted(SESSIONS)  # each PET with its own CT


def test_every_session_is_aligned_to_the_baseline_and_measured(run):
    sub = run / "sub-S001"
    for moving in ("fapi", "psma2", "fapi2"):
        for f in (f"sub-S001_from-{moving}_to-psma_xfm.mat", f"sub-S001_from-{moving}_to-psma_xfm.nii.gz",
                  f"sub-S001_from-{moving}_to-psma_invxfm.nii.gz"):
            assert (sub / f).is_file(), f
    qc = pd.read_parquet(run / "tables" / "qc.parquet")
    align = qc[qc["stage"] == "align"]
    assert sorted(align["session"]) == ["fapi", "fapi2", "psma2"] and set(align["status"]) == {"ok"}
    assert not (qc["status"] == "failed").any()
    gs = pd.read_parquet(run / "tables" / "gland_stats.parquet")
    assert sorted(gs["session"].unique()) == sorted(SESSIONS)
    assert dict(gs.groupby("session")["timepoint"].first()) == {"psma": 1, "fapi": 1, "psma2": 2, "fapi2": 2}
    assert gs["days_from_first_scan"].notna().all()
    # the baseline labels reach the follow-up through the alignment: the same glands, similar volumes
    vol = gs.pivot_table(index=["gland", "side"], columns="session", values="volume_ml")
    big = vol.loc[list(CHANGED)]
    assert np.allclose(big["psma2"], big["psma"], rtol=0.15), big


def test_the_index_per_time_point(run):
    gi = pd.read_parquet(run / "tables" / "gland_index.parquet")
    assert sorted(gi["timepoint"].unique()) == [1, 2]
    for t in (1, 2):
        part = gi[(gi["timepoint"] == t) & gi["gland"].isin(CHANGED)]
        assert part["psma_fapi_index"].notna().all()
        assert np.allclose(part["psma_fapi_index"], part["fapi_suv_mean"] / part["psma_suv_mean"])
        assert part.loc[part["gland"] == "parotid", "voxel_spearman_rho"].notna().all()


def test_gland_change_recovers_the_planted_change(run):
    truth = pd.read_parquet(run / "demo" / "truth" / "gland_truth.parquet")
    true = truth.pivot_table(index=["gland", "side"], columns="session", values="true_suv_mean")
    ch = pd.read_parquet(run / "tables" / "gland_change.parquet")
    assert set(ch["subject_id"]) == {"S001"} and set(ch["timepoint"]) == {2}
    assert (ch["days_from_baseline"] > 150).all()
    for family, sign in (("psma", +1), ("fapi", -1)):
        rows = ch[(ch["quantity"] == f"{family}_suv_mean") & ch["gland"].isin(CHANGED)]
        assert len(rows) == 2 * len(CHANGED)
        for r in rows.itertuples():
            planted = 100 * (true.loc[(r.gland, r.side), f"{family}2"] / true.loc[(r.gland, r.side), family] - 1)
            assert np.sign(r.change_pct) == sign == np.sign(planted)
            assert abs(r.change_pct - planted) <= TEST_RETEST_PCT, (family, r.gland, r.side, r.change_pct, planted)
            assert r.beyond_test_retest
    # the index: FAPI down and PSMA up make the FAPI/PSMA ratio fall
    idx = ch[(ch["quantity"] == "psma_fapi_index") & ch["gland"].isin(CHANGED)]
    assert len(idx) == 2 * len(CHANGED) and (idx["change_pct"] < -TEST_RETEST_PCT).all()


def test_cross_sectional_tables_count_the_subject_once(run):
    """The follow-ups are in gland_change, not in the cohort comparisons."""
    snakemake(run.parent, "--cores", "1", str(run / "tables" / "outcomes.parquet"))
    out = pd.read_parquet(run / "tables" / "outcomes.parquet")
    assert not out["session"].isin(["psma2", "fapi2"]).any()
    assert (out["n"].dropna() <= 1).all()  # one subject, counted once

"""gland_change: each follow-up against the same subject's baseline (glandpet.cohort.change), and the
index per time point (glandpet.measure.gland_index)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from glandpet.cohort.change import TEST_RETEST_PCT, gland_change_table, with_timepoints
from glandpet.measure.gland_index import gland_index_table, index_pairs
from glandpet.workflow.dag import reference_session


def _stats(values: dict[str, float], days: dict[str, int]) -> pd.DataFrame:
    rows = []
    for ses, v in values.items():
        for side in ("left", "right"):
            rows.append(dict(subject_id="S001", group="pss", session=ses, gland="parotid", side=side,
                             suv_mean=v, suv_max=2 * v, suv_mean_pvc=1.5 * v, suv_type="bw",
                             days_from_first_scan=days[ses]))
    return pd.DataFrame(rows)


def test_sessions_pair_by_time_point_and_the_reference_is_the_baseline():
    assert index_pairs(["psma", "fapi", "psma2", "fapi2", "psma3"]) == [(1, "psma", "fapi"), (2, "psma2", "fapi2")]
    assert index_pairs(["fapi", "psma2"]) == []
    assert reference_session(["fapi2", "psma2", "fapi"]) == "fapi"
    assert reference_session(["psma2", "fapi", "psma"]) == "psma"
    assert reference_session(["fapi2", "psma2"]) == "psma2"


def test_index_rows_per_time_point():
    gs = _stats({"psma": 10.0, "fapi": 4.0, "psma2": 12.5, "fapi2": 2.8}, {"psma": 0, "fapi": 1, "psma2": 180,
                                                                             "fapi2": 181})
    gi = gland_index_table(gs, "ratio", use_pvc=False)
    assert list(gi["timepoint"]) == [1, 1, 2, 2]
    base, follow = gi[gi["timepoint"] == 1], gi[gi["timepoint"] == 2]
    assert np.allclose(base["psma_fapi_index"], 4.0 / 10.0) and np.allclose(follow["psma_fapi_index"], 2.8 / 12.5)
    assert np.allclose(follow["psma_suv_mean"], 12.5) and np.allclose(follow["fapi_suv_mean"], 2.8)


def test_change_of_each_value_and_the_index_against_the_baseline():
    gs = _stats({"psma": 10.0, "fapi": 4.0, "psma2": 12.5, "fapi2": 3.8}, {"psma": 0, "fapi": 1, "psma2": 180,
                                                                             "fapi2": 181})
    gi = gland_index_table(gs, "ratio", use_pvc=False)
    ch = gland_change_table(gs, gi)
    left = ch[ch["side"] == "left"].set_index("quantity")
    assert set(left.index) == {"psma_suv_mean", "psma_suv_max", "psma_suv_mean_pvc", "fapi_suv_mean", "fapi_suv_max",
                               "fapi_suv_mean_pvc", "psma_fapi_index"}
    p = left.loc["psma_suv_mean"]
    assert (p["baseline_session"], p["followup_session"], p["timepoint"]) == ("psma", "psma2", 2)
    assert p["change_abs"] == pytest.approx(2.5) and p["change_pct"] == pytest.approx(25.0)
    assert p["days_from_baseline"] == 180 and bool(p["beyond_test_retest"])
    assert p["test_retest_pct"] == TEST_RETEST_PCT
    f = left.loc["fapi_suv_mean"]  # -5 %: within the test-retest variability
    assert f["change_pct"] == pytest.approx(-5.0) and not bool(f["beyond_test_retest"])
    assert f["days_from_baseline"] == 180
    i = left.loc["psma_fapi_index"]
    assert i["change_pct"] == pytest.approx(100 * (3.8 / 12.5 - 0.4) / 0.4)
    assert i["test_retest_pct"] == pytest.approx(TEST_RETEST_PCT * math.sqrt(2))
    assert pd.isna(i["baseline_session"]) and i["days_from_baseline"] == 180


def test_no_follow_up_no_rows_and_a_follow_up_without_baseline_has_none():
    gs = _stats({"psma": 10.0, "fapi": 4.0}, {"psma": 0, "fapi": 1})
    assert gland_change_table(gs, gland_index_table(gs, "ratio", use_pvc=False)).empty
    gs = _stats({"fapi": 4.0, "psma2": 12.5}, {"fapi": 0, "psma2": 180})  # no PSMA baseline to compare with
    ch = gland_change_table(gs, gland_index_table(gs, "ratio", use_pvc=False))
    assert ch.empty


def test_log_ratio_index_has_no_relative_change():
    gs = _stats({"psma": 10.0, "fapi": 4.0, "psma2": 12.5, "fapi2": 3.8}, {"psma": 0, "fapi": 1, "psma2": 180,
                                                                             "fapi2": 181})
    ch = gland_change_table(gs, gland_index_table(gs, "log_ratio", use_pvc=False))
    i = ch[ch["quantity"] == "psma_fapi_index"].iloc[0]
    assert i["change_abs"] == pytest.approx(math.log(3.8 / 12.5) - math.log(0.4))
    assert pd.isna(i["change_pct"]) and pd.isna(i["beyond_test_retest"]) and pd.isna(i["test_retest_pct"])


def test_timepoints_from_session_names():
    df = with_timepoints(pd.DataFrame({"session": ["psma", "fapi2", "psma10"]}))
    assert list(df["timepoint"]) == [1, 2, 10]

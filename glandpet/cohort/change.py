"""Change between time points: each follow-up scan against the same subject's baseline (`gland_change`).

A subject scanned again after treatment has follow-up sessions (``psma2``, ``fapi2``, ...;
:func:`glandpet.layout.session_parts`), each aligned to the subject's baseline CT and measured with the
baseline's labels carried through that alignment. For every gland and side present at both time points,
:func:`gland_change_table` gives the change of

* each tracer's SUVmean, SUVmax and SUVmean after PVC (``psma_suv_mean``, ``fapi_suv_max``, ...), follow-up
  session against the baseline session of the same tracer;
* the PSMA/FAPI index (``psma_fapi_index``), time point against time point (both tracers at each);

as ``change_abs`` (follow-up - baseline) and ``change_pct`` (relative to the baseline), and compares
``|change_pct|`` with a test-retest variability (``beyond_test_retest``). The reference is the ~10 %
test-retest variability of [68Ga]Ga-PSMA-11 parotid uptake reported by olde Heuvel et al. 2020
(:data:`TEST_RETEST_PCT`): a change within it is not distinguishable from scanning the same gland twice.
No repeatability of FAPI uptake in salivary glands is published: FAPI rows use the same figure, and say
so (``test_retest_source``). The ratio index combines two scans of that variability, so its reference is
their quadrature sum (~14 %); the ``log_ratio`` and ``z_diff`` indices have no meaningful relative change
(they cross zero), so only their absolute change is given.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from glandpet.layout import session_parts

__all__ = ["TEST_RETEST_PCT", "TEST_RETEST_REFERENCE", "SUV_QUANTITIES", "gland_change_table", "with_timepoints"]

#: Test-retest variability (%) of PSMA-11 parotid SUV: the reference a change is compared with.
TEST_RETEST_PCT = 10.0
TEST_RETEST_REFERENCE = ("~10 % test-retest variability of [68Ga]Ga-PSMA-11 parotid uptake "
                         "(olde Heuvel et al. 2020)")
#: The per-session values whose change is given (`gland_stats` columns).
SUV_QUANTITIES: tuple[str, ...] = ("suv_mean", "suv_max", "suv_mean_pvc")
_SOURCES = {
    "psma": "olde Heuvel et al. 2020: PSMA-11 parotid SUV test-retest ~10 %",
    "fapi": "assumed equal to PSMA-11's (olde Heuvel et al. 2020): no published FAPI test-retest of the glands",
    "index": "two scans of ~10 % each (olde Heuvel et al. 2020), in quadrature: the ratio's relative variability",
}


def with_timepoints(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (rows with a ``session``) with ``timepoint`` set from the session name when absent or
    null (``psma`` -> 1, ``fapi2`` -> 2)."""
    out = table.copy()
    from_names = pd.Series([session_parts(s)[1] for s in out["session"]], index=out.index, dtype="Int64")
    if "timepoint" in out.columns:
        out["timepoint"] = pd.to_numeric(out["timepoint"], errors="coerce").astype("Int64").fillna(from_names)
    else:
        out["timepoint"] = from_names
    return out


def _pct(change: np.ndarray, base: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(base) & (base > 0), 100.0 * change / base, np.nan)


def _rows(base: pd.DataFrame, follow: pd.DataFrame, keys: list[str], value: str, quantity: str, reference: float | None,
          source: str | None, relative: bool = True) -> pd.DataFrame:
    """One row per follow-up with a baseline of the same keys."""
    b = base[keys + [value] + [c for c in ("session", "day") if c in base.columns]]
    b = b.rename(columns={value: "baseline_value", "session": "baseline_session", "day": "baseline_day"})
    f = follow[keys + ["timepoint", value] + [c for c in ("session", "day", "group", "suv_type") if c in follow.columns]]
    f = f.rename(columns={value: "followup_value", "session": "followup_session", "day": "followup_day"})
    m = f.merge(b, on=keys, how="inner")
    if m.empty:
        return m
    bv = pd.to_numeric(m["baseline_value"], errors="coerce").to_numpy(float)
    fv = pd.to_numeric(m["followup_value"], errors="coerce").to_numpy(float)
    m["baseline_value"], m["followup_value"] = bv, fv
    m["change_abs"] = fv - bv
    m["change_pct"] = _pct(m["change_abs"].to_numpy(float), bv) if relative else np.nan
    m["quantity"] = quantity
    m["test_retest_pct"] = reference if relative and reference is not None else np.nan
    m["test_retest_source"] = source if relative else None
    pct = m["change_pct"].to_numpy(float)
    beyond = pd.array([None if not np.isfinite(p) or not relative else bool(abs(p) > reference) for p in pct],
                      dtype="boolean")
    m["beyond_test_retest"] = beyond
    if "followup_day" in m.columns and "baseline_day" in m.columns:
        m["days_from_baseline"] = (pd.to_numeric(m["followup_day"], errors="coerce")
                                   - pd.to_numeric(m["baseline_day"], errors="coerce")).astype("Int64")
    return m


def gland_change_table(gland_stats: pd.DataFrame, gland_index: pd.DataFrame | None = None, *,
                       test_retest_pct: float = TEST_RETEST_PCT) -> pd.DataFrame:
    """The `gland_change` rows (see the module docstring) from the cohort's `gland_stats` (``session``,
    and ``days_from_first_scan`` for the interval when present) and `gland_index` (``timepoint``,
    ``psma_fapi_index``, ``index_definition``). No follow-up: no rows."""
    cols = ["subject_id", "group", "gland", "side", "quantity", "baseline_session", "followup_session", "timepoint",
            "days_from_baseline", "baseline_value", "followup_value", "change_abs", "change_pct", "test_retest_pct",
            "test_retest_source", "beyond_test_retest", "suv_type"]
    parts = []
    gs = with_timepoints(pd.DataFrame(gland_stats))
    gs["family"] = [session_parts(s)[0] for s in gs["session"]]
    if "days_from_first_scan" in gs.columns:
        gs["day"] = pd.to_numeric(gs["days_from_first_scan"], errors="coerce")
    base, follow = gs[gs["timepoint"] == 1], gs[gs["timepoint"] > 1]
    keys = ["subject_id", "family", "gland", "side"]
    for family in ("psma", "fapi"):
        b, f = base[base["family"] == family], follow[follow["family"] == family]
        if f.empty:
            continue
        for value in SUV_QUANTITIES:
            if value in gs.columns:
                parts.append(_rows(b, f, keys, value, f"{family}_{value}", test_retest_pct, _SOURCES[family]))
    if gland_index is not None and len(gland_index) and "timepoint" in gland_index.columns:
        gi = pd.DataFrame(gland_index).copy()
        gi["timepoint"] = pd.to_numeric(gi["timepoint"], errors="coerce").astype("Int64").fillna(1)
        if "day" in gs.columns:  # a time point's day: its PSMA scan's, else its FAPI scan's
            days = (gs.sort_values("family", key=lambda s: s.map({"psma": 0, "fapi": 1}))
                    .drop_duplicates(["subject_id", "timepoint"])[["subject_id", "timepoint", "day"]])
            gi = gi.merge(days, on=["subject_id", "timepoint"], how="left")
        # a time point without both tracers has no index: nothing to compare
        gi = gi[np.isfinite(pd.to_numeric(gi["psma_fapi_index"], errors="coerce").to_numpy(float))]
        b, f = gi[gi["timepoint"] == 1], gi[gi["timepoint"] > 1]
        if not f.empty:
            ratio = set(gi.get("index_definition", pd.Series(["ratio"])).dropna()) <= {"ratio"}
            parts.append(_rows(b, f, ["subject_id", "gland", "side"], "psma_fapi_index", "psma_fapi_index",
                               test_retest_pct * math.sqrt(2.0), _SOURCES["index"], relative=ratio))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)
    out = out.reindex(columns=cols)
    out["timepoint"] = out["timepoint"].astype("Int64")
    return out.sort_values(["subject_id", "gland", "side", "quantity", "timepoint"], kind="stable").reset_index(drop=True)

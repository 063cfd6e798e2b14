"""Cohort statistics on the `gland_stats` / `gland_index` tables, and fast aggregation of per-subject tables.

Every function takes a pandas DataFrame (as read from the Parquet tables) and returns a tidy
DataFrame (one row per gland [x side] [x group / clinical variable]). Work is vectorised with
groupby; the only Python loops run over the handful of glands (one test per gland).

Choices
-------
* **Sides**: the left and right glands of one subject are not independent observations. By
  default (``combine_sides=True``) each subject contributes one value per gland, the mean of its
  available sides; ``combine_sides=False`` analyses each side separately (a ``side`` column).
* **p-values** are permutation p-values, two-sided, never 0: **exact** (every permutation
  enumerated; the observed one counts) when there are at most :data:`EXACT_MAX_PERMUTATIONS`
  (Spearman: n <= 8 subjects; Mann-Whitney: C(n1 + n2, n1), e.g. 9 vs 9), otherwise from
  :data:`N_PERMUTATIONS` seeded random permutations as ``(1 + #{as extreme}) / (N + 1)`` (so
  p >= 1e-4). Ties are handled by the mid-ranks of the observed data, which the permutations
  keep. The t / normal approximations are wrong at the n of a gland study (rho = -1 at n = 4
  gave p = 0; the exact p is 2 / 4! = 0.083). See :func:`spearman_test`, :func:`mann_whitney_test`.
* **Group comparison** (:func:`compare_groups`): two-sided Mann-Whitney U, ``u_statistic`` is U
  of the pSS sample, effect size the rank-biserial correlation ``r = 2 U / (n_pss n_control) - 1``
  (positive: pSS higher; +1 every pSS value above every control value).
* **PSMA vs FAPI correlation** (:func:`psma_fapi_correlation`): Spearman rho across subjects of
  one group (pSS by default), its permutation p, and a percentile bootstrap 95 % CI (``n_boot``
  resamples of subjects, seeded per gland from ``seed`` and the gland name, so a gland's CI does
  not depend on which other glands are in the table). Resamples with a constant variable are
  dropped from the percentile. Fewer than 3 subjects: NaN.
* **Clinical associations** (:func:`clinical_associations`): Spearman rho and permutation p of a gland value
  against each clinical column present (``essdai, esspri, usf_ml_min, schirmer_mm`` by default),
  no multiplicity correction (``n_tests`` reported). The workflow uses :func:`registered_outcomes`
  instead.
* **Registered outcomes** (:func:`registered_outcomes`, table `outcomes`): every gland x value
  (per session SUVmax, SUVmean, SUVmean after PVC; the index) against the group and against every
  declared clinical variable by its type (Spearman + bootstrap CI; Mann-Whitney by status with the
  rank-biserial r and its CI; Kruskal-Wallis, :func:`kruskal_wallis_test`). The primary family
  (:data:`FAMILY_DEFINITION`) stands apart; q-values are Benjamini-Hochberg per family
  (:func:`bh_qvalues`).
* **Diagnostic value** (:func:`diagnostic_table`, table `diagnostic`): ROC AUC with a stratified
  bootstrap CI, Youden cut-off, sensitivity and specificity, per gland and for the
  parotid+submandibular mean, of the index and of PSMA / FAPI SUVmean alone.
* **Results table** (:func:`results_table`): median (IQR) per group, the group effect with CI, p, q.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from glandpet.glands import SESSIONS  # the tracer families, also the baseline sessions
from glandpet.rng import keyed_rng

CLINICAL_COLUMNS: tuple[str, ...] = ("essdai", "esspri", "usf_ml_min", "schirmer_mm")
GROUPS: tuple[str, str] = ("pss", "control")
#: Up to this many permutations a p-value is exact (all enumerated): 8! = 40320, C(18, 9) = 48620.
EXACT_MAX_PERMUTATIONS: int = 50_000
#: Random permutations beyond the exact range (p >= 1 / (N + 1) = 1e-4).
N_PERMUTATIONS: int = 9_999


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _require(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}")


def subject_values(
    df: pd.DataFrame, values: Sequence[str], *, combine_sides: bool = True, extra_keys: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per subject x gland (x side unless ``combine_sides``): the mean of ``values`` over sides.

    Nulls are skipped (a subject with one measurable side keeps that side's value).
    """
    keys = ["subject_id", "group", *extra_keys, "gland"] + ([] if combine_sides else ["side"])
    _require(df, keys + list(values), "table")
    d = df[keys + list(values)].copy()
    for v in values:
        d[v] = pd.to_numeric(d[v], errors="coerce").astype(float)
    return d.groupby(keys, sort=True, dropna=False, observed=True)[list(values)].mean().reset_index()


def _unit_keys(combine_sides: bool) -> list[str]:
    return ["gland"] if combine_sides else ["gland", "side"]


def _rank_rows(a: np.ndarray) -> np.ndarray:
    return stats.rankdata(a, axis=1, method="average")


def bootstrap_spearman_ci(
    x: np.ndarray, y: np.ndarray, *, n_boot: int = 2000, ci: float = 0.95, rng: np.random.Generator | int | None = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of Spearman rho (vectorised over resamples)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = x.size
    if n < 3:
        return float("nan"), float("nan")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    idx = rng.integers(0, n, size=(int(n_boot), n))
    rx = _rank_rows(x[idx])
    ry = _rank_rows(y[idx])
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)
    return _percentile_ci(rho, ci)


def _perm_seed(seed: int, key: tuple) -> np.random.Generator:
    """The permutation stream of one test (apart from the bootstrap's, which keeps its CIs)."""
    return keyed_rng(seed, "permutation", *key)


def _p_from_null(null: np.ndarray, observed: float, exact: bool) -> float:
    """Two-sided p: share of the null distribution of a centred statistic at least as extreme."""
    tol = 1e-9 * max(abs(observed), 1.0)
    k = int(np.count_nonzero(np.abs(null) >= abs(observed) - tol))
    return k / null.size if exact else (k + 1) / (null.size + 1)


def spearman_test(
    x: np.ndarray, y: np.ndarray, *, rng: np.random.Generator | int | None = 0, n_perm: int = N_PERMUTATIONS
) -> tuple[float, float]:
    """Spearman rho and its two-sided permutation p (exact up to :data:`EXACT_MAX_PERMUTATIONS`
    orderings, i.e. n <= 8; else ``n_perm`` seeded random permutations). NaN when n < 3 or a
    variable is constant."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = x.size
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rx = stats.rankdata(x) - (n + 1) / 2.0
    ry = stats.rankdata(y) - (n + 1) / 2.0
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    rho = float((rx * ry).sum() / den)
    exact = math.factorial(n) <= EXACT_MAX_PERMUTATIONS
    if exact:
        perms = np.array(list(itertools.permutations(range(n))), dtype=np.intp)
    else:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        perms = rng.permuted(np.tile(np.arange(n), (int(n_perm), 1)), axis=1)
    null = (ry[perms] @ rx) / den
    return float(np.clip(rho, -1.0, 1.0)), _p_from_null(null, rho, exact)


def mann_whitney_test(
    a: np.ndarray, b: np.ndarray, *, rng: np.random.Generator | int | None = 0, n_perm: int = N_PERMUTATIONS
) -> tuple[float, float]:
    """Mann-Whitney U of sample ``a`` and its two-sided permutation p: every split of the pooled
    mid-ranks into groups of the two sizes when there are at most :data:`EXACT_MAX_PERMUTATIONS`,
    else ``n_perm`` seeded random splits. NaN when a sample is empty."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return float("nan"), float("nan")
    ranks = stats.rankdata(np.r_[a, b])
    offset = n1 * (n1 + 1) / 2.0
    u = float(ranks[:n1].sum() - offset)
    centre = n1 * n2 / 2.0
    exact = math.comb(n1 + n2, n1) <= EXACT_MAX_PERMUTATIONS
    if exact:
        idx = np.array(list(itertools.combinations(range(n1 + n2), n1)), dtype=np.intp)
        null_u = ranks[idx].sum(axis=1) - offset
    else:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        perm = rng.permuted(np.tile(ranks, (int(n_perm), 1)), axis=1)
        null_u = perm[:, :n1].sum(axis=1) - offset
    return u, _p_from_null(null_u - centre, u - centre, exact)


# --------------------------------------------------------------------------------------------
# analyses
# --------------------------------------------------------------------------------------------
def compare_groups(
    gland_stats: pd.DataFrame,
    *,
    session: str | None = "fapi",
    value: str = "suv_mean",
    groups: tuple[str, str] = GROUPS,
    combine_sides: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """pSS vs control per gland: Mann-Whitney U, permutation p, rank-biserial effect size, n and
    median per group (``seed``: the random permutations beyond the exact range, per gland).

    ``gland_stats``: the `gland_stats` table (filtered to ``session`` when given; pass
    ``session=None`` for a table with no session column, e.g. `gland_index` values).
    """
    df = gland_stats
    if session is not None:
        _require(df, ["session"], "gland_stats")
        df = df[df["session"] == session]
    sv = subject_values(df, [value], combine_sides=combine_sides)
    sv = sv[sv["group"].isin(groups) & sv[value].notna()]
    g1, g2 = groups
    unit = _unit_keys(combine_sides)
    summ = (
        sv.groupby(unit + ["group"], observed=True)[value].agg(["count", "median"]).unstack("group")
        if len(sv)
        else pd.DataFrame()
    )
    rows = []
    for key, part in sv.groupby(unit, sort=True, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        a = part.loc[part["group"] == g1, value].to_numpy()
        b = part.loc[part["group"] == g2, value].to_numpy()
        u = p = r = np.nan
        if a.size and b.size:
            u, p = mann_whitney_test(a, b, rng=_perm_seed(seed, key))
            r = 2.0 * u / (a.size * b.size) - 1.0
        rows.append(dict(zip(unit, key), u_statistic=u, p_value=p, rank_biserial=r))
    out = pd.DataFrame(rows, columns=unit + ["u_statistic", "p_value", "rank_biserial"])
    for g in groups:
        n = summ[("count", g)] if ("count", g) in summ.columns else pd.Series(dtype=float)
        m = summ[("median", g)] if ("median", g) in summ.columns else pd.Series(dtype=float)
        ext = pd.DataFrame({f"n_{g}": n, f"median_{g}": m}).reset_index() if len(n) else pd.DataFrame(columns=unit + [f"n_{g}", f"median_{g}"])
        out = out.merge(ext, on=unit, how="left")
        out[f"n_{g}"] = pd.to_numeric(out[f"n_{g}"]).fillna(0).astype("int64")
    out.insert(len(unit), "session", session)
    out.insert(len(unit) + 1, "value", value)
    cols = unit + ["session", "value", f"n_{g1}", f"n_{g2}", f"median_{g1}", f"median_{g2}", "u_statistic", "p_value", "rank_biserial"]
    return out[cols]


#: ``analysis`` of :func:`psma_fapi_correlation`'s rows in the `cohort_stats` table (long form: one row per gland,
#: group and statistic: n, rho, p_value, ci_low, ci_high, n_boot); the ``psma_vs_fapi`` figure reads them there.
PSMA_FAPI_ANALYSIS = "psma_vs_fapi_spearman"


def psma_fapi_correlation(
    gland_index: pd.DataFrame,
    *,
    group: str | None = "pss",
    x: str = "psma_suv_mean",
    y: str = "fapi_suv_mean",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    combine_sides: bool = True,
) -> pd.DataFrame:
    """Spearman rho of PSMA vs FAPI SUVmean across subjects (of ``group``; None: everyone), per gland.

    Columns: gland [side], group, n, rho, p_value, ci_low, ci_high, n_boot. Subjects lacking
    either value are left out.
    """
    sv = subject_values(gland_index, [x, y], combine_sides=combine_sides)
    if group is not None:
        sv = sv[sv["group"] == group]
    sv = sv[sv[x].notna() & sv[y].notna()]
    unit = _unit_keys(combine_sides)
    rows = []
    for key, part in sv.groupby(unit, sort=True, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        a, b = part[x].to_numpy(), part[y].to_numpy()
        n = a.size
        rho = p = lo = hi = np.nan
        if n >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
            rho, p = spearman_test(a, b, rng=_perm_seed(seed, key))
            lo, hi = bootstrap_spearman_ci(a, b, n_boot=n_boot, ci=ci, rng=keyed_rng(seed, *key))
        rows.append(dict(zip(unit, key), group=group if group is not None else "all", n=n, rho=rho, p_value=p, ci_low=lo, ci_high=hi, n_boot=int(n_boot)))
    return pd.DataFrame(rows, columns=unit + ["group", "n", "rho", "p_value", "ci_low", "ci_high", "n_boot"])


def index_by_group(
    gland_index: pd.DataFrame, *, value: str = "psma_fapi_index", combine_sides: bool = True
) -> pd.DataFrame:
    """Distribution of the index per gland and group: n, median, q1, q3, iqr (nulls skipped)."""
    sv = subject_values(gland_index, [value], combine_sides=combine_sides)
    sv = sv[sv[value].notna()]
    keys = _unit_keys(combine_sides) + ["group"]
    g = sv.groupby(keys, sort=True, observed=True)[value]
    q = g.quantile([0.25, 0.5, 0.75]).unstack()
    out = pd.DataFrame({"n": g.count(), "median": q[0.5], "q1": q[0.25], "q3": q[0.75]}) if len(sv) else pd.DataFrame(columns=["n", "median", "q1", "q3"])
    out["iqr"] = out["q3"] - out["q1"]
    out = out.reset_index() if len(sv) else pd.DataFrame(columns=keys + ["n", "median", "q1", "q3", "iqr"])
    out.insert(len(keys), "value", value)
    out["n"] = out["n"].astype("int64")
    return out


def clinical_associations(
    table: pd.DataFrame,
    subjects: pd.DataFrame | None = None,
    *,
    value: str = "psma_fapi_index",
    clinical: Sequence[str] = CLINICAL_COLUMNS,
    group: str | None = "pss",
    session: str | None = None,
    combine_sides: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman rho (permutation p, see the module notes) of a gland value against each clinical
    column present, per gland.

    ``table``: `gland_index` (default value: the index) or `gland_stats` (give ``session`` and e.g.
    ``value='suv_mean'``). ``subjects``: the subject sheet (``subject_id`` + clinical columns);
    None if ``table`` already carries them. Clinical columns absent from both are skipped; an
    empty DataFrame comes back when none is present. Columns: gland [side], clinical, group, n,
    rho, p_value, n_tests.
    """
    df = table
    if session is not None:
        _require(df, ["session"], "table")
        df = df[df["session"] == session]
    src = subjects if subjects is not None else df
    present = [c for c in clinical if c in src.columns]
    unit = _unit_keys(combine_sides)
    cols = unit + ["clinical", "group", "n", "rho", "p_value", "n_tests"]
    if not present:
        return pd.DataFrame(columns=cols)
    sv = subject_values(df, [value], combine_sides=combine_sides)
    if subjects is not None:
        _require(subjects, ["subject_id"], "subject sheet")
        clin = subjects[["subject_id", *present]].drop_duplicates("subject_id")
    else:
        clin = df[["subject_id", *present]].drop_duplicates("subject_id")
    sv = sv.merge(clin, on="subject_id", how="left")
    if group is not None:
        sv = sv[sv["group"] == group]
    long = sv.melt(id_vars=unit + ["subject_id", value], value_vars=present, var_name="clinical", value_name="clinical_value")
    long["clinical_value"] = pd.to_numeric(long["clinical_value"], errors="coerce")
    long = long[long[value].notna() & long["clinical_value"].notna()]
    rows = []
    for key, part in long.groupby(unit + ["clinical"], sort=True, observed=True):
        a, b = part[value].to_numpy(float), part["clinical_value"].to_numpy(float)
        rho = p = np.nan
        if a.size >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
            rho, p = spearman_test(a, b, rng=_perm_seed(seed, key if isinstance(key, tuple) else (key,)))
        rows.append(dict(zip(unit + ["clinical"], key), group=group if group is not None else "all", n=int(a.size), rho=rho, p_value=p))
    out = pd.DataFrame(rows, columns=unit + ["clinical", "group", "n", "rho", "p_value"])
    out["n_tests"] = int(out["rho"].notna().sum())
    return out[cols]


# --------------------------------------------------------------------------------------------
# the study's registered outcomes (issue 19): typed clinical variables, multiplicity, diagnosis
# --------------------------------------------------------------------------------------------
#: Gland values analysed per session (`gland_stats`), and the index (`gland_index`, no session).
SESSION_VALUES: tuple[str, ...] = ("suv_max", "suv_mean", "suv_mean_pvc")
INDEX_VALUE = "psma_fapi_index"


def baseline(table: pd.DataFrame) -> pd.DataFrame:
    """The baseline rows of `gland_stats` (sessions ``psma``, ``fapi``) or `gland_index` (``timepoint``
    1): the cross-sectional analyses (groups, clinical variables, diagnosis, figures) compare subjects
    at one time point; follow-up scans (``psma2``, ...) go to `gland_change` instead."""
    if "timepoint" in table.columns:
        return table[pd.to_numeric(table["timepoint"], errors="coerce").fillna(1) == 1]
    if "session" in table.columns:
        return table[table["session"].isin(SESSIONS)]
    return table


#: The pre-specified primary outcome: parotid SUVmax and SUVmean, pSS vs control, per tracer.
PRIMARY_GLAND = "parotid"
PRIMARY_VALUES: tuple[str, ...] = ("suv_max", "suv_mean")
#: Family definitions, stored in the outcome table's Parquet metadata.
FAMILY_DEFINITION = {
    "primary": "parotid SUVmax and SUVmean, pSS vs control, one test per tracer session (psma, fapi); "
               "pre-specified; q_value = Benjamini-Hochberg within these tests",
    "secondary": "every other test of the table as one family: pSS vs control for every other gland x value "
                 "(SUVmax, SUVmean, SUVmean after PVC per session; the PSMA/FAPI index), and every gland x value "
                 "against every declared clinical variable present in the sheet (within pSS subjects); "
                 "q_value = Benjamini-Hochberg over the family's tests with a p-value",
}


def bh_qvalues(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of one family; NaN p stay NaN and do not count.
    q >= p, monotone in p, capped at 1."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv, kind="stable")
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = np.maximum(out, pv)
    return q


def _bootstrap_auc(a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """U / (n_a n_b) (probability a > b, ties half) of ``n_boot`` resamples drawn within each sample."""
    n1, n2 = a.size, b.size
    ra = a[rng.integers(0, n1, size=(int(n_boot), n1))]
    rb = b[rng.integers(0, n2, size=(int(n_boot), n2))]
    ranks = _rank_rows(np.concatenate([ra, rb], axis=1))
    return (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n2)


def _percentile_ci(x: np.ndarray, ci: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(x, [a, 1.0 - a])
    return float(lo), float(hi)


def rank_biserial_test(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, ci: float = 0.95, seed_key: tuple = (), seed: int = 0
) -> dict:
    """Mann-Whitney U of ``a`` vs ``b`` (permutation p of :func:`mann_whitney_test`), the rank-biserial
    r = 2U/(n_a n_b) - 1 (positive: ``a`` higher) and its percentile bootstrap CI (resampling within
    each sample). NaN when a sample is empty; CI NaN when a sample has one value."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    out = dict(statistic=np.nan, effect=np.nan, ci_low=np.nan, ci_high=np.nan, p_value=np.nan)
    if a.size == 0 or b.size == 0:
        return out
    u, p = mann_whitney_test(a, b, rng=_perm_seed(seed, seed_key))
    out.update(statistic=u, effect=2.0 * u / (a.size * b.size) - 1.0, p_value=p)
    if a.size >= 2 and b.size >= 2:
        boot = 2.0 * _bootstrap_auc(a, b, n_boot, keyed_rng(seed, *seed_key)) - 1.0
        out["ci_low"], out["ci_high"] = _percentile_ci(boot, ci)
    return out


def kruskal_wallis_test(
    values: np.ndarray, labels: Sequence, *, rng: np.random.Generator | int | None = 0, n_perm: int = N_PERMUTATIONS
) -> tuple[float, float, float]:
    """Kruskal-Wallis H (tie-corrected) across the categories of ``labels``, its permutation p (the
    labels permuted over the mid-ranks: every assignment when there are at most
    :data:`EXACT_MAX_PERMUTATIONS`, else ``n_perm`` seeded ones; never 0), and the effect size
    epsilon-squared = H / (n - 1). NaN with fewer than 2 categories or constant values."""
    x = np.asarray(values, dtype=float)
    lab = pd.Series(list(labels)).astype(str).to_numpy()
    cats, codes = np.unique(lab, return_inverse=True)
    n = x.size
    if cats.size < 2 or n < 3 or np.ptp(x) == 0:
        return float("nan"), float("nan"), float("nan")
    r = stats.rankdata(x)
    counts = np.bincount(codes, minlength=cats.size).astype(float)
    _, t = np.unique(x, return_counts=True)
    tie = 1.0 - float((t ** 3 - t).sum()) / (n ** 3 - n)

    def h_of(code_rows: np.ndarray) -> np.ndarray:  # rows of group codes -> H per row
        sums = np.stack([(r[None, :] * (code_rows == k)).sum(axis=1) for k in range(cats.size)], axis=1)
        return (12.0 / (n * (n + 1)) * (sums ** 2 / counts).sum(axis=1) - 3.0 * (n + 1)) / tie

    h = float(h_of(codes[None, :])[0])
    n_assign = math.factorial(n)
    for c in counts:
        n_assign //= math.factorial(int(c))
    exact = n_assign <= EXACT_MAX_PERMUTATIONS
    if exact:
        rows = []

        def place(free: tuple, k: int, cur: np.ndarray) -> None:
            if k == cats.size - 1:
                c = cur.copy()
                c[list(free)] = k
                rows.append(c)
                return
            for pick in itertools.combinations(free, int(counts[k])):
                c = cur.copy()
                c[list(pick)] = k
                place(tuple(i for i in free if i not in pick), k + 1, c)

        place(tuple(range(n)), 0, np.zeros(n, dtype=np.intp))
        null = h_of(np.array(rows))
    else:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        null = h_of(rng.permuted(np.tile(codes, (int(n_perm), 1)), axis=1))
    return h, _p_from_null(null, h, exact), h / (n - 1)


def _gland_values(gland_stats: pd.DataFrame | None, gland_index: pd.DataFrame | None) -> pd.DataFrame:
    """Long frame: subject_id, group, gland, session (None for the index), value (name), x (the
    subject's mean of its available sides)."""
    parts = []
    if gland_stats is not None and len(gland_stats):
        vals = [v for v in SESSION_VALUES if v in gland_stats.columns]
        sv = subject_values(gland_stats, vals, extra_keys=["session"])
        parts.append(sv.melt(id_vars=["subject_id", "group", "session", "gland"], value_vars=vals,
                             var_name="value", value_name="x"))
    if gland_index is not None and len(gland_index) and INDEX_VALUE in gland_index.columns:
        sv = subject_values(gland_index, [INDEX_VALUE])
        sv.insert(2, "session", None)
        parts.append(sv.melt(id_vars=["subject_id", "group", "session", "gland"], value_vars=[INDEX_VALUE],
                             var_name="value", value_name="x"))
    cols = ["subject_id", "group", "session", "gland", "value", "x"]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)[cols]
    out["session"] = out["session"].astype(object).where(out["session"].notna(), None)
    return out[out["x"].notna()]


_OUTCOME_COLS = ["family", "analysis", "gland", "session", "value", "variable", "variable_type", "subjects", "test",
                 "n", "n_a", "n_b", "label_a", "label_b", "effect_name", "effect", "ci_low", "ci_high", "statistic",
                 "p_value", "q_value", "n_boot"]


def registered_outcomes(
    gland_stats: pd.DataFrame | None,
    gland_index: pd.DataFrame | None,
    subjects: pd.DataFrame | None = None,
    clinical: Mapping[str, str] | None = None,
    *,
    clinical_group: str | None = "pss",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Every registered outcome test, one row each (tidy long form, table `outcomes`).

    Units: subjects (the mean of a gland's available sides). Values: per session SUVmax, SUVmean and
    SUVmean after PVC, and the PSMA/FAPI index, per gland.

    * ``analysis = group_comparison``: pSS (a) vs control (b), Mann-Whitney U with the rank-biserial
      r (positive: pSS higher) and its bootstrap CI. Parotid SUVmax and SUVmean are the ``primary``
      family, every other comparison ``secondary``.
    * ``analysis = clinical_association`` (``secondary``), every value against every declared clinical
      variable present in ``subjects`` with at least one value, within ``clinical_group`` subjects:
      continuous and ordinal: Spearman rho with its bootstrap CI (``statistic`` = rho); binary:
      Mann-Whitney by status, a = positive, b = negative, rank-biserial r (positive: higher value in
      the positive subjects) with its CI; categorical: Kruskal-Wallis H, effect epsilon-squared (no CI).

    p-values are the permutation p-values of this module (exact for small samples, never 0); q-values
    are Benjamini-Hochberg within each family. Returns (table, notes): notes holds the family
    definitions, the declared clinical columns absent from the sheet (not analysed) and those
    present but empty.
    """
    from glandpet.study.subjects import DEFAULT_CLINICAL

    clinical = dict(DEFAULT_CLINICAL if clinical is None else clinical)
    long = _gland_values(gland_stats, gland_index)
    rows: list[dict] = []
    ci_kw = dict(n_boot=n_boot, ci=ci, seed=seed)
    # group comparisons
    for (gland, session, value), part in long.groupby(["gland", "session", "value"], sort=True, dropna=False):
        session = session if isinstance(session, str) else None
        a = part.loc[part["group"] == "pss", "x"].to_numpy(float)
        b = part.loc[part["group"] == "control", "x"].to_numpy(float)
        res = rank_biserial_test(a, b, seed_key=("group", gland, session, value), **ci_kw)
        primary = gland == PRIMARY_GLAND and value in PRIMARY_VALUES and session in SESSIONS
        rows.append(dict(family="primary" if primary else "secondary", analysis="group_comparison", gland=gland,
                         session=session, value=value, variable="group", variable_type="group",
                         subjects="pss_vs_control", test="mann_whitney", n=a.size + b.size, n_a=a.size, n_b=b.size,
                         label_a="pss", label_b="control", effect_name="rank_biserial", **res))
    # clinical associations
    notes = {"clinical_declared": clinical, "clinical_absent": [], "clinical_empty": []}
    if subjects is not None:
        _require(subjects, ["subject_id"], "subject sheet")
        present = []
        for col in clinical:
            if col not in subjects.columns:
                notes["clinical_absent"].append(col)
            elif subjects[col].notna().any():
                present.append(col)
            else:
                notes["clinical_empty"].append(col)
        clin = subjects[["subject_id", *present]].drop_duplicates("subject_id")
        sub = long if clinical_group is None else long[long["group"] == clinical_group]
        sub = sub.merge(clin, on="subject_id", how="left")
        for (gland, session, value), part in sub.groupby(["gland", "session", "value"], sort=True, dropna=False):
            session = session if isinstance(session, str) else None
            for col in present:
                kind = clinical[col]
                d = part[part[col].notna()]
                x = d["x"].to_numpy(float)
                key = ("clinical", gland, session, value, col)
                row = dict(family="secondary", analysis="clinical_association", gland=gland, session=session,
                           value=value, variable=col, variable_type=kind,
                           subjects=clinical_group if clinical_group is not None else "all", n=int(x.size))
                if kind in ("continuous", "ordinal"):
                    y = pd.to_numeric(d[col], errors="coerce").to_numpy(float)
                    rho = p = lo = hi = np.nan
                    if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                        rho, p = spearman_test(x, y, rng=_perm_seed(seed, key))
                        lo, hi = bootstrap_spearman_ci(x, y, n_boot=n_boot, ci=ci, rng=keyed_rng(seed, *key))
                    row.update(test="spearman", effect_name="spearman_rho", effect=rho, ci_low=lo, ci_high=hi,
                               statistic=rho, p_value=p)
                elif kind == "binary":
                    status = d[col].astype(bool).to_numpy()
                    res = rank_biserial_test(x[status], x[~status], seed_key=key, **ci_kw)
                    row.update(test="mann_whitney", effect_name="rank_biserial", n_a=int(status.sum()),
                               n_b=int((~status).sum()), label_a="positive", label_b="negative", **res)
                else:
                    h, p, eps = kruskal_wallis_test(x, d[col].to_numpy(), rng=_perm_seed(seed, key))
                    row.update(test="kruskal_wallis", effect_name="epsilon_squared", effect=eps, statistic=h,
                               p_value=p, label_a=",".join(sorted(map(str, d[col].unique()))))
                rows.append(row)
    out = pd.DataFrame(rows, columns=_OUTCOME_COLS)
    out["n_boot"] = int(n_boot)
    for fam in ("primary", "secondary"):
        m = out["family"] == fam
        out.loc[m, "q_value"] = bh_qvalues(out.loc[m, "p_value"].to_numpy(float))
    for c in ("n", "n_a", "n_b"):
        out[c] = pd.to_numeric(out[c]).astype("Int64")
    notes["families"] = FAMILY_DEFINITION
    notes["n_tests"] = {f: int(out.loc[out["family"] == f, "p_value"].notna().sum()) for f in ("primary", "secondary")}
    notes["p_values"] = (f"two-sided permutation p: exact up to {EXACT_MAX_PERMUTATIONS} permutations, else "
                         f"{N_PERMUTATIONS} seeded ones ((1 + k) / (N + 1)); never 0")
    notes["ci"] = f"percentile bootstrap {ci:.0%} CI, {n_boot} resamples of subjects (within groups for U), seed {seed}"
    notes["units"] = "one value per subject and gland: the mean of the available sides"
    return out.sort_values(["family", "analysis", "gland", "session", "value", "variable"], kind="stable",
                           na_position="first").reset_index(drop=True), notes


# ------------------------------------------------------------------ diagnostic value (ROC)
#: Markers of the ROC analysis and the direction pre-specified for pSS: PSMA uptake falls with
#: salivary gland damage, FAPI uptake rises with fibrosis, so the index (FAPI relative to PSMA) rises.
DIAGNOSTIC_MARKERS: dict[str, str] = {
    "psma_fapi_index": "higher_in_pss",
    "psma_suv_mean": "lower_in_pss",
    "fapi_suv_mean": "higher_in_pss",
}
#: The subject-level combination: the mean of these glands' subject values.
COMBINED_GLANDS: tuple[str, ...] = ("parotid", "submandibular")
COMBINED_NAME = "parotid+submandibular"


def roc_points(pss: np.ndarray, control: np.ndarray, direction: str = "higher_in_pss") -> pd.DataFrame:
    """ROC curve of a marker (pSS positive): one row per threshold (every distinct value, plus one
    beyond the range), columns cutoff, sensitivity, specificity, fpr. A subject is called pSS when
    its value is >= cutoff (``higher_in_pss``) or <= cutoff (``lower_in_pss``)."""
    a, b = np.asarray(pss, dtype=float), np.asarray(control, dtype=float)
    sign = 1.0 if direction == "higher_in_pss" else -1.0
    sa, sb = sign * a, sign * b
    cuts = np.unique(np.r_[sa, sb])[::-1]
    cuts = np.r_[np.inf, cuts]
    sens = (sa[None, :] >= cuts[:, None]).mean(axis=1) if a.size else np.full(cuts.size, np.nan)
    spec = (sb[None, :] < cuts[:, None]).mean(axis=1) if b.size else np.full(cuts.size, np.nan)
    return pd.DataFrame({"cutoff": sign * cuts, "sensitivity": sens, "specificity": spec, "fpr": 1.0 - spec})


def roc_auc(pss: np.ndarray, control: np.ndarray, direction: str = "higher_in_pss", *, n_boot: int = 2000,
            ci: float = 0.95, rng: np.random.Generator | int | None = 0) -> dict:
    """AUC (= P(pSS value more pSS-like than a control's), ties half: the Mann-Whitney U / (n1 n2)),
    its percentile bootstrap CI (resampling within groups), the Youden cut-off (maximal
    sensitivity + specificity - 1; the first, i.e. the strictest, on ties) with its sensitivity and
    specificity. NaN when a group is empty."""
    a, b = np.asarray(pss, dtype=float), np.asarray(control, dtype=float)
    out = dict(auc=np.nan, auc_ci_low=np.nan, auc_ci_high=np.nan, youden_cutoff=np.nan, youden_j=np.nan,
               sensitivity=np.nan, specificity=np.nan)
    if a.size == 0 or b.size == 0:
        return out
    sign = 1.0 if direction == "higher_in_pss" else -1.0
    ranks = stats.rankdata(np.r_[sign * a, sign * b])
    out["auc"] = float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0) / (a.size * b.size))
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if a.size >= 2 and b.size >= 2:
        out["auc_ci_low"], out["auc_ci_high"] = _percentile_ci(_bootstrap_auc(sign * a, sign * b, n_boot, rng), ci)
    pts = roc_points(a, b, direction).iloc[1:]  # the cut-off beyond the range calls nobody pSS
    j = (pts["sensitivity"] + pts["specificity"] - 1.0).to_numpy()
    k = int(np.argmax(j))
    out.update(youden_cutoff=float(pts["cutoff"].iloc[k]), youden_j=float(j[k]),
               sensitivity=float(pts["sensitivity"].iloc[k]), specificity=float(pts["specificity"].iloc[k]))
    return out


def diagnostic_markers(gland_index: pd.DataFrame, *, complete_cases: bool = True) -> pd.DataFrame:
    """Subject values of each ROC marker per gland and for :data:`COMBINED_NAME` (the mean of the
    subject's parotid and submandibular values; both needed). ``complete_cases``: only subjects with
    every marker of that gland, so the markers are compared on the same subjects. Columns
    subject_id, group, gland, marker, x."""
    markers = [m for m in DIAGNOSTIC_MARKERS if m in gland_index.columns]
    cols = ["subject_id", "group", "gland", "marker", "x"]
    if gland_index is None or gland_index.empty or not markers:
        return pd.DataFrame(columns=cols)
    sv = subject_values(gland_index, markers)
    sv = sv[sv["group"].isin(GROUPS)]
    if complete_cases:
        sv = sv.dropna(subset=markers)
    comb = sv[sv["gland"].isin(COMBINED_GLANDS)]
    comb = comb.groupby(["subject_id", "group"], observed=True)
    both = comb["gland"].nunique() == len(COMBINED_GLANDS)
    cm = comb[markers].mean()[both.to_numpy()]
    if not complete_cases:  # a marker of the combination needs both glands' values
        cnt = sv[sv["gland"].isin(COMBINED_GLANDS)].groupby(["subject_id", "group"], observed=True)[markers].count()
        cm = cm.where(cnt.loc[cm.index] == len(COMBINED_GLANDS))
    cm = cm.reset_index().assign(gland=COMBINED_NAME)
    allv = pd.concat([sv, cm[sv.columns]], ignore_index=True) if len(cm) else sv
    long = allv.melt(id_vars=["subject_id", "group", "gland"], value_vars=markers, var_name="marker", value_name="x")
    return long[long["x"].notna()][cols].reset_index(drop=True)


def diagnostic_table(gland_index: pd.DataFrame, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                     complete_cases: bool = True) -> pd.DataFrame:
    """ROC analysis of pSS vs control per gland and for the parotid+submandibular combination, for
    the PSMA/FAPI index and for PSMA and FAPI SUVmean alone (:data:`DIAGNOSTIC_MARKERS`, with their
    pre-specified direction). One row per gland x marker: n_pss, n_control, auc with its bootstrap CI,
    Youden cut-off, J, sensitivity and specificity at it."""
    long = diagnostic_markers(gland_index, complete_cases=complete_cases)
    rows = []
    for (gland, marker), part in long.groupby(["gland", "marker"], sort=True):
        a = part.loc[part["group"] == "pss", "x"].to_numpy(float)
        b = part.loc[part["group"] == "control", "x"].to_numpy(float)
        d = DIAGNOSTIC_MARKERS[marker]
        res = roc_auc(a, b, d, n_boot=n_boot, ci=ci, rng=keyed_rng(seed, "roc", gland, marker))
        rows.append(dict(gland=gland, marker=marker, direction=d, n_pss=a.size, n_control=b.size, **res,
                         n_boot=int(n_boot)))
    cols = ["gland", "marker", "direction", "n_pss", "n_control", "auc", "auc_ci_low", "auc_ci_high",
            "youden_cutoff", "youden_j", "sensitivity", "specificity", "n_boot"]
    from glandpet.glands import GLANDS as _ORDER

    order = {g: i for i, g in enumerate([*_ORDER, COMBINED_NAME])}
    out = pd.DataFrame(rows, columns=cols)
    rank = out["gland"].map(order).fillna(len(order)) * 10 + out["marker"].map(
        {m: i for i, m in enumerate(DIAGNOSTIC_MARKERS)})
    return out.iloc[np.argsort(rank.to_numpy(float), kind="stable")].reset_index(drop=True)


# ------------------------------------------------------------------ the paper's results table
VALUE_LABEL = {"suv_max": "SUVmax", "suv_mean": "SUVmean", "suv_mean_pvc": "SUVmean (PVC)",
               "psma_fapi_index": "PSMA/FAPI index"}


def results_table(outcomes: pd.DataFrame, gland_stats: pd.DataFrame | None, gland_index: pd.DataFrame | None,
                  *, digits: int = 2) -> pd.DataFrame:
    """A table a paper can print: per gland, session and value, median (IQR) per group, the group
    effect (rank-biserial r, positive = pSS higher) with its CI, p and q (from ``outcomes``' group
    comparisons), the family. Subject values as in :func:`registered_outcomes`."""
    long = _gland_values(gland_stats, gland_index)
    cols = ["family", "gland", "session", "value", "pss", "control", "effect_ci", "p", "q"]
    if long.empty:
        return pd.DataFrame(columns=cols)
    key = ["gland", "session", "value"]
    long = long.assign(session=long["session"].fillna(""))

    def fmt(v: pd.Series) -> str:
        if v.empty:
            return ""
        q1, med, q3 = np.quantile(v.to_numpy(float), [0.25, 0.5, 0.75])
        return f"{med:.{digits}f} ({q1:.{digits}f}\u2013{q3:.{digits}f}), n={v.size}"

    summ = long.groupby(key + ["group"], sort=True)["x"].apply(fmt).unstack("group")
    for g in GROUPS:
        if g not in summ.columns:
            summ[g] = ""
    summ = summ[list(GROUPS)].fillna("").reset_index()
    gc = outcomes[outcomes["analysis"] == "group_comparison"].assign(session=lambda d: d["session"].fillna(""))
    out = summ.merge(gc[key + ["family", "effect", "ci_low", "ci_high", "p_value", "q_value"]], on=key, how="left")

    def pfmt(p: float) -> str:
        return "" if not np.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")

    out["effect_ci"] = [
        "" if not np.isfinite(e) else (f"{e:+.2f} ({lo:+.2f} to {hi:+.2f})" if np.isfinite(lo) else f"{e:+.2f}")
        for e, lo, hi in zip(out["effect"].astype(float), out["ci_low"].astype(float), out["ci_high"].astype(float))]
    out["p"] = [pfmt(p) for p in out["p_value"].astype(float)]
    out["q"] = [pfmt(q) for q in out["q_value"].astype(float)]
    out["value"] = out["value"].map(lambda v: VALUE_LABEL.get(v, v))
    out["family"] = out["family"].fillna("secondary")
    order = {"primary": 0, "secondary": 1}
    out = out.sort_values(["family", "gland", "session", "value"], key=lambda s: s.map(order) if s.name == "family"
                          else s, kind="stable")
    return out[cols].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def aggregate_tables(
    paths: Sequence[str | Path], *, schema: pa.Schema | str | None = None, columns: Sequence[str] | None = None, use_threads: bool = True
) -> pa.Table:
    """Concatenate many per-subject Parquet files into one table in a single pass (pyarrow.dataset).

    ``schema``: a pyarrow schema or a name of :data:`glandpet.tables.SCHEMAS` (files are read as,
    and cast to, it); default the first file's schema. Row order follows ``paths``. An empty
    ``paths`` gives an empty table of ``schema`` (which is then required).
    """
    import pyarrow.dataset as ds

    if isinstance(schema, str):
        from glandpet.tables import SCHEMAS

        schema = SCHEMAS[schema]
    paths = [str(p) for p in paths]
    if not paths:
        if schema is None:
            raise ValueError("no files to aggregate and no schema to give the empty table")
        return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
    dataset = ds.dataset(paths, format="parquet", schema=schema)
    return dataset.to_table(columns=list(columns) if columns is not None else None, use_threads=use_threads)

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
  against each clinical column present (``essdai, esspri, usf_ml_min, schirmer_mm`` by default).
  No multiplicity correction is applied; ``n_tests`` is reported for the reader (Bonferroni
  or Holm on ``p_value`` is one line).
"""

from __future__ import annotations

import itertools
import math
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

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
    rho = rho[np.isfinite(rho)]
    if rho.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(rho, [a, 1.0 - a])
    return float(lo), float(hi)


def _gland_seed(seed: int, key: tuple) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32("/".join(map(str, key)).encode())])


def _perm_seed(seed: int, key: tuple) -> np.random.Generator:
    """The permutation stream of one test (apart from the bootstrap's, which keeps its CIs)."""
    return _gland_seed(seed, ("permutation", *key))


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
            lo, hi = bootstrap_spearman_ci(a, b, n_boot=n_boot, ci=ci, rng=_gland_seed(seed, key))
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
        from .tables import SCHEMAS

        schema = SCHEMAS[schema]
    paths = [str(p) for p in paths]
    if not paths:
        if schema is None:
            raise ValueError("no files to aggregate and no schema to give the empty table")
        return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
    dataset = ds.dataset(paths, format="parquet", schema=schema)
    return dataset.to_table(columns=list(columns) if columns is not None else None, use_threads=use_threads)

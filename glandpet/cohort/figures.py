"""Cohort figures (PNG + SVG) and per-subject QC montages (PNG), drawn with matplotlib (Agg).

Everything is drawn on :class:`matplotlib.figure.Figure` objects with an Agg canvas: no pyplot
state, no display, safe in parallel Snakemake jobs. Text on the figures carries gland names,
group names and numbers only (subject ids at most, e.g. a montage title); never a path,
PatientID or date.

Cohort figures (:func:`cohort_figures`, one PNG and one SVG per stem)
--------------------------------------------------------------------
``psma_vs_fapi``   PSMA vs FAPI SUVmean (`gland_index`: PVC values where PVC is enabled), pSS
                   subjects, one panel per gland, one marker per side (the sides with both values);
                   Spearman rho across subjects on the subject means of the two sides, with its
                   permutation p, bootstrap 95 % CI and n, read from the `cohort_stats` table
                   (:func:`glandpet.cohort.statistics.psma_fapi_correlation`; without that table
                   the panels give n only).
``fapi_by_group``  FAPI SUVmean (`gland_stats.suv_mean`) by group, one panel per gland: box of
                   the subject values (mean of the available sides, the unit of the
                   Mann-Whitney test in `outcomes`) with the same values jittered on top;
                   two-sided Mann-Whitney p (the permutation p of the `outcomes` table) and
                   rank-biserial r when both groups have data.
``psma_by_group``  the same for PSMA.
``index_by_group`` the PSMA/FAPI index (`gland_index.psma_fapi_index`) by group, the definition
                   named in the title (from the table's ``index_definition``). Only groups with
                   an index are drawn; the title says "no control with both sessions" when a
                   group of the table has none (the by-group figures likewise draw groups with data).
``voxel_rho``      within-gland voxel Spearman rho between PSMA and FAPI SUV, per gland (one
                   point per subject and side, box per gland).
``roc``            ROC curves of pSS vs control per gland and for the parotid+submandibular
                   combination: the PSMA/FAPI index, PSMA SUVmean and FAPI SUVmean alone (subject
                   means; subjects with all three), AUC with its bootstrap CI from the
                   `diagnostic` table, the Youden point marked.
``clinical_forest`` forest plot of the clinical associations (`outcomes` table): per clinical
                   variable and gland the effect with its 95 % CI (Spearman rho; rank-biserial r by
                   status for binary variables) for PSMA SUVmean, FAPI SUVmean and the index; filled
                   markers: q < 0.05 (Benjamini-Hochberg). Categorical variables (Kruskal-Wallis,
                   no signed effect) are in the table only.

Panels without data are left out; a figure with no data at all says so (the file is still
written, so the set of outputs is fixed).

QC montage (:func:`qc_montage`)
-------------------------------
Row 1: CT (window -160..240 HU) with the gland contours of the label map: axial slice through
the centroid of the parotid labels, coronal through the centroid of all gland labels, sagittal
through the centroid of the patient-right glands; a legend panel. One row per PET session: the
PET (SUV) fused on the same three CT slices with the contours, and the coronal maximum-intensity
projection (inverted grey) with the projected gland outlines. Radiological convention (patient
right on image left), orientation letters on every panel. Each PET is resampled onto the CT grid
through world coordinates (NIfTI affines, trilinear), with the PET->CT registration when given
(ITK ``.mat``, CT points to PET points, LPS) and, for the session not acquired with this CT, the
session alignment (ANTs ``[warp, affine]`` mapping this CT's points to that session's CT). The
PET window is 0..p99.5 of the PET inside the body (CT > -300 HU), per session.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from glandpet.geometry import transform_lps_to_ras
from glandpet.glands import DEFAULT_LABELS, GLANDS, SIDES
from glandpet.segmentation.confidence import rank_key

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# shared style
# ------------------------------------------------------------------------------------------------
DPI = 120
RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "none",  # text stays text in the SVG (small, searchable)
    "svg.hashsalt": "glandpet",  # deterministic ids in the SVG
}
GROUP_ORDER: tuple[str, ...] = ("pss", "control")
GROUP_LABEL = {"pss": "pSS", "control": "Control"}
GROUP_COLOUR = {"pss": "#d95f02", "control": "#1b9e77"}
OTHER_COLOUR = "#7570b3"
SIDE_MARKER = {"left": "o", "right": "^"}
SESSION_LABEL = {"psma": "PSMA", "fapi": "FAPI"}
SUV_UNIT = "(g/mL)"
INDEX_LABEL = {
    "ratio": ("FAPI / PSMA SUVmean ratio", "ratio = FAPI SUVmean / PSMA SUVmean"),
    "log_ratio": ("ln(FAPI / PSMA SUVmean)", "log_ratio = ln(FAPI SUVmean / PSMA SUVmean)"),
    "z_diff": ("z(FAPI) \u2212 z(PSMA) (SD units)", "z_diff = z(FAPI) \u2212 z(PSMA) against reference values"),
}
#: One colour per gland (both sides), chosen to stand out on CT grey and on the PET colour map.
GLAND_COLOUR = {
    "parotid": "#00e5ff",
    "submandibular": "#76ff03",
    "sublingual": "#ff4fd8",
    "lacrimal": "#2f7bff",
    "tubarial": "#ffffff",
}

STEMS: tuple[str, ...] = ("psma_vs_fapi", "fapi_by_group", "psma_by_group", "index_by_group", "voxel_rho", "roc",
                          "clinical_forest")
#: Markers of the ROC figure and their labels; colours per marker; glands in the forest plot.
MARKER_LABEL = {"psma_fapi_index": "PSMA/FAPI index", "psma_suv_mean": "PSMA SUVmean", "fapi_suv_mean": "FAPI SUVmean"}
MARKER_COLOUR = {"psma_fapi_index": "#7570b3", "psma_suv_mean": "#1f78b4", "fapi_suv_mean": "#e6550d"}
FOREST_GLAND_COLOUR = {"parotid": "#1b9e77", "submandibular": "#d95f02", "sublingual": "#e7298a",
                       "lacrimal": "#7570b3", "tubarial": "#666666"}


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _rc():
    import matplotlib

    return matplotlib.rc_context(RC)


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out = []
    for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None})):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, format=ext, dpi=DPI, metadata=meta)
        out.append(p)
    return out


def _no_data(title: str, message: str):
    fig = _figure(6.0, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    ax.text(0.5, 0.62, "no data", ha="center", va="center", fontsize=16, color="#555555", transform=ax.transAxes)
    ax.text(0.5, 0.35, message, ha="center", va="center", fontsize=9, color="#555555", transform=ax.transAxes,
            wrap=True)
    fig.suptitle(title, fontsize=11)
    return fig


def _glands_in(df: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    """Glands (in the canonical order, then any others) with at least one finite value in all ``cols``."""
    if df.empty or "gland" not in df.columns:
        return []
    ok = np.ones(len(df), bool)
    for c in cols:
        ok &= np.isfinite(pd.to_numeric(df[c], errors="coerce").to_numpy(float))
    present = set(df.loc[ok, "gland"].dropna().astype(str))
    return [g for g in GLANDS if g in present] + sorted(present - set(GLANDS))


def _groups_in(df: pd.DataFrame) -> list[str]:
    if df.empty or "group" not in df.columns:
        return []
    present = set(df["group"].fillna("unknown").astype(str))
    return [g for g in GROUP_ORDER if g in present] + sorted(present - set(GROUP_ORDER))


def _panel_grid(fig, n: int, max_cols: int = 5):
    ncols = min(n, max_cols)
    nrows = int(np.ceil(n / ncols))
    return [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]


def _numeric(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    d = df.copy()
    for c in cols:
        d[c] = pd.to_numeric(d[c], errors="coerce").astype(float)
    return d


def _subject_means(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """One row per subject x gland with a finite value: the mean of its sides
    (:func:`glandpet.cohort.statistics.subject_values`, the statistics' unit)."""
    from glandpet.cohort.statistics import subject_values

    d = df[np.isfinite(df[value].to_numpy(float))]
    if d.empty:
        return pd.DataFrame(columns=["subject_id", "group", "gland", value])
    d = d.assign(group=d["group"].fillna("unknown").astype(str))
    return subject_values(d, [value])


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def _suv_type(*dfs: pd.DataFrame) -> str:
    for df in dfs:
        if "suv_type" in df.columns:
            vals = sorted(set(df["suv_type"].dropna().astype(str)))
            if vals:
                return ", ".join(vals)
    return ""


def _box_strip(ax, values_by_group: list[tuple[str, np.ndarray]], rng: np.random.Generator) -> None:
    """Box (median, IQR, 1.5 IQR whiskers, no fliers: every point is drawn) + jittered points per group."""
    pos = np.arange(1, len(values_by_group) + 1)
    data = [v for _, v in values_by_group]
    nonempty = [i for i, v in enumerate(data) if v.size]
    if nonempty:
        bp = ax.boxplot([data[i] for i in nonempty], positions=pos[nonempty], widths=0.55, showfliers=False,
                        patch_artist=True, medianprops={"color": "black", "linewidth": 1.4},
                        whiskerprops={"color": "#444444"}, capprops={"color": "#444444"})
        for patch, i in zip(bp["boxes"], nonempty):
            c = GROUP_COLOUR.get(values_by_group[i][0], OTHER_COLOUR)
            patch.set_facecolor(c)
            patch.set_alpha(0.25)
            patch.set_edgecolor(c)
    for i, (g, v) in enumerate(values_by_group):
        if v.size:
            x = pos[i] + rng.uniform(-0.16, 0.16, v.size)
            ax.scatter(x, v, s=16, color=GROUP_COLOUR.get(g, OTHER_COLOUR), edgecolor="white", linewidth=0.4,
                       zorder=3, alpha=0.9)
    ax.set_xticks(pos)
    ax.set_xticklabels([f"{GROUP_LABEL.get(g, g)}\n(n={v.size})" for g, v in values_by_group])
    ax.set_xlim(0.4, len(values_by_group) + 0.6)


def _group_tests(outcomes: pd.DataFrame, value: str, session: str | None) -> dict[str, tuple[float, float]]:
    """``{gland: (p, rank-biserial r)}`` of the pSS vs control comparisons of ``value`` in the
    ``outcomes`` table (:func:`glandpet.cohort.statistics.registered_outcomes`): a figure shows the
    table's test, never a recomputation of it."""
    need = {"analysis", "gland", "session", "value", "p_value", "effect"}
    if outcomes is None or outcomes.empty or not need <= set(outcomes.columns):
        return {}
    rows = outcomes[(outcomes["analysis"] == "group_comparison") & (outcomes["value"] == value)]
    rows = rows[rows["session"].isna()] if session is None else rows[rows["session"] == session]
    return {str(r.gland): (float(r.p_value), float(r.effect)) for r in rows.itertuples()
            if pd.notna(r.p_value)}


def _psma_fapi_tests(cohort_stats: pd.DataFrame, group: str = "pss") -> dict[str, dict[str, float]]:
    """``{gland: {statistic: value}}`` (n, rho, p_value, ci_low, ci_high, ...) of the PSMA vs FAPI
    Spearman correlation of ``group`` in the `cohort_stats` table
    (:func:`glandpet.cohort.statistics.psma_fapi_correlation`, rows of analysis
    :data:`~glandpet.cohort.statistics.PSMA_FAPI_ANALYSIS`): the scatter shows the table's rho, never
    a recomputation of it. Glands without a finite rho are left out."""
    from glandpet.cohort.statistics import PSMA_FAPI_ANALYSIS

    need = {"analysis", "gland", "group", "statistic", "value"}
    if cohort_stats is None or cohort_stats.empty or not need <= set(cohort_stats.columns):
        return {}
    rows = cohort_stats[(cohort_stats["analysis"] == PSMA_FAPI_ANALYSIS) & (cohort_stats["group"] == group)]
    wide = rows.assign(value=pd.to_numeric(rows["value"], errors="coerce")).groupby(
        ["gland", "statistic"], sort=False)["value"].first().unstack()
    if "rho" not in wide.columns:
        return {}
    return {str(g): {k: float(v) for k, v in r.items() if pd.notna(v)} for g, r in wide.iterrows()
            if pd.notna(r["rho"])}


# ------------------------------------------------------------------------------------------------
# cohort figures
# ------------------------------------------------------------------------------------------------
def _group_panels(sv: pd.DataFrame, col: str, glands: list[str], groups: list[str], rng,
                  tests: dict[str, tuple[float, float]]):
    """One panel per gland: box + strip of the subject values of `col` by group, with the
    two-sided Mann-Whitney p and rank-biserial r of the outcomes table (``tests``, :func:`_group_tests`)
    where both pSS and controls have values."""
    fig = _figure(max(6.5, 2.6 * min(len(glands), 5) + 0.6), 3.6 * int(np.ceil(len(glands) / 5)) + 0.7)
    axes = _panel_grid(fig, len(glands))
    for ax, gland in zip(axes, glands):
        part = sv[sv["gland"] == gland]
        vals = [(g, part.loc[part["group"] == g, col].to_numpy(float)) for g in groups]
        _box_strip(ax, vals, rng)
        ax.set_title(gland)
        byg = dict(vals)
        if "pss" in byg and "control" in byg and byg["pss"].size and byg["control"].size and gland in tests:
            p, r = tests[gland]
            ax.text(0.02, 0.98, f"Mann\u2013Whitney {_fmt_p(p)}\nr = {r:+.2f}", transform=ax.transAxes,
                    va="top", ha="left", fontsize=7.5, color="#333333")
    return fig, axes


def _fig_by_group(gs: pd.DataFrame, session: str, suv_type: str, rng, outcomes: pd.DataFrame):
    name = SESSION_LABEL[session]
    title = f"{name} SUVmean by group"
    d = gs[gs["session"].astype(str) == session] if "session" in gs.columns else gs.iloc[0:0]
    glands = _glands_in(d, ["suv_mean"])
    if not glands:
        return _no_data(title, f"no finite {name} SUVmean in gland_stats")
    sv = _subject_means(d, "suv_mean")
    groups = _groups_in(sv)  # only groups with a value
    with _rc():
        fig, axes = _group_panels(sv, "suv_mean", glands, groups, rng, _group_tests(outcomes, "suv_mean", session))
        for ax in axes:
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1] * 1.12, 1e-3))
        axes[0].set_ylabel(f"{name} SUVmean {SUV_UNIT}")
        st = f" (SUV{suv_type})" if suv_type else ""
        fig.suptitle(f"{title}{st}\none point per subject (mean of left and right)", fontsize=10.5)
        fig.tight_layout()
    return fig


def _fig_scatter(gi: pd.DataFrame, suv_type: str, tests: dict[str, dict[str, float]]):
    """One panel per gland: PSMA vs FAPI SUVmean of each pSS side with both values, and the Spearman
    rho, p, 95 % CI and n of the `cohort_stats` table (``tests``, :func:`_psma_fapi_tests`)."""
    title = "PSMA vs FAPI SUVmean, pSS subjects"
    d = gi[gi["group"].astype(str) == "pss"] if "group" in gi.columns else gi.iloc[0:0]
    glands = _glands_in(d, ["psma_suv_mean", "fapi_suv_mean"])
    if not glands:
        return _no_data(title, "no pSS subject with both a PSMA and a FAPI SUVmean")
    d = d[np.isfinite(d["psma_suv_mean"].to_numpy(float)) & np.isfinite(d["fapi_suv_mean"].to_numpy(float))]
    with _rc():
        fig = _figure(max(6.0, 2.9 * min(len(glands), 5) + 0.6), 3.3 * int(np.ceil(len(glands) / 5)) + 0.9)
        axes = _panel_grid(fig, len(glands))
        for ax, gland in zip(axes, glands):
            part = d[d["gland"] == gland]
            for side in SIDES:
                s = part[part["side"] == side]
                if len(s):
                    ax.scatter(s["psma_suv_mean"], s["fapi_suv_mean"], marker=SIDE_MARKER[side], s=22,
                               color=GROUP_COLOUR["pss"], alpha=0.85 if side == "left" else 0.55,
                               facecolor=GROUP_COLOUR["pss"] if side == "left" else "none",
                               linewidth=0.9, label=side)
            t = tests.get(gland)
            txt = f"n = {int(t['n']) if t and 'n' in t else part['subject_id'].nunique()} subjects"
            if t:
                lo, hi = t.get("ci_low", np.nan), t.get("ci_high", np.nan)
                ci = f" (95% CI {lo:+.2f} to {hi:+.2f})" if np.isfinite(lo) and np.isfinite(hi) else ""
                txt = f"Spearman \u03c1 = {t['rho']:+.2f}{ci}\n{_fmt_p(t.get('p_value', np.nan))}\n" + txt
            ax.text(0.03, 0.97, txt, transform=ax.transAxes, va="top", ha="left", fontsize=7.5, color="#333333")
            ax.set_title(gland)
            ax.set_xlabel(f"PSMA SUVmean {SUV_UNIT}")
            ax.set_xlim(left=0, right=ax.get_xlim()[1] * 1.05)
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.25)  # room for the three lines of the test
        axes[0].set_ylabel(f"FAPI SUVmean {SUV_UNIT}")
        h, lab = axes[0].get_legend_handles_labels()
        if not h:
            for ax in axes:
                h, lab = ax.get_legend_handles_labels()
                if h:
                    break
        if h:
            fig.legend(h, [f"{x} gland" for x in lab], loc="upper right", frameon=False, ncol=2)
        st = f" (SUV{suv_type}; PVC where enabled)" if suv_type else " (PVC where enabled)"
        fig.suptitle(f"{title}{st}\n\u03c1 (permutation p, bootstrap CI) on the subject means of both sides",
                     fontsize=10.5, x=0.02, ha="left")
        fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def _fig_index(gi: pd.DataFrame, rng, outcomes: pd.DataFrame):
    defs = sorted(set(gi["index_definition"].dropna().astype(str))) if "index_definition" in gi.columns else []
    if len(defs) == 1 and defs[0] in INDEX_LABEL:
        ylabel, defn = INDEX_LABEL[defs[0]]
    else:
        ylabel, defn = "PSMA/FAPI index", ("definition: " + ", ".join(defs)) if defs else "definition not recorded"
    title = f"PSMA/FAPI index by group ({defn})"
    glands = _glands_in(gi, ["psma_fapi_index"])
    if not glands:
        return _no_data(title, "no finite PSMA/FAPI index (needs subjects with both sessions)")
    sv = _subject_means(gi, "psma_fapi_index")
    groups = _groups_in(sv)  # only groups with an index: a box of "Control (n=0)" says nothing
    missing = [g for g in _groups_in(gi) if g not in groups]
    note = "".join(f"; no {GROUP_LABEL.get(g, g).lower()} with both sessions" for g in missing)
    with _rc():
        fig, axes = _group_panels(sv, "psma_fapi_index", glands, groups, rng,
                                  _group_tests(outcomes, "psma_fapi_index", None))
        for ax in axes:
            if defs and defs[0] in ("log_ratio", "z_diff"):
                ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle="--", zorder=0)
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.12 * (hi - lo))
        axes[0].set_ylabel(ylabel)
        fig.suptitle(f"{title}\none point per subject (mean of left and right){note}", fontsize=10.5)
        fig.tight_layout()
    return fig


def _fig_rho(gi: pd.DataFrame, rng):
    title = "Within-gland voxel Spearman \u03c1, PSMA vs FAPI SUV"
    glands = _glands_in(gi, ["voxel_spearman_rho"])
    if not glands:
        return _no_data(title, "no within-gland voxel correlation (needs subjects with both sessions)")
    d = gi[np.isfinite(gi["voxel_spearman_rho"].to_numpy(float))]
    d = d.assign(group=d["group"].fillna("unknown").astype(str) if "group" in d.columns else "unknown")
    groups = _groups_in(d)
    with _rc():
        fig = _figure(max(5.5, 1.35 * len(glands) + 2.2), 4.0)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle="--", zorder=0)
        pos = np.arange(1, len(glands) + 1)
        data = [d.loc[d["gland"] == g, "voxel_spearman_rho"].to_numpy(float) for g in glands]
        bp = ax.boxplot(data, positions=pos, widths=0.55, showfliers=False, patch_artist=True,
                        medianprops={"color": "black", "linewidth": 1.4})
        for patch in bp["boxes"]:
            patch.set_facecolor("#cccccc")
            patch.set_alpha(0.5)
        for i, g in enumerate(glands):
            part = d[d["gland"] == g]
            for grp in groups:
                for side in SIDES:
                    s = part[(part["group"] == grp) & (part["side"] == side)]
                    if len(s):
                        x = pos[i] + rng.uniform(-0.18, 0.18, len(s))
                        c = GROUP_COLOUR.get(grp, OTHER_COLOUR)
                        ax.scatter(x, s["voxel_spearman_rho"], s=16, marker=SIDE_MARKER[side], zorder=3,
                                   color=c, facecolor=c if side == "left" else "none", linewidth=0.8, alpha=0.85,
                                   label=f"{GROUP_LABEL.get(grp, grp)}, {side}")
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{g}\n(n={v.size})" for g, v in zip(glands, data)])
        ax.set_xlim(0.4, len(glands) + 0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("voxel Spearman \u03c1 (PSMA vs FAPI SUV)")
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        ax.legend(uniq.values(), uniq.keys(), loc="lower left", frameon=False, fontsize=7.5,
                  ncol=max(1, len(uniq) // 2))
        ax.set_title(f"{title}: one point per subject and side (n = gland sides)", fontsize=10)
        fig.tight_layout()
    return fig


def _fig_roc(gi: pd.DataFrame, diagnostic: pd.DataFrame):
    from glandpet.cohort.statistics import COMBINED_NAME, DIAGNOSTIC_MARKERS, diagnostic_markers, roc_auc, roc_points

    title = "ROC, pSS vs control"
    long = diagnostic_markers(gi) if len(gi) else pd.DataFrame(columns=["gland", "marker", "group", "x"])
    glands = [g for g in [*GLANDS, COMBINED_NAME] if g in set(long["gland"])]
    glands = [g for g in glands if {"pss", "control"} <= set(long.loc[long["gland"] == g, "group"])]
    if not glands:
        return _no_data(title, "needs pSS and control subjects with both a PSMA and a FAPI session")
    diag = diagnostic.set_index(["gland", "marker"]) if len(diagnostic) else None
    with _rc():
        fig = _figure(max(6.0, 3.0 * min(len(glands), 4) + 0.4), 3.3 * int(np.ceil(len(glands) / 4)) + 0.8)
        axes = _panel_grid(fig, len(glands), max_cols=4)
        for ax, gland in zip(axes, glands):
            ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8, linestyle="--")
            part = long[long["gland"] == gland]
            for marker, direction in DIAGNOSTIC_MARKERS.items():
                m = part[part["marker"] == marker]
                a = m.loc[m["group"] == "pss", "x"].to_numpy(float)
                b = m.loc[m["group"] == "control", "x"].to_numpy(float)
                if not (a.size and b.size):
                    continue
                pts = roc_points(a, b, direction)
                if diag is not None and (gland, marker) in diag.index:
                    r = diag.loc[(gland, marker)]
                    auc, lo, hi = float(r["auc"]), float(r["auc_ci_low"]), float(r["auc_ci_high"])
                    sens, spec = float(r["sensitivity"]), float(r["specificity"])
                else:
                    r = roc_auc(a, b, direction, n_boot=0)
                    auc, lo, hi, sens, spec = r["auc"], np.nan, np.nan, r["sensitivity"], r["specificity"]
                ci = f" ({lo:.2f}\u2013{hi:.2f})" if np.isfinite(lo) else ""
                c = MARKER_COLOUR[marker]
                ax.plot(pts["fpr"], pts["sensitivity"], color=c, linewidth=1.5,
                        label=f"{MARKER_LABEL[marker]}: AUC {auc:.2f}{ci}")
                ax.plot([1 - spec], [sens], marker="o", color=c, markersize=4.5, zorder=4)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_aspect("equal")
            n = part.groupby("group")["subject_id"].nunique()
            ax.set_title(f"{gland}\n(pSS n={n.get('pss', 0)}, control n={n.get('control', 0)})", fontsize=9)
            ax.set_xlabel("1 \u2212 specificity")
            ax.legend(loc="lower right", frameon=False, fontsize=6.5)
        axes[0].set_ylabel("sensitivity")
        fig.suptitle(f"{title}: subject means of both sides; dot = Youden cut-off", fontsize=10.5)
        fig.tight_layout()
    return fig


def _fig_forest(outcomes: pd.DataFrame):
    title = "Clinical associations (pSS subjects)"
    need = {"analysis", "variable_type", "session", "value", "variable", "gland", "effect", "ci_low", "ci_high"}
    if outcomes.empty or not need <= set(outcomes.columns):
        return _no_data(title, "no clinical variable in the subject sheet")
    d = outcomes[(outcomes["analysis"] == "clinical_association") & outcomes["variable_type"].isin(
        ["continuous", "ordinal", "binary"])]
    d = d[np.isfinite(pd.to_numeric(d["effect"], errors="coerce").to_numpy(float))]
    panels = [(("psma", "suv_mean"), "PSMA SUVmean"), (("fapi", "suv_mean"), "FAPI SUVmean"),
              ((None, "psma_fapi_index"), "PSMA/FAPI index")]
    sess = d["session"].where(d["session"].notna(), None)
    keep = [(k, lab) for k, lab in panels if ((sess == k[0]) if k[0] else sess.isna()).mul(d["value"] == k[1]).any()]
    if d.empty or not keep:
        return _no_data(title, "no clinical association with an effect (too few subjects or no clinical values)")
    variables = list(dict.fromkeys(d["variable"]))
    glands = [g for g in GLANDS if g in set(d["gland"])] + sorted(set(d["gland"]) - set(GLANDS))
    step = 0.7 / max(len(glands), 1)
    with _rc():
        fig = _figure(3.2 * len(keep) + 1.6, 0.32 * len(variables) * max(len(glands), 1) * 0.55 + 1.8)
        axes = [fig.add_subplot(1, len(keep), i + 1) for i in range(len(keep))]
        for ax, ((session, value), label) in zip(axes, keep):
            m = ((sess == session) if session else sess.isna()) & (d["value"] == value)
            part = d[m]
            ax.axvline(0.0, color="#999999", linewidth=0.8, linestyle="--", zorder=0)
            for j, gland in enumerate(glands):
                g = part[part["gland"] == gland].set_index("variable")
                y = [len(variables) - 1 - variables.index(v) + (len(glands) - 1) / 2 * step - j * step
                     for v in g.index]
                e = g["effect"].to_numpy(float)
                lo, hi = g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float)
                sig = (pd.to_numeric(g.get("q_value"), errors="coerce").to_numpy(float) < 0.05) if "q_value" in g else \
                    np.zeros(len(g), bool)
                c = FOREST_GLAND_COLOUR.get(gland, OTHER_COLOUR)
                ok = np.isfinite(lo) & np.isfinite(hi)
                ax.hlines(np.asarray(y)[ok], lo[ok], hi[ok], color=c, linewidth=1.0)
                ax.scatter(np.asarray(y) * 0 + e, y, s=18, color=c, zorder=3,
                           facecolors=[c if s_ else "white" for s_ in sig], edgecolors=c, linewidths=1.0,
                           label=gland)
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-0.6, len(variables) - 0.4)
            ax.set_yticks(range(len(variables)))
            ax.set_yticklabels(variables[::-1] if ax is axes[0] else [])
            ax.set_title(label)
            ax.set_xlabel("effect (95% CI)")
        h, lab = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:
            for hh, ll in zip(*ax.get_legend_handles_labels()):
                if ll not in lab:
                    h.append(hh)
                    lab.append(ll)
        if h:
            fig.legend(h, lab, loc="lower center", ncol=len(lab), frameon=False)
        fig.suptitle(f"{title}: Spearman \u03c1 (continuous, ordinal) or rank-biserial r by status (binary); "
                     "filled: q < 0.05", fontsize=9.5)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _read(path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # an unreadable or absent table gives "no data" figures, not a crash
        log.warning("cannot read %s: %s", Path(path).name, exc)
        return pd.DataFrame()


def cohort_figures(gland_stats_path, gland_index_path, out_dir, *, outcomes_path=None,
                   diagnostic_path=None, cohort_stats_path=None) -> list[Path]:
    """Write the cohort figures (PNG + SVG per stem in :data:`STEMS`) into ``out_dir``.

    The tests the figures show are read from the statistics tables: ``outcomes_path`` (`outcomes`: the
    group comparisons and clinical associations), ``diagnostic_path`` (`diagnostic`: the ROC AUCs with
    their CIs), ``cohort_stats_path`` (`cohort_stats`: the PSMA vs FAPI Spearman rho). Without a table,
    the scatter and the by-group panels leave their tests out and the ROC figure gives AUCs without CI.

    Returns the written paths (two per stem, PNG then SVG). Never raises on thin data: a figure
    without data says "no data"; panels of glands without finite values are left out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from glandpet.cohort.statistics import baseline

    gs = baseline(_read(gland_stats_path))  # the cohort at baseline (follow-ups: gland_change)
    gi = baseline(_read(gland_index_path))
    num_s = [c for c in ("suv_mean",) if c in gs.columns]
    num_i = [c for c in ("psma_suv_mean", "fapi_suv_mean", "psma_fapi_index", "voxel_spearman_rho") if c in gi.columns]
    gs = _numeric(gs, num_s)
    gi = _numeric(gi, num_i)
    # absent columns behave as all-null columns
    for c in ("suv_mean", "session", "group", "gland", "side", "subject_id"):
        if c not in gs.columns:
            gs[c] = pd.Series(np.nan if c == "suv_mean" else None, index=gs.index, dtype=float if c == "suv_mean" else object)
    for c in ("psma_suv_mean", "fapi_suv_mean", "psma_fapi_index", "voxel_spearman_rho", "group", "gland", "side", "subject_id"):
        if c not in gi.columns:
            num = c not in ("group", "gland", "side", "subject_id")
            gi[c] = pd.Series(np.nan if num else None, index=gi.index, dtype=float if num else object)
    suv_type = _suv_type(gs, gi)
    outcomes = _read(outcomes_path) if outcomes_path else pd.DataFrame()
    diagnostic = _read(diagnostic_path) if diagnostic_path else pd.DataFrame()
    cohort_stats = _read(cohort_stats_path) if cohort_stats_path else pd.DataFrame()
    rng = np.random.default_rng(0)
    makers = {
        "psma_vs_fapi": lambda: _fig_scatter(gi, suv_type, _psma_fapi_tests(cohort_stats)),
        "fapi_by_group": lambda: _fig_by_group(gs, "fapi", suv_type, rng, outcomes),
        "psma_by_group": lambda: _fig_by_group(gs, "psma", suv_type, rng, outcomes),
        "index_by_group": lambda: _fig_index(gi, rng, outcomes),
        "voxel_rho": lambda: _fig_rho(gi, rng),
        "roc": lambda: _fig_roc(gi, diagnostic),
        "clinical_forest": lambda: _fig_forest(outcomes),
    }
    written: list[Path] = []
    for stem in STEMS:
        with _rc():
            try:
                fig = makers[stem]()
            except Exception as exc:  # a drawing bug must not take the whole report down
                log.exception("figure %s failed", stem)
                fig = _no_data(stem.replace("_", " "), f"figure could not be drawn ({type(exc).__name__})")
            written += _save(fig, out_dir, stem)
    return written


# ------------------------------------------------------------------------------------------------
# QC montage
# ------------------------------------------------------------------------------------------------
CT_WINDOW_HU = (-160.0, 240.0)
BODY_HU = -300.0
PET_PERCENTILE = 99.5


def _load3d(path):
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    return data, img.affine.astype(float)


def _linear_to_ct(pet: np.ndarray, pet_aff: np.ndarray, ct_shape, ct_aff: np.ndarray, xfm=None) -> np.ndarray:
    """PET resampled onto the CT grid (trilinear, 0 outside) through world coordinates.

    ``xfm``: optional (A, b) with ``x_pet = A x_ct + b`` in LPS mm (the PET->CT registration)."""
    from scipy import ndimage

    T = np.eye(4)
    if xfm is not None:
        A, b = xfm
        T[:3, :3], T[:3, 3] = A, b
    M = np.linalg.inv(pet_aff) @ transform_lps_to_ras(T) @ ct_aff  # CT voxel -> PET voxel
    return ndimage.affine_transform(pet, M[:3, :3], offset=M[:3, 3], output_shape=tuple(ct_shape), order=1,
                                    mode="constant", cval=0.0, prefilter=False).astype(np.float32)


def _session_warp_list(session_warp) -> list[str]:
    """ANTs transform list (this CT's points -> the other session's CT points)."""
    if isinstance(session_warp, (list, tuple)):
        return [str(t) for t in session_warp]
    from glandpet.layout import session_transform_paths

    p = session_transform_paths(session_warp)
    return [p["warp"], p["affine"]] if Path(p["warp"]).exists() else [p["affine"]]


def _ants_to_ct(ct_path, pet_path, transforms: list[str]) -> np.ndarray:
    """PET resampled onto the CT grid through an ANTs transform list (CT side first)."""
    import ants

    fixed = ants.image_read(str(ct_path))
    moving = ants.image_read(str(pet_path)).clone("float")
    out = ants.apply_transforms(fixed, moving, transforms, interpolator="linear", defaultvalue=0.0)
    return out.numpy().astype(np.float32)


def _canonical(data: np.ndarray, aff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel axes reordered/flipped to the closest RAS+ (axis 0 along patient right, 1 anterior,
    2 superior), with the matching affine (as nibabel's ``as_closest_canonical``)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(aff)
    out = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(out), aff @ nib.orientations.inv_ornt_aff(ornt, data.shape)


def _centroid_mm(mask: np.ndarray, aff: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    c = idx.mean(axis=0)
    return aff[:3, :3] @ c + aff[:3, 3]


def _world_to_index(p: np.ndarray, aff: np.ndarray, shape) -> np.ndarray:
    ijk = np.linalg.inv(aff) @ np.r_[p, 1.0]
    return np.clip(np.rint(ijk[:3]).astype(int), 0, np.asarray(shape) - 1)


def _extent(aff: np.ndarray, shape, ax_h: int, ax_v: int):
    """imshow extent (RAS mm) for an image whose columns run along voxel axis ``ax_h`` and rows along ``ax_v``."""
    def lim(a):
        sp = aff[a, a]
        lo = aff[a, 3]
        hi = lo + sp * (shape[a] - 1)
        return lo - sp / 2, hi + sp / 2

    h, v = lim(ax_h), lim(ax_v)
    return (h[0], h[1], v[0], v[1])


class _View:
    """One 2D view of RAS+ volumes: axial (k), coronal (j) or sagittal (i), radiological display."""

    def __init__(self, kind: str, index: int, aff: np.ndarray, shape):
        self.kind, self.index = kind, index
        self.axis = {"axial": 2, "coronal": 1, "sagittal": 0}[kind]
        self.h, self.v = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[kind]
        self.extent = _extent(aff, shape, self.h, self.v)
        self.pos_mm = aff[self.axis, self.axis] * index + aff[self.axis, 3]

    def cut(self, vol: np.ndarray) -> np.ndarray:
        return np.take(vol, self.index, axis=self.axis).T  # rows along v, columns along h

    def project(self, vol: np.ndarray, reduce=np.max) -> np.ndarray:
        return reduce(vol, axis=self.axis).T

    def letters(self):
        # radiological: patient right on image left (RAS +x shown right-to-left); sagittal: anterior on the left
        return {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}[self.kind]

    def frame(self, ax, limits) -> None:
        (h0, h1), (v0, v1) = limits
        ax.set_xlim(h1, h0)  # +x (right) / +y (anterior) on the image left
        ax.set_ylim(v0, v1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        left, right, top, bottom = self.letters()
        kw = dict(transform=ax.transAxes, color="white", fontsize=10, fontweight="bold")
        ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
        ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
        ax.text(0.5, 0.98, top, ha="center", va="top", **kw)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **kw)


def _bbox_limits(mask: np.ndarray, aff: np.ndarray, margin_mm: float = 12.0):
    """Per RAS axis (lo, hi) mm of a mask's bounding box plus a margin, or the full grid."""
    out = []
    for a in range(3):
        other = tuple(x for x in range(3) if x != a)
        prof = np.flatnonzero(mask.any(axis=other)) if mask.any() else np.array([0, mask.shape[a] - 1])
        lo = aff[a, a] * prof[0] + aff[a, 3]
        hi = aff[a, a] * prof[-1] + aff[a, 3]
        full_lo, full_hi = aff[a, 3] - abs(aff[a, a]) / 2, aff[a, 3] + aff[a, a] * (mask.shape[a] - 1) + abs(aff[a, a]) / 2
        out.append((max(min(lo, hi) - margin_mm, min(full_lo, full_hi)), min(max(lo, hi) + margin_mm, max(full_lo, full_hi))))
    return out


#: colour of the dashed outline around a gland flagged for review (segmentation confidence)
REVIEW_COLOUR = "#ff2a2a"


def _draw_contours(ax, view: _View, dseg: np.ndarray, labels, project: bool = False, lw: float = 1.1,
                   review=()) -> None:
    """Gland contours; a label named in ``review`` gets a wide dashed red outline under its own."""
    for lab in labels:
        m = dseg == lab.index
        sl = view.project(m, np.any) if project else view.cut(m)
        if sl.any():
            if lab.name in review:
                ax.contour(sl.astype(np.float32), levels=[0.5], colors=[REVIEW_COLOUR], linewidths=lw + 2.2,
                           linestyles="dashed", extent=view.extent, origin="lower")
            ax.contour(sl.astype(np.float32), levels=[0.5], colors=[GLAND_COLOUR.get(lab.gland, "yellow")],
                       linewidths=lw, extent=view.extent, origin="lower")


def qc_montage(ct_path, pet_paths: Mapping[str, str | Path], dseg_path, out_png, *, title: str = "",
               pet_to_ct_xfms: Mapping[str, str | Path] | None = None, session_warp=None,
               labels=DEFAULT_LABELS, review: Mapping[str, float | None] | None = None) -> Path:
    """Per-subject QC montage (PNG, 1600 px wide): CT with gland contours, each PET fused on the CT,
    and each PET's coronal MIP. See the module docstring for the layout and the conventions.

    ``review``: ``{gland_side: segmentation confidence or None}`` of the glands flagged for review
    (:mod:`glandpet.segmentation.confidence`): their contours get a dashed red outline and the legend
    lists them.

    ``pet_paths``: ``{session: SUV NIfTI}`` (one or two sessions; empty: a CT-only montage).
    ``dseg_path``: the gland label map on the CT grid (label values of ``labels``).
    ``pet_to_ct_xfms``: ``{session: ITK .mat}`` mapping CT points to that PET's points (LPS), as
    written by :func:`glandpet.registration.pet_to_ct.register_pet_to_ct`; a missing entry: no correction.
    ``session_warp``: the session alignment for a PET not acquired with this CT: an ``align_sessions``
    output prefix or an ANTs transform list (this CT's points -> that session's CT points, CT side
    first), applied to the ``fapi`` session; or ``{session: prefix | list}``. Without it, the
    PET is placed by its own world coordinates only (the row title says so).
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    pet_to_ct_xfms = dict(pet_to_ct_xfms or {})
    review = dict(review or {})
    if session_warp is None:
        warps = {}
    elif isinstance(session_warp, Mapping):
        warps = dict(session_warp)
    else:
        warps = {"fapi": session_warp}

    ct0, ct_aff0 = _load3d(ct_path)
    dseg0, dseg_aff = _load3d(dseg_path)
    if dseg0.shape != ct0.shape or not np.allclose(dseg_aff, ct_aff0, atol=1e-3):
        dseg0 = _linear_nearest(dseg0, dseg_aff, ct0.shape, ct_aff0)

    pets: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    for ses in sorted(pet_paths, key=lambda s: (list(SESSION_LABEL).index(s) if s in SESSION_LABEL else 9, s)):
        path = pet_paths[ses]
        xfm_path = pet_to_ct_xfms.get(ses)
        warp = warps.get(ses)
        try:
            if warp is not None:
                tl = _session_warp_list(warp) + ([str(xfm_path)] if xfm_path else [])
                pets[ses] = _ants_to_ct(ct_path, path, tl)
                notes[ses] = "session alignment" + (" + PET\u2192CT registration" if xfm_path else "")
            else:
                xfm = None
                if xfm_path:
                    from glandpet.registration.transforms import transform_matrix

                    xfm = transform_matrix(str(xfm_path))
                pet, pet_aff = _load3d(path)
                pets[ses] = _linear_to_ct(pet, pet_aff, ct0.shape, ct_aff0, xfm)
                notes[ses] = "PET\u2192CT registration" if xfm_path else "scanner coordinates (no registration applied)"
        except Exception as exc:
            log.warning("montage: session %s could not be resampled: %s", ses, exc)
            pets[ses] = None
            notes[ses] = f"could not be resampled ({type(exc).__name__})"

    ct, aff = _canonical(ct0, ct_aff0)
    dseg, _ = _canonical(np.rint(dseg0).astype(np.int16), ct_aff0)
    pets = {s: (_canonical(v, ct_aff0)[0] if v is not None else None) for s, v in pets.items()}

    body = ct > BODY_HU
    limits = _bbox_limits(body, aff)
    present = [lab for lab in labels if np.any(dseg == lab.index)]
    parotid = np.isin(dseg, [lab.index for lab in labels if lab.gland == "parotid"])
    allg = dseg > 0
    right = np.isin(dseg, [lab.index for lab in labels if lab.side == "right"])
    centre = np.array([(lo + hi) / 2 for lo, hi in limits])
    c_ax = _centroid_mm(parotid, aff)
    c_all = _centroid_mm(allg, aff)
    c_sag = _centroid_mm(right, aff)
    c_ax = c_ax if c_ax is not None else (c_all if c_all is not None else centre)
    c_all = c_all if c_all is not None else centre
    c_sag = c_sag if c_sag is not None else c_all
    views = [
        _View("axial", int(_world_to_index(c_ax, aff, ct.shape)[2]), aff, ct.shape),
        _View("coronal", int(_world_to_index(c_all, aff, ct.shape)[1]), aff, ct.shape),
        _View("sagittal", int(_world_to_index(c_sag, aff, ct.shape)[0]), aff, ct.shape),
    ]
    mip_view = _View("coronal", 0, aff, ct.shape)

    import matplotlib.colors as mcolors
    from matplotlib.lines import Line2D

    n_rows = 1 + len(pets)
    width_in = 1600 / DPI
    with _rc():
        fig = _figure(width_in, 3.35 * n_rows + 0.55)
        fig.patch.set_facecolor("black")
        gs = fig.add_gridspec(n_rows, 5, width_ratios=[1, 1, 1, 1, 0.06], left=0.01, right=0.95, top=1 - 0.5 / (3.35 * n_rows + 0.55),
                              bottom=0.01, wspace=0.04, hspace=0.12)
        text_kw = dict(color="white")
        ctkw = dict(cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], origin="lower", interpolation="bilinear")

        def lims(view):
            return limits[view.h], limits[view.v]

        names = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal"}
        # row 1: CT + contours
        for c, view in enumerate(views):
            ax = fig.add_subplot(gs[0, c])
            ax.set_facecolor("black")
            ax.imshow(view.cut(ct), extent=view.extent, **ctkw)
            _draw_contours(ax, view, dseg, present, review=review)
            view.frame(ax, lims(view))
            ax.set_title(f"CT, {names[view.kind]} ({_pos_text(view)})", fontsize=9, **text_kw)
        lax = fig.add_subplot(gs[0, 3])
        lax.set_axis_off()
        handles = [Line2D([0], [0], color=GLAND_COLOUR[g], lw=2.2, label=g) for g in GLANDS
                   if any(lab.gland == g for lab in present)]
        if handles:
            leg = lax.legend(handles=handles, loc="upper left", frameon=False, title="gland contours (L and R)",
                             fontsize=9, title_fontsize=9, labelcolor="white")
            leg.get_title().set_color("white")
        else:
            lax.text(0.02, 0.95, "no gland labels in the label map", va="top", fontsize=9, **text_kw)
        if review:
            items = [f"{name.replace('_', ' ')} {'(none)' if c is None or not np.isfinite(c) else f'{c:.2f}'}"
                     for name, c in sorted(review.items(), key=lambda kv: (rank_key(kv[1]), kv[0]))]
            lines = [", ".join(items[i:i + 2]) for i in range(0, len(items), 2)]
            lax.text(0.02, 0.60, "REVIEW (dashed red), confidence:\n" + "\n".join(lines), va="top", ha="left",
                     fontsize=8, color=REVIEW_COLOUR, fontweight="bold", transform=lax.transAxes)
        info = [f"CT window {CT_WINDOW_HU[0]:.0f}..{CT_WINDOW_HU[1]:.0f} HU",
                "radiological convention: patient right on image left",
                "axial through the parotid centroid,", "coronal through the centroid of all glands,",
                "sagittal through the right-side glands"]
        for ses in pets:
            info.append(f"{SESSION_LABEL.get(ses, ses)} PET on CT: {notes[ses]}")
        lax.text(0.02, 0.02, "\n".join(info), va="bottom", ha="left", fontsize=7.5, color="#cccccc",
                 transform=lax.transAxes)

        # PET rows
        for r, (ses, vol) in enumerate(pets.items(), start=1):
            name = SESSION_LABEL.get(ses, ses)
            if vol is None:
                ax = fig.add_subplot(gs[r, 0:4])
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{name} PET: {notes[ses]}", ha="center", va="center", fontsize=12, **text_kw)
                continue
            inside = vol[body & (vol > 0)]
            vmax = float(np.percentile(inside, PET_PERCENTILE)) if inside.size else float(np.nanmax(vol) or 1.0)
            vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
            norm = mcolors.Normalize(vmin=0.0, vmax=vmax)
            cmap = _fusion_cmap()
            for c, view in enumerate(views):
                ax = fig.add_subplot(gs[r, c])
                ax.set_facecolor("black")
                ax.imshow(view.cut(ct), extent=view.extent, **ctkw)
                im = ax.imshow(view.cut(vol), extent=view.extent, cmap=cmap, norm=norm, origin="lower",
                               interpolation="bilinear")
                _draw_contours(ax, view, dseg, present, lw=0.8)
                view.frame(ax, lims(view))
                ax.set_title(f"{name} PET on CT, {names[view.kind]}", fontsize=9, **text_kw)
            ax = fig.add_subplot(gs[r, 3])
            ax.set_facecolor("white")
            ax.imshow(mip_view.project(vol), extent=mip_view.extent, cmap="gray_r", norm=norm, origin="lower",
                      interpolation="bilinear")
            _draw_contours(ax, mip_view, dseg, present, project=True, lw=0.7)
            mip_view.frame(ax, lims(mip_view))
            for t in ax.texts:
                t.set_color("black")
            ax.set_title(f"{name} coronal MIP", fontsize=9, **text_kw)
            cax = fig.add_subplot(gs[r, 4])
            import matplotlib.cm as mcm

            cb = fig.colorbar(mcm.ScalarMappable(norm=norm, cmap="hot"), cax=cax)
            cb.set_label(f"{name} SUV (g/mL), 0..p{PET_PERCENTILE:g}", color="white", fontsize=8)
            cb.ax.tick_params(colors="white", labelsize=7.5)
            cb.outline.set_edgecolor("#888888")
        fig.suptitle(title or "QC montage", color="white", fontsize=13, y=1 - 0.12 / (3.35 * n_rows + 0.55))
        _save_png_small(fig, out_png)
    return out_png


def _pos_text(view: _View) -> str:
    p = view.pos_mm
    if view.kind == "axial":
        return f"z = {p:.0f} mm"
    if view.kind == "coronal":
        return f"y = {p:.0f} mm"
    return f"x = {p:.0f} mm"


def _fusion_cmap():
    """'hot' with an alpha ramp: transparent below 20 % of the window, 0.8 opaque from 50 % up
    (background uptake tints the CT, glands and lesions show in full colour)."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    base = matplotlib.colormaps["hot"](np.linspace(0, 1, 256))
    ramp = np.clip((np.linspace(0, 1, 256) - 0.2) / 0.3, 0, 1) * 0.8
    base[:, 3] = ramp
    return ListedColormap(base, name="hot_fusion")


def _linear_nearest(lab: np.ndarray, lab_aff, shape, aff) -> np.ndarray:
    """A label map brought onto another grid (nearest neighbour, world coordinates)."""
    from scipy import ndimage

    M = np.linalg.inv(lab_aff) @ aff
    return ndimage.affine_transform(lab, M[:3, :3], offset=M[:3, 3], output_shape=tuple(shape), order=0,
                                    mode="constant", cval=0.0)


def _save_png_small(fig, out_png: Path, max_bytes: int = 1_400_000) -> None:
    """Save as PNG; if larger than ``max_bytes``, re-encode with a 256-colour palette."""
    fig.savefig(out_png, format="png", dpi=DPI, facecolor=fig.get_facecolor(), metadata={"Software": None})
    if out_png.stat().st_size > max_bytes:
        from PIL import Image

        with Image.open(out_png) as im:
            q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        q.save(out_png, format="PNG", optimize=True)


#: width (px) of the QC montage's thumbnail, the copy the Snakemake report embeds (issue 21)
THUMBNAIL_WIDTH = 640


def montage_thumbnail(png, out_png, width: int = THUMBNAIL_WIDTH) -> Path:
    """A small copy of a QC montage for the Snakemake report: ``width`` px wide (aspect kept,
    Lanczos), 256-colour palette PNG (~90 KB for a two-session montage, vs ~700 KB for the 1600 px
    original). The self-contained report embeds every montage in base64, so with full-size
    montages a 1,000-subject report would be ~1 GB (``benchmarks/report_scale.py``); the full image
    stays in ``figures/qc/`` and the caption names it."""
    from PIL import Image

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(png) as im:
        rgb = im.convert("RGB")
    if rgb.width > width:
        rgb = rgb.resize((width, max(1, round(rgb.height * width / rgb.width))), Image.Resampling.LANCZOS)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)
    tmp.replace(out_png)
    return out_png

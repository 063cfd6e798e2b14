"""Readable HTML views of the cohort tables for the Snakemake report.

The Parquet files stay the results; these pages are summaries a reader can see in the report
without a Parquet viewer: the statistics pivoted one row per analysis x gland, the per-gland
values summarised by session and group (a cohort of thousands stays a page long), and every QC
row that is not ``ok``. They hold only pseudonymous subject ids, as the tables do.
"""

from __future__ import annotations

import html
import json

import pandas as pd

from glandpet import layout
from glandpet.segmentation.confidence import rank_key
from glandpet.tables import atomic_path

_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
caption{text-align:left;font-weight:600;margin:.4em 0}
#review-queue td{text-align:left}#review-queue{margin-bottom:1.5em}
</style>"""


def _page(title: str, body: str) -> bytes:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}"
            f"</head><body><h2>{html.escape(title)}</h2>{body}</body></html>").encode()


def _table(df: pd.DataFrame, caption: str) -> str:
    if df.empty:
        return f"<p><b>{html.escape(caption)}</b>: no rows.</p>"
    table = df.to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="", border=0)
    head_end = table.index(">") + 1
    return f"{table[:head_end]}<caption>{html.escape(caption)}</caption>{table[head_end:]}"


def statistics_view(cohort_stats: pd.DataFrame) -> str:
    """One table per analysis, one row per gland (x session x group x variable), statistics as columns."""
    parts = []
    keys = ["gland", "session", "group", "variable"]
    for analysis, rows in cohort_stats.groupby("analysis", sort=True):
        wide = rows.pivot_table(index=keys, columns="statistic", values="value", aggfunc="first", dropna=False)
        wide = wide.dropna(how="all").reset_index()
        wide.columns.name = None
        wide = wide.loc[:, wide.notna().any()]
        parts.append(_table(wide, str(analysis)))
    return "".join(parts) or "<p>No statistics (too few subjects per group).</p>"


def gland_values_view(gland_stats: pd.DataFrame) -> str:
    """Median [q1, q3] of SUVmean (uncorrected and PVC) and volume by session x group x gland."""
    if gland_stats.empty:
        return "<p>No gland was measured.</p>"
    keys = ["session", "group", "gland"]
    g = gland_stats.groupby(keys, dropna=False)
    out = g["subject_id"].nunique().rename("n_subjects").to_frame()
    for col in ("suv_mean", "suv_mean_pvc", "volume_ml"):
        q = g[col].quantile([0.25, 0.5, 0.75]).unstack()
        out[f"{col} median"] = q[0.5]
        out[f"{col} q1"] = q[0.25]
        out[f"{col} q3"] = q[0.75]
    return _table(out.reset_index(), "per-gland values (left and right pooled): median and quartiles")


def _notes(path) -> dict:
    from glandpet.tables import table_notes

    try:
        return table_notes(path)
    except Exception:  # noqa: BLE001 - a table without notes
        return {}


def results_view(outcomes: pd.DataFrame, gland_stats: pd.DataFrame, gland_index: pd.DataFrame,
                 diagnostic: pd.DataFrame | None = None, notes: dict | None = None) -> str:
    """The results a paper prints: the primary outcome on its own, then per gland and group the median
    (IQR) of each value with the group effect (rank-biserial r, CI), p and q; the index's diagnostic
    value (ROC); every clinical association with its q-value; the family definitions and the declared
    clinical columns the sheet lacks (not analysed)."""
    from glandpet.cohort.statistics import results_table

    notes = notes or {}
    parts = []
    t = results_table(outcomes, gland_stats, gland_index) if len(outcomes) else pd.DataFrame()
    label = {"pss": "pSS median (IQR)", "control": "control median (IQR)", "effect_ci": "r (95% CI)"}
    if len(t):
        t = t.rename(columns=label)
        parts.append(_table(t[t["family"] == "primary"].drop(columns="family"),
                            "Primary outcome: parotid SUVmax and SUVmean, pSS vs control, per tracer (Mann-Whitney; "
                            "r = rank-biserial, positive: pSS higher; q: Benjamini-Hochberg within the primary tests)"))
        parts.append(_table(t[t["family"] != "primary"].drop(columns="family"),
                            "Secondary: every gland and value, pSS vs control (q: Benjamini-Hochberg over the "
                            "secondary family)"))
    else:
        parts.append("<p>No group comparison (no measured gland).</p>")
    if diagnostic is not None and len(diagnostic):
        d = diagnostic.drop(columns=[c for c in ("pipeline_version", "config_hash", "n_boot") if c in diagnostic])
        parts.append(_table(d, "Diagnostic value, pSS vs control: ROC AUC (bootstrap 95% CI), Youden cut-off, "
                               "sensitivity and specificity at it (subjects with the index and both SUVs)"))
    assoc = outcomes[outcomes["analysis"] == "clinical_association"] if len(outcomes) else outcomes
    if len(assoc):
        cols = ["gland", "session", "value", "variable", "variable_type", "test", "n", "effect_name", "effect",
                "ci_low", "ci_high", "p_value", "q_value"]
        parts.append(_table(assoc.sort_values(["p_value", "gland"], na_position="last")[cols],
                            "Secondary: clinical associations within pSS subjects, by smallest p (continuous and "
                            "ordinal: Spearman rho; binary: rank-biserial r by status, positive: higher value in "
                            "the positive subjects; categorical: Kruskal-Wallis epsilon-squared)"))
    items = []
    for fam, text in (notes.get("families") or {}).items():
        items.append(f"<li><b>{html.escape(fam)}</b>: {html.escape(str(text))}</li>")
    if notes.get("clinical_absent"):
        items.append("<li>declared clinical columns absent from the subject sheet, not analysed: "
                     f"{html.escape(', '.join(notes['clinical_absent']))}</li>")
    if notes.get("clinical_empty"):
        items.append("<li>clinical columns present but empty, not analysed: "
                     f"{html.escape(', '.join(notes['clinical_empty']))}</li>")
    for k in ("p_values", "ci", "units"):
        if notes.get(k):
            items.append(f"<li>{html.escape(k.replace('_', '-'))}: {html.escape(str(notes[k]))}</li>")
    if items:
        parts.append("<h3>Notes</h3><ul>" + "".join(items) + "</ul>")
    return "".join(parts)


#: where the review queue (results/tables/report/qc.html) finds a subject's QC montage
MONTAGE_HREF = "../../figures/qc/{name}"


def review_queue(qc: pd.DataFrame) -> pd.DataFrame:
    """The glands flagged for review (qc rows of stage ``segment_review``), worst first: subject,
    session, gland, side, confidence, volume, the atlases' range, why flagged."""
    cols = ["subject_id", "session", "gland", "side", "confidence", "volume_ml", "atlas_min_ml", "atlas_max_ml",
            "why"]
    rows = []
    for r in qc[qc["stage"] == "segment_review"].to_dict("records"):
        m = json.loads(r.get("metrics_json") or "{}")
        av = [float(v) for v in m.get("atlas_volumes_ml") or []]
        rows.append({"subject_id": r["subject_id"], "session": r["session"], "gland": m.get("gland"),
                     "side": m.get("side"), "confidence": m.get("confidence"), "volume_ml": m.get("volume_ml"),
                     "atlas_min_ml": min(av) if av else None, "atlas_max_ml": max(av) if av else None,
                     "why": "; ".join(m.get("reasons") or [])})
    df = pd.DataFrame(rows, columns=cols)
    if df.empty:
        return df
    df["_c"] = df["confidence"].map(rank_key)
    return df.sort_values(["_c", "subject_id", "session", "gland", "side"]).drop(columns="_c").reset_index(drop=True)


def review_view(qc: pd.DataFrame) -> str:
    """HTML table of :func:`review_queue`, each row linked to its subject's QC montage."""
    q = review_queue(qc)
    title = "Review queue: glands whose segmentation confidence is under segmentation.review_below, worst first"
    if q.empty:
        return f"<p><b>{html.escape(title)}</b>: none flagged.</p>"

    def num(v, fmt):
        return "" if v is None or pd.isna(v) else format(float(v), fmt)

    head = ("<tr><th>subject</th><th>session</th><th>gland</th><th>side</th><th>confidence</th>"
            "<th>volume mL (atlases' range)</th><th>why flagged</th><th>QC montage</th></tr>")
    body = []
    for r in q.to_dict("records"):
        rng = (f" ({num(r['atlas_min_ml'], '.2f')}-{num(r['atlas_max_ml'], '.2f')})"
               if r["atlas_min_ml"] is not None and not pd.isna(r["atlas_min_ml"]) else "")
        montage = layout.name(str(r["subject_id"]), suffix="qc.png")
        href = html.escape(MONTAGE_HREF.format(name=montage))
        body.append(
            "<tr class='review'>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                r["subject_id"], r["session"] or "", r["gland"] or "", r["side"] or "",
                num(r["confidence"], ".2f") or "none", num(r["volume_ml"], ".2f") + rng, r["why"]))
            + f"<td><a href='{href}'>{html.escape(montage)}</a></td></tr>")
    return (f"<table id='review-queue'><caption>{html.escape(title)}</caption>{head}{''.join(body)}</table>")


def qc_view(qc: pd.DataFrame) -> str:
    counts = qc.groupby(["stage", "status"]).size().rename("rows").reset_index()
    issues = qc.loc[(qc["status"] != "ok") & (qc["stage"] != "segment_review"),
                    ["subject_id", "session", "stage", "status", "message"]]
    return review_view(qc) + _table(counts, "QC rows by stage and status") + _table(
        issues.sort_values(["status", "subject_id", "session", "stage"]), "failures and warnings")


def write_report_tables(gland_stats: str, cohort_stats: str, qc: str, out_statistics: str,
                        out_gland_values: str, out_qc: str, *, outcomes: str | None = None,
                        gland_index: str | None = None, diagnostic: str | None = None,
                        out_results: str | None = None) -> None:
    """Write the HTML views (atomically) from the cohort Parquet tables (the results page when
    ``out_results`` and the outcome table are given)."""
    views = {
        out_statistics: ("Cohort statistics", statistics_view(pd.read_parquet(cohort_stats))),
        out_gland_values: ("Per-gland values by session and group", gland_values_view(pd.read_parquet(gland_stats))),
        out_qc: ("Quality control", qc_view(pd.read_parquet(qc))),
    }
    if out_results and outcomes:
        from glandpet.cohort.statistics import baseline

        gi = baseline(pd.read_parquet(gland_index)) if gland_index else None
        diag = pd.read_parquet(diagnostic) if diagnostic else None
        views[out_results] = ("Results: registered outcomes", results_view(
            pd.read_parquet(outcomes), baseline(pd.read_parquet(gland_stats)), gi, diag, _notes(outcomes)))
    for path, (title, body) in views.items():
        tmp = atomic_path(path)
        tmp.write_bytes(_page(title, body))
        tmp.replace(path)


# ------------------------------------------------------------------ the report's landing graph
def rulegraph_one_node_per_rule(dag) -> tuple[dict, int, int]:
    """The landing page's step graph with **one node per rule** (same return value as Snakemake's
    ``snakemake.report.rulegraph_spec.rulegraph_spec``).

    Snakemake keeps one node per rule *and DAG level* (snakemake/snakemake#1938), and glandpet's
    per-session steps sit at several depths: the reference session's segmentation is one step
    nearer the CT conversion than the other session's (which waits for the session alignment), a
    single-session subject is shallower again. The graph then listed segment_glands,
    measure_glands and gland_index_and_montage twice. Here a rule's node sits at the first level it
    appears on; links join the rules' nodes (each pair once)."""
    order, rep = [], {}
    first: dict[str, object] = {}
    for level in dag.toposorted():
        for job in sorted(level, key=lambda j: j.rule.name):
            name = job.rule.name
            if name not in first:
                first[name] = job
                order.append(job)
            rep[job] = first[name]
    nodes = [{"rule": job.rule.name, "fx": 10, "fy": i * 50} for i, job in enumerate(order)]
    idx = {job: i for i, job in enumerate(order)}
    pairs: set[tuple[int, int]] = set()
    for job, r in rep.items():
        for dep in dag.dependencies[job]:
            if dep in rep and idx[rep[dep]] != idx[r]:
                pairs.add((idx[rep[dep]], idx[r]))

    def link(s: int, t: int) -> dict:
        return {"target": t, "source": s, "sourcerule": nodes[s]["rule"], "targetrule": nodes[t]["rule"], "value": 1}

    spec = {"nodes": nodes,
            "links": [link(s, t) for s, t in sorted(pairs) if t - s != 1],
            "links_direct": [link(s, t) for s, t in sorted(pairs) if t - s == 1]}
    return spec, 100, max((n["fy"] for n in nodes), default=0)


def use_one_node_per_rule_graph() -> bool:
    """Make ``snakemake --report`` draw :func:`rulegraph_one_node_per_rule` (called by
    rules/report.smk). Replaces the name the HTML reporter looks up; does nothing (False) if a
    Snakemake version no longer has it, so the report is then Snakemake's own."""
    try:
        from snakemake.report import html_reporter
    except ImportError:
        return False
    if not callable(getattr(html_reporter, "rulegraph_spec", None)):
        return False
    html_reporter.rulegraph_spec = rulegraph_one_node_per_rule
    return True

"""Readable HTML views of the cohort tables for the Snakemake report.

The Parquet files stay the results; these pages are summaries a reader can see in the report
without a Parquet viewer: the statistics pivoted one row per analysis x gland, the per-gland
values summarised by session and group (a cohort of thousands stays a page long), and every QC
row that is not ``ok``. They hold only pseudonymous subject ids, as the tables do.
"""

from __future__ import annotations

import html

import pandas as pd

from .tables import atomic_path

_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
caption{text-align:left;font-weight:600;margin:.4em 0}
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


def qc_view(qc: pd.DataFrame) -> str:
    counts = qc.groupby(["stage", "status"]).size().rename("rows").reset_index()
    issues = qc.loc[qc["status"] != "ok", ["subject_id", "session", "stage", "status", "message"]]
    return _table(counts, "QC rows by stage and status") + _table(
        issues.sort_values(["status", "subject_id", "session", "stage"]), "failures and warnings")


def write_report_tables(gland_stats: str, cohort_stats: str, qc: str, out_statistics: str,
                        out_gland_values: str, out_qc: str) -> None:
    """Write the three HTML views (atomically) from the cohort Parquet tables."""
    views = {
        out_statistics: ("Cohort statistics", statistics_view(pd.read_parquet(cohort_stats))),
        out_gland_values: ("Per-gland values by session and group", gland_values_view(pd.read_parquet(gland_stats))),
        out_qc: ("Quality control", qc_view(pd.read_parquet(qc))),
    }
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
    measure_glands and index_and_montage twice. Here a rule's node sits at the first level it
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

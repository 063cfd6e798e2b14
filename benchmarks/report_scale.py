"""The Snakemake report at scale (issue 21, deliverable 5): size of the report of an N-subject cohort,
the time Snakemake takes to write it, and the time headless Chromium takes to show it.

    python benchmarks/report_scale.py [--subjects 1000 ...] [--format html|zip] [--montage PNG]
                                      [--control-montage PNG] [--workflow DIR] [--keep DIR] [--no-browser]

The cohort is the synthetic sheet-based one of ``benchmarks/scale.py`` (its index checkpoint
already run; half pSS with a PSMA and a FAPI session, half controls with FAPI only). Every output of
every job of the DAG (``snakemake --summary``) is then written, so that the report is built by
Snakemake's own code on the real workflow, in three timed steps:

1. outputs: report items get realistic content, every other output is an empty file. A QC montage
   is a copy of ``--montage`` (default: the newest ``results/figures/qc/sub-*_qc.png`` of a demo
   run in the repository, else ``docs/qc_montage.png``, a two-session montage of the demo: 1600 x
   1272 px, ~0.7 MB); a control's (one session) is its top two rows (CT and one PET), as the
   montage is one row shorter (``--control-montage``: a real one). Its report thumbnail is
   ``glandpet.cohort.figures.montage_thumbnail`` of it.
   The cohort figures are copies of the montage (an upper bound: 7 PNGs). The report tables
   (``tables/report/*.html``) are glandpet.cohort.report_tables' views of synthetic tables with the
   N-subject row counts: gland_stats (N x sessions x 4 glands x 2 sides), a qc table with every
   stage of every session, 5 % of the gland sides flagged for review and 2 % of the sessions with a
   warning (the review queue and the failure list grow with N); the statistics and results pages
   do not grow with N (one row per analysis x gland) and are small fixed tables.
2. ``snakemake --touch --forceall``: marks every job done and records its metadata (start/end
   times, as a run does; the report's runtime statistics read it). Touch mode sleeps 0.1 s per job
   (``snakemake.executors.touch.Executor.SLEEPING_TIME``); here it is set to 0 (it only waits for
   coarse file-system clocks).
3. ``snakemake --report report.html`` (or ``.zip``): timed; the size of the file.

Then the report is opened in headless Chromium through Selenium and chromedriver (as
``tests/test_report_browser.py``): ``driver.get`` (returns at the load event) and the browser's
own timings from the DevTools Performance API (``performance.getEntriesByType('paint')``:
first-paint and first-contentful-paint; ``performance.timing``: DOMContentLoaded and load, all from
navigationStart), and the wall time until the report's menu has rendered (its JavaScript builds
the page after load; the test waits for the same). A .zip report is unpacked and its
``report.html`` opened.

``--workflow DIR``: the Snakefile of another copy of the workflow (e.g. ``git archive HEAD`` of an
older one, to measure before a change); default: this repository's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import REPO, synth_cohort  # noqa: E402  (the synthetic cohort of the DAG benchmark)

GLANDS = ("parotid", "submandibular", "sublingual", "tubarial")
QC_STAGES = ("convert_pet", "convert_ct", "register", "align", "segment", "measure", "index")
TOUCH = ("import sys, snakemake.executors.touch as t; t.Executor.SLEEPING_TIME = 0; "
         "from snakemake.cli import main; sys.argv[0] = 'snakemake'; main()")


def default_montage() -> Path:
    runs = sorted((REPO / "results" / "figures" / "qc").glob("sub-*_qc.png"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else REPO / "docs" / "qc_montage.png"


def montage_templates(montage: Path, tmp: Path, control: Path | None = None) -> dict[str, bytes]:
    """Bytes of the pSS (two-session) and control (one-session) montages and their thumbnails."""
    from PIL import Image

    from glandpet.cohort.figures import DPI, montage_thumbnail

    out = {"pss": montage.read_bytes()}
    if control is None:
        with Image.open(montage) as im:
            # the montage is 3.35 in per row + 0.55 in (figures.qc_montage): a control's has one PET row
            h = min(im.height, round((3.35 * 2 + 0.55) * DPI))
            im.crop((0, 0, im.width, h)).save(tmp / "control.png", format="PNG", optimize=True)
        control = tmp / "control.png"
    out["control"] = control.read_bytes()
    for k in ("pss", "control"):
        (tmp / f"{k}_full.png").write_bytes(out[k])
        out[f"{k}_thumb"] = montage_thumbnail(tmp / f"{k}_full.png", tmp / f"{k}_thumb.png").read_bytes()
    return out


def report_tables_html(sheet: pd.DataFrame, rng: np.random.Generator) -> dict[str, bytes]:
    """The four tables/report pages from synthetic tables of the cohort's row counts."""
    from glandpet.cohort import report_tables as rt

    sessions = [(r.subject_id, r.group, s) for r in sheet.itertuples()
                for s in (("psma", "fapi") if r.group == "pss" else ("fapi",))]
    gs = pd.DataFrame([dict(subject_id=s, group=g, session=ses, gland=gl, side=sd,
                            suv_mean=rng.gamma(4, 1.5), suv_mean_pvc=rng.gamma(4, 2.0), volume_ml=rng.gamma(6, 2.0))
                       for s, g, ses in sessions for gl in GLANDS for sd in ("left", "right")])
    qc = []
    for s, g, ses in sessions:
        qc += [dict(subject_id=s, session=ses, stage=st, status="ok", message="", metrics_json="{}") for st in QC_STAGES]
        if rng.random() < 0.02:
            qc.append(dict(subject_id=s, session=ses, stage="register", status="warning",
                           message="PET->CT registration: mutual information below the usual range; check the "
                                   "QC montage", metrics_json="{}"))
        for gl in GLANDS:
            for sd in ("left", "right"):
                if rng.random() < 0.05:
                    m = {"gland": gl, "side": sd, "confidence": float(rng.uniform(0.2, 0.6)),
                         "volume_ml": float(rng.gamma(6, 2)), "atlas_volumes_ml": list(rng.gamma(6, 2, 3)),
                         "reasons": ["low agreement between the atlases (Dice to the fusion 0.41)"]}
                    qc.append(dict(subject_id=s, session=ses, stage="segment_review", status="warning",
                                   message="flagged for review", metrics_json=json.dumps(m)))
    qc = pd.DataFrame(qc)
    keys = [(a, gl, ses) for a in ("fapi_group", "psma_group", "psma_vs_fapi", "index_group")
            for gl in GLANDS for ses in ("psma", "fapi")]
    stats = pd.DataFrame([dict(analysis=a, gland=gl, session=ses, group="all", variable="suv_mean", statistic=st,
                               value=rng.random()) for a, gl, ses in keys for st in ("n", "u", "p_value", "effect")])
    results = pd.DataFrame([dict(gland=gl, session=ses, value=v, pss="1.2 (0.9-1.6)", control="0.8 (0.6-1.1)",
                                 r="0.31 (0.12-0.48)", p_value=rng.random(), q_value=rng.random())
                            for gl in GLANDS for ses in ("psma", "fapi")
                            for v in ("suv_max", "suv_mean", "suv_mean_pvc", "psma_fapi_index")])
    return {
        "statistics.html": rt._page("Cohort statistics", rt.statistics_view(stats)),
        "gland_values.html": rt._page("Per-gland values by session and group", rt.gland_values_view(gs)),
        "qc.html": rt._page("Quality control", rt.qc_view(qc)),
        "results.html": rt._page("Results: registered outcomes", rt._table(results, "Secondary (synthetic)")),
    }


def snakemake(snakefile: Path, config: Path, *args: str, touch_fast: bool = False) -> tuple[float, str]:
    head = [sys.executable, "-c", TOUCH] if touch_fast else [sys.executable, "-m", "snakemake"]
    cmd = head + ["-s", str(snakefile), "--directory", str(config.parent), "--configfile", str(config), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return wall, proc.stdout + proc.stderr


def write_outputs(snakefile: Path, config: Path, n: int, montage: Path,
                  control: Path | None = None) -> tuple[int, float]:
    """Every output of the DAG: report items with content, the rest empty. (files, bytes of content written)"""
    root = config.parent
    results = root / "results"
    _, out = snakemake(snakefile, config, "--summary", "--cores", "1")
    paths = [line.split("\t")[0] for line in out.splitlines() if line.startswith(str(root)) and "\t" in line]
    sheet = pd.read_csv(root / "subjects.tsv", sep="\t", dtype=str)
    group = dict(zip(sheet["subject_id"], sheet["group"]))
    tpl = montage_templates(montage, Path(tempfile.mkdtemp(dir=root)), control)
    tables = report_tables_html(sheet, np.random.default_rng(1))
    n_files, report_bytes = 0, 0
    for p in map(Path, paths):
        if p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        rel = p.relative_to(results).as_posix()
        data = None
        if rel == "figures/cohort":  # directory(...) of the cohort figures, patterns ["{name}.png"]
            p.mkdir()
            for name in ("psma_vs_fapi", "fapi_by_group", "psma_by_group", "index_by_group", "voxel_rho", "roc",
                         "clinical_forest"):
                (p / f"{name}.png").write_bytes(tpl["pss"])
                report_bytes += len(tpl["pss"])
            continue
        if rel.startswith("figures/qc/") and p.name.startswith("sub-") and p.name.endswith("_qc.png"):
            kind = "pss" if group.get(p.name[4:-7]) == "pss" else "control"
            data = tpl[f"{kind}_thumb"] if "/thumbnails/" in rel else tpl[kind]
        elif rel.startswith("tables/report/") and p.name in tables:
            data = tables[p.name]
        if data is None:
            p.touch()
        else:
            p.write_bytes(data)
            report_bytes += len(data)
        n_files += 1
    return n_files, report_bytes


def browser_timing(report: Path, timeout: float = 900.0) -> dict[str, float]:
    """Seconds: driver.get, first paint, first contentful paint, DOMContentLoaded, load, menu rendered."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for f in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1500,950"):
        opts.add_argument(f)
    profile = tempfile.mkdtemp(prefix="glandpet-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(timeout)
    out: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        try:
            driver.get(report.as_uri())
        except Exception as e:  # noqa: BLE001 - a timeout or a crashed tab is a result
            out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return out
        out["get_s"] = time.perf_counter() - t0
        while time.perf_counter() - t0 < timeout:
            if any(e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, "nav li")):
                out["menu_s"] = time.perf_counter() - t0
                break
            time.sleep(0.1)
        t = driver.execute_script(
            "const n = performance.timing.navigationStart; const p = {};"
            "performance.getEntriesByType('paint').forEach(e => p[e.name] = e.startTime);"
            "return {fp: p['first-paint'], fcp: p['first-contentful-paint'],"
            " dcl: performance.timing.domContentLoadedEventEnd - n, load: performance.timing.loadEventEnd - n};")
        for k, v in t.items():
            if v is not None:
                out[f"{k}_s"] = v / 1000.0
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, nargs="+", default=[1000])
    ap.add_argument("--format", choices=["html", "zip"], default="html")
    ap.add_argument("--montage", type=Path, default=None, help="a two-session QC montage PNG to copy for every pSS subject")
    ap.add_argument("--control-montage", type=Path, default=None,
                    help="a one-session QC montage PNG for every control (default: --montage's top two rows)")
    ap.add_argument("--workflow", type=Path, default=REPO, help="folder of the Snakefile (default: this repository)")
    ap.add_argument("--keep", type=Path, help="build here and keep it (default: a temporary folder, removed)")
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args(argv)
    montage = args.montage or default_montage()
    snakefile = args.workflow.resolve() / "Snakefile"
    base = Path(args.keep or tempfile.mkdtemp(prefix="glandpet-report-scale-"))
    print(f"workflow {snakefile}; montage {montage} ({montage.stat().st_size / 1e6:.2f} MB); "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    try:
        for n in args.subjects:
            root = base / f"n{n}"
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            config = synth_cohort(root, n)
            n_files, item_bytes = write_outputs(snakefile, config, n, montage, args.control_montage)
            synth = time.perf_counter() - t0
            touch, _ = snakemake(snakefile, config, "--touch", "--forceall", "--cores", "1", "--quiet",
                                 touch_fast=True)
            report = root / "results" / f"report.{args.format}"
            gen, _ = snakemake(snakefile, config, "--report", str(report))
            row = {"subjects": n, "outputs": n_files, "content_mb": item_bytes / 1e6,
                   "report_mb": report.stat().st_size / 1e6, "generate_s": gen, "touch_s": touch,
                   "synth_s": synth}
            print(f"  {n} subjects: report {row['report_mb']:.1f} MB in {gen:.1f} s "
                  f"(content written {row['content_mb']:.1f} MB)", flush=True)
            if not args.no_browser:
                page = report
                if args.format == "zip":
                    with zipfile.ZipFile(report) as z:
                        z.extractall(root / "unzipped")
                    page = next((root / "unzipped").rglob("report.html"))
                row.update(browser_timing(page))
                print(f"  {n} subjects in Chromium: " + ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                    if k.endswith("_s") and k not in ("generate_s", "touch_s", "synth_s") or k == "error"), flush=True)
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    df = pd.DataFrame(rows)
    print(f"\nSnakemake report ({args.format}) of synthetic cohorts, {snakefile.parent.name}; times in s "
          "(get: driver.get to the load event; fp/fcp: first (contentful) paint, dcl: DOMContentLoaded, load: "
          "load event, from the DevTools Performance API; menu: the report's menu rendered), load "
          f"{os.getloadavg()[0]:.1f}:")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()

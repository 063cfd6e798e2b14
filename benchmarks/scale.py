"""Cohort scale: DAG construction time of the workflow for large cohorts, and what a real cohort
costs per subject-session and per 1,000 subjects (issue 6).

Part 1 (`dag`): for sheet-based cohorts of 100, 1,000 and 5,000 subjects, the wall time and peak
memory of `snakemake -n` (dry run: build the DAG, print the plan). The index checkpoint's outputs
are synthesised (series table, per-subject selection files, empty DICOM folders, atlas
placeholders) so the dry run reads no DICOM: half the subjects are pSS with a PSMA and a FAPI
session, half controls with FAPI only, as in the demo. `--cprofile N` also profiles the N-subject
dry run and prints the functions of the workflow (Snakefile, rules/*.smk, glandpet) that cost the
most. The peak memory is the dry run's own (ru_maxrss of the child process).

Where the time goes (issue 21; py-spy of the 1,000-subject dry run, 7,507 jobs): the workflow's own
code (input functions, the series table, the failure records: glandpet.workflow.dag.DagLookup) is ~3 %
of it. The rest is Snakemake's per-job work: creating the jobs (~16 %: expanding inputs, outputs,
logs, benchmarks), reading the source of every `script:` job's script through its source cache
(~25 %: three URI parses per job, each building a namedtuple class), deciding what needs to run
(~10 %), the conda environment of every job (~3 %, it evaluates the params), and importing Snakemake
(~15 %, fixed). The Snakefile tunes Python's garbage collector for this (fewer rescans of the
DAG while it is built, none at exit): ~20 % and ~3 s at 1,000 subjects.

Part 2 (`cost`): wall time, CPU time and peak memory per rule from the Snakemake `benchmark:`
TSVs of a finished run (`RESULTS/benchmarks/**.tsv`), per subject-session, and an estimate of
the CPU-hours a 1,000-subject cohort costs by stage (job counts scaled from the run's own
cohort; both the CPU time used and the core-hours a scheduler charges: wall x threads).

    python benchmarks/scale.py dag --subjects 100 1000 5000
    python benchmarks/scale.py dag --subjects 1000 --cprofile 1000
    python benchmarks/scale.py cost RESULTS_DIR [--cohort 1000]
    python benchmarks/scale.py run --subjects 20 [--atlases 2] [--cores 2] [--workdir DIR]

Part 3 (`run`): the whole workflow on an N-subject demo cohort (the phantom generates it: half pSS
with two sessions, half controls), `snakemake --cores 2`, timed end to end; then Part 2 on it.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]

#: Stage of each rule, for the cost table.
STAGES = {
    "catalog_dicom": "index", "convert_pet": "PET conversion + SUV",
    "convert_ct_register_pet": "CT conversion + PET->CT registration",
    "align_sessions": "session alignment", "segment_glands": "segmentation",
    "measure_glands": "measurement", "gland_index_and_montage": "index + QC montage",
    "cohort_tables": "cohort", "cohort_statistics": "cohort", "report_tables": "cohort",
    "cohort_figures": "cohort", "demo_phantom": "demo phantom", "phantom_atlases": "demo phantom",
}
THREADS_DEFAULT = 1


# ------------------------------------------------------------------------------------ part 1
def checkpoint_outputs() -> list[str]:
    """Paths (relative to the results folder) of the index checkpoint's outputs."""
    text = (REPO / "rules" / "ingest.smk").read_text()
    block = re.search(r"checkpoint catalog_dicom:.*?output:(.*?)\n    \w+:", text, re.S)
    return re.findall(r'f"\{RESULTS\}/([^"]+)"', block.group(1)) if block else []


def synth_cohort(root: Path, n: int, n_atlases: int = 3, id_column: str = "dicom_dir") -> Path:
    """A sheet-based study of n subjects whose index checkpoint has already run. `id_column`:
    the sheet finds each subject's DICOM by `dicom_dir` (a folder each) or `patient_id`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    dicom, results = root / "dicom", root / "results"
    ids = [f"P{i:05d}" for i in range(1, n + 1)]
    groups = ["pss" if i % 2 == 0 else "control" for i in range(n)]
    dicom.mkdir(parents=True, exist_ok=True)
    if id_column == "dicom_dir":
        for s in ids:
            (dicom / s).mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"subject_id": ids, "group": groups, id_column: ids}).to_csv(
        root / "subjects.tsv", sep="\t", index=False)
    atlases = []
    for a in range(1, n_atlases + 1):
        d = root / "atlases" / f"atlas{a:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for f in ("ct.nii.gz", "labels.nii.gz", "labels.tsv"):
            (d / f).touch()
        atlases.append({"name": d.name, "ct": str(d / "ct.nii.gz"), "labels": str(d / "labels.nii.gz"),
                        "label_table": str(d / "labels.tsv")})
    time.sleep(0.01)
    rows = []
    for s, g in zip(ids, groups):
        sessions = {"psma": "psma11", "fapi": "fapi04"} if g == "pss" else {"fapi": "fapi04"}
        selection = {}
        for ses, trc in sessions.items():
            key_pet, key_ct = f"{s}{ses}pet", f"{s}{ses}ct"
            rows += [dict(subject_id=s, session=ses, role="pet_ac", selected=True, tracer_slug=trc, series_key=key_pet),
                     dict(subject_id=s, session=ses, role="ct", selected=True, tracer_slug=None, series_key=key_ct)]
            selection[ses] = {"tracer": trc, "tracer_slug": trc, "pet_key": key_pet, "ct_key": key_ct,
                              "pet_files": [], "ct_files": []}
        w = results / "work" / f"sub-{s}"
        w.mkdir(parents=True, exist_ok=True)
        (w / f"sub-{s}_series.json").write_text(json.dumps(selection, sort_keys=True))
    (results / "tables").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), results / "tables" / "series.parquet")
    pq.write_table(pa.table({"series_key": [r["series_key"] for r in rows],
                             "paths": [[] for _ in rows]}), results / "work" / "series_files.parquet")
    # the index's failures table, empty, with its schema (the end-of-run summary reads it)
    from glandpet.dicom.catalog import FAILURES_SCHEMA

    pq.write_table(FAILURES_SCHEMA.empty_table(), results / "work" / "index_failures.parquet")
    # every other output of the checkpoint (read from rules/ingest.smk): an empty table
    for rel in checkpoint_outputs():
        if not (results / rel).exists():
            (results / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"path": pa.array([], pa.string())}), results / rel)
    config = {"results": str(results), "subjects": str(root / "subjects.tsv"), "dicom_root": str(dicom),
              "atlases": atlases}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


def dry_run(config: Path, *extra: str, cprofile: Path | None = None) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS MB, output) of one `snakemake -n`."""
    cmd = [sys.executable] + (["-m", "cProfile", "-o", str(cprofile)] if cprofile else []) + [
        "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(config.parent),
        "--configfile", str(config), "-n", "--cores", "2", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed ({' '.join(cmd)}):\n{out[-4000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, out


def total_jobs(out: str) -> int:
    m = re.search(r"^total\s+(\d+)", out, re.M)
    return int(m.group(1)) if m else -1


def sheet_seconds(root: Path) -> float:
    """CPU seconds of reading and validating the subject sheet (done once per Snakemake start)."""
    from glandpet.study.subjects import read_subject_sheet

    t0 = time.process_time()
    read_subject_sheet(root / "subjects.tsv", root / "dicom")
    return time.process_time() - t0


def dag_table(sizes: list[int], quiet: bool, cprofile: int | None, top: int, id_column: str) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="glandpet-scale-") as tmp:
        for n in sizes:
            t0 = time.perf_counter()
            cfg = synth_cohort(Path(tmp) / f"n{n}", n, id_column=id_column)
            synth = time.perf_counter() - t0
            extra = ("--quiet",) if quiet else ()
            wall, cpu, rss, out = dry_run(cfg, *extra)
            rows.append({"subjects": n, "jobs": total_jobs(out), "dry_run_s": wall, "cpu_s": cpu,
                         "sheet_cpu_s": sheet_seconds(cfg.parent), "peak_rss_mb": rss,
                         "ms_per_subject": 1000 * wall / n, "load": os.getloadavg()[0], "synth_s": synth})
            print(f"  {n} subjects: {wall:.1f} s wall, {cpu:.1f} s CPU, {rss:.0f} MB", file=sys.stderr, flush=True)
            if cprofile == n:
                prof = Path(tmp) / f"n{n}.prof"
                dry_run(cfg, *extra, cprofile=prof)  # its timing includes the profiler: not reported
                print(f"\nProfile of the {n}-subject dry run (cumulative s; workflow code only):")
                stats = pstats.Stats(str(prof))
                entries = []
                for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():
                    if any(k in file for k in ("Snakefile", ".smk", "glandpet")):
                        entries.append((ct, tt, nc, f"{Path(file).name}:{line}({fn})"))
                for ct, tt, nc, name in sorted(entries, reverse=True)[:top]:
                    print(f"  {ct:8.2f} cum {tt:8.2f} own {nc:9d} calls  {name}")
                stats.sort_stats("cumulative").print_stats(15)
    df = pd.DataFrame(rows)
    base = df.iloc[0]
    df["growth_vs_first"] = df["dry_run_s"] / base["dry_run_s"]
    df["cpu_growth"] = df["cpu_s"] / base["cpu_s"]
    df["size_ratio"] = df["subjects"] / base["subjects"]
    print(f"\nDAG construction (`snakemake -n{' --quiet' if quiet else ''}`, sheet by {id_column}), "
          f"{os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}:")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    slope = (df["dry_run_s"].iloc[-1] - df["dry_run_s"].iloc[0]) / (df["subjects"].iloc[-1] - df["subjects"].iloc[0]) \
        if len(df) > 1 else float("nan")
    cslope = (df["cpu_s"].iloc[-1] - df["cpu_s"].iloc[0]) / (df["subjects"].iloc[-1] - df["subjects"].iloc[0]) \
        if len(df) > 1 else float("nan")
    print(f"marginal cost: {1000 * slope:.1f} ms wall, {1000 * cslope:.1f} ms CPU per subject "
          "(wall includes waiting for a CPU on a loaded machine: compare the CPU column)")


# ------------------------------------------------------------------------------------ part 2
def read_benchmarks(results: Path) -> pd.DataFrame:
    rows = []
    for f in sorted((results / "benchmarks").rglob("*.tsv")):
        rel = f.relative_to(results / "benchmarks")
        rule = rel.parts[0] if len(rel.parts) > 1 else f.stem
        df = pd.read_csv(f, sep="\t")
        for r in df.itertuples():
            m = re.match(r"sub-([A-Za-z0-9]+)(?:_ses-(psma|fapi))?", f.stem)
            rows.append({"rule": rule, "subject": m.group(1) if m else None, "session": m.group(2) if m else None,
                         "wall_s": float(r.s), "cpu_s": float(r.cpu_time), "max_rss_mb": float(r.max_rss),
                         "mean_load": float(r.mean_load)})
    if not rows:
        raise SystemExit(f"no benchmark TSVs under {results / 'benchmarks'}")
    return pd.DataFrame(rows)


def rule_threads() -> dict[str, int]:
    """threads: of every rule, read from rules/*.smk."""
    out = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        rule = None
        for line in smk.read_text().splitlines():
            m = re.match(r"^(?:checkpoint|rule) (\w+):", line)
            if m:
                rule = m.group(1)
            m = re.match(r"^\s+threads:\s*(\d+)", line)
            if m and rule:
                out[rule] = int(m.group(1))
    return out


def cost_table(results: Path, cohort: int) -> None:
    bench = read_benchmarks(results)
    threads = rule_threads()
    n_subjects = max(1, bench["subject"].dropna().nunique())
    n_sessions = max(1, bench.dropna(subset=["session"]).groupby(["subject", "session"]).ngroups)
    per_rule = bench.groupby("rule").agg(jobs=("wall_s", "size"), wall_s_median=("wall_s", "median"),
                                         wall_s_max=("wall_s", "max"), cpu_s_median=("cpu_s", "median"),
                                         cpu_s_sum=("cpu_s", "sum"), wall_s_sum=("wall_s", "sum"),
                                         max_rss_mb=("max_rss_mb", "max"), mean_load=("mean_load", "mean"))
    per_rule["threads"] = [threads.get(r, THREADS_DEFAULT) for r in per_rule.index]
    per_rule["stage"] = [STAGES.get(r, "other") for r in per_rule.index]
    print(f"\nPer rule, from {len(bench)} benchmark records of {results} ({n_subjects} subjects, "
          f"{n_sessions} subject-sessions):")
    show = per_rule[["stage", "jobs", "threads", "wall_s_median", "wall_s_max", "cpu_s_median", "max_rss_mb"]]
    print(show.to_string(float_format=lambda v: f"{v:.1f}"))

    per_session = bench[bench["session"].notna()]
    per_subject = bench[bench["subject"].notna() & bench["session"].isna()]
    print(f"\nPer subject-session (mean of {n_sessions}): wall {per_session['wall_s'].sum() / n_sessions:.0f} s, "
          f"CPU {per_session['cpu_s'].sum() / n_sessions:.0f} s, peak memory "
          f"{per_session['max_rss_mb'].max():.0f} MB; plus per subject: wall "
          f"{per_subject['wall_s'].sum() / n_subjects:.0f} s, CPU {per_subject['cpu_s'].sum() / n_subjects:.0f} s")

    # A cohort of `cohort` subjects with this run's mix of sessions: per-subject and per-session
    # jobs scale with the subjects, cohort-wide jobs (index, tables, statistics) are counted once
    # at this run's cost (an underestimate for the index, which reads every file once).
    scale = cohort / n_subjects
    est = []
    for rule, r in per_rule.iterrows():
        if r["stage"] == "demo phantom":
            continue
        cohort_wide = rule in ("catalog_dicom", "cohort_tables", "cohort_statistics", "cohort_figures")
        k = 1.0 if cohort_wide else scale
        est.append({"stage": r["stage"], "jobs": r["jobs"] * k,
                    "cpu_h": r["cpu_s_sum"] * k / 3600, "core_h": r["wall_s_sum"] * r["threads"] * k / 3600,
                    "peak_mb": r["max_rss_mb"]})
    est = pd.DataFrame(est).groupby("stage", sort=False).agg(
        jobs=("jobs", "sum"), cpu_h=("cpu_h", "sum"), core_h=("core_h", "sum"), peak_mb=("peak_mb", "max"))
    est = est.sort_values("core_h", ascending=False)
    est.loc["total"] = [est["jobs"].sum(), est["cpu_h"].sum(), est["core_h"].sum(), est["peak_mb"].max()]
    print(f"\nEstimated cost of {cohort} subjects (this run's session mix; cpu_h = CPU time used, core_h = "
          f"wall x threads, what SLURM charges; the jobs got {bench['mean_load'].mean():.0f}% of a CPU on "
          "average: wall times on a loaded machine overstate core_h):")
    print(est.to_string(float_format=lambda v: f"{v:.1f}"))


def cohort_run(n: int, atlases: int, cores: int, workdir: Path | None, seed: int) -> None:
    """Run the demo workflow on an n-subject phantom cohort and report its wall time and cost."""
    import yaml

    work = Path(workdir or tempfile.mkdtemp(prefix=f"glandpet_scale_{n}_"))
    work.mkdir(parents=True, exist_ok=True)
    config = {"results": str(work / "results"), "demo": {"subjects": n, "seed": seed, "atlases": atlases}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", str(cores), "--quiet", "rules"]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    bench = read_benchmarks(work / "results")
    phantom = bench[bench["rule"].isin(["demo_phantom", "phantom_atlases"])]["wall_s"].sum()
    print(f"{n}-subject demo cohort ({atlases} atlases), snakemake --cores {cores}, load {load:.1f} at start: "
          f"{wall / 60:.1f} min wall in all, {(wall - phantom) / 60:.1f} min without generating the phantom "
          f"({phantom / 60:.1f} min); results in {work}")
    cost_table(work / "results", 1000)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dag", help="dry-run time for synthetic cohorts")
    d.add_argument("--subjects", type=int, nargs="+", default=[100, 1000, 5000])
    d.add_argument("--quiet", action="store_true", help="time `snakemake -n --quiet` (no job listing)")
    d.add_argument("--cprofile", type=int, help="also profile the dry run of this many subjects")
    d.add_argument("--top", type=int, default=25)
    d.add_argument("--id-column", choices=["dicom_dir", "patient_id"], default="dicom_dir",
                   help="how the synthetic sheet finds the DICOM (dicom_dir: one folder per subject)")
    c = sub.add_parser("cost", help="per-rule wall/CPU/memory of a finished run, cost of a cohort")
    c.add_argument("results", type=Path)
    c.add_argument("--cohort", type=int, default=1000)
    r = sub.add_parser("run", help="run the workflow on an N-subject demo cohort, timed end to end")
    r.add_argument("--subjects", type=int, default=20)
    r.add_argument("--atlases", type=int, default=2)
    r.add_argument("--cores", type=int, default=2)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        cohort_run(args.subjects, args.atlases, args.cores, args.workdir, args.seed)
    elif args.cmd == "dag":
        dag_table(args.subjects, quiet=args.quiet, cprofile=args.cprofile, top=args.top, id_column=args.id_column)
    else:
        cost_table(args.results, args.cohort)


if __name__ == "__main__":
    main()

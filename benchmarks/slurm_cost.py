"""Compares what a SLURM run of the workflow was charged (CPUs allocated x elapsed, per SLURM job)
with the CPU time its steps used, per rule group and in total, with a 1,000-subject estimate (issue 21).

Reads a finished run's Snakemake working directory:

* the SLURM jobs: every `<jobid>.log` the executor plugin wrote under the SLURM log folder
  (`--slurm-logdir`, default `.snakemake/slurm_logs`; keep them with
  `--slurm-keep-successful-logs`), named `group_<group>/...` or `rule_<rule>/...`; each log lists
  the rule jobs the SLURM job ran (the job step's `rule X:` blocks with their `log:` file and `threads:`);
* their allocation: `sacct` (AllocCPUS, ElapsedRaw, TotalCPU) where accounting works, else
  `scontrol show job` (NumCPUs, RunTime: slurmctld keeps finished jobs for MinJobAge seconds),
  else slurmctld's log where it is readable (allocation and completion lines);
  what was read is cached beside the logs (`slurm_jobs.tsv`), so the script can be run again later;
* the CPU time used: the `cpu_time` of each rule job's `benchmark:` file (this workflow names it
  after the job's log: `RESULTS/logs/X.log` -> `RESULTS/benchmarks/X.tsv`), and its wall time `s`
  with the step's threads (from the log) for "sized": what the job would be charged if every step
  had an allocation of its own threads. "idle %" (1 - sized / alloc) is the part of the charge no
  step could use, whatever the machine's load; "used %" also counts the time a step waited for a
  CPU on a loaded node. Not in "used": the Snakemake process each SLURM job starts around its steps
  (start-up, DAG), which the allocation pays for too; "overhead s" is a job's elapsed time minus
  its steps' wall time.

The 1,000-subject estimate scales each group by its units (a session for a group whose steps all
have one, else a subject): units x 1,000 / the run's subjects, `group-components` units per SLURM
job (from the profile), each job allocated the CPUs of a full group (as run for groups of one
unit; else the run's CPUs per unit x components, at most the profile's `cores`, or --group-cpus
where the run's node had fewer CPUs than the profile's `cores`) for the steps' wall time per unit
x units per job plus the run's mean overhead per job. Jobs that run once per cohort (index, cohort
tables) are counted once, as measured.

    python benchmarks/slurm_cost.py WORKDIR [--logdir DIR] [--profile profiles/slurm] [--cohort 1000]
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]

#: rules that run once per cohort: not scaled in the estimate
PER_COHORT = {"catalog_dicom", "cohort_tables", "cohort_statistics", "report_tables", "cohort_figures",
              "demo_phantom", "phantom_atlases"}

JOB_COLUMNS = ["jobid", "cpus", "elapsed_s", "total_cpu_s", "source"]


def _seconds(text: str) -> float:
    """SLURM durations ([D-]HH:MM:SS[.fff], MM:SS[.fff]) in seconds."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


def query_allocations(job_ids: list[str]) -> pd.DataFrame:
    """CPUs and elapsed seconds of finished SLURM jobs: sacct when accounting answers, else scontrol."""
    rows = []
    if shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids),
                               "-o", "JobIDRaw,AllocCPUS,ElapsedRaw,TotalCPU"], capture_output=True, text=True)
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                jid, cpus, elapsed, total = line.split("|")
                rows.append([jid, int(cpus), float(elapsed), _seconds(total) if total else math.nan, "sacct"])
    found = {r[0] for r in rows}
    for jid in job_ids:
        if jid in found:
            continue
        proc = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True)
        m_cpus, m_run = re.search(r"\bNumCPUs=(\d+)", proc.stdout), re.search(r"\bRunTime=(\S+)", proc.stdout)
        state = re.search(r"\bJobState=(\w+)", proc.stdout)
        if m_cpus and m_run and state and state.group(1) not in ("PENDING", "RUNNING"):
            rows.append([jid, int(m_cpus.group(1)), _seconds(m_run.group(1)), math.nan, "scontrol"])
            found.add(jid)
    rest = [j for j in job_ids if j not in found]
    if rest:
        rows += slurmctld_log_allocations(rest)
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def slurmctld_log_allocations(job_ids: list[str]) -> list[list]:
    """CPUs and elapsed seconds from slurmctld's own log (`sched: Allocate JobId=N ... #CPUs=C`,
    `_job_complete: JobId=N done`), for jobs scontrol no longer lists on a cluster without
    accounting; readable where the log is (a test cluster run as root)."""
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    m = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", conf, re.M)
    if not m or not Path(m.group(1)).is_file():
        return []
    stamp = r"^\[(\S+)\] "
    start, cpus, end = {}, {}, {}
    for line in Path(m.group(1)).read_text(errors="replace").splitlines():
        a = re.match(stamp + r"sched: Allocate JobId=(\d+) .*#CPUs=(\d+)", line)
        if a:
            start[a.group(2)], cpus[a.group(2)] = pd.Timestamp(a.group(1)), int(a.group(3))
        d = re.match(stamp + r"_job_complete: JobId=(\d+) done", line)
        if d:
            end[d.group(2)] = pd.Timestamp(d.group(1))
    return [[j, cpus[j], (end[j] - start[j]).total_seconds(), math.nan, "slurmctld.log"]
            for j in job_ids if j in start and j in end]


def slurm_jobs(logdir: Path) -> pd.DataFrame:
    """One row per SLURM job under logdir: its group (or rule), allocation and the rule jobs it ran."""
    logs = {p.stem: p for p in logdir.rglob("*.log") if re.fullmatch(r"\d+(_\d+)?", p.stem)}
    if not logs:
        sys.exit(f"no SLURM job logs (<jobid>.log) under {logdir}: run with --slurm-keep-successful-logs")
    cache = logdir / "slurm_jobs.tsv"
    known = pd.read_csv(cache, sep="\t", dtype={"jobid": str}) if cache.is_file() else pd.DataFrame(columns=JOB_COLUMNS)
    missing = sorted(set(logs) - set(known["jobid"]))
    if missing:
        known = pd.concat([known, query_allocations(missing)], ignore_index=True) if len(known) else query_allocations(missing)
        known.to_csv(cache, sep="\t", index=False)
    alloc = known.set_index("jobid")
    rows = []
    for jid, path in sorted(logs.items(), key=lambda kv: int(kv[0].split("_")[0])):
        if jid not in alloc.index:
            sys.exit(f"SLURM job {jid}: no allocation record (no sacct, scontrol no longer lists it, no "
                     f"slurmctld log here): run this script within slurmctld's MinJobAge of the job's end")
        text = path.read_text(errors="replace")
        steps = []  # (rule, log file, threads) of every rule job the SLURM job ran
        for block in re.split(r"\n(?=\[[^\]]+\]\n)", text):
            m = re.search(r"^(?:rule|checkpoint) (\w+):", block, re.M)  # the job step's line, not the nested srun's localrule
            log = re.search(r"^\s*log: (\S+)", block, re.M)
            threads = re.search(r"^\s*threads: (\d+)", block, re.M)
            if m and log:
                steps.append((m.group(1), log.group(1), int(threads.group(1)) if threads else 1))
        label = path.relative_to(logdir).parts[0]  # rule_<rule> or group_<group>_<its rules>
        rows.append({"jobid": jid, "label": label, "steps": sorted(set(steps)),
                     "cpus": int(alloc.at[jid, "cpus"]), "elapsed_s": float(alloc.at[jid, "elapsed_s"]),
                     "total_cpu_s": float(alloc.at[jid, "total_cpu_s"])})
    return pd.DataFrame(rows)


def group_names(jobs: pd.DataFrame, groups: set[str]) -> pd.Series:
    """The group (or rule) of each job, from its log folder name and the profile's group names."""
    def name(label: str) -> str:
        if label.startswith("rule_"):
            return label[len("rule_"):]
        label = label[len("group_"):]
        return max((g for g in groups if label == g or label.startswith(g + "_")), key=len, default=label)
    return jobs["label"].map(name)


def benchmark_of(log: str, results: Path) -> Path:
    rel = Path(log)
    rel = rel.relative_to(results / "logs") if rel.is_absolute() else Path(*rel.parts[rel.parts.index("logs") + 1:])
    return results / "benchmarks" / rel.with_suffix(".tsv")


def units_of(steps: list[tuple[str, str]]) -> set[str]:
    """The connected components of a group job: sessions when every step has one, else subjects."""
    names = [Path(log).stem for _, log, _ in steps]
    if all("_ses-" in n for n in names):
        return {re.sub(r"_trc-.*", "", n) for n in names}
    return {re.match(r"(sub-[^_]+)", n).group(1) for n in names if n.startswith("sub-")}


def measure(workdir: Path, logdir: Path) -> tuple[pd.DataFrame, Path]:
    cfg = yaml.safe_load((workdir / "config.yaml").read_text()) or {}
    results = Path(cfg.get("results", "results"))
    results = results if results.is_absolute() else workdir / results
    jobs = slurm_jobs(logdir)
    used, wall, sized = [], [], []
    for steps in jobs["steps"]:
        bench = [(pd.read_csv(benchmark_of(log, results), sep="\t").iloc[0], threads) for _, log, threads in steps]
        used.append(sum(float(b["cpu_time"]) for b, _ in bench))
        wall.append(sum(float(b["s"]) for b, _ in bench))
        sized.append(sum(float(b["s"]) * t for b, t in bench))
    jobs["used_cpu_s"], jobs["steps_wall_s"], jobs["steps_cpu_wall_s"] = used, wall, sized
    jobs["alloc_cpu_s"] = jobs["cpus"] * jobs["elapsed_s"]
    jobs["overhead_s"] = (jobs["elapsed_s"] - jobs["steps_wall_s"]).clip(lower=0)
    # what the job would be charged with each step in an allocation of its own threads (and the
    # overhead at the largest): the CPUs no step of the job could use are alloc - sized
    jobs["sized_cpu_s"] = jobs["steps_cpu_wall_s"] + jobs["overhead_s"] * [max(t for *_, t in s) for s in jobs["steps"]]
    jobs["units"] = [len(units_of(s)) if not {r for r, *_ in s} <= PER_COHORT else 0 for s in jobs["steps"]]
    return jobs, results


def n_subjects(results: Path) -> int:
    series = pd.read_parquet(results / "tables" / "series.parquet")
    col = "subject_id" if "subject_id" in series.columns else series.columns[0]
    return int(series[col].nunique())


def profile_settings(profile: Path) -> tuple[int, dict[str, int], set[str]]:
    cfg = yaml.safe_load((profile / "config.yaml").read_text())
    return (int(cfg.get("cores", 1)), {str(k): int(v) for k, v in (cfg.get("group-components") or {}).items()},
            {str(g) for g in (cfg.get("groups") or {}).values()})


def estimate(jobs: pd.DataFrame, subjects: int, cohort: int, cores: int, components: dict[str, int],
             group_cpus: dict[str, float]) -> pd.DataFrame:
    """Allocated, sized and used CPU-s of a `cohort`-subject run, per group (see the module docstring)."""
    rows = []
    for label, g in jobs.groupby("label", sort=False):
        if (g["units"] == 0).all():  # once per cohort: as measured
            rows.append({"group": label, "slurm jobs": len(g), "cpus": max(g["cpus"]), "alloc_cpu_s": g["alloc_cpu_s"].sum(),
                         "sized_cpu_s": g["sized_cpu_s"].sum(), "used_cpu_s": g["used_cpu_s"].sum()})
            continue
        units = g["units"].sum()
        k = components.get(label, 1)
        units_at_scale = units * cohort / subjects
        n_jobs = math.ceil(units_at_scale / k)
        if label in group_cpus:
            cpus = group_cpus[label]
        elif k == 1:
            cpus = max(g["cpus"])
        else:  # the run's CPUs per unit, for a full group, within the profile's cores
            cpus = min(cores, max(math.ceil(c / u * k) for c, u in zip(g["cpus"], g["units"])))
        overhead = g["overhead_s"].mean()
        elapsed = g["steps_wall_s"].sum() / units * units_at_scale / n_jobs + overhead
        top = max(t for s in g["steps"] for *_, t in s)
        rows.append({"group": label, "slurm jobs": n_jobs, "cpus": cpus, "alloc_cpu_s": n_jobs * cpus * elapsed,
                     "sized_cpu_s": g["steps_cpu_wall_s"].sum() / units * units_at_scale + n_jobs * overhead * top,
                     "used_cpu_s": g["used_cpu_s"].sum() / units * units_at_scale})
    est = pd.DataFrame(rows)
    total = est.sum(numeric_only=True).to_dict()
    total.update({"group": "total", "cpus": ""})
    return pd.concat([est, pd.DataFrame([total])], ignore_index=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path, help="the run's Snakemake working directory (holds config.yaml)")
    ap.add_argument("--logdir", type=Path, help="SLURM job logs (default WORKDIR/.snakemake/slurm_logs)")
    ap.add_argument("--profile", type=Path, default=REPO / "profiles" / "slurm",
                    help="the profile the run used (cores, group-components) for the estimate")
    ap.add_argument("--cohort", type=int, default=1000, help="subjects of the estimate (default 1000)")
    ap.add_argument("--group-cpus", nargs="*", default=[], metavar="GROUP=N",
                    help="CPUs of a full group job of the estimate (a mean where they vary) where the run could not show them "
                         "(a node with fewer CPUs than the profile's cores)")
    args = ap.parse_args(argv)
    logdir = args.logdir or args.workdir / ".snakemake" / "slurm_logs"
    jobs, results = measure(args.workdir, logdir)
    subjects = n_subjects(results)
    cores, components, groups = profile_settings(args.profile)
    jobs["label"] = group_names(jobs, groups)

    per = jobs.groupby("label", sort=False).agg(
        slurm_jobs=("jobid", "size"), rule_jobs=("steps", lambda s: sum(len(x) for x in s)),
        cpus=("cpus", lambda c: "/".join(str(v) for v in sorted(set(c)))), elapsed_s=("elapsed_s", "sum"),
        alloc_cpu_s=("alloc_cpu_s", "sum"), sized_cpu_s=("sized_cpu_s", "sum"), used_cpu_s=("used_cpu_s", "sum"),
        overhead_s=("overhead_s", "sum"))
    tot = per.sum(numeric_only=True)
    tot["cpus"] = ""
    per.loc["total"] = tot
    per["idle %"] = 100 * (1 - per["sized_cpu_s"] / per["alloc_cpu_s"])
    per["used %"] = 100 * per["used_cpu_s"] / per["alloc_cpu_s"]
    if jobs["total_cpu_s"].notna().all():
        per["sacct TotalCPU s"] = jobs.groupby("label", sort=False)["total_cpu_s"].sum()
        per.loc["total", "sacct TotalCPU s"] = jobs["total_cpu_s"].sum()
    pd.set_option("display.width", 200)
    print(f"{args.workdir}: {len(jobs)} SLURM jobs, {subjects} subjects. alloc = CPUs x elapsed of each SLURM "
          f"job; sized = each step's threads x its wall time (+ the job's overhead at its largest step's "
          f"threads); idle = CPUs allocated that no step could use (1 - sized/alloc); used = the steps' "
          f"benchmark cpu_time")
    print(per.round(1).to_string())

    group_cpus = {k: float(v) for k, v in (a.split("=") for a in args.group_cpus)}
    est = estimate(jobs, subjects, args.cohort, cores, components, group_cpus)
    # this machine's load stretched every step's wall time: `load` = sized / used CPU-s of the
    # run's steps; on CPUs of their own the charges shrink by about that factor
    load = jobs["steps_cpu_wall_s"].sum() / jobs["used_cpu_s"].sum()
    est["idle %"] = 100 * (1 - est["sized_cpu_s"] / est["alloc_cpu_s"])
    est["alloc CPU-h"] = est["alloc_cpu_s"] / 3600
    est["alloc CPU-h / load"] = est["alloc CPU-h"] / load
    est["used CPU-h"] = est["used_cpu_s"] / 3600
    print(f"\n{args.cohort}-subject estimate (profile {args.profile}: cores {cores}, group-components "
          f"{components or 'none'}):")
    print(est.drop(columns=["alloc_cpu_s", "sized_cpu_s", "used_cpu_s"]).round(1).to_string(index=False))
    print(f"load factor of this run (steps' threads x wall / their CPU time): {load:.2f}; "
          f"'alloc CPU-h / load' is the charge on CPUs the steps have to themselves")


if __name__ == "__main__":
    main()

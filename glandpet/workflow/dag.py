"""What the Snakefile asks while it plans: subjects, atlases, sessions, resources, and which sessions a run
leaves out.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

from glandpet.layout import is_session, session_order
from glandpet.tables import config_hash
from glandpet.workflow.failures import failed_state, failure_records, read_failure_records


def subject_ids(config: Mapping[str, Any], sheet: str) -> list[str]:
    """Subject ids of the run: the demo's S001..S00N, or the validated subject sheet's ids."""
    if config["subjects"] == "":
        return [f"S{i:03d}" for i in range(1, int(config["demo"]["subjects"]) + 1)]
    from glandpet.study.subjects import read_subject_sheet

    # a missing subject folder fails that subject only (the index reports it; qc.parquet lists it)
    # the declared clinical columns are type-checked here, at the start of a run, not after the processing
    return list(read_subject_sheet(sheet, config.get("dicom_root") or None, missing_dirs="report",
                                   clinical=config.get("clinical"))["subject_id"])


def atlas_list(config: Mapping[str, Any], phantom_atlas_dir: str) -> list[dict[str, str]]:
    """The configured atlases, or the phantom's atlas set."""
    if config.get("atlases"):
        return [dict(a) for a in config["atlases"]]
    n = int(config["demo"].get("atlases", 3))
    return [
        {
            "name": f"atlas{i:02d}",
            "ct": f"{phantom_atlas_dir}/atlas{i:02d}/ct.nii.gz",
            "labels": f"{phantom_atlas_dir}/atlas{i:02d}/labels.nii.gz",
            "label_table": f"{phantom_atlas_dir}/atlas{i:02d}/labels.tsv",
        }
        for i in range(1, n + 1)
    ]


def config_digest(config: Mapping[str, Any]) -> str:
    return config_hash(config)


def reference_session(sessions: Mapping[str, str] | list[str]) -> str:
    """The session atlases are registered to and every other session is aligned to: the earliest time
    point, PSMA before FAPI (the baseline PSMA when present; :func:`glandpet.layout.session_order`)."""
    names = list(sessions)
    if not names:
        raise ValueError("subject has no session")
    return min(names, key=session_order)


def clear_caches() -> None:
    """Forget the cached selections and failure records (a run that changed them plans again)."""
    read_failure_records.cache_clear()
    _selected.cache_clear()


@functools.lru_cache(maxsize=8)
def _selected(series_path: str, mtime: float) -> dict[str, dict[str, str]]:
    import pandas as pd
    import pyarrow.parquet as pq

    cols = ["subject_id", "session", "role", "selected", "tracer_slug"]
    has_problem = "problem" in pq.read_schema(series_path).names
    df = pd.read_parquet(series_path, columns=cols + (["problem"] if has_problem else []))
    keep = df["selected"].fillna(False).astype(bool) & (df["role"] == "pet_ac") & df["session"].map(is_session).astype(bool)
    if has_problem:
        keep &= df["problem"].isna()  # a session the index found unusable is left out (qc.parquet says why)
    df = df[keep]
    out: dict[str, dict[str, str]] = {}
    for sub, ses, trc in zip(df["subject_id"], df["session"], df["tracer_slug"]):
        out.setdefault(sub, {})[ses] = trc
    return out


def selected_sessions(series_path: str, subject: str, rule_params: Mapping[str, str] | None = None, *,
                      records: list[dict] | None = None) -> dict[str, str]:
    """{session: tracer slug} of the PET series the index selected for a subject, without the sessions
    the index found unusable (the series' ``problem``) and those whose job failed in an earlier run
    and still would (a current failure record in ``<results>/work/failed/``, see :func:`failure_records`
    and :func:`left_out`). `rule_params`: {rule: params digest} of this run (:func:`params_digest`).
    `records`: the current failure records to use (e.g. the subject's, :class:`DagLookup`) instead
    of reading them."""
    out = dict(_selected(str(series_path), os.path.getmtime(series_path)).get(subject, {}))
    drop = left_out(Path(series_path).parent.parent, subject, list(out), rule_params, records=records)
    if drop is None:
        return {}
    return {k: v for k, v in out.items() if k not in drop}


# A job that fails (any exception in a step run under `log_to`) leaves a record
# `<results>/work/failed/<rule>/<log name>.json` {subject_id, session, stage, status, message, fingerprint}.
# While the record is current (the job's inputs, the rule's params and the code are those of the failed
# attempt: `fingerprint`), later runs leave the failed session out of the DAG (see `left_out`), so a
# `--keep-going` run ends in complete cohort tables, and the cohort tables step copies the record into
# qc.parquet. Once any of the three changes the record is stale: it is ignored and the job runs again
# (success removes the record, a new failure rewrites it). Deleting the record also retries the job.
# a failure of one of these subject-level jobs leaves out the subject's product of it, not its sessions
SUBJECT_PRODUCT_RULES = {"gland_index_and_montage", "index_and_montage"}  # and the rule's earlier name (a record written before the rename)


# the session alignment failing leaves out the session that needs it (the non-reference one)
ALIGN_RULE = "align_sessions"


def left_out(results: str | os.PathLike, subject: str, sessions: list[str],
             rule_params: Mapping[str, str] | None = None, *, records: list[dict] | None = None) -> set[str] | None:
    """The sessions of `subject` that current failure records leave out (None: the whole subject).

    A session's own job failing leaves that session out; the session alignment failing leaves out
    the session that needed it (the non-reference one); the subject's index/montage failing leaves
    out no session (only that job's products, :func:`product_failed`); any other subject-level
    failure leaves the subject out. `records`: the current records to use instead of reading them
    (any subject's; the others are skipped)."""
    drop: set[str] = set()
    for rec in failure_records(results, rule_params) if records is None else records:
        if rec["subject_id"] != subject or rec.get("stage") in SUBJECT_PRODUCT_RULES:
            continue
        if rec.get("session"):
            drop.add(rec["session"])
        elif rec.get("stage") == ALIGN_RULE:
            kept = [s for s in sessions if s not in drop]
            if len(kept) > 1:
                drop.add(next(s for s in kept if s != reference_session(kept)))
        else:
            return None
    return drop


def product_failed(results: str | os.PathLike, subject: str, rule: str,
                   rule_params: Mapping[str, str] | None = None) -> bool:
    """A current failure record of the subject-level `rule` (e.g. gland_index_and_montage) for `subject`."""
    return any(r["subject_id"] == subject and r.get("stage") == rule for r in failure_records(results, rule_params))


class DagLookup:
    """The sessions of each subject (:func:`selected_sessions`) and its failed subject-level products
    (:func:`product_failed`) while Snakemake builds the DAG, which calls the input functions ~20 times
    per subject (and again after the index checkpoint).

    Each subject's answer is worked out once per state of what it depends on (the series table's
    modification time; the failure records' folder, :func:`failed_state`), and the failure records
    are checked (:func:`record_is_current`: a stat of each record's input files) once per state for
    all subjects and grouped by subject, instead of all records on every call: O(records) per state,
    not O(subjects x records). An input of a failed job that changes without either state changing is
    seen by a new DagLookup (the end of a run makes one: the Snakefile's run_finished).

    `rule_params`: {rule: params digest} of this run, or a function returning it (evaluated on first
    use: the rules must be complete)."""

    def __init__(self, series_path: str | os.PathLike, rule_params: Any = None):
        self.series_path = str(series_path)
        self.results = str(Path(series_path).parent.parent)
        self.failed_folder = os.path.join(self.results, "work", "failed")
        self._rule_params = rule_params
        self._key: tuple | None = None
        self._by_subject: dict[str, list[dict]] = {}
        self._sessions: dict[str, dict[str, str]] = {}

    def rule_params(self) -> Mapping[str, str] | None:
        return self._rule_params() if callable(self._rule_params) else self._rule_params

    def _refresh(self) -> None:
        key = (os.stat(self.series_path).st_mtime_ns, failed_state(self.failed_folder))
        if key == self._key:
            return
        by_subject: dict[str, list[dict]] = {}
        for rec in failure_records(self.results, self.rule_params()) if key[1] is not None else []:
            by_subject.setdefault(rec.get("subject_id"), []).append(rec)
        self._key, self._by_subject, self._sessions = key, by_subject, {}

    def sessions(self, subject: str) -> dict[str, str]:
        """:func:`selected_sessions` of `subject` (a new dict each call)."""
        self._refresh()
        out = self._sessions.get(subject)
        if out is None:
            out = self._sessions[subject] = selected_sessions(
                self.series_path, subject, self.rule_params(), records=self._by_subject.get(subject, []))
        return dict(out)

    def product_failed(self, subject: str, rule: str) -> bool:
        """:func:`product_failed` of `subject`'s `rule`."""
        self._refresh()
        return any(r.get("stage") == rule for r in self._by_subject.get(subject, []))


_SUMMARY_DONE: list[bool] = []


MAX_PASSES = 3  # a --keep-going run plans again without newly failed sessions at most this often


def left_out_summary(results: str | os.PathLike, subjects: list[str], sessions_of: Any,
                     rule_params: Mapping[str, str] | None = None, *, causes: int = 3) -> str | None:
    """What the run leaves out, for the terminal: subjects and sessions, the first `causes` causes and
    where the rest is. None when nothing is left out. `sessions_of(subject)` -> the usable sessions."""
    import pandas as pd

    results = Path(results)
    rows: list[tuple[str, str | None, str, str]] = []  # subject, session, stage, message
    idx = results / "work" / "index_failures.parquet"
    if idx.is_file():
        f = pd.read_parquet(idx)
        for r in f[f["status"] == "failed"].itertuples():
            rows.append((r.subject_id, r.session if isinstance(r.session, str) else None, r.stage, r.message))
    for r in failure_records(results, rule_params):
        rows.append((r["subject_id"], r.get("session"), r.get("stage", "?"), r.get("message") or ""))
    if not rows:
        return None
    gone = [s for s in subjects if not sessions_of(s)]
    sessions = {(s, ses) for s, ses, _, _ in rows if ses and s not in gone}
    products = {(s, st) for s, ses, st, _ in rows if st in SUBJECT_PRODUCT_RULES and s not in gone}
    parts = [f"{len(gone)} of {len(subjects)} subject(s)", f"{len(sessions)} more session(s)"]
    if products:
        parts.append(f"{len(products)} subject index/montage job(s)")
    lines = [f"glandpet: this run left out {', '.join(parts)}; causes:"]
    for s, ses, stage, msg in rows[:causes]:
        msg = " ".join(str(msg).split())
        lines.append(f"  [{stage}] {msg[:200] + ('...' if len(msg) > 200 else '')}")
    more = len(rows) - causes
    qc = results / "tables" / "qc.parquet"
    lines.append(f"  {'and ' + str(more) + ' more; ' if more > 0 else ''}every cause, one row each (status 'failed'): {qc}")
    lines.append(f"  A failed job runs again once its inputs, its rule's params or the code change; to retry it "
                 f"unchanged, delete its record in {results / 'work' / 'failed'}/.")
    return "\n".join(lines)


def plan_after_index(workflow: Any, series_path: str) -> None:
    """Print the real plan once the index checkpoint has expanded it (glandpet.progress)."""
    import logging as _logging

    from glandpet.progress import PlanAfterCheckpoint

    if not getattr(workflow, "is_main_process", False):
        return
    handler = PlanAfterCheckpoint(lambda: workflow.dag, "catalog_dicom", dryrun=lambda: bool(workflow.dryrun),
                                  checkpoint_done=lambda: os.path.isfile(series_path))
    # on the parent of Snakemake's logger: Snakemake resets its own logger's handlers after parsing
    _logging.getLogger("snakemake").addHandler(handler)


def per_attempt(first: int) -> Any:
    """A rule's resource (``mem_mb``, ``runtime`` in minutes) that grows with the attempt: ``first``
    on the first, 2x on the second, 3x on the third (``retries`` in profiles/slurm: a job that ran
    out of memory or time asks for more). The one place of each rule's resources: the SLURM profile
    repeats none of them."""

    def resource(wildcards: Any, attempt: int) -> int:
        return int(first) * int(attempt)

    resource.__name__ = f"per_attempt_{int(first)}"
    return resource


def remember_input_function_params(workflow: Any) -> int:
    """Let Snakemake look up each input function's parameters once, not on every call.

    Snakemake inspects an input function's signature (``inspect.signature``) each time it calls it,
    to pass only the arguments it takes: ~8 % of the DAG time of a 1,000-subject cohort. Snakemake's own
    wrappers (``snakemake.ioutils``) record the parameters on the function
    (``snakemake.common.overwrite_function_params``), which it then reads instead; this does the same
    for the input functions of every rule of `workflow`. Returns how many functions it marked (0 when
    this Snakemake has no such hook)."""
    try:
        from snakemake.common import get_function_params, overwrite_function_params
    except ImportError:
        return 0
    import inspect

    done = set()
    for rule in workflow.rules:
        for item in rule.input:
            func = getattr(getattr(item, "_file", item), "callable", None) or (item if callable(item) else None)
            if not inspect.isfunction(func) or id(func) in done:
                continue
            done.add(id(func))
            overwrite_function_params(func, get_function_params(func))
    return len(done)


def _snakemake_argv() -> list[str] | None:
    """The command line of this snakemake run, to run it again (None when not run from the CLI)."""
    import sys

    exe = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if exe is None or "snakemake" not in str(exe):
        return None
    return [sys.executable, "-m", "snakemake", *sys.argv[1:]]


def finish_run(workflow: Any, results: str | os.PathLike, subjects: list[str], sessions_of: Any,
               rule_params: Mapping[str, str] | None, *, failed: bool, run_start: float) -> None:
    """End of a run (the Snakefile's onsuccess/onerror, and at exit for a run with nothing to do).

    With ``--keep-going``, jobs that failed in this run leave failure records; nothing downstream of
    them ran, the cohort tables included. The run is then planned again (the same command, at most
    MAX_PASSES times), now without the failed sessions, so every healthy session of the cohort reaches
    the tables in this one run. Then the terminal gets the summary of what was left out."""
    import subprocess
    import sys

    if _SUMMARY_DONE or os.environ.get("GLANDPET_PASS_OF"):
        _SUMMARY_DONE.append(True)
        return
    _SUMMARY_DONE.append(True)
    main = getattr(workflow, "is_main_process", True)
    if not main:
        return
    dryrun = bool(getattr(workflow, "dryrun", False))
    keep_going = bool(getattr(getattr(workflow, "execution_settings", None), "keep_going", False))
    argv = _snakemake_argv()
    passes = 1
    while failed and keep_going and not dryrun and argv and passes < MAX_PASSES:
        new = [r for r in failure_records(results, rule_params) if r.get("_mtime", 0) >= run_start]
        if not new:
            break
        print(f"glandpet: {len(new)} subject job(s) failed in this run; planning again without what they leave "
              f"out, so that the healthy sessions reach the cohort tables (pass {passes + 1})", file=sys.stderr,
              flush=True)
        run_start = __import__("time").time()
        env = dict(os.environ, GLANDPET_PASS_OF="1")
        rc = subprocess.run([*argv, "--nolock"], env=env).returncode
        passes += 1
        failed = rc != 0
        clear_caches()
    try:
        text = left_out_summary(results, subjects, sessions_of, rule_params)
    except Exception as exc:  # noqa: BLE001 - the summary must not hide the run's own outcome
        text = f"glandpet: could not summarise what the run left out ({type(exc).__name__}: {exc})"
    if text:
        print(text, file=sys.stderr, flush=True)

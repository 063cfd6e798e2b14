"""Glue between the Snakemake rules and the glandpet modules.

The Snakefile imports the parse-time helpers (subject list, atlas list, sessions found by the
index); each `scripts/*.py` wrapper calls exactly one step function here, which wires file paths
to the pure functions of the concern's module. Nothing here computes image values itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping

from .glands import SESSIONS
from .layout import label_table_of, parse, session_transform_paths, transform_prefix_of
from .layout import path as layout_path
from .registration import set_threads
from .tables import config_hash

log = logging.getLogger("glandpet")


# --------------------------------------------------------------------------- parse time
def subject_ids(config: Mapping[str, Any], sheet: str) -> list[str]:
    """Subject ids of the run: the demo's S001..S00N, or the validated subject sheet's ids."""
    if config["subjects"] == "":
        return [f"S{i:03d}" for i in range(1, int(config["demo"]["subjects"]) + 1)]
    from .subjects import read_subject_sheet

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
    """The session atlases are registered to: PSMA when present, else the only session."""
    names = list(sessions)
    if not names:
        raise ValueError("subject has no session")
    return "psma" if "psma" in names else sorted(names)[0]


@functools.lru_cache(maxsize=8)
def _selected(series_path: str, mtime: float) -> dict[str, dict[str, str]]:
    import pandas as pd
    import pyarrow.parquet as pq

    cols = ["subject_id", "session", "role", "selected", "tracer_slug"]
    has_problem = "problem" in pq.read_schema(series_path).names
    df = pd.read_parquet(series_path, columns=cols + (["problem"] if has_problem else []))
    keep = df["selected"].fillna(False).astype(bool) & (df["role"] == "pet_ac") & df["session"].isin(SESSIONS)
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


# --------------------------------------------------------------------------- job failure records
# A job that fails (any exception in a step run under `log_to`) leaves a record
# `<results>/work/failed/<rule>/<log name>.json` {subject_id, session, stage, status, message, fingerprint}.
# While the record is current (the job's inputs, the rule's params and the code are those of the failed
# attempt: `fingerprint`), later runs leave the failed session out of the DAG (see `left_out`), so a
# `--keep-going` run ends in complete cohort tables, and the cohort tables step copies the record into
# qc.parquet. Once any of the three changes the record is stale: it is ignored and the job runs again
# (success removes the record, a new failure rewrites it). Deleting the record also retries the job.
# a failure of one of these subject-level jobs leaves out the subject's product of it, not its sessions
SUBJECT_PRODUCT_RULES = {"index_and_montage"}
# the session alignment failing leaves out the session that needs it (the non-reference one)
ALIGN_RULE = "align_sessions"
_PACKAGE = Path(__file__).resolve().parent


def _entities(path: str | os.PathLike) -> dict:
    """The entities of a pipeline file's name (:func:`glandpet.layout.parse`: ``subject``, ``session``,
    ``desc``, ``suffix`` ...), {} for a name outside the layout (a cohort-level job's log, say)."""
    try:
        return parse(path)
    except ValueError:
        return {}


def failure_record_path(log_path: str | os.PathLike) -> Path | None:
    """Where a per-subject job's failure record goes (None for cohort-level jobs)."""
    log_path = Path(log_path)
    if log_path.parent.parent.name != "logs" or not _entities(log_path):
        return None
    results = log_path.parent.parent.parent
    return results / "work" / "failed" / log_path.parent.name / (log_path.name[: -len(".log")] + ".json")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of the step code: the glandpet package and the Snakemake wrapper scripts (a changed
    line anywhere in them makes earlier failure records stale)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(_PACKAGE.rglob("*.py")) + sorted((_PACKAGE.parent / "scripts").glob("*.py"))
    for f in files:
        try:
            h.update(str(f.relative_to(_PACKAGE.parent)).encode() + b"\0" + f.read_bytes())
        except OSError:
            continue
    return h.hexdigest()[:16]


def params_digest(params: Any) -> str:
    """Digest of a rule's (or job's) params: the same value for Snakemake's rule params and the job's
    ``snakemake.params`` (JSON of the named items; callables by name only)."""
    import hashlib

    items = params.items() if hasattr(params, "items") else []
    plain = {str(k): (f"<callable {getattr(v, '__name__', '?')}>" if callable(v) else v) for k, v in items}
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_state(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def job_fingerprint(job: Any = None) -> dict:
    """What a failed job depended on: its input files (size, mtime), its params and the code."""
    inputs, params = {}, None
    if job is not None:
        inputs = {os.path.abspath(str(f)): _file_state(str(f)) for f in job.input}
        params = params_digest(job.params)
    return {"inputs": inputs, "params": params, "code": code_digest()}


def record_is_current(rec: Mapping[str, Any], rule_params: Mapping[str, str] | None = None) -> bool:
    """A failure record applies while its job's inputs, its rule's params (when `rule_params` is
    given) and the code are those it failed with. A record without a fingerprint is stale."""
    fp = rec.get("fingerprint")
    if not isinstance(fp, Mapping) or fp.get("code") != code_digest():
        return False
    if rule_params is not None and fp.get("params") is not None and rule_params.get(rec.get("stage")) != fp["params"]:
        return False
    return all(_file_state(path) == state for path, state in (fp.get("inputs") or {}).items())


def failure_records(results: str | os.PathLike, rule_params: Mapping[str, str] | None = None, *,
                    stale: bool = False) -> list[dict]:
    """The current job failure records under `<results>/work/failed/` (subject_id, session, stage,
    status, message, fingerprint); with ``stale=True`` the stale ones instead.

    Called for every subject while Snakemake builds the DAG: the records are read once per state of
    the folder (its rule subfolders' modification times), not once per call."""
    folder = os.path.join(results, "work", "failed")
    state = _failed_state(folder)
    if state is None:
        return []
    return [r for r in _read_failure_records(folder, state) if record_is_current(r, rule_params) != stale]


def _failed_state(folder: str) -> tuple | None:
    """The state of the failure records' folder: its rule subfolders' modification times (a record
    written or removed changes its subfolder's). None when there is no folder."""
    if not os.path.isdir(folder):  # the usual case: no job ever failed
        return None
    try:
        with os.scandir(folder) as it:
            return tuple(sorted((d.name, d.stat().st_mtime_ns) for d in it))
    except (FileNotFoundError, NotADirectoryError):
        return None


@functools.lru_cache(maxsize=8)
def _read_failure_records(folder: str, _state: tuple) -> list[dict]:
    out = []
    for p in sorted(Path(folder).glob("*/*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rec["_mtime"] = p.stat().st_mtime
        out.append(rec)
    return out


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
    """A current failure record of the subject-level `rule` (e.g. index_and_montage) for `subject`."""
    return any(r["subject_id"] == subject and r.get("stage") == rule for r in failure_records(results, rule_params))


class DagLookup:
    """The sessions of each subject (:func:`selected_sessions`) and its failed subject-level products
    (:func:`product_failed`) while Snakemake builds the DAG, which calls the input functions ~20 times
    per subject (and again after the index checkpoint).

    Each subject's answer is worked out once per state of what it depends on (the series table's
    modification time; the failure records' folder, :func:`_failed_state`), and the failure records
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
        key = (os.stat(self.series_path).st_mtime_ns, _failed_state(self.failed_folder))
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


def _record_failure(log_path: str | os.PathLike, exc: BaseException, job: Any = None) -> None:
    path = failure_record_path(log_path)
    if path is None:
        return
    m = _entities(log_path)
    message = " ".join(str(exc).split()) or type(exc).__name__
    from .errors import UserError

    if not isinstance(exc, UserError):
        message = f"{type(exc).__name__}: {message}"
    prefix = f"sub-{m['subject']}" + (f" ses-{m['session']}" if m["session"] else "")
    if not message.startswith(prefix):
        message = f"{prefix}: {message}"
    rec = {"subject_id": m["subject"], "session": m["session"], "stage": Path(log_path).parent.name,
           "status": "failed", "message": message[:2000], "log": str(Path(log_path).name),
           "fingerprint": job_fingerprint(job)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(rec, path)


# --------------------------------------------------------------------------- end of a run
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

    from .progress import PlanAfterCheckpoint

    if not getattr(workflow, "is_main_process", False):
        return
    handler = PlanAfterCheckpoint(lambda: workflow.dag, "index_dicom", dryrun=lambda: bool(workflow.dryrun),
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
        _read_failure_records.cache_clear()
        _selected.cache_clear()
    try:
        text = left_out_summary(results, subjects, sessions_of, rule_params)
    except Exception as exc:  # noqa: BLE001 - the summary must not hide the run's own outcome
        text = f"glandpet: could not summarise what the run left out ({type(exc).__name__}: {exc})"
    if text:
        print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- run time
@contextlib.contextmanager
def log_to(path: str | os.PathLike | None, job: Any = None) -> Iterator[logging.Logger]:
    """Send the step's logging, stdout and stderr to its Snakemake log file; log tracebacks.

    A failing per-subject step leaves a failure record with the fingerprint of `job` (the step's
    Snakemake object: inputs, params; default: the ``snakemake`` object of the running script)."""
    if job is None:
        import sys

        job = getattr(sys.modules.get("__main__"), "snakemake", None)
    if path is None:
        yield log
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield log
        except Exception as exc:
            traceback.print_exc(file=fh)
            try:
                _record_failure(path, exc, job)
            except Exception:  # noqa: BLE001 - the record is a courtesy; the job fails anyway
                traceback.print_exc(file=fh)
            raise
        else:
            stale = failure_record_path(path)
            if stale is not None and stale.exists():
                stale.unlink()
        finally:
            root.removeHandler(handler)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    from .tables import atomic_path

    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


# --------------------------------------------------------------------------- steps
def demo_phantom(outdir: str, subjects: int, seed: int, atlases: int, threads: int = 1) -> None:
    """Generate the demo cohort (or, with subjects=0, only the phantom's atlas set)."""
    from .phantom.cohort import generate_cohort

    generate_cohort(outdir, int(subjects), int(seed), n_atlases=int(atlases), jobs=int(threads), progress=False)


def index_dicom(sheet: str, dicom_root: str, overrides: list[Mapping[str, str]], output: Any, threads: int = 1,
                suv_type: str = "bw", config: Mapping[str, Any] | None = None) -> None:
    """Index the tree, select series per subject and session, and write each subject's selection
    (`work/sub-<id>/sub-<id>_series.json`: the files of the chosen CT and PET per session).

    Problems of one subject or session (missing folder, no PET, no CT, ambiguous PET, a series that
    is not one regular volume, a header that cannot give SUV, undecodable pixel data, ...) do not
    stop the cohort: they go to the failures table (`output.failures`), the session is left out of
    the DAG (:func:`selected_sessions`) and the cohort tables step lists it in qc.parquet.

    A selection file is rewritten only when its content changes, so adding a subject to the
    sheet re-runs the index but none of the other subjects' conversions."""
    from .series_index import index_tree, summary_text, write_index
    from .subjects import read_subject_sheet

    subjects = read_subject_sheet(sheet, dicom_root, missing_dirs="report")
    chosen = {(o["subject_id"], o["session"]): o["series_key"] for o in overrides or []}
    result = index_tree(dicom_root, subjects, jobs=int(threads), overrides=chosen, on_ambiguity="report",
                        suv_type=suv_type)
    if config is not None:  # the pre-flight (glandpet check): stop on config, sheet and atlas problems
        from .preflight import raise_for_problems, run_check

        raise_for_problems(run_check(config, index=result, schema=False), fatal_only=True)
    failures_path = getattr(output, "failures", None)
    write_index(result, output.series, output.files, output.skipped, failures_path=failures_path)
    work = Path(output.files).parent
    for row in result.failures.itertuples():
        (log.error if row.status == "failed" else log.warning)("%s", row.message)
    for subject, selection in session_selections(result.series, result.files).items():
        path = Path(layout_path(work, subject, suffix="series.json"))
        text = json.dumps(selection, indent=2, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(text, path)
    log.info("index of %s:\n%s", Path(dicom_root).name, summary_text(result))


def session_selections(series: Any, files: Any) -> dict[str, dict[str, Any]]:
    """{subject: {session: {tracer, tracer_slug, pet_key, ct_key, pet_files, ct_files}}} of the
    selected series (file paths relative to the DICOM root, in slice order)."""
    from .series_index import series_label

    paths = dict(zip(files["series_key"], files["paths"]))
    labels = {row["series_key"]: series_label(row) for row in series.to_dict("records")}
    sel = series[series["selected"].fillna(False).astype(bool) & (series["role"] == "pet_ac")]
    out: dict[str, dict[str, Any]] = {}
    for row in sel.itertuples():
        ct_key = row.paired_ct_key if isinstance(row.paired_ct_key, str) else None
        out.setdefault(row.subject_id, {})[row.session] = {
            "tracer": row.tracer, "tracer_slug": row.tracer_slug, "pet_key": row.series_key, "ct_key": ct_key,
            "pet_files": list(paths.get(row.series_key, [])), "ct_files": list(paths.get(ct_key, [])) if ct_key else [],
            "pet_label": labels[row.series_key], "ct_label": labels.get(ct_key) if ct_key else None,
        }
    for subject in series["subject_id"].unique():
        out.setdefault(subject, {})
    return out


def convert_session(selection_path: str, dicom_root: str, subject: str, session: str, modality: str,
                    output: Any, suv_type: str | None = None) -> None:
    """Convert the selected CT or PET series of one session to NIfTI (PET in Bq/mL + sidecar, and
    with ``suv_type`` the SUV image ``output.suv``: one job per PET, not two)."""
    from .convert import convert_series
    from .errors import UserError

    selection = json.loads(Path(selection_path).read_text()).get(session)
    if not selection:
        raise UserError(f"sub-{subject} ses-{session}: the index selected no PET series for this session")
    files = selection[f"{modality}_files"]
    if not files:
        raise UserError(f"sub-{subject} ses-{session}: the PET series has no CT (no CT shares its frame of "
                        f"reference or study)" if modality == "ct" else f"sub-{subject} ses-{session}: no PET files")
    out = output.ct if modality == "ct" else output.image
    label = f"sub-{subject} ses-{session} {selection.get(f'{modality}_label') or modality.upper() + ' series'}"
    sidecar = convert_series([str(Path(dicom_root) / f) for f in files], out, suv="none", label=label)
    log.info("sub-%s ses-%s %s: %d files -> %s (%s)", subject, session, modality, len(files), out, sidecar.get("Units"))
    if modality == "pet" and suv_type:
        suv_image(output.image, output.sidecar, suv_type, output.suv)


def suv_image(pet_path: str, sidecar_path: str, suv_type: str, out_path: str) -> None:
    """PET in Bq/mL -> SUV of `suv_type`, with the factors the converter derived from the header."""
    import nibabel as nib
    import numpy as np

    from .errors import SUVError
    from .suv import SUV_CHOICES

    sidecar = json.loads(Path(sidecar_path).read_text())
    factors = sidecar.get("SUVFactors") or {}
    key = SUV_CHOICES[suv_type]
    factor, applied = factors.get(key), sidecar.get("AppliedFactor", 1.0)
    if factor is None or (isinstance(factor, list) and any(f is None for f in factor)):
        raise SUVError(f"{Path(pet_path).name}: the header cannot support SUV type '{suv_type}' ({key} is null)")
    img = nib.load(pet_path)
    bqml = np.asarray(img.dataobj, dtype=np.float32)
    per_slice = np.broadcast_to(np.asarray(factor, dtype=np.float64) / np.asarray(applied, dtype=np.float64), (bqml.shape[2],))
    suv = (bqml * per_slice[None, None, :].astype(np.float32)).astype(np.float32)
    write_nifti_like(suv, img, out_path)
    log.info("%s: SUV%s factor %s (per Bq/mL)", Path(out_path).name, suv_type, per_slice[0])


def write_nifti_like(data: Any, ref: Any, out_path: str | os.PathLike) -> None:
    """Write `data` with the exact affine (qform and sform) of the reference image, atomically."""
    import nibabel as nib

    from .tables import atomic_path

    img = nib.Nifti1Image(data, ref.affine)
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = atomic_path(str(out_path))
    tmp_nii = tmp.with_name(tmp.name + ".nii.gz")
    try:
        nib.save(img, tmp_nii)
        os.replace(tmp_nii, out_path)
    finally:
        for t in (tmp, tmp_nii):
            if t.exists():
                t.unlink()


def register_pet_to_ct(ct_path: str, pet_path: str, out_xfm: str, out_qc: str, threads: int = 1) -> None:
    """Rigid PET->CT registration of one session, with its QC record."""
    from .registration import register_pet_to_ct as register

    set_threads(threads, blas=True)  # ITK and BLAS: what Snakemake granted the job
    metrics = register(ct_path, pet_path, out_xfm, threads=threads)
    status = "warning" if metrics.get("warning") else "ok"
    if metrics.get("warning"):
        log.warning("%s: %s", Path(out_xfm).name, metrics["warning"])
    write_json({"stage": "register", "status": status, "message": metrics.get("warning"), "metrics": metrics}, out_qc)


def align_sessions(psma_ct: str, fapi_ct: str, output: Any, threads: int = 1) -> None:
    """FAPI session CT -> PSMA session CT; writes the affine, the warp and its inverse."""
    from .registration import align_sessions as align

    set_threads(threads, blas=True)  # ITK and BLAS: what Snakemake granted the job
    prefix = transform_prefix_of(output.affine)
    metrics = align(psma_ct, fapi_ct, prefix, threads=threads)
    write_json({"stage": "align", "status": "ok", "message": None, "metrics": metrics}, output.qc)


def ct_to_pet_affine(xfm_path: str) -> Any:
    """The rigid CT->PET transform of a session (ITK .mat) as a 4x4 matrix in RAS mm."""
    import numpy as np

    from .geometry import transform_lps_to_ras
    from .registration import transform_matrix

    A, b = transform_matrix(xfm_path)
    m_lps = np.eye(4)
    m_lps[:3, :3], m_lps[:3, 3] = A, b
    return transform_lps_to_ras(m_lps)


def seg_confidence_columns(seg_qc_path: str | None, gland: str, side: str, review_below: float | None = None,
                           segmentation_source: str = "atlas") -> dict:
    """``seg_confidence``, ``seg_flag``, ``segmentation_source`` of one gland from the session's
    segment QC JSON (``metrics.glands``, :mod:`glandpet.seg_confidence`). A corrected segmentation
    was reviewed by a person: confidence 1, flag ok. A QC JSON without the per-gland block (older
    results) or without this gland: no confidence, flag review."""
    from .seg_confidence import REVIEW_BELOW, flag

    review_below = REVIEW_BELOW if review_below is None else float(review_below)
    if segmentation_source == "corrected":
        return dict(seg_confidence=1.0, seg_flag="ok", segmentation_source="corrected")
    glands = {}
    if seg_qc_path and Path(seg_qc_path).is_file():
        glands = (json.loads(Path(seg_qc_path).read_text()).get("metrics") or {}).get("glands") or {}
    conf = (glands.get(f"{gland}_{side}") or {}).get("confidence")
    conf = None if conf is None else float(conf)
    return dict(seg_confidence=conf, seg_flag=flag(conf, review_below), segmentation_source="atlas")


def measure_glands(inputs: Any, output: Any, subject: str, session: str, suv_type: str, pvc: Mapping[str, Any],
                   review_below: float | None = None, segmentation_source: str | None = None) -> None:
    """Per-gland statistics in the session's PET space, with partial-volume correction.

    The CT-space label map is carried onto the PET grid as per-voxel label fractions, through the
    PET->CT registration (no interpolation of label values); volumes come from the CT labels. Each
    gland gets the segmentation's confidence and review flag (:func:`seg_confidence_columns`);
    ``segmentation_source`` (None: from the label map's name, ``desc-corrected`` -> "corrected",
    as rules/common.smk's ``dseg`` names it; not a rule param: a callable param's digest would
    differ from the job's and make every failure record of the rule look stale).
    """
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from .glands import read_label_table
    from .measure import gland_statistics, label_fractions_on_grid, volume_ml_from_labels, voxel_sizes
    from .pvc import background_regions, body_fraction_from_ct, gtm, rbv_region_means, session_fwhm_mm
    from .tables import atomic_path

    if segmentation_source is None:
        segmentation_source = "corrected" if _entities(inputs.dseg).get("desc") == "corrected" else "atlas"
    suv_img, ct_img, lab_img = nib.load(inputs.suv), nib.load(inputs.ct), nib.load(inputs.dseg)
    suv = np.asarray(suv_img.dataobj, dtype=np.float32)
    labels = np.asarray(lab_img.dataobj).astype(np.int16)
    table = read_label_table(label_table_of(inputs.dseg))
    # CT voxel -> PET world: the registration maps CT points to the PET points of the same tissue.
    ct_to_pet = ct_to_pet_affine(inputs.xfm)
    ct_in_pet = ct_to_pet @ lab_img.affine
    values = [lab.index for lab in table]
    fractions = label_fractions_on_grid(labels, ct_in_pet, suv.shape, suv_img.affine, values)
    volumes = volume_ml_from_labels(labels, lab_img.affine, values)
    rows = gland_statistics(suv, fractions, suv_img.affine, table, volumes_ml=volumes)

    method = pvc.get("method", "gtm")
    sidecar_path = getattr(inputs, "sidecar", None)
    psf = session_fwhm_mm(pvc, session, json.loads(Path(sidecar_path).read_text()) if sidecar_path else None)
    fwhm = psf.fwhm_mm
    by_name = {f"{lab.gland}_{lab.side}": fractions[lab.index] for lab in table if fractions[lab.index].sum() > 0}
    corrected: dict[str, float] = {}
    if method != "none" and by_name:
        ct = np.asarray(ct_img.dataobj, dtype=np.float32)
        body = body_fraction_from_ct(ct, ct_to_pet @ ct_img.affine, suv.shape, suv_img.affine)
        regions = dict(by_name)
        regions.update(background_regions(by_name, body))
        vox = voxel_sizes(suv_img.affine)
        corrected = (gtm if method == "gtm" else rbv_region_means)(suv, regions, fwhm, vox)
    for row in rows:
        row.update(subject_id=subject, session=session, suv_type=suv_type, pvc_method=method,
                   pvc_fwhm_mm=fwhm if method != "none" else None,
                   suv_mean_pvc=corrected.get(f"{row['gland']}_{row['side']}"),
                   **seg_confidence_columns(getattr(inputs, "seg_qc", None), row["gland"], row["side"], review_below,
                                            segmentation_source))
    df = pd.DataFrame(rows)
    if "seg_confidence" in df.columns:  # all null (no confidence recorded) must still be a float column
        df["seg_confidence"] = df["seg_confidence"].astype("float64")
    tmp = atomic_path(output.stats)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, output.stats)
    # the label map on the PET grid (majority label per voxel), for QC and the voxel correlation
    pet_labels = np.zeros(suv.shape, dtype=np.uint8)
    best = np.zeros(suv.shape, dtype=np.float32)
    for value, frac in fractions.items():
        take = (frac >= 0.5) & (frac > best)
        pet_labels[take], best[take] = value, frac[take]
    write_nifti_like(pet_labels, suv_img, output.pet_dseg)
    log.info("sub-%s ses-%s: %d glands measured (PVC %s, FWHM %.2f mm from %s)", subject, session, len(by_name),
             method, fwhm, psf.source)


def gland_index(inputs: Any, out_path: str, subject: str, index_cfg: Mapping[str, Any]) -> None:
    """Per-gland PSMA/FAPI index of one subject, and the within-gland voxel Spearman correlation
    between PSMA and FAPI SUV on the PSMA PET grid (FAPI brought there through both PET->CT
    registrations and the session alignment)."""
    import pandas as pd

    from .gland_index import gland_index_table
    from .tables import atomic_path

    stats = pd.concat([pd.read_parquet(p) for p in inputs.stats], ignore_index=True)
    stats["subject_id"] = subject
    spearman = None
    # both sessions measured (the montage's inputs name each session's SUV even for one session)
    if {"psma_pet_dseg", "psma_suv", "fapi_suv", "affine"} <= set(inputs.keys()):
        spearman = _voxel_correlations(inputs, subject)
    definition = index_cfg.get("definition", "ratio")
    df = gland_index_table(stats, definition, index_cfg.get("reference") or None, use_pvc=True, spearman=spearman)
    tmp = atomic_path(out_path)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_path)


def _voxel_correlations(inputs: Any, subject: str) -> Any:
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from .gland_index import voxel_spearman
    from .glands import read_label_table
    from .registration import warp

    labels = np.asarray(nib.load(inputs.psma_pet_dseg).dataobj)
    p = session_transform_paths(transform_prefix_of(inputs.affine))
    # PSMA PET point -> PSMA CT (inverse of CT->PET) -> FAPI CT (session) -> FAPI PET (CT->PET).
    fapi_on_psma = warp(inputs.fapi_suv, inputs.psma_suv,
                        [inputs.fapi_xfm, p["warp"], p["affine"], inputs.psma_xfm],
                        invert=[False, False, False, True]).numpy()
    psma = np.asarray(nib.load(inputs.psma_suv).dataobj, dtype=np.float32)
    rows = []
    for lab in read_label_table(label_table_of(inputs.psma_dseg)):
        rho, n = voxel_spearman(psma, fapi_on_psma, labels == lab.index)
        rows.append(dict(subject_id=subject, gland=lab.gland, side=lab.side, voxel_spearman_rho=rho, n_voxels=n))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- cohort
def _qc_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        if not str(path).endswith(".json"):
            continue
        rec = json.loads(Path(path).read_text())
        m = _entities(path)
        rows.append(dict(subject_id=m.get("subject") or "?", session=m.get("session"),
                         stage=rec.get("stage", "?"), status=rec.get("status", "ok"), message=rec.get("message"),
                         metrics_json=json.dumps(rec.get("metrics", {}), sort_keys=True, default=str)))
    return rows


def _review_rows(stats: Any, qc_paths: list[str]) -> list[dict]:
    """qc rows (stage ``segment_review``, status ``warning``) of the glands flagged ``review`` in
    gland_stats, worst first; ``metrics_json`` holds the gland, its confidence, the reasons, its
    volume and the atlases' (from the session's segment QC JSON, :mod:`glandpet.seg_confidence`)."""
    if stats is None or not len(stats) or "seg_flag" not in stats.columns:
        return []
    seg = {}
    for path in qc_paths:
        m = _entities(path)
        is_segment_qc = (m.get("desc"), m.get("suffix"), m.get("extension")) == ("segment", "qc", ".json")
        if is_segment_qc and m["session"] and Path(path).is_file():
            metrics = json.loads(Path(path).read_text()).get("metrics") or {}
            seg[(m["subject"], m["session"])] = metrics.get("glands") or {}
    flagged = stats[stats["seg_flag"] == "review"].copy()
    flagged["_c"] = flagged["seg_confidence"].astype(float).fillna(-1.0)
    rows = []
    for r in flagged.sort_values(["_c", "subject_id", "session", "gland", "side"]).to_dict("records"):
        name = f"{r['gland']}_{r['side']}"
        e = seg.get((r["subject_id"], r["session"]), {}).get(name) or {}
        conf = None if r["_c"] < 0 else float(r["_c"])
        reasons = list(e.get("reasons") or []) if e else ["no confidence recorded"]
        if conf is not None and not reasons:
            reasons = ["confidence under the review threshold"]
        metrics = {"gland": r["gland"], "side": r["side"], "confidence": conf, "reasons": reasons,
                   "volume_ml": e.get("volume_ml", r.get("volume_ml")), "atlas_volumes_ml": e.get("atlas_volumes_ml", [])}
        conf_txt = "none" if conf is None else f"{conf:.2f}"
        rows.append(dict(subject_id=r["subject_id"], session=r["session"], stage="segment_review", status="warning",
                         message=f"{name}: segmentation confidence {conf_txt} ({'; '.join(reasons)}): review",
                         metrics_json=json.dumps(metrics, sort_keys=True, default=str)))
    return rows


def _failure_rows(index_failures: str | None, results: Path) -> list[dict]:
    """qc rows of what did not run: the index's failures and warnings, and the job failure records."""
    import pandas as pd

    rows = []
    if index_failures and Path(index_failures).is_file():
        for r in pd.read_parquet(index_failures).to_dict("records"):
            rows.append(dict(subject_id=r["subject_id"], session=r["session"] if isinstance(r["session"], str) else None,
                             stage=r["stage"], status=r["status"], message=r["message"], metrics_json="{}"))
    for r in failure_records(results):
        rows.append(dict(subject_id=r["subject_id"], session=r.get("session"), stage=r.get("stage", "?"),
                         status="failed", message=r.get("message"),
                         metrics_json=json.dumps({"log": r.get("log")}, sort_keys=True)))
    return rows


def cohort_tables(inputs: Any, output: Any, cfg_hash: str, atlases: list[Mapping[str, str]]) -> None:
    """Gather per-subject Parquet files into the cohort tables (one pass each), add the group from
    the subject sheet, the tracer from the index and the provenance columns."""
    import pandas as pd

    from .cohort_stats import aggregate_tables
    from .subjects import read_subject_sheet
    from .tables import GLAND_INDEX, GLAND_STATS, QC, provenance, write_table

    prov = {"pipeline_version": provenance()["pipeline_version"], "config_hash": cfg_hash}
    groups = read_subject_sheet(inputs.sheet, allow_empty_group=True)[["subject_id", "group"]]
    series = pd.read_parquet(inputs.series, columns=["subject_id", "session", "role", "selected", "tracer"])
    tracers = series[series["selected"].fillna(False).astype(bool) & (series["role"] == "pet_ac")]
    tracers = tracers[["subject_id", "session", "tracer"]].drop_duplicates(["subject_id", "session"])

    def gather(paths: list[str], schema: Any) -> Any:  # no file when every subject failed: qc still lists them
        if paths:
            return aggregate_tables(paths).to_pandas()
        return pd.DataFrame(columns=[f.name for f in schema if f.name not in ("pipeline_version", "config_hash")])

    stats = gather(list(inputs.stats), GLAND_STATS)
    stats = stats.drop(columns=[c for c in ("group", "tracer") if c in stats.columns])
    stats = stats.merge(groups, on="subject_id", how="left").merge(tracers, on=["subject_id", "session"], how="left")
    write_table(stats.assign(**prov), GLAND_STATS, output.gland_stats)

    index = gather(list(inputs.index), GLAND_INDEX)
    index = index.drop(columns=[c for c in ("group",) if c in index.columns]).merge(groups, on="subject_id", how="left")
    write_table(index.assign(**prov), GLAND_INDEX, output.gland_index)

    qc = _qc_rows(list(inputs.qc))
    qc += _review_rows(stats, list(inputs.qc))
    qc += _failure_rows(getattr(inputs, "failures", None), Path(output.qc).parent.parent)
    held = set()
    from .glands import GLANDS, read_label_table

    for atlas in atlases:
        held |= {lab.gland for lab in read_label_table(atlas["label_table"])}
    for gland in GLANDS:
        if gland not in held:
            qc.append(dict(subject_id="*", session=None, stage="segment", status="warning",
                           message=f"no atlas holds the {gland} gland: it is not measured", metrics_json="{}"))
    write_table(pd.DataFrame(qc).assign(**prov) if qc else pd.DataFrame(columns=["subject_id"]), QC, output.qc)
    log.info("cohort tables: %d gland_stats rows, %d gland_index rows, %d qc rows", len(stats), len(index), len(qc))


def _long(df: Any, analysis: str, id_cols: list[str]) -> Any:
    import pandas as pd

    keep = [c for c in id_cols if c in df.columns]
    num = [c for c in df.columns if c not in keep and pd.api.types.is_numeric_dtype(df[c])]
    out = df[keep + num].melt(id_vars=keep, value_vars=num, var_name="statistic", value_name="value")
    out.insert(0, "analysis", analysis)
    return out


def cohort_statistics(inputs: Any, output: Any, clinical: Mapping[str, str] | None = None) -> None:
    """Per-gland cohort statistics as one long tidy table (analysis, gland, ..., statistic, value);
    the registered outcomes (``output.outcomes``: every value against pSS/control and every declared
    clinical variable of the sheet, typed by ``clinical``, with BH q-values) and the diagnostic ROC
    table (``output.diagnostic``)."""
    import pandas as pd

    from . import cohort_stats as cs
    from .subjects import read_subject_sheet
    from .tables import COHORT_STATS, DIAGNOSTIC, OUTCOMES, write_table

    out_path = output if isinstance(output, str) else output.stats
    gs, gi = pd.read_parquet(inputs.gland_stats), pd.read_parquet(inputs.gland_index)
    prov = gs[["pipeline_version", "config_hash"]].iloc[0].to_dict() if len(gs) else {"pipeline_version": "", "config_hash": ""}
    parts = []
    if gs["group"].nunique() > 1:
        parts.append(_long(cs.compare_groups(gs).rename(columns={"value": "variable"}), "fapi_pss_vs_control",
                           ["gland", "session", "variable"]))
    parts.append(_long(cs.psma_fapi_correlation(gi), "psma_vs_fapi_spearman", ["gland", "group"]))
    parts.append(_long(cs.index_by_group(gi).rename(columns={"value": "variable"}), "index_by_group",
                       ["gland", "group", "variable"]))
    sheet = read_subject_sheet(inputs.sheet, allow_empty_group=True, clinical=clinical)
    df = pd.concat(parts, ignore_index=True)
    write_table(df.assign(**prov), COHORT_STATS, out_path)
    log.info("cohort statistics: %d rows from %d analyses", len(df), len(parts))
    if isinstance(output, str):
        return
    outcomes, notes = cs.registered_outcomes(gs, gi, sheet, clinical)
    write_table(outcomes.assign(**prov), OUTCOMES, output.outcomes, metadata=notes)
    if notes["clinical_absent"]:
        log.info("clinical columns declared but not in the sheet (not analysed): %s", ", ".join(notes["clinical_absent"]))
    log.info("registered outcomes: %d tests (%d primary, %d secondary with a p-value)", len(outcomes),
             notes["n_tests"]["primary"], notes["n_tests"]["secondary"])
    diag = cs.diagnostic_table(gi)
    write_table(diag.assign(**prov), DIAGNOSTIC, output.diagnostic,
                metadata={"complete_cases": "subjects with the index, PSMA and FAPI SUVmean of the gland",
                          "combined": f"{cs.COMBINED_NAME}: mean of the subject's "
                                      f"{' and '.join(cs.COMBINED_GLANDS)} values",
                          "directions": cs.DIAGNOSTIC_MARKERS})
    log.info("diagnostic table: %d rows", len(diag))


def cohort_figures(inputs: Any, output: Any) -> None:
    """Cohort figures (PNG + SVG) into the report's figure folder."""
    from .figures import cohort_figures as draw

    out_dir = Path(output.figures)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw(inputs.gland_stats, inputs.gland_index, out_dir, outcomes_path=getattr(inputs, "outcomes", None),
         diagnostic_path=getattr(inputs, "diagnostic", None))
    Path(output.done).write_text("")


def segment_glands(inputs: Any, output: Any, session: str, atlases: list[Mapping[str, str]], fusion: str,
                   refine_hu: Mapping[str, Any], threads: int = 1, atlases_per_gland: int | None = None,
                   atlases_per_region: int | None = None, preserve_volume: bool = True, refine_intensity: bool = True) -> None:
    """Gland labels in one session's CT space: multi-atlas segmentation on the reference session,
    the session transform (inverse, generic-label interpolation) for the other one."""

    from .glands import read_label_table, write_label_table

    set_threads(threads, blas=True)  # ITK and BLAS: what Snakemake granted the job
    if "atlases" in inputs.keys():
        from .segmentation import segment_subject
        from .segmentation_params import SegmentationParams

        params = SegmentationParams.from_config(dict(
            fusion=fusion, refine_hu=refine_hu, atlases_per_gland=atlases_per_gland,
            atlases_per_region=atlases_per_region, preserve_volume=preserve_volume,
            refine_intensity=refine_intensity))
        metrics = segment_subject(inputs.ct, [dict(a) for a in atlases], output.dseg, output.table, params,
                                  threads=threads)
        message = None
        missing = metrics.get("labels_absent")
        if missing:
            message = f"no atlas holds: {', '.join(missing)}"
        _label_editor_tables(output, read_label_table(output.table))
        write_json({"stage": "segment", "status": "warning" if message else "ok", "message": message,
                    "segmentation_source": "atlas", "metrics": metrics}, output.qc)
        return
    from .registration import apply_inverse_session_transform

    prefix = transform_prefix_of(inputs.affine)
    apply_inverse_session_transform(inputs.ref_dseg, inputs.ct, prefix, out_path=output.dseg,
                                    interpolation="genericLabel")
    ref_table = label_table_of(inputs.ref_dseg)
    labels = read_label_table(ref_table)
    write_label_table(output.table, labels)
    _label_editor_tables(output, labels)
    metrics: dict[str, Any] = {"method": "session_transform"}
    ref_qc = getattr(inputs, "ref_qc", None)
    if ref_qc:  # the carried labels are the reference's: so is their per-gland confidence
        ref_metrics = json.loads(Path(ref_qc).read_text()).get("metrics", {})
        if "glands" in ref_metrics:
            metrics["glands"] = ref_metrics["glands"]
    write_json({"stage": "segment", "status": "ok", "message": f"labels carried from the reference session to {session}",
                "segmentation_source": "atlas", "metrics": metrics}, output.qc)


def _label_editor_tables(output: Any, labels: list) -> None:
    """The colour tables beside a session's dseg, for correcting it: 3D Slicer (.ctbl) and ITK-SNAP."""
    from .glands import write_itksnap_labels, write_slicer_ctbl

    if "ctbl" in output.keys():
        write_slicer_ctbl(output.ctbl, labels)
    if "itksnap" in output.keys():
        write_itksnap_labels(output.itksnap, labels)


def qc_montage(inputs: Any, out_png: str, subject: str) -> None:
    """Per-subject QC montage on the reference session's CT."""
    from .figures import qc_montage as draw
    from .glands import read_label_table

    keys = set(inputs.keys())
    pets = {s: inputs[f"{s}_suv"] for s in ("psma", "fapi") if f"{s}_suv" in keys}
    xfms = {s: inputs[f"{s}_xfm"] for s in ("psma", "fapi") if f"{s}_xfm" in keys}
    warp = transform_prefix_of(inputs.affine) if "affine" in keys else None
    labels = read_label_table(label_table_of(inputs.dseg))
    draw(inputs.ct, pets, inputs.dseg, out_png, title=f"sub-{subject}", pet_to_ct_xfms=xfms,
         session_warp=warp, labels=labels, review=flagged_glands(inputs.stats if "stats" in keys else [], inputs.dseg))


def flagged_glands(stats_paths: Any, dseg_path: str) -> dict[str, float | None]:
    """``{gland_side: seg_confidence}`` of the glands flagged ``review`` in the gland_stats of the
    session whose label map ``dseg_path`` is (the montage's), for :func:`glandpet.figures.qc_montage`."""
    import pandas as pd

    session = _entities(dseg_path).get("session")
    out: dict[str, float | None] = {}
    for p in [stats_paths] if isinstance(stats_paths, (str, Path)) else list(stats_paths):
        df = pd.read_parquet(p)
        if "seg_flag" not in df.columns:
            continue
        if session is not None and "session" in df.columns:
            df = df[df["session"] == session]
        for r in df[df["seg_flag"] == "review"].to_dict("records"):
            c = r.get("seg_confidence")
            out[f"{r['gland']}_{r['side']}"] = None if c is None or pd.isna(c) else float(c)
    return out

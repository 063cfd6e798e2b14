"""Failure records and logs: what a failed job writes, whether a record still applies, and the log each step
writes to.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path
import traceback
from typing import Any, Iterator, Mapping

from glandpet.layout import entities

log = logging.getLogger("glandpet")
from glandpet.problems import Problem
from glandpet.repository import PACKAGE_DIR, REPO_DIR, SCRIPTS_DIR
from glandpet.writers import write_json



def failure_record_path(log_path: str | os.PathLike) -> Path | None:
    """Where a per-subject job's failure record goes (None for cohort-level jobs)."""
    log_path = Path(log_path)
    if log_path.parent.parent.name != "logs" or not entities(log_path):
        return None
    results = log_path.parent.parent.parent
    return results / "work" / "failed" / log_path.parent.name / Path(log_path.name).with_suffix(".json")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of the step code: the glandpet package and the Snakemake wrapper scripts (a changed
    line anywhere in them makes earlier failure records stale)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(PACKAGE_DIR.rglob("*.py")) + sorted(SCRIPTS_DIR.glob("*.py"))
    for f in files:
        try:
            h.update(str(f.relative_to(REPO_DIR)).encode() + b"\0" + f.read_bytes())
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
    state = failed_state(folder)
    if state is None:
        return []
    return [r for r in read_failure_records(folder, state) if record_is_current(r, rule_params) != stale]


def failed_state(folder: str) -> tuple | None:
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
def read_failure_records(folder: str, _state: tuple) -> list[dict]:
    out = []
    for p in sorted(Path(folder).glob("*/*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rec["_mtime"] = p.stat().st_mtime
        out.append(rec)
    return out


def _record_failure(log_path: str | os.PathLike, exc: BaseException, job: Any = None) -> None:
    path = failure_record_path(log_path)
    if path is None:
        return
    m = entities(log_path)
    message = " ".join(str(exc).split()) or type(exc).__name__
    from glandpet.errors import UserError

    if not isinstance(exc, UserError):
        message = f"{type(exc).__name__}: {message}"
    prefix = f"sub-{m['subject']}" + (f" ses-{m['session']}" if m["session"] else "")
    if not message.startswith(prefix):
        message = f"{prefix}: {message}"
    rec = Problem(m["subject"], m["session"], Path(log_path).parent.name, "failed", message[:2000]).fields() | {
        "log": str(Path(log_path).name), "fingerprint": job_fingerprint(job)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(rec, path)


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

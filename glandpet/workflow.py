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
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping

from .glands import SESSIONS
from .tables import config_hash

log = logging.getLogger("glandpet")


# --------------------------------------------------------------------------- parse time
def subject_ids(config: Mapping[str, Any], sheet: str) -> list[str]:
    """Subject ids of the run: the demo's S001..S00N, or the validated subject sheet's ids."""
    if config["subjects"] == "":
        return [f"S{i:03d}" for i in range(1, int(config["demo"]["subjects"]) + 1)]
    from .subjects import read_subject_sheet

    return list(read_subject_sheet(sheet, config.get("dicom_root") or None)["subject_id"])


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

    df = pd.read_parquet(series_path, columns=["subject_id", "session", "role", "selected", "tracer_slug"])
    df = df[df["selected"].fillna(False).astype(bool) & (df["role"] == "pet_ac") & df["session"].isin(SESSIONS)]
    out: dict[str, dict[str, str]] = {}
    for sub, ses, trc in zip(df["subject_id"], df["session"], df["tracer_slug"]):
        out.setdefault(sub, {})[ses] = trc
    return out


def selected_sessions(series_path: str, subject: str) -> dict[str, str]:
    """{session: tracer slug} of the PET series the index selected for a subject."""
    return dict(_selected(str(series_path), os.path.getmtime(series_path)).get(subject, {}))


# --------------------------------------------------------------------------- run time
@contextlib.contextmanager
def log_to(path: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """Send the step's logging, stdout and stderr to its Snakemake log file; log tracebacks."""
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
        except Exception:
            traceback.print_exc(file=fh)
            raise
        finally:
            root.removeHandler(handler)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    from .tables import atomic_path

    tmp = atomic_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def set_threads(threads: int) -> None:
    """Limit ITK/BLAS threads to what Snakemake granted the job."""
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(max(1, int(threads)))

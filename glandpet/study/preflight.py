"""`glandpet check CONFIG`: the pre-flight of a cohort, from headers only, in seconds.

Checks, in order (each problem names subject, session, series and cause):

1. the config against ``config.schema.yaml`` (the message names the key);
2. the subject sheet: every row (empty or duplicate ids, ids unusable in file names, empty or unknown
   group, dicom_dir and patient_id both or neither, missing folder), then
   :func:`glandpet.study.subjects.read_subject_sheet` itself;
3. the index (:func:`glandpet.dicom.catalog.index_tree`, ambiguities reported): each subject has
   DICOM; each session resolves to exactly one attenuation-corrected PET and one CT; a subject has
   at least one PSMA or FAPI session; PET series whose tracer is not recognised are named;
4. SUV: the index applies the SUV rules (:mod:`glandpet.suv.factors`) to each selected PET's header, and
   the configured ``suv_type`` must have a factor (the index's failures table carries 3 and 4);
5. atlases: files present, NIfTI headers readable, CT and label map on the same grid, label table
   valid (:func:`glandpet.glands.read_label_table`).

``error`` problems stop the run or leave a subject or session out of the results (``glandpet check``
exits 1); ``warning`` problems do not. The workflow's index stage calls :func:`run_check` with the
index it built (``index=``) and ``raise_for_problems(..., fatal_only=True)``, so ``snakemake`` stops
early, with the same messages, on the problems that would stop the whole run (config, subject sheet,
atlases); failed subjects and sessions are left out and listed in qc.parquet.
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from glandpet.errors import UserError
from glandpet.glands import GROUPS
from glandpet.problems import Problem
from glandpet.repository import CONFIG_SCHEMA, DEFAULT_CONFIG

__all__ = [
    "Problem",
    "load_config",
    "problems_table",
    "raise_for_problems",
    "run_check",
    "config_error_line",
    "run_check_command",
    "validate_config",
]

#: A pre-flight problem's status (glandpet.problems.STATUSES): "failed" would leave a session or
#: subject out, or stop the run (:func:`is_fatal`); "warning" is worth a look.
ERROR, WARNING = "failed", "warning"


def _problem(subject: str | None, session: str | None, about: str, cause: str, severity: str = ERROR) -> Problem:
    """A pre-flight problem (stage ``check``): of a subject's session, or of the run (no subject);
    ``about``: the series key, ``config``, ``subject sheet``, ``index`` or ``atlas <name>``."""
    return Problem(subject or None, session or None, "check", severity, cause, about=about)


# ------------------------------------------------------------------------------ config
def _deep_update(base: dict, new: Mapping) -> dict:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_config(path: str | Path, *, defaults: bool = True) -> dict:
    """A study config merged over the workflow's default config.yaml (as `snakemake --configfile` does)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found")
    try:
        user = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(user, dict):
        raise UserError(f"config file {p}: expected keys and values (a mapping)")
    base: dict = {}
    default = DEFAULT_CONFIG
    if defaults and default.is_file():
        base = yaml.safe_load(default.read_text()) or {}
    return _deep_update(base, user)


def validate_config(config: Mapping[str, Any], schema_path: str | Path | None = None) -> list[Problem]:
    """Schema problems, each naming the key (``pvc.method``)."""
    import jsonschema
    import yaml

    sp = Path(schema_path) if schema_path else CONFIG_SCHEMA
    if not sp.is_file():
        return [_problem("", "", "config", f"schema {sp} not found: config not validated", WARNING)]
    schema = yaml.safe_load(sp.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    out = []
    for err in sorted(validator.iter_errors(dict(config)), key=lambda e: [str(x) for x in e.absolute_path]):
        key = ".".join(str(x) for x in err.absolute_path)
        msg = err.message
        if err.validator == "additionalProperties":
            extra = re.findall(r"'([^']+)'", msg)
            known = list((err.schema or {}).get("properties", {}) if isinstance(err.schema, Mapping) else [])
            for e in extra:
                close = difflib.get_close_matches(e, known, n=1, cutoff=0.6)
                hint = f" (did you mean {key + '.' if key else ''}{close[0]}?)" if close else ""
                out.append(_problem("", "", "config", f"unknown key {key + '.' if key else ''}{e}{hint}"))
            continue
        if err.validator == "required":
            m = re.match(r"'([^']+)'", msg)
            name = f"{key}.{m.group(1)}" if key and m else (m.group(1) if m else key)
            out.append(_problem("", "", "config", f"key {name}: missing"))
            continue
        out.append(_problem("", "", "config", f"key {key or '(top level)'}: {msg}"))
    return out


def config_error_line(config: Mapping[str, Any], schema_path: str | Path | None = None, *,
                      raise_error: bool = False) -> str | None:
    """The config's schema problems in one line (``config: unknown key pvc.methd (did you mean
    pvc.method?)``), worded as ``glandpet check`` words them; None when the config is valid. With
    `raise_error` a problem raises :class:`UserError` with that line (the Snakefile's check)."""
    problems = [p for p in validate_config(config, schema_path) if p.status == ERROR]
    if not problems:
        return None
    line = "config: " + "; ".join(p.message for p in problems)
    if raise_error:
        raise UserError(line)
    return line


# ------------------------------------------------------------------------------ subject sheet
def _sheet_rows(path: Path, root: Path | None, clinical: Mapping[str, str] | None = None) -> list[Problem]:
    """Every row's problems (read_subject_sheet stops at the first), the declared clinical columns'
    values against their types included."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception:  # noqa: BLE001 - read_subject_sheet gives the precise message
        return []
    df.columns = [str(c).strip() for c in df.columns]
    if "subject_id" not in df.columns or "group" not in df.columns:
        return []
    from glandpet.study.subjects import ID_PATTERN, NUMERIC_CLINICAL_COLUMNS, _check_clinical, clinical_types

    types = {c: "continuous" for c in NUMERIC_CLINICAL_COLUMNS}
    try:
        types.update(clinical_types(clinical) if clinical is not None else {})
    except UserError:
        pass  # the config's schema check names a bad type
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(df.to_dict("records")):
        line = i + 2
        sid = str(r.get("subject_id", "")).strip()
        where = f"line {line}"
        if not sid:
            out.append(_problem("", "", "subject sheet", f"{where}: empty subject id"))
            continue
        if not ID_PATTERN.match(sid):
            out.append(_problem(sid, "", "subject sheet", f"{where}: subject id not usable in file names "
                                                          "(letters and digits only)"))
        if sid.lower() in seen:
            out.append(_problem(sid, "", "subject sheet", f"{where}: duplicate subject id (also on line {seen[sid.lower()]})"))
        else:
            seen[sid.lower()] = line
        group = str(r.get("group", "")).strip().lower()
        if not group:
            out.append(_problem(sid, "", "subject sheet", f"{where}: group is empty (fill in {' or '.join(GROUPS)})"))
        elif group not in GROUPS:
            out.append(_problem(sid, "", "subject sheet", f"{where}: unknown group {r['group']!r} "
                                                          f"(expected {' or '.join(GROUPS)})"))
        ddir = str(r.get("dicom_dir", "") or "").strip()
        pid = str(r.get("patient_id", "") or "").strip()
        if ddir and pid:
            out.append(_problem(sid, "", "subject sheet", f"{where}: both dicom_dir and patient_id are filled"))
        elif not ddir and not pid:
            out.append(_problem(sid, "", "subject sheet", f"{where}: neither dicom_dir nor patient_id is filled"))
        elif ddir and root is not None:
            folder = Path(ddir) if Path(ddir).is_absolute() else root / ddir
            if not folder.is_dir():
                out.append(_problem(sid, "", "subject sheet", f"{where}: dicom_dir folder {ddir!r} not found "
                                                              "under dicom_root"))
        for col, kind in types.items():
            if col in df.columns:
                bad = _check_clinical(col, kind, str(r.get(col, "") or "").strip())
                if bad:
                    out.append(_problem(sid, "", "subject sheet", f"{where}, column {col}: {bad}"))
    return out


# ------------------------------------------------------------------------------ atlases
def _atlas_problems(atlases: list[Mapping[str, str]], base: Path) -> list[Problem]:
    import nibabel as nib
    import numpy as np

    from glandpet.glands import MIN_FRACTION_OF_ATLAS_MEDIAN, read_label_table, volume_warnings
    from glandpet.segmentation.multi_atlas import gland_volumes_ml

    out: list[Problem] = []
    for a in atlases:
        name = f"atlas {a.get('name', '?')}"
        paths = {k: (Path(a[k]) if Path(a[k]).is_absolute() else base / a[k]) for k in ("ct", "labels", "label_table") if k in a}
        missing = [k for k, p in paths.items() if not p.is_file()]
        for k in missing:
            out.append(_problem("", "", name, f"{k} file {paths[k]} not found"))
        if missing:
            continue
        imgs = {}
        for k in ("ct", "labels"):
            try:
                imgs[k] = nib.load(str(paths[k]))  # header only: the data are read lazily
            except Exception as exc:  # noqa: BLE001
                out.append(_problem("", "", name, f"{k} file {paths[k].name} is not a readable NIfTI ({type(exc).__name__})"))
        if len(imgs) == 2:
            c, lab = imgs["ct"], imgs["labels"]
            if c.shape[:3] != lab.shape[:3] or not np.allclose(c.affine, lab.affine, atol=1e-3):
                out.append(_problem("", "", name, f"labels grid {lab.shape[:3]} differs from the CT grid {c.shape[:3]}"))
        try:
            read_label_table(paths["label_table"])
        except (ValueError, OSError, KeyError) as exc:
            out.append(_problem("", "", name, f"label table: {exc}"))
            continue
        if "labels" in imgs and not any(p.about == name for p in out):
            # contour volumes (the label voxels are read: a few MB per atlas)
            vols = {g: ml for g, ml in gland_volumes_ml(paths["labels"], paths["label_table"]).items() if ml > 0}
            for msg in volume_warnings(vols):
                out.append(_problem("", "", name, f"{msg} (a contour under {MIN_FRACTION_OF_ATLAS_MEDIAN:.0%} of the "
                                                 "atlases' median for that gland does not vote on it)", WARNING))
    return out


# ------------------------------------------------------------------------------ the check
def run_check(config: Mapping[str, Any], *, base_dir: str | Path = ".", jobs: int = 1, progress: bool = False,
              index: Any = None, schema: bool = True) -> list[Problem]:
    """Every problem of a study that can be seen before running (see the module docstring).

    `config`: the merged config (:func:`load_config`); relative paths are taken from `base_dir` (the
    folder snakemake runs in). `index`: an :class:`~glandpet.dicom.catalog.IndexResult` already built
    from this config's sheet (the workflow's index stage), else the tree is indexed here."""

    problems: list[Problem] = []
    base = Path(base_dir)
    if schema:
        problems += validate_config(config)
        if any(p.status == ERROR for p in problems):
            return problems
    if not config.get("subjects"):
        return problems  # the demo cohort
    res = Path(str(config["subjects"]))
    sheet_path = res if res.is_absolute() else base / res
    root_s = str(config.get("dicom_root") or "")
    root = (Path(root_s) if Path(root_s).is_absolute() else base / root_s) if root_s else None
    if root is None or not root.is_dir():
        return problems + [_problem("", "", "config", f"key dicom_root: folder {root_s!r} not found")]

    # subject sheet
    from glandpet.study.subjects import read_subject_sheet

    if not sheet_path.is_file():
        return problems + [_problem("", "", "config", f"key subjects: subject sheet {sheet_path} not found")]
    rows = _sheet_rows(sheet_path, root, config.get("clinical"))
    problems += rows
    sheet = None
    try:
        sheet = read_subject_sheet(sheet_path, root, allow_empty_group=True, clinical=config.get("clinical"))
    except UserError as exc:
        if not rows:
            problems.append(_problem("", "", "subject sheet", str(exc)))
    if sheet is None:
        return problems

    # index
    overrides = {(o["subject_id"], o["session"]): o["series_key"] for o in config.get("series_overrides") or []}
    suv_type = str(config.get("suv_type", "bw"))
    if index is None:
        from glandpet.dicom.catalog import index_tree

        try:
            index = index_tree(root, sheet, jobs=jobs, progress=progress, overrides=overrides, on_ambiguity="report",
                               suv_type=suv_type)
        except UserError as exc:
            return problems + [_problem(None, None, "index", str(exc))]
    # the index names what cannot be processed per subject and session (the SUV rules included)
    problems += _from_failures(index.failures, index.series)

    # atlases
    atlases = list(config.get("atlases") or [])
    if atlases:
        problems += _atlas_problems(atlases, base)
    else:
        problems.append(_problem("", "", "atlases", "no atlases configured: the synthetic phantom's atlases will "
                                                   "segment this study's CTs (configure atlases of real anatomy)", WARNING))
    return problems


def _from_failures(failures: pd.DataFrame, series: pd.DataFrame) -> list[Problem]:
    """Problems from the index's failures table (status failed: error; warning: warning)."""
    key_of = {}
    if "problem" in series.columns:
        key_of = {m: k for m, k in zip(series["problem"], series["series_key"]) if isinstance(m, str) and m}
    out = []
    for r in failures.itertuples():
        msg = str(r.message)
        ses = r.session if isinstance(r.session, str) else ""
        keys = list(dict.fromkeys(re.findall(r"\b[0-9a-f]{16}\b", msg)))
        key = key_of.get(msg) or ", ".join(keys)
        cause = re.sub(rf"^sub-{re.escape(str(r.subject_id))}( ses-{re.escape(ses)})?: ", "", msg) if ses else \
            re.sub(rf"^sub-{re.escape(str(r.subject_id))}: ", "", msg)
        cause = re.sub(rf"^subject {re.escape(str(r.subject_id))}(, session {re.escape(ses)})?: ", "", cause)
        out.append(_problem(str(r.subject_id), ses, key, cause, ERROR if r.status == "failed" else WARNING))
    return out


def problems_table(problems: list[Problem]) -> str:
    """One table of problems by subject (errors first within a subject)."""
    if not problems:
        return "no problems"
    rows = sorted(problems, key=lambda p: (p.subject_id is None, p.subject_id or "", p.session or "", p.status != ERROR,
                                           p.about or ""))
    cols = ("subject", "session", "series", "status")
    data = [(p.subject_id or "-", p.session or "-", p.about or "-", p.status) for p in rows]
    w = [max(len(c), *(len(d[i]) for d in data)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols)) + "  cause"]
    for d, p in zip(data, rows):
        lines.append("  ".join(x.ljust(w[i]) for i, x in enumerate(d)) + "  " + p.message)
    return "\n".join(lines)


def is_fatal(p: Problem) -> bool:
    """A problem that stops the whole run (config, subject sheet, atlases), not one subject or session."""
    return p.status == ERROR and ((p.about or "") in ("config", "subject sheet", "index")
                                  or (p.about or "").startswith("atlas "))


def raise_for_problems(problems: list[Problem], *, fatal_only: bool = False) -> None:
    """Raise a UserError listing the error problems (none: return). `fatal_only`: only those that stop
    the whole run (:func:`is_fatal`): the workflow's index stage leaves failed subjects and sessions out
    and lists them in qc.parquet instead."""
    errors = [p for p in problems if p.status == ERROR and (is_fatal(p) or not fatal_only)]
    if errors:
        raise UserError(f"{len(errors)} problem(s) would stop the run:\n" + problems_table(errors))


def problems_frame(problems: list[Problem]) -> pd.DataFrame:
    return pd.DataFrame([asdict(p) for p in problems], columns=["subject_id", "session", "stage", "status", "message",
                                                                 "about"])


def run_check_command(args: Any) -> int:
    """`glandpet check CONFIG [--jobs N]`: exit 0 (no errors) or 1 (a problem would stop the run)."""
    t0 = time.perf_counter()
    config = load_config(args.config)
    problems = run_check(config, base_dir=getattr(args, "base_dir", None) or ".", jobs=int(getattr(args, "jobs", 1) or 1),
                         progress=not getattr(args, "quiet", False))
    n_err = sum(p.status == ERROR for p in problems)
    n_warn = len(problems) - n_err
    print(problems_table(problems))
    verdict = "ready to run" if not n_err else "fix the errors above before running"
    print(f"glandpet check: {n_err} error(s), {n_warn} warning(s) in {time.perf_counter() - t0:.1f} s: {verdict}",
          file=sys.stdout)
    return 1 if n_err else 0

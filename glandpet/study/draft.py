"""`glandpet init DICOM_ROOT STUDY_DIR`: draft a study from a DICOM export.

The tree is indexed once (:func:`glandpet.dicom.catalog.index_tree`, ambiguities reported, not
raised). Series are grouped by PatientID (held in memory and written only to the linkage key), and
each patient's PSMA/FAPI sessions are those the index selects. Three files are written:

* ``subjects.tsv`` — the subject sheet of docs/design.md: ``subject_id`` (``S0001``, ``S0002``, ...),
  ``group`` (empty: the team fills ``pss`` | ``control``), and per patient either ``dicom_dir``
  (when all the patient's files lie under one folder that holds no other patient's file: the
  highest such folder below the root) or ``patient_id`` (patients sharing folders); then columns
  describing what was found: ``sessions`` (the sessions the index found, baseline and follow-ups, in
  :func:`glandpet.layout.session_order`: ``psma,fapi,psma2,fapi2``), ``tracers``, ``<session>_day`` (days
  since the patient's first scan, no calendar dates: ``psma_day`` and ``fapi_day`` always, ``psma2_day`` ...
  when some patient has that follow-up) and ``n_series``; then the declared clinical columns (config
  ``clinical``, default the registered outcomes), empty for the team to fill.
* ``linkage-key.tsv`` — ``subject_id`` ↔ ``PatientID``, owner-only permissions (0600), first line
  a comment saying what it is. The workflow never reads it; ``init`` reads it on a re-run so that
  existing patients keep their ids and new patients get the next free ones.
* ``config.yaml`` — every configuration key, commented, with ``subjects``, ``dicom_root`` and
  ``results`` filled in (absolute paths). An existing config is kept.

On a re-run, the team's edits to ``subjects.tsv`` (group, clinical columns) are kept; the found-data
columns (every ``<session>_day`` column among them) are refreshed and new patients appended. Patients
with no attenuation-corrected PSMA or FAPI PET are listed, not added.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from glandpet.errors import UserError
from glandpet.glands import SESSIONS
from glandpet.layout import SESSION_PATTERN, is_session, session_order
from glandpet.repository import DEFAULT_CONFIG, REPO_DIR

__all__ = [
    "FOUND_COLUMNS",
    "found_columns",
    "LINKAGE_HEADER",
    "InitResult",
    "config_text",
    "init_study",
    "next_commands",
    "patient_folders",
    "read_linkage_key",
    "write_linkage_key",
]

LINKAGE_NAME = "linkage-key.tsv"
SHEET_NAME = "subjects.tsv"
CONFIG_NAME = "config.yaml"
LINKAGE_HEADER = ("# glandpet linkage key: subject_id <-> DICOM PatientID. The only file that links the "
                  "pseudonyms to patients. Keep it private (owner-only); the workflow never reads it; "
                  "`glandpet init` reads it to keep subject ids stable.")
#: Columns that `init` writes and refreshes on every run (the team's own columns are kept), for a cohort
#: without follow-up scans (:func:`found_columns`: with a ``<session>_day`` column per follow-up session).
FOUND_COLUMNS = ("sessions", "tracers", "psma_day", "fapi_day", "n_series")
_DAY_COLUMN = re.compile(rf"^({SESSION_PATTERN})_day$")
_ID_RE = re.compile(r"^S(\d+)$")
_DATE_RE = re.compile(r"(?<!\d)(19|20)\d{2}[-_.]?(0[1-9]|1[0-2])[-_.]?(0[1-9]|[12]\d|3[01])(?!\d)")


def found_columns(sessions: Iterable[str] = ()) -> tuple[str, ...]:
    """The columns `init` writes for a cohort with these sessions: :data:`FOUND_COLUMNS`, with a
    ``<session>_day`` column for every follow-up session after ``psma_day`` / ``fapi_day``, in
    :func:`glandpet.layout.session_order`."""
    follow = sorted({s for s in sessions if s not in SESSIONS}, key=session_order)
    return ("sessions", "tracers", *(f"{s}_day" for s in (*SESSIONS, *follow)), "n_series")


def _is_found_column(col: str) -> bool:
    return col in FOUND_COLUMNS or _DAY_COLUMN.match(col) is not None


# ------------------------------------------------------------------------------ linkage key
def read_linkage_key(path: str | Path) -> dict[str, str]:
    """{PatientID: subject_id} from an existing linkage key (empty if the file is absent)."""
    p = Path(path)
    if not p.is_file():
        return {}
    df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, comment=None, skiprows=_comment_lines(p))
    if not {"subject_id", "patient_id"} <= set(df.columns):
        raise UserError(f"linkage key {p}: needs columns subject_id and patient_id")
    out: dict[str, str] = {}
    for sid, pid in zip(df["subject_id"], df["patient_id"]):
        if pid in out and out[pid] != sid:
            raise UserError(f"linkage key {p}: PatientID on several rows ({out[pid]}, {sid})")
        out[pid] = sid
    return out


def _comment_lines(p: Path) -> int:
    n = 0
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            n += 1
    return n


def write_linkage_key(path: str | Path, pid_to_subject: dict[str, str]) -> None:
    """Write the key with owner-only permissions from the start (never world-readable, even briefly)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(LINKAGE_HEADER + "\n")
        fh.write("subject_id\tpatient_id\n")
        for pid, sid in sorted(pid_to_subject.items(), key=lambda kv: _id_number(kv[1])):
            fh.write(f"{sid}\t{pid}\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)


def _id_number(sid: str) -> int:
    m = _ID_RE.match(sid)
    return int(m.group(1)) if m else 10**9


# ------------------------------------------------------------------------------ folders
def patient_folders(files_by_patient: dict[str, Iterable[str]]) -> dict[str, str | None]:
    """For each patient, the highest folder (relative to the root) that holds all the patient's
    files and no other patient's file; None when there is none (patients share folders, or files
    lie directly in the root)."""
    owners: dict[str, set[str]] = defaultdict(set)  # folder -> patients with a file under it
    dirs_of: dict[str, set[str]] = {}
    for pid, paths in files_by_patient.items():
        dirs = {os.path.dirname(p) for p in paths}
        dirs_of[pid] = dirs
        for d in dirs:
            while d:
                if pid in owners[d]:
                    break
                owners[d].add(pid)
                d = os.path.dirname(d)
    out: dict[str, str | None] = {}
    for pid, dirs in dirs_of.items():
        common = os.path.commonpath(sorted(dirs)) if dirs else ""
        if not common or owners[common] != {pid}:
            out[pid] = None
            continue
        best = common
        d = os.path.dirname(common)
        while d and owners[d] == {pid}:
            best = d
            d = os.path.dirname(d)
        out[pid] = best
    return out


# ------------------------------------------------------------------------------ config
#: the workflow's defaults: a drafted study config copies every section of it that is not the study's
#: own (paths, atlases, series overrides), so a key added there reaches new studies without a copy here
#: sections `glandpet init` writes itself: the study's paths and choices, with their own comments
STUDY_SECTIONS = ("results", "subjects", "dicom_root", "demo", "atlases", "series_overrides")


def config_sections(text: str) -> dict[str, str]:
    """Top-level sections of a YAML config text: ``{key: text}``, each with the comment lines
    directly above its key (after the last blank line) and its indented body; in file order."""
    out: dict[str, str] = {}
    pending: list[str] = []
    key = None
    for line in text.splitlines(keepends=True):
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*):", line)
        if m:
            key = m.group(1)
            out[key] = "".join(pending) + line
            pending = []
        elif not line.strip():
            key, pending = None, []
        elif line.startswith("#") and key is None:
            pending.append(line)
        elif key is not None:
            out[key] += line
    return out


def declared_clinical(config_path: str | Path | None = None) -> dict[str, str]:
    """The clinical columns a study declares: the defaults (the registered outcomes) updated by the
    ``clinical`` section of the study's config when it has one (as the workflow merges them)."""
    import yaml

    from glandpet.study.subjects import DEFAULT_CLINICAL

    out = dict(DEFAULT_CLINICAL)
    if config_path is not None and Path(config_path).is_file():
        try:
            cfg = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
        if isinstance(cfg, dict) and isinstance(cfg.get("clinical"), dict):
            out.update({str(k): str(v) for k, v in cfg["clinical"].items()})
    return out


def config_text(subjects: str, dicom_root: str, results: str, atlases: list[dict[str, str]] | None = None) -> str:
    """A commented study config with every key of config.schema.yaml (values valid against the schema)."""
    import yaml

    def q(s: str) -> str:
        return yaml.safe_dump(s, default_style='"').strip()

    if atlases:
        atl = "atlases:\n" + "".join(
            f"  - name: {a['name']}\n    ct: {q(a['ct'])}\n    labels: {q(a['labels'])}\n"
            f"    label_table: {q(a['label_table'])}\n" for a in atlases)
    else:
        atl = ("atlases: []\n"
               "#  - name: hn01                        # letters, digits, _ and -\n"
               "#    ct: /path/to/atlases/hn01/ct.nii.gz\n"
               "#    labels: /path/to/atlases/hn01/labels.nii.gz\n"
               "#    label_table: /path/to/atlases/hn01/labels.tsv   # index, gland, side\n")
    # every other section as the workflow's defaults (config.yaml) write it, comments included
    defaults = config_sections(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    workflow_sections = "\n".join(v for k, v in defaults.items() if k not in STUDY_SECTIONS)
    return f"""# glandpet study configuration, drafted by `glandpet init`.
# Run: snakemake --cores all --configfile {q(str(Path(subjects).parent / CONFIG_NAME))[1:-1]}
# Keys here override the defaults of the workflow's config.yaml. Relative paths are relative to the
# folder snakemake runs in; `glandpet init` writes absolute paths.

# Every output goes under this folder (tables, figures, logs, report).
results: {q(results)}

# Subject sheet (TSV): subject_id, group (pss | control), dicom_dir or patient_id, optional
# clinical columns (essdai, esspri, usf_ml_min, schirmer_mm, ...). Fill the group column first.
subjects: {q(subjects)}

# The subject sheet's dicom_dir values are relative to this folder; patient_id rows are matched
# against every file under it.
dicom_root: {q(dicom_root)}

# Only used when `subjects` is empty (the synthetic demo cohort).
demo:
  subjects: 6
  seed: 0
  atlases: 3
  followups: 0

# Atlases: CT + gland label map + label table (index, gland, side), e.g. built with
# `glandpet atlas add ATLAS_DIR --ct CT_SERIES_DIR --rtstruct RS.dcm`.
# Empty: the synthetic phantom's atlas set (a placeholder: use atlases of real anatomy for a study).
{atl}
# Series chosen by hand where `glandpet check` reports several candidate PET series (session psma,
# fapi, or a follow-up scan's: psma2, fapi2, ...):
#   - {{subject_id: S0001, session: psma, series_key: ab12cd34ef56ab12}}
series_overrides: []

{workflow_sections}"""


def atlas_entry(atlas_dir: str | Path) -> dict[str, str]:
    """Config entry of an atlas folder holding ct.nii.gz, labels.nii.gz and labels.tsv."""
    d = Path(atlas_dir).resolve()
    entry = {"name": re.sub(r"[^A-Za-z0-9_-]+", "_", d.name) or "atlas", "ct": str(d / "ct.nii.gz"),
             "labels": str(d / "labels.nii.gz"), "label_table": str(d / "labels.tsv")}
    missing = [k for k in ("ct", "labels", "label_table") if not Path(entry[k]).is_file()]
    if missing:
        raise UserError(f"atlas folder {d}: missing {', '.join(Path(entry[k]).name for k in missing)} "
                        "(an atlas folder holds ct.nii.gz, labels.nii.gz and labels.tsv)")
    return entry


# ------------------------------------------------------------------------------ init
@dataclass
class InitResult:
    study_dir: Path
    sheet: pd.DataFrame
    n_new: int
    n_kept: int
    not_found: list[str]  # subject ids of the linkage key not in this export
    no_session: int  # patients without an attenuation-corrected PSMA/FAPI PET (not added)
    index: Any  # IndexResult
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config_written: bool = True
    seconds: float = 0.0


def _read_patient_ids(root: Path, first_paths: dict[str, str], progress: bool) -> dict[str, str]:
    """{series_key: PatientID} reading one header per series (PatientID only)."""
    import pydicom

    from glandpet.progress import Progress

    out: dict[str, str] = {}
    with Progress(len(first_paths), "reading patient ids", unit="series", quiet=not progress) as bar:
        for key, rel in first_paths.items():
            try:
                ds = pydicom.dcmread(root / rel, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
                out[key] = str(ds.get("PatientID", "") or "").strip()
            except Exception:  # noqa: BLE001 - the index read it; a failure here means no id
                out[key] = ""
            bar.update()
    return out


def _day(v: Any) -> Any:
    return int(v) if v is not None and not pd.isna(v) else pd.NA


def init_study(dicom_root: str | Path, study_dir: str | Path, *, jobs: int = 1, progress: bool = True,
               atlases: list[str | Path] | None = None) -> InitResult:
    """Index `dicom_root` and write (or update) subjects.tsv, linkage-key.tsv and config.yaml in `study_dir`."""
    import time

    from glandpet.dicom.catalog import index_tree

    t0 = time.perf_counter()
    root = Path(dicom_root).resolve()
    study = Path(study_dir).resolve()
    if not root.is_dir():
        raise UserError(f"DICOM root {dicom_root} is not a folder")
    if study == root or root in study.parents:
        raise UserError(f"study folder {study_dir} is inside the DICOM root {dicom_root}; put it elsewhere "
                        "(the index would read the study's own files)")
    atlas_entries = [atlas_entry(a) for a in atlases or []]
    study.mkdir(parents=True, exist_ok=True)

    result = index_tree(root, None, jobs=jobs, progress=progress, on_ambiguity="report")
    series, files = result.series, result.files
    paths_of = dict(zip(files["series_key"], files["paths"]))
    first = {k: p[0] for k, p in paths_of.items() if len(p)}
    pid_of_series = _read_patient_ids(root, first, progress)

    # group by PatientID (in memory only)
    pseudo_to_pid: dict[str, str] = {}
    warnings: list[str] = list(result.warnings)
    problems: list[str] = list(result.problems)
    failures = getattr(result, "failures", None)
    if isinstance(failures, pd.DataFrame) and not failures.empty:  # the index's per-session findings
        problems = list(dict.fromkeys(problems + [m for m, st in zip(failures["message"], failures["status"])
                                                  if st == "failed" and m not in problems]))
        warnings += [m for m, st in zip(failures["message"], failures["status"]) if st != "failed"]
    for key, sid in zip(series["series_key"], series["subject_id"]):
        pid = pid_of_series.get(key, "")
        prev = pseudo_to_pid.get(sid)
        if prev is None or (not prev and pid):
            pseudo_to_pid[sid] = pid
    files_by_pid: dict[str, list[str]] = defaultdict(list)
    for key, sid in zip(series["series_key"], series["subject_id"]):
        files_by_pid[pseudo_to_pid[sid]].extend(paths_of.get(key, []))
    folders = patient_folders(files_by_pid)
    pid_to_pseudo = {pid: sid for sid, pid in pseudo_to_pid.items()}

    # problems by pseudonym -> by PatientID (reported with the study's subject ids below)
    found_rows: dict[str, dict[str, Any]] = {}
    no_session = 0
    for pid, pseudo in sorted(pid_to_pseudo.items(), key=lambda kv: kv[1]):
        ss = series[series["subject_id"] == pseudo]
        sel = ss[ss["selected"].fillna(False).astype(bool) & (ss["role"] == "pet_ac")]
        cand = ss[(ss["role"] == "pet_ac") & ss["session"].map(is_session)]
        if sel.empty and cand.empty:
            no_session += 1
            continue
        if not pid:
            problems.append(f"{len(ss)} series without a PatientID (study keys "
                            f"{', '.join(sorted(set(ss['study_key'].dropna()))[:3])}) cannot be matched; not added")
            continue
        row: dict[str, Any] = {"dicom_dir": folders.get(pid) or "", "patient_id": "" if folders.get(pid) else pid}
        sessions = sorted(set(cand["session"]), key=session_order)  # selected or ambiguous (problems say which)
        row["sessions"] = ",".join(sessions)
        order = sel[sel["session"].map(is_session)]
        order = order.iloc[sorted(range(len(order)), key=lambda i: session_order(order["session"].iloc[i]))]
        tracers = list(dict.fromkeys(order["tracer"].dropna()))
        row["tracers"] = ",".join(tracers or [t for t in dict.fromkeys(cand["tracer"].dropna())])
        for s in dict.fromkeys([*SESSIONS, *sessions]):
            d = sel.loc[sel["session"] == s, "days_from_first_scan"]
            row[f"{s}_day"] = _day(d.iloc[0]) if len(d) else pd.NA
        row["n_series"] = int((ss["role"] != "other").sum())
        row["_pseudo"] = pseudo
        found_rows[pid] = row

    # stable ids
    key_path = study / LINKAGE_NAME
    known = read_linkage_key(key_path)
    used = {_id_number(s) for s in known.values()}
    nxt = max([n for n in used if n < 10**9], default=0) + 1
    new_pids = [pid for pid in found_rows if pid not in known]
    new_pids.sort(key=lambda p: found_rows[p]["_pseudo"])  # order of salted hashes: reveals nothing
    width = max(4, len(str(nxt + len(new_pids))))
    for pid in new_pids:
        known[pid] = f"S{nxt:0{width}d}"
        nxt += 1
    sid_of = {pid: known[pid] for pid in found_rows}
    write_linkage_key(key_path, known)

    # sheet: keep the team's columns of existing rows
    sheet_path = study / SHEET_NAME
    old = None
    if sheet_path.is_file():
        old = pd.read_csv(sheet_path, sep="\t", dtype=str, keep_default_na=False)
    rows = []
    for pid, row in found_rows.items():
        r = {"subject_id": sid_of[pid], "group": ""}
        r.update({k: v for k, v in row.items() if not k.startswith("_")})
        rows.append(r)
    columns = found_columns(s for r in found_rows.values() for s in r["sessions"].split(",") if s)
    found = pd.DataFrame(rows, columns=["subject_id", "group", "dicom_dir", "patient_id", *columns])
    not_found: list[str] = []
    if old is not None and "subject_id" in old.columns:
        # the team's columns; found-data columns are refreshed (a follow-up no longer found loses its day column)
        extra = [c for c in old.columns if c not in found.columns and not _is_found_column(c)]
        merged = []
        by_id = {r["subject_id"]: r for r in found.to_dict("records")}
        for o in old.to_dict("records"):
            sid = o["subject_id"]
            if sid in by_id:
                r = by_id.pop(sid)
                r["group"] = o.get("group", "") or ""
                r.update({c: o[c] for c in extra})
                merged.append(r)
            else:
                not_found.append(sid)
                merged.append(o)
        merged += list(by_id.values())
        out = pd.DataFrame(merged, columns=list(found.columns) + extra)
    else:
        out = found
    for col in declared_clinical(study / CONFIG_NAME):  # the declared clinical columns, empty for the team
        if col not in out.columns:
            out[col] = ""
    out = out.sort_values("subject_id", key=lambda s: s.map(_id_number), kind="stable").reset_index(drop=True)
    for c in (*(c for c in columns if c.endswith("_day")), "n_series"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("Int64")
    has_pid = bool((out["patient_id"].fillna("") != "").any())
    tmp = sheet_path.with_name(sheet_path.name + ".tmp")
    out.to_csv(tmp, sep="\t", index=False, na_rep="")
    if has_pid:  # PatientIDs are in the sheet: as private as the linkage key
        os.chmod(tmp, 0o600)
        warnings.append(f"{SHEET_NAME} holds PatientIDs (column patient_id, used for matching only, never "
                        f"written to any output): keep it as private as {LINKAGE_NAME}")
    os.replace(tmp, sheet_path)
    for pid, folder in folders.items():
        if folder and pid in found_rows and (_DATE_RE.search(folder) or (len(pid) >= 3 and pid in folder)):
            warnings.append(f"subject {sid_of[pid]}: its folder name holds a date or its PatientID "
                            f"(column dicom_dir); rename the folder if the sheet is shared")

    # the study's ids in the index problems (the index names its own pseudonyms)
    pseudo_to_sid = {found_rows[p]["_pseudo"]: s for p, s in sid_of.items()}
    problems = [_rename(p, pseudo_to_sid) for p in problems]
    warnings = [_rename(w, pseudo_to_sid) for w in warnings]

    cfg_path = study / CONFIG_NAME
    written = not cfg_path.is_file()
    if written:
        cfg_path.write_text(config_text(str(sheet_path), str(root), str(study / "results"), atlas_entries))
    elif atlas_entries:
        warnings.append(f"{cfg_path} exists and was kept: add the atlases to its `atlases:` key by hand")
    return InitResult(study, out, n_new=len(new_pids), n_kept=len(found_rows) - len(new_pids), not_found=not_found,
                      no_session=no_session, index=result, problems=problems, warnings=warnings,
                      config_written=written, seconds=time.perf_counter() - t0)


def _rename(text: str, mapping: dict[str, str]) -> str:
    for a, b in mapping.items():
        text = text.replace(f"subject {a}", f"subject {b}").replace(f"sub-{a}", f"sub-{b}")
        text = text.replace(f"subject_id: {a}", f"subject_id: {b}")
    return text


# ------------------------------------------------------------------------------ report
def repo_dir() -> Path | None:
    """The folder holding the workflow's Snakefile (a source checkout), if any."""
    return REPO_DIR if (REPO_DIR / "Snakefile").is_file() else None


def next_commands(study_dir: Path) -> list[str]:
    cfg = study_dir / CONFIG_NAME
    repo = repo_dir()
    cd = [f"cd {repo}"] if repo else []
    return [
        f"# 1. fill the group column (pss | control) in {study_dir / SHEET_NAME}",
        f"glandpet check {cfg}",
        *cd,
        f"snakemake --cores all --configfile {cfg}",
        f"# on a SLURM cluster: snakemake --workflow-profile profiles/slurm --configfile {cfg}",
    ]


def summary_table(res: InitResult) -> str:
    s, k = res.index.series, res.index.skipped
    sheet = res.sheet
    rows: list[tuple[str, str]] = []
    n = len(sheet)
    rows.append(("patients", f"{n} ({res.n_new} new, {res.n_kept} kept"
                 + (f", {len(res.not_found)} in the sheet but not in this export" if res.not_found else "") + ")"))
    by = [f"dicom_dir {int((sheet['dicom_dir'].fillna('') != '').sum())}",
          f"patient_id {int((sheet['patient_id'].fillna('') != '').sum())}"]
    rows.append(("matched by", ", ".join(by)))
    if res.no_session:
        rows.append(("not added", f"{res.no_session} patients without an attenuation-corrected PSMA or FAPI PET"))
    sel = s[s["selected"].fillna(False).astype(bool) & (s["role"] == "pet_ac")] if not s.empty else s
    ses = []
    found = {x for x in (sel["session"] if not sel.empty else []) if is_session(x)}
    follow = sorted(found - set(SESSIONS), key=session_order)
    for x in (*SESSIONS, *follow):  # the baselines always, then each follow-up session found
        part = sel[sel["session"] == x] if not sel.empty else sel
        tr = Counter(part["tracer"].fillna("unknown")) if not part.empty else Counter()
        ses.append(f"{x} {len(part)}" + (" (" + ", ".join(f"{t} {c}" for t, c in sorted(tr.items())) + ")" if tr else ""))
    rows.append(("sessions", "; ".join(ses)))
    if follow:
        n = int(sel["session"].isin(follow).sum())
        m = sel.loc[sel["session"].isin(follow), "subject_id"].nunique()
        rows.append(("follow-ups", f"{n} follow-up session{'s' if n != 1 else ''} of {m} "
                     f"patient{'s' if m != 1 else ''}"))
    roles = Counter(s["role"]) if not s.empty else Counter()
    rows.append(("series", f"{len(s)}" + (" (" + ", ".join(f"{r} {c}" for r, c in sorted(roles.items())) + ")" if roles else "")))
    kr = Counter(k["reason"]) if not k.empty else Counter()
    rows.append(("files skipped", f"{len(k)}" + (": " + ", ".join(f"{r} {c}" for r, c in kr.most_common()) if kr else "")))
    rows.append(("problems", str(len(res.problems)) if res.problems else "none"))
    w = max(len(a) for a, _ in rows)
    lines = [f"  {a:<{w}}  {b}" for a, b in rows]
    lines += [f"  problem: {p}" for p in res.problems]
    lines += [f"  warning: {x}" for x in res.warnings]
    return "\n".join(lines)


def run_init(args: Any) -> int:
    """`glandpet init DICOM_ROOT STUDY_DIR [--jobs N] [--atlas DIR ...]`."""
    res = init_study(args.dicom_root, args.study_dir, jobs=int(getattr(args, "jobs", 1) or 1),
                     progress=not getattr(args, "quiet", False), atlases=getattr(args, "atlas", None) or [])
    out = sys.stdout
    print(f"glandpet init: {args.dicom_root} -> {res.study_dir} ({res.seconds:.1f} s)", file=out)
    print(summary_table(res), file=out)
    print(f"wrote {res.study_dir / SHEET_NAME}, {res.study_dir / LINKAGE_NAME} (owner-only)"
          + (f", {res.study_dir / CONFIG_NAME}" if res.config_written else f"; kept {res.study_dir / CONFIG_NAME}"),
          file=out)
    print("next:", file=out)
    for c in next_commands(res.study_dir):
        print(f"  {c}", file=out)
    return 0

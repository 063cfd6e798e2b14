"""Read and validate the subject sheet (docs/design.md, "Subject sheet").

A TSV, one row per subject: ``subject_id`` (pseudonymous; letters and digits only, because it
becomes part of file names ``sub-<id>_...``), ``group`` (``pss`` | ``control``), and either
``dicom_dir`` (the subject's folder under the DICOM root) or ``patient_id`` (the DICOM PatientID,
used for matching only and never written to any output); then optional clinical columns.

Every problem is a :class:`~glandpet.errors.UserError` naming the sheet, the line (the header is
line 1) and the column.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from glandpet.errors import UserError
from glandpet.glands import GROUPS
from glandpet.layout import SUBJECT_ID_PATTERN

__all__ = ["read_subject_sheet", "subject_folders", "ID_PATTERN", "NUMERIC_CLINICAL_COLUMNS", "CLINICAL_TYPES",
           "DEFAULT_CLINICAL", "parse_binary", "clinical_types"]

ID_PATTERN = re.compile(rf"^{SUBJECT_ID_PATTERN}$")
#: Clinical columns that must be numeric when present (empty cells are allowed: missing value).
NUMERIC_CLINICAL_COLUMNS = ("essdai", "esspri", "usf_ml_min", "schirmer_mm", "age_years", "disease_duration_years")
#: The types a clinical variable can be declared with (config key ``clinical``).
CLINICAL_TYPES = ("continuous", "ordinal", "binary", "categorical")
#: The study's registered clinical outcomes (the default of the config's ``clinical`` section; config.yaml and
#: config.schema.yaml hold the same mapping, a test keeps them equal).
DEFAULT_CLINICAL: dict[str, str] = {
    "usf_ml_min": "continuous", "essdai": "continuous", "esspri": "continuous", "anti_ssa": "binary",
    "anti_ssb": "binary", "igg_g_l": "continuous", "esr_mm_h": "continuous", "crp_mg_l": "continuous",
    "schirmer_mm": "continuous",
}
#: Spellings a binary column accepts (case-insensitive); an empty cell is a missing value.
BINARY_TRUE = ("positive", "pos", "yes", "y", "1", "+", "true")
BINARY_FALSE = ("negative", "neg", "no", "n", "0", "-", "false")


def parse_binary(value: str) -> bool | None:
    """``positive/negative, yes/no, 1/0, +/-, true/false`` (any case) -> True/False; empty -> None;
    anything else raises ValueError."""
    v = _cell(value).lower()
    if v == "":
        return None
    if v in BINARY_TRUE:
        return True
    if v in BINARY_FALSE:
        return False
    raise ValueError(value)


def clinical_types(clinical=None) -> dict[str, str]:
    """The declared clinical columns and their types: ``clinical`` (the config section) validated, or
    :data:`DEFAULT_CLINICAL` when None."""
    out = dict(DEFAULT_CLINICAL if clinical is None else clinical)
    for col, kind in out.items():
        if kind not in CLINICAL_TYPES:
            raise UserError(f"config clinical.{col}: unknown type {kind!r} (expected one of {', '.join(CLINICAL_TYPES)})")
        if col in ("subject_id", "group", "dicom_dir", "patient_id"):
            raise UserError(f"config clinical.{col}: {col} is a column of the sheet itself, not a clinical variable")
    return out


def _check_clinical(col: str, kind: str, raw: str) -> str | None:
    """The problem of one clinical cell (None: fine)."""
    if raw == "":
        return None
    if kind in ("continuous", "ordinal"):
        try:
            x = float(raw.replace(",", "."))
        except ValueError:
            return f"{raw!r} is not a number ({col} is declared {kind})"
        if not math.isfinite(x):
            return f"{raw!r} is not a finite number ({col} is declared {kind})"
    elif kind == "binary":
        try:
            parse_binary(raw)
        except ValueError:
            return (f"{raw!r} is not a binary value ({col} is declared binary: positive/negative, yes/no, 1/0, +/-, "
                    "true/false; empty = missing)")
    return None


def _cell(v) -> str:
    return "" if v is None else str(v).strip()


def read_subject_sheet(
    path: str | Path, dicom_root: str | Path | None = None, *, allow_empty_group: bool = False,
    missing_dirs: str = "error", clinical=None,
) -> pd.DataFrame:
    """Read and validate a subject sheet; return it as a DataFrame (strings stripped; `group`
    lower-cased; `dicom_dir` / `patient_id` present as columns, empty cells as None; numeric clinical
    columns as floats).

    `dicom_root`: folder that `dicom_dir` values are relative to; when given, each folder must
    exist, unless `missing_dirs="report"`: then a missing folder is left for the index to report as a
    failure of that subject only (the workflow goes on with the others). With `allow_empty_group` an
    empty group is accepted (a sheet drafted by `glandpet init`).

    `clinical`: the declared clinical columns ``{column: continuous|ordinal|binary|categorical}`` (the
    config's ``clinical`` section). Each present column's values are checked against its type (an
    error names the line and the column) and converted: continuous/ordinal to floats, binary to a
    nullable boolean, categorical to strings; empty cells are missing values. Declared columns the
    sheet lacks are left out (not an error). None: only :data:`NUMERIC_CLINICAL_COLUMNS` are checked.
    """
    if missing_dirs not in ("error", "report"):
        raise ValueError("missing_dirs must be 'error' or 'report'")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"subject sheet {path} not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False,
                         encoding="utf-8-sig", comment=None)
    except pd.errors.EmptyDataError:
        raise UserError(f"subject sheet {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"subject sheet {path} is not a readable TSV: {msg}") from None
    df.columns = [str(c).strip() for c in df.columns]
    where = f"subject sheet {path}"
    if len(df.columns) == 1 and "," in df.columns[0]:
        raise UserError(f"{where}: the header has no tab; the sheet must be tab-separated (TSV), not CSV")
    dup_cols = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup_cols:
        raise UserError(f"{where}: column(s) {dup_cols} appear more than once in the header")
    for col in ("subject_id", "group"):
        if col not in df.columns:
            raise UserError(f"{where}: missing column {col!r} (the sheet needs subject_id, group, "
                            "and dicom_dir or patient_id)")
    if "dicom_dir" not in df.columns and "patient_id" not in df.columns:
        raise UserError(f"{where}: needs a column 'dicom_dir' or 'patient_id' to find each subject's DICOM")
    if df.empty:
        raise UserError(f"{where}: has a header but no subjects")
    for col in ("dicom_dir", "patient_id"):
        if col not in df.columns:
            df[col] = ""
    df = df.map(_cell)

    types = ({c: "continuous" for c in NUMERIC_CLINICAL_COLUMNS} if clinical is None
             else {**{c: "continuous" for c in NUMERIC_CLINICAL_COLUMNS}, **clinical_types(clinical)})
    root = Path(dicom_root) if dicom_root not in (None, "") else None
    if root is not None and not root.is_dir():
        raise UserError(f"DICOM root {root} is not a folder")

    seen_ids: dict[str, int] = {}
    seen_pid: dict[str, int] = {}
    seen_dirs: dict[Path, tuple[int, str]] = {}  # each subject's folder
    seen_parents: dict[Path, tuple[int, str]] = {}  # every folder above one of them (overlap check in O(depth))
    for i, row in enumerate(df.itertuples(index=False)):
        line = i + 2
        r = dict(zip(df.columns, row))
        sid = r["subject_id"]
        at = f"{where}, line {line}"
        if not sid:
            raise UserError(f"{at}, column subject_id: empty subject id")
        if not ID_PATTERN.match(sid):
            raise UserError(f"{at}, column subject_id: {sid!r} is not usable in file names "
                            "(letters and digits only, e.g. 'pss001')")
        key = sid.lower()  # ids differing only in case collide on case-insensitive file systems
        if key in seen_ids:
            raise UserError(f"{at}, column subject_id: duplicate subject id {sid!r} (also on line {seen_ids[key]})")
        seen_ids[key] = line
        at = f"{at} (subject {sid})"
        group = r["group"].lower()
        if not group:
            if not allow_empty_group:
                raise UserError(f"{at}, column group: empty group (expected one of {', '.join(GROUPS)})")
        elif group not in GROUPS:
            raise UserError(f"{at}, column group: unknown group {r['group']!r} (expected one of {', '.join(GROUPS)})")
        df.iat[i, df.columns.get_loc("group")] = group
        ddir, pid = r["dicom_dir"], r["patient_id"]
        if ddir and pid:
            raise UserError(f"{at}: both dicom_dir and patient_id are filled; give exactly one")
        if not ddir and not pid:
            raise UserError(f"{at}: neither dicom_dir nor patient_id is filled; give exactly one")
        if pid:
            if pid in seen_pid:
                raise UserError(f"{at}, column patient_id: the same patient id is also on line {seen_pid[pid]}")
            seen_pid[pid] = line
        folder = None
        if ddir and root is not None:
            folder = (root / ddir) if not Path(ddir).is_absolute() else Path(ddir)
            if not folder.is_dir() and missing_dirs == "report":
                folder = None  # the index reports it as a failure of this subject
        if folder is not None:
            if not folder.is_dir():
                raise UserError(f"{at}, column dicom_dir: folder {ddir!r} not found under the DICOM root {root}")
            real = folder.resolve()
            clash = (seen_dirs.get(real) or seen_parents.get(real)
                     or next((seen_dirs[q] for q in real.parents if q in seen_dirs), None))
            if clash:
                oline, osid = clash
                raise UserError(f"{at}, column dicom_dir: folder {ddir!r} overlaps the folder of subject "
                                f"{osid} (line {oline}); each subject needs a folder of their own")
            seen_dirs[real] = (line, sid)
            for q in real.parents:
                seen_parents.setdefault(q, (line, sid))
        for col, kind in types.items():
            if col in df.columns:
                bad = _check_clinical(col, kind, r[col])
                if bad:
                    raise UserError(f"{at}, column {col}: {bad}")

    for col in ("group", "dicom_dir", "patient_id"):
        df[col] = pd.Series([v if isinstance(v, str) and v else None for v in df[col]], dtype=object, index=df.index)
    for col, kind in types.items():
        if col not in df.columns:
            continue
        if kind in ("continuous", "ordinal"):
            df[col] = pd.to_numeric(df[col].str.replace(",", ".", regex=False).replace("", None), errors="coerce")
        elif kind == "binary":
            df[col] = pd.array([parse_binary(v) for v in df[col]], dtype="boolean")
        else:
            df[col] = pd.Series([v if v else None for v in df[col]], dtype=object, index=df.index)
    return df


def subject_folders(sheet: pd.DataFrame, dicom_root: str | Path) -> dict[str, Path]:
    """subject_id -> absolute folder, for the rows that give a dicom_dir."""
    root = Path(dicom_root)
    out = {}
    for sid, ddir in zip(sheet["subject_id"], sheet["dicom_dir"]):
        if isinstance(ddir, str) and ddir:
            p = Path(ddir)
            out[sid] = (p if p.is_absolute() else root / p).resolve()
    return out

"""Index a DICOM tree: one row per series, classified, paired and selected, with no identifiers.

`index_tree` walks a real-world export (nested folders, files without extension, DICOMDIR,
non-DICOM and truncated files, duplicate instances, several studies per patient), reads headers
only, groups instances into series, classifies each series, pairs each PET with a CT and chooses
the PET of each session per subject (tracer family ``psma`` | ``fapi`` at a time point: ``psma``,
``fapi`` the baseline, ``psma2``, ``fapi2`` ... the follow-ups, from the scan days).

Subjects
--------
From the subject sheet (:mod:`glandpet.study.subjects`): a row with ``dicom_dir`` owns every file under
that folder; a row with ``patient_id`` owns every file whose PatientID equals it (the whole root is
walked then, and files of other patients are listed in ``skipped``). Without a sheet, each
PatientID becomes a pseudonymous id ``p`` + 10 hex digits of a salted HMAC-SHA256 (never the
PatientID itself). UIDs are stored only as 16-hex salted hashes (``series_key``, ``study_key``,
``frame_key``): deterministic, so keys are stable between runs with the same salt (environment
variable ``GLANDPET_SALT``, else a fixed default; set a secret salt for real exports).

Grouping
--------
Instances are grouped by SeriesInstanceUID. A series that mixes modalities, SOP classes, image
sizes, pixel spacings or orientations is split into parts (``split_part`` 1, 2, ...; keys are
hashes of UID#part). A SOPInstanceUID seen twice is indexed once (first path in sorted order);
the other copies are skipped as "duplicate instance".

Roles
-----
* ``other``: secondary capture, RTSTRUCT / SEG / RTDOSE / SR / presentation states / any
  non-image SOP class, PET MIPs / projections, single-slice PET.
* ``localizer``: ImageType contains LOCALIZER, or a CT series with a single slice (scout).
* ``ct``: a CT image series with two or more slices.
* ``pet_ac``: a PET image series whose CorrectedImage contains ATTN; when CorrectedImage is
  absent, a description naming NAC/NOAC/uncorrected makes it ``pet_nac``, else it is assumed AC
  (``role_rule`` says so).
* ``pet_nac``: CorrectedImage present without ATTN.

Tracer and session of a PET: :func:`glandpet.dicom.tracers.classify_dataset`; FDG or any non-PSMA /
non-FAP tracer has session None (tracer named); an unrecognised tracer has tracer None and the
text in ``tracer_note``.

Pairing PET -> CT (``pairing_rule``)
-----------------------------------
1. ``frame_of_reference``: a CT of the same subject with the same FrameOfReferenceUID;
2. ``study_closest_time``: else a CT of the same study;
3. ``same_day_closest_time``: else a CT of the same subject acquired the same day within 3 h
   (PET and CT exported as two studies);
4. none: ``paired_ct_key`` null, ``pairing_rule`` "no CT".
Ties within a rule: axial CT first, then closest acquisition time, then most slices, then the
highest series number.

Session selection (``selected``, ``selection_rule``, ``session``)
-----------------------------------------------------------------
A session is a tracer family at a time point (:func:`glandpet.layout.session_name`): ``psma`` / ``fapi``
the baseline, ``psma2`` / ``fapi2`` the first follow-up, ``psma3`` the second ... Per subject and tracer
family, the candidates are the ``pet_ac`` series of that family, grouped into acquisitions (same study and
frame of reference, first acquisition times within 30 min: reconstructions of the same scan), and the
acquisitions into time points by their day (``days_from_first_scan``): the earliest day is the baseline
(``psma``), the next day ``psma2``, and so on (numbered by distinct day). Per time point:
* none: the session is missing (allowed; downstream handles it);
* one: selected ("only candidate"; with follow-ups the rule names the time point and its day);
* an override ``overrides[(subject_id, session)] = series_key`` selects that series for that session
  (any session name, ``psma2`` too; it must be a ``pet_ac`` series of that subject whose tracer family
  is that session's or unknown); the series is no automatic candidate of another session, and its day
  still counts in its family's numbering;
* several of one acquisition: prefer, in order, (1) the one whose CT pairs by frame of reference,
  (2) ImageType ORIGINAL over DERIVED, (3) the finest voxels (smallest voxel volume: glands are small),
  (4) the most slices, (5) the highest series number;
* several acquisitions on one day (a repeat scan, a dual-time-point protocol): ambiguous for that
  session only (the other time points are selected). `on_ambiguity="error"` (default) raises a
  UserError naming the subject, the session and the candidate series; ``"report"`` selects none of them
  and lists the problem in ``IndexResult.problems`` (used by ``glandpet init`` / ``check``).
An acquisition without a day (no date in its headers) leaves its family unordered: several acquisitions
of that family are then ambiguous for the baseline session. The selected PET carries its session
(``tracer_session``, internal, stays the family); the CT paired with it is selected too and carries the
same session.

Failures (``IndexResult.failures``, FAILURES_SCHEMA; never raised)
-------------------------------------------------------------------
Everything that would break a subject or a session and can be seen in the headers, without reading
pixels: a subject's folder missing or empty or without DICOM images, no PET (CT without PET), no PSMA /
FAPI tracer, an ambiguous session (``on_ambiguity="report"``), and for the selected PET and its CT: no
CT, truncated files (file size against the pixel data length the header implies), not one regular
volume (unequal spacing, missing slices, two instances at one position, gantry tilt: the converter's
tolerances; a CT whose only fault is unequal spacing or gantry tilt is not a failure but a ``warning``
row: the converter makes its slices equidistant through dcm2niix, or de-shears the tilt from the slice
positions, glandpet.dicom.ct_dcm2niix), a compressed transfer syntax without a decoder, a PET header that cannot give SUV (the
rules of :mod:`glandpet.suv.factors` on the first header) or not the requested ``suv_type``. Each row names
the subject (``sub-<id>``), the session and the series (number and description) and the cause;
``status`` is ``failed`` (the selected PET's ``problem`` column holds the message, and the workflow
leaves the session out) or ``warning`` (an unused PET of an unknown tracer, skipped unreadable files).

No patient name, id, birth date, accession number, institution or physician is stored: the
series description (and any tracer text) is dropped when it contains one of them. File paths
relative to the root are stored in the files and skipped tables (the converter needs them);
``IndexResult.warnings`` says when a path contains an identifier (folders named after patients).

Stages
------
:func:`index_tree` runs the catalog's stages over one record type (:mod:`glandpet.dicom.catalog_records`):
:mod:`~glandpet.dicom.catalog_headers` (files and headers), :mod:`~glandpet.dicom.catalog_grouping` (subjects,
series, roles, geometry), :mod:`~glandpet.dicom.catalog_pairing` (PET -> CT, sessions),
:mod:`~glandpet.dicom.catalog_selection` (one PET and its CT per subject and session) and
:mod:`~glandpet.dicom.catalog_failures` (the failures table); this module writes the tables and runs the
command. The names callers use are importable from here.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa

from glandpet.dicom.catalog_failures import FAILURES_SCHEMA, decoder_problem, failure_rows, identifier_warnings
from glandpet.dicom.catalog_grouping import add_scan_times, assign_subjects, drop_duplicates, group_series
from glandpet.dicom.catalog_headers import clear_caches, files_to_read, read_header, read_headers, sort_records
from glandpet.dicom.catalog_pairing import pair_pets_with_cts
from glandpet.dicom.catalog_records import FILES_SCHEMA, SERIES_SCHEMA, SKIP_REASONS, SKIPPED_SCHEMA, salted_key, series_label, series_table, subject_pseudonym
from glandpet.dicom.catalog_selection import check_overrides, select_paired_cts, select_sessions
from glandpet.errors import UserError
from glandpet.glands import SESSIONS
from glandpet.layout import is_session, session_order

__all__ = [
    "IndexResult", "index_tree", "run_index", "SERIES_SCHEMA", "FILES_SCHEMA", "SKIPPED_SCHEMA", "FAILURES_SCHEMA",
    "SKIP_REASONS", "salted_key", "subject_pseudonym", "read_overrides", "series_label", "decoder_problem",
    "read_header", "write_index", "output_paths", "summary_text", "session_counts",
]


# ------------------------------------------------------------------------------------------
# result

@dataclass
class IndexResult:
    """The tables of one index run (series, files, skipped, failures) and what it found (problems, warnings, timings)."""

    series: pd.DataFrame
    files: pd.DataFrame
    skipped: pd.DataFrame
    problems: list[str] = field(default_factory=list)  # ambiguities (on_ambiguity="report")
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # n_files, seconds, files_per_s
    # one row per subject / session that cannot be processed (status failed) or needs a look
    # (warning): FAILURES_SCHEMA columns; messages name the subject, session, series and cause
    failures: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FAILURES_SCHEMA.names))


def index_tree(
    root: str | Path,
    subjects: pd.DataFrame | str | Path | None = None,
    jobs: int = 1,
    progress: bool = False,
    *,
    overrides: Mapping[tuple[str, str], str] | None = None,
    salt: str | None = None,
    on_ambiguity: str = "error",
    suv_type: str = "bw",
) -> IndexResult:
    """Index the DICOM tree under `root` (see the module docstring for every rule).

    `subjects`: a subject sheet (path, or DataFrame from :func:`glandpet.study.subjects.read_subject_sheet`);
    None: pseudonymous ids from PatientID. `overrides`: {(subject_id, session): series_key}.
    `on_ambiguity`: "error" (raise UserError) or "report" (IndexResult.problems).
    `suv_type`: the SUV the workflow will compute; a selected PET whose header cannot give it is a
    failure of its session (IndexResult.failures, and the series' ``problem``).
    """
    t0 = time.perf_counter()
    clear_caches()  # per-series caches hold within one index run only (files may change between runs)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"DICOM root {root} is not a folder")
    if on_ambiguity not in ("error", "report"):
        raise ValueError("on_ambiguity must be 'error' or 'report'")
    if subjects is not None and not isinstance(subjects, pd.DataFrame):
        from glandpet.study.subjects import read_subject_sheet

        subjects = read_subject_sheet(subjects, root, missing_dirs="report")

    # headers: which files, whose, one record each
    items, owner, folder_of, pid_to_subject = files_to_read(root, subjects)
    n = len(items)
    from glandpet.progress import Progress

    bar = Progress(n, "indexing", unit="files", quiet=not progress)
    records = read_headers(items, jobs, bar)
    t_read = time.perf_counter() - t0
    insts, skipped, bad_files, attributed = sort_records(records)

    # grouping: subjects, duplicates, series, scan times
    insts = assign_subjects(insts, owner, pid_to_subject, subjects is not None, salt, skipped)
    kept = drop_duplicates(insts, skipped)
    series_rows, files_rows = group_series(kept, bad_files, salt)
    add_scan_times(series_rows)

    # pairing PET -> CT, then selection per subject and session
    by_subject = pair_pets_with_cts(series_rows)
    overrides = dict(overrides or {})
    keyed = {s["series_key"]: s for s in series_rows}
    check_overrides(overrides, by_subject, keyed)
    problems, ambiguous = select_sessions(by_subject, keyed, overrides)
    if problems and on_ambiguity == "error":
        raise UserError("; ".join(problems))
    select_paired_cts(series_rows, keyed)

    # failures: what cannot be processed, per subject and session (the workflow leaves these out)
    failures = failure_rows(series_rows, by_subject, ambiguous, subjects, folder_of, skipped, owner, suv_type,
                            attributed)
    warnings = identifier_warnings(series_rows, files_rows)

    series_df = series_table(series_rows)
    files_df = pd.DataFrame(files_rows, columns=FILES_SCHEMA.names)
    skipped_df = pd.DataFrame(sorted(skipped, key=lambda r: r["path"]), columns=SKIPPED_SCHEMA.names)
    dt_total = time.perf_counter() - t0
    stats = {"n_files": float(n), "seconds": dt_total, "read_seconds": t_read,
             "files_per_s": n / t_read if t_read > 0 else math.nan}
    bar.close(f"indexed {n} files in {dt_total:.1f} s ({stats['files_per_s']:.0f} files/s): "
              f"{len(series_df)} series, {len(skipped_df)} skipped")
    failures_df = pd.DataFrame(failures, columns=FAILURES_SCHEMA.names)
    return IndexResult(series_df, files_df, skipped_df, problems, warnings, stats, failures_df)


# ------------------------------------------------------------------------------------------
# writing and the command

def _write(df: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    from glandpet.tables import write_table

    write_table(df, schema, path)


def output_paths(series_path: str | Path) -> tuple[Path, Path, Path]:
    """(series, files, skipped) table paths: `<stem>.parquet`, `<stem>_files.parquet`, `<stem>_skipped.parquet`."""
    p = Path(series_path)
    stem = p.name[:-len(".parquet")] if p.name.endswith(".parquet") else p.stem
    return p, p.with_name(f"{stem}_files.parquet"), p.with_name(f"{stem}_skipped.parquet")


def write_index(result: IndexResult, series_path: str | Path, files_path: str | Path | None = None,
                skipped_path: str | Path | None = None, failures_path: str | Path | None = None
                ) -> tuple[Path, Path, Path]:
    """Write the three tables (default paths: :func:`output_paths`); the series table last. With
    `failures_path`, the failures table too (FAILURES_SCHEMA)."""
    sp, fp, kp = output_paths(series_path)
    fp, kp = Path(files_path or fp), Path(skipped_path or kp)
    _write(result.files, FILES_SCHEMA, fp)
    _write(result.skipped, SKIPPED_SCHEMA, kp)
    if failures_path is not None:
        _write(result.failures, FAILURES_SCHEMA, Path(failures_path))
    _write(result.series, SERIES_SCHEMA, sp)
    return sp, fp, kp


def read_overrides(path: str | Path) -> dict[tuple[str, str], str]:
    """Overrides TSV: columns subject_id, session, series_key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"overrides file {p} not found")
    df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
    missing = {"subject_id", "session", "series_key"} - set(df.columns)
    if missing:
        raise UserError(f"overrides file {p}: missing column(s) {sorted(missing)}")
    return {(r.subject_id.strip(), r.session.strip()): r.series_key.strip() for r in df.itertuples()}


def session_counts(sessions: pd.Series) -> str:
    """How many of each baseline session (always named) and of follow-ups (when any, by session):
    ``psma 10, fapi 8, follow-ups 3 (psma2 2, fapi2 1)``."""
    counts = Counter(x for x in sessions if is_session(x))
    text = ", ".join(f"{x} {counts[x]}" for x in SESSIONS)
    follow = sorted((x for x in counts if x not in SESSIONS), key=session_order)
    if follow:
        text += (f", follow-ups {sum(counts[x] for x in follow)} ("
                 + ", ".join(f"{x} {counts[x]}" for x in follow) + ")")
    return text


def summary_text(result: IndexResult) -> str:
    """The index's summary lines: series by role, subjects and sessions selected, PET series by tracer,
    skipped files, then the problems, failures and warnings."""
    s, k = result.series, result.skipped
    lines = []
    roles = s["role"].value_counts() if not s.empty else pd.Series(dtype=int)
    lines.append("series by role: " + (", ".join(f"{r} {int(n)}" for r, n in roles.items()) or "none"))
    if not s.empty:
        sel = s[s["selected"] & (s["role"] == "pet_ac")]
        n_subj = s["subject_id"].nunique()
        lines.append(f"subjects: {n_subj}; sessions selected: {session_counts(sel['session'])}")
        pet = s[s["role"].isin(["pet_ac", "pet_nac"])]
        if not pet.empty:
            tr = pet["tracer"].fillna("unknown").value_counts()
            lines.append("PET series by tracer: " + ", ".join(f"{t} {int(n)}" for t, n in tr.items()))
    kr = k["reason"].value_counts() if not k.empty else pd.Series(dtype=int)
    lines.append("skipped files: " + (", ".join(f"{r} {int(n)}" for r, n in kr.items()) or "none"))
    for p in result.problems:
        lines.append("problem: " + p)
    for row in result.failures.itertuples():
        if row.message not in result.problems:
            lines.append(f"{row.status}: {row.message}")
    for w in result.warnings:
        lines.append("warning: " + w)
    return "\n".join(lines)


def run_index(args: Any) -> int:
    """`glandpet index DICOM_ROOT -o series.parquet [--subjects SHEET] [--jobs N]`."""
    root = Path(args.dicom_root)
    overrides = None
    if getattr(args, "overrides", None):
        overrides = read_overrides(args.overrides)
    subjects = getattr(args, "subjects", None) or None
    result = index_tree(root, subjects, jobs=int(getattr(args, "jobs", 1) or 1), progress=True,
                        overrides=overrides)
    sp, fp, kp = write_index(result, args.output)
    print(summary_text(result))
    print(f"wrote {sp}, {fp.name}, {kp.name}")
    return 0

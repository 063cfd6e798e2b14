"""Corrected label maps: a team corrects a session's gland labels (3D Slicer, ITK-SNAP) and drops the
file into the corrections folder (config ``segmentation.corrections``); the workflow then measures
that session, and the other session of the subject when only the reference session was corrected,
from the corrected labels, and reruns nothing upstream of the measurement.

File names: ``sub-<id>_ses-<session>_space-ct_dseg.nii.gz`` (a label map on the session's CT NIfTI
grid) or ``sub-<id>_ses-<session>_space-ct_dseg.dcm`` (a DICOM SEG on that session's CT).

- :func:`correction_index` lists the folder once per process (the workflow's input functions ask it
  for every job: no file is read).
- :func:`validate_correction` checks one file: the grid is the session CT's NIfTI grid exactly (shape,
  affine within :data:`AFFINE_TOL_MM`), the label values are glandpet's (:data:`glandpet.glands.DEFAULT_LABELS`).
- :func:`check_corrections` runs at workflow start: every file names a subject and session of the study
  and, once the session's CT exists, passes :func:`validate_correction`; the first problem raises
  :class:`glandpet.errors.UserError` with one line naming the file.
- :func:`apply_correction` (own correction) and :func:`carry_correction` (the reference session's
  correction carried through the session transform, genericLabel) write the corrected label map and
  its label table into results.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from glandpet.errors import UserError
from glandpet.layout import label_table_of
from glandpet.layout import ENTITY_VALUE_PATTERN, SUBJECT_ID_PATTERN, is_session

__all__ = [
    "AFFINE_TOL_MM",
    "CORRECTION_PATTERN",
    "apply_correction",
    "carry_correction",
    "check_corrections",
    "correction_index",
    "corrected_subjects",
    "load_correction",
    "source_of",
    "validate_correction",
]

AFFINE_TOL_MM = 1e-3
CORRECTION_PATTERN = re.compile(
    rf"^sub-(?P<subject>{SUBJECT_ID_PATTERN})_ses-(?P<session>{ENTITY_VALUE_PATTERN})"
    r"_space-ct_dseg\.(?P<ext>nii\.gz|nii|dcm)$")


@functools.lru_cache(maxsize=8)
def _listing(folder: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(correction files, other files) of the folder, listed once per process."""
    if not folder or not os.path.isdir(folder):
        return (), ()
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    good = tuple(n for n in names if CORRECTION_PATTERN.match(n))
    return good, tuple(n for n in names if n not in good)


def correction_index(folder: str | os.PathLike | None) -> dict[tuple[str, str], str]:
    """{(subject, session): correction path} of the folder (empty when unset or absent), cached per
    process (do not modify it). A subject and session with two files (``.nii.gz`` and ``.dcm``) keeps
    the first: :func:`check_corrections` reports the pair."""
    return _index(str(folder or ""))


@functools.lru_cache(maxsize=8)
def _index(folder: str) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for n in _listing(folder)[0]:
        m = CORRECTION_PATTERN.match(n)
        out.setdefault((m["subject"], m["session"]), os.path.join(folder, n))
    return out


@functools.lru_cache(maxsize=8)
def corrected_subjects(folder: str | os.PathLike | None) -> frozenset[str]:
    """The subjects with at least one correction in the folder (cached per process)."""
    return frozenset(subject for subject, _ in correction_index(folder))


def source_of(index: Mapping[tuple[str, str], str], subject: str, session: str, reference: str) -> str | None:
    """How a session's labels come from a correction: ``"own"`` (the session's own file), ``"carried"``
    (only the reference session was corrected: its labels go through the session transform), or None
    (the atlas labels)."""
    if (subject, session) in index:
        return "own"
    if session != reference and (subject, reference) in index:
        return "carried"
    return None


def _label_values() -> set[int]:
    from glandpet.glands import DEFAULT_LABELS

    return {lab.index for lab in DEFAULT_LABELS}


def load_correction(path: str | os.PathLike, ct_path: str | os.PathLike) -> np.ndarray:
    """The correction's label values on the session CT's NIfTI grid (a DICOM SEG through
    :func:`glandpet.dicom.export.seg_to_label_map`); a NIfTI on another grid raises UserError."""
    import nibabel as nib

    path, name = str(path), Path(path).name
    ct = nib.load(str(ct_path))
    if path.endswith(".dcm"):
        try:
            from glandpet.dicom.export import seg_to_label_map
        except ImportError:
            raise UserError(f"{name}: DICOM SEG corrections need glandpet.dicom.export (not installed in this "
                            "version); export the correction as NIfTI instead") from None
        try:
            data = np.asarray(seg_to_label_map(path, str(ct_path)))
        except UserError as err:
            raise UserError(f"{name}: {err}") from None
        except Exception as err:  # noqa: BLE001 - a broken file: one line naming it
            raise UserError(f"{name}: not a readable DICOM SEG on this session's CT ({err})") from None
        if not np.any(data):
            raise UserError(f"{name}: no segment voxel lies on this session's CT (a SEG of another series?)")
    else:
        try:
            img = nib.load(path)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{name}: not a readable NIfTI label map ({err})") from None
        shape = tuple(img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if shape != tuple(ct.shape[:3]):
            raise UserError(f"{name}: grid {'x'.join(map(str, shape))} is not the session CT's "
                            f"{'x'.join(map(str, ct.shape[:3]))}: save the labels on the results' CT "
                            f"({Path(ct_path).name})")
        diff = float(np.max(np.abs(img.affine - ct.affine)))
        if diff > AFFINE_TOL_MM:
            raise UserError(f"{name}: voxel-to-world affine differs from the session CT's by up to {diff:.3g} mm "
                            f"(allowed {AFFINE_TOL_MM:g}): save the labels on the results' CT ({Path(ct_path).name})")
        data = np.asarray(img.dataobj).reshape(shape)
    if data.shape != tuple(ct.shape[:3]):
        raise UserError(f"{name}: label map shape {data.shape} is not the session CT's {tuple(ct.shape[:3])}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise UserError(f"{name}: label values are not whole numbers (a label map holds glandpet's label "
                            "values, not an image)")
    values = set(np.unique(data).astype(np.int64).tolist()) - {0}
    unknown = sorted(values - _label_values())
    if unknown:
        raise UserError(f"{name}: unknown label value(s) {', '.join(map(str, unknown[:10]))} (glandpet's labels "
                        f"are 1-{max(_label_values())}: the .ctbl / ITK-SNAP label file beside the session's dseg)")
    return data.astype(np.int16)


def validate_correction(path: str | os.PathLike, ct_path: str | os.PathLike) -> None:
    """Raise UserError (one line naming the file) unless the correction is on the session CT's grid
    and holds glandpet's label values only."""
    load_correction(path, ct_path)


def check_corrections(folder: str | os.PathLike | None, subjects: Iterable[str],
                      sessions_of: Any = None, ct_of: Any = None) -> int:
    """The workflow-start check of the corrections folder; returns the number of corrections.

    `sessions_of(subject)`: the subject's sessions in the study (None until the index has run: then
    only subject and session names are checked); `ct_of(subject, session)`: the session CT's NIfTI
    path, validated against when it exists. The first problem raises UserError naming the file."""
    if not folder:
        return 0
    if not os.path.isdir(folder):
        raise UserError(f"segmentation.corrections: {folder} is not a folder")
    good, other = _listing(str(folder))
    for n in other:
        if n.startswith("sub-") or n.endswith((".nii", ".nii.gz", ".dcm", ".nrrd", ".mha", ".mhd")):
            raise UserError(f"{n}: not a correction name (sub-<id>_ses-<psma|fapi|psma2|...>_space-ct_dseg.nii.gz, or .dcm "
                            "for a DICOM SEG)")
    subjects = set(subjects)
    seen: dict[tuple[str, str], str] = {}
    for n in good:
        m = CORRECTION_PATTERN.match(n)
        subject, session = m["subject"], m["session"]
        if (subject, session) in seen:
            raise UserError(f"{n}: a second correction of sub-{subject} ses-{session} (also {seen[subject, session]})")
        seen[subject, session] = n
        if subject not in subjects:
            raise UserError(f"{n}: subject {subject} is not in the study's subject sheet")
        study_sessions = sessions_of(subject) if sessions_of is not None else None
        if study_sessions is not None and session not in study_sessions:
            have = ", ".join(sorted(study_sessions)) or "none"
            raise UserError(f"{n}: subject {subject} has no session {session} in the study (sessions: {have})")
        if study_sessions is None and not is_session(session):
            raise UserError(f"{n}: unknown session {session} (psma or fapi, or a follow-up: psma2, fapi2, ...)")
        ct = ct_of(subject, session) if ct_of is not None else None
        if ct and os.path.isfile(ct):
            validate_correction(os.path.join(str(folder), n), ct)
    return len(good)


def _write_labels(data: np.ndarray, ct_path: str, out_dseg: str, out_table: str, atlas_table: str) -> None:
    """The label map (uint8, the CT's header) and its label table: the atlas segmentation's table (the
    same rows measured), plus glandpet's label of any value it lacks."""
    import nibabel as nib

    from glandpet.glands import DEFAULT_LABELS, read_label_table, write_label_table
    from glandpet.writers import write_nifti_like

    table = read_label_table(atlas_table)
    have = {lab.index for lab in table}
    present = set(np.unique(data).tolist()) - {0}
    table += [lab for lab in DEFAULT_LABELS if lab.index in present and lab.index not in have]
    write_nifti_like(data.astype(np.uint8), nib.load(ct_path), out_dseg)
    write_label_table(out_table, table)


def _changes(data: np.ndarray, atlas_dseg: str) -> dict[str, int]:
    """Voxels whose label differs from the atlas segmentation, per label value of either."""
    import nibabel as nib

    atlas = np.asarray(nib.load(atlas_dseg).dataobj).astype(np.int16)
    if atlas.shape != data.shape:
        return {}
    diff = atlas != data
    out: dict[str, int] = {}
    for v in sorted((set(np.unique(atlas[diff]).tolist()) | set(np.unique(data[diff]).tolist())) - {0}):
        out[str(v)] = int(np.sum(diff & ((atlas == v) | (data == v))))
    return out


def apply_correction(correction: str, ct_path: str, atlas_dseg: str, out_dseg: str, out_table: str,
                     out_qc: str) -> None:
    """A session's own correction, validated, into results (label map, label table, QC JSON with
    ``segmentation_source: corrected`` and the changed voxels per label)."""
    from glandpet.problems import qc_record
    from glandpet.writers import write_json

    data = load_correction(correction, ct_path)
    _write_labels(data, ct_path, out_dseg, out_table, label_table_of(atlas_dseg))
    write_json(qc_record(out_qc, "correction", "ok", f"corrected labels from {Path(correction).name}",
                         segmentation_source="corrected",
                         metrics={"method": "correction", "file": Path(correction).name,
                                  "changed_voxels_by_label": _changes(data, atlas_dseg)}), out_qc)


def carry_correction(ref_dseg: str, ct_path: str, xfm_prefix: str, atlas_dseg: str, out_dseg: str,
                     out_table: str, out_qc: str) -> None:
    """The reference session's corrected labels carried to this session through the inverse session
    transform (genericLabel), as the atlas labels are."""
    import nibabel as nib

    from glandpet.registration.transforms import apply_inverse_session_transform
    from glandpet.problems import qc_record
    from glandpet.writers import write_json

    apply_inverse_session_transform(ref_dseg, ct_path, xfm_prefix, out_path=out_dseg, interpolation="genericLabel")
    data = np.asarray(nib.load(out_dseg).dataobj).astype(np.int16)
    _write_labels(data, ct_path, out_dseg, out_table, label_table_of(atlas_dseg))
    write_json(qc_record(out_qc, "correction", "ok", "corrected labels carried from the reference session",
                         segmentation_source="corrected",
                         metrics={"method": "session_transform", "changed_voxels_by_label": _changes(data, atlas_dseg)}),
               out_qc)

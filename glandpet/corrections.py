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

from .errors import UserError

__all__ = [
    "AFFINE_TOL_MM",
    "CORRECTION_PATTERN",
    "apply_correction",
    "carry_correction",
    "check_corrections",
    "correction_index",
    "load_correction",
    "source_of",
    "validate_correction",
]

AFFINE_TOL_MM = 1e-3
CORRECTION_PATTERN = re.compile(
    r"^sub-(?P<subject>[A-Za-z0-9]+)_ses-(?P<session>[A-Za-z0-9]+)_space-ct_dseg\.(?P<ext>nii\.gz|nii|dcm)$")


@functools.lru_cache(maxsize=8)
def _listing(folder: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(correction files, other files) of the folder, listed once per process."""
    if not folder or not os.path.isdir(folder):
        return (), ()
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    good = tuple(n for n in names if CORRECTION_PATTERN.match(n))
    return good, tuple(n for n in names if n not in good)


def correction_index(folder: str | os.PathLike | None) -> dict[tuple[str, str], str]:
    """{(subject, session): correction path} of the folder (empty when unset or absent). A subject
    and session with two files (``.nii.gz`` and ``.dcm``) keeps the first: :func:`check_corrections`
    reports the pair."""
    folder = str(folder or "")
    out: dict[tuple[str, str], str] = {}
    for n in _listing(folder)[0]:
        m = CORRECTION_PATTERN.match(n)
        out.setdefault((m["subject"], m["session"]), os.path.join(folder, n))
    return out


def source_of(index: Mapping[tuple[str, str], str], subject: str, session: str, reference: str) -> str | None:
    """How a session's labels come from a correction: ``"own"`` (the session's own file), ``"carried"``
    (only the reference session was corrected: its labels go through the session transform), or None
    (the atlas labels)."""
    if (subject, session) in index:
        return "own"
    if session != reference and (subject, reference) in index:
        return "carried"
    return None

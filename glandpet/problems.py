"""One record for what went wrong, or is worth a look, in a run: subject, session, stage, status and message.

The same fields travel everywhere a problem is recorded: the pre-flight's list (``glandpet check``,
:mod:`glandpet.study.preflight`), the DICOM catalog's failures table, a failed job's failure record
(:mod:`glandpet.workflow.failures`), a step's QC record (JSON beside its outputs) and the cohort's
``qc.parquet`` (:data:`glandpet.tables.QC`): a problem found at any stage reads the same way, and no
reader takes a subject or session back out of a message or a file name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["STATUSES", "Problem", "qc_record"]

#: ``ok`` (a QC record with nothing to report), ``warning`` (processed; worth a look), ``failed``
#: (left out, or, in the pre-flight, would be left out or stop the run).
STATUSES = ("ok", "warning", "failed")

#: The fields every problem record carries, in the tables' column order.
FIELDS = ("subject_id", "session", "stage", "status", "message")


@dataclass(frozen=True)
class Problem:
    """A problem of a subject's session (``session`` None: the whole subject; ``subject_id`` None: the
    run, its config, subject sheet or atlases) at a ``stage`` (a rule, ``index``, ``check``).
    ``about``: what it concerns beyond subject and session (a series key, ``config``,
    ``subject sheet``, ``atlas <name>``), for the pre-flight's table."""

    subject_id: str | None
    session: str | None
    stage: str
    status: str
    message: str | None
    about: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"problem status {self.status!r}: one of {', '.join(STATUSES)}")

    def fields(self) -> dict[str, Any]:
        """The record's fields as the tables and JSON records store them."""
        return {k: getattr(self, k) for k in FIELDS}

    @classmethod
    def from_fields(cls, rec: Mapping[str, Any], **overrides: Any) -> Problem:
        """The problem of a stored record (a table row, a QC or failure JSON)."""
        values = {k: rec.get(k) for k in FIELDS} | overrides
        values["stage"] = values["stage"] or "?"
        values["status"] = values["status"] or "ok"
        return cls(**values)


def qc_record(path: str | os.PathLike, stage: str, status: str, message: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """A step's QC record (its JSON): the problem fields, the subject and session from the record's
    own file name (:func:`glandpet.layout.parse`), and ``extra`` (``metrics``, ...)."""
    from glandpet.layout import entities

    m = entities(path)
    return Problem(m.get("subject"), m.get("session"), stage, status, message).fields() | extra

"""The pipeline's file names: one module builds and takes apart the BIDS-like names of its files.

A per-subject file of a run is
``<results>/sub-<id>/[ses-<session>/]sub-<id>[_ses-<session>][_<key>-<value>...]_<suffix>``, where
``<suffix>`` carries the extension (``ct.nii.gz``, ``qc.json``, ``dseg.itksnap.txt``), in the spirit
of snakebids' ``bids()``. The entities come in one fixed order (:data:`ENTITY_ORDER`), so one
set of entities has one name; for example::

    path("results", "S001", "psma", "dseg.nii.gz", desc="corrected", space="ct")
    -> "results/sub-S001/ses-psma/sub-S001_ses-psma_desc-corrected_space-ct_dseg.nii.gz"
    path("results", "S001", None, "xfm.mat", from_="fapi", to="psma")
    -> "results/sub-S001/sub-S001_from-fapi_to-psma_xfm.mat"

:func:`parse` is the inverse (it also reads the names of log files, ``sub-<id>_ses-<session>.log``);
:func:`label_table_of` names the label table beside a label map, :func:`transform_prefix_of` and
:func:`session_transform_paths` the three files of the session transform. Nothing here touches the
file system. :func:`pattern` and :func:`name_pattern` give the same names with Snakemake wildcards
(``{subject}``, ``{session}``, ``{tracer}``) for the rules' ``output:``, ``log:`` and ``benchmark:``.
The rules, their input functions (rules/common.smk) and the Python steps name files through this
module only (tests/test_layout.py holds the names literally, and checks nothing else builds them).
"""

from __future__ import annotations

import functools
import os
import re

__all__ = ["SUBJECT_ID_PATTERN", "ENTITY_VALUE_PATTERN", "SESSION_PATTERN", "ENTITY_ORDER", "name", "path",
           "name_pattern", "pattern", "parse", "entities", "beside", "label_table_of", "transform_prefix_of",
           "session_transform_paths", "session_name", "session_parts", "is_session", "session_order",
           "session_transform_prefix"]

#: The one regex (unanchored, no groups) for a subject id: letters and digits only, because it becomes part
#: of file names ``sub-<id>_...``. The subject sheet, the log-name parsing and the Snakemake wildcard use it.
SUBJECT_ID_PATTERN = "[A-Za-z0-9]+"
#: The regex for the value of any other entity (``ses-psma``, ``trc-<tracer slug>``, ``desc-suvbw``): the
#: ``_`` and ``-`` that separate entities cannot be part of one (the Snakemake ``tracer`` wildcard uses it).
ENTITY_VALUE_PATTERN = "[A-Za-z0-9]+"
#: The regex (unanchored, no groups) for a session: the tracer family (``psma`` | ``fapi``), then the time
#: point from the second on: ``psma`` is the baseline PSMA scan, ``psma2`` the first follow-up, ``fapi3``
#: the second FAPI follow-up (:func:`session_name`, :func:`session_parts`). A baseline is never ``psma1``,
#: so the names of a study without follow-ups are those of every earlier release.
SESSION_PATTERN = "(?:psma|fapi)(?:[2-9]|[1-9][0-9]+)?"
#: The order of the entities after ``sub``/``ses`` in a name (``from`` is passed as ``from_``: a Python keyword).
ENTITY_ORDER = ("trc", "from", "to", "desc", "space")

_VALUE = re.compile(ENTITY_VALUE_PATTERN)
_SUBJECT = re.compile(SUBJECT_ID_PATTERN)
_SUFFIX = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*(?:\.[A-Za-z0-9]+)*")


def _check(kind: str, value: str, pattern: re.Pattern = _VALUE) -> str:
    value = str(value)
    if not pattern.fullmatch(value):
        raise ValueError(f"{kind} {value!r}: a file name's {kind} holds letters and digits only")
    return value


@functools.lru_cache(maxsize=1 << 16)  # the input functions of a 1,000-subject DAG ask ~50,000 times
def name(subject: str, session: str | None = None, suffix: str = "", **entities: str | None) -> str:
    """The file name (no folder): ``sub-<id>[_ses-<session>][_<key>-<value>...][_<suffix>]``.

    ``suffix`` holds the extension (``"ct.nii.gz"``; the per-gland tables' suffixes have an underscore:
    ``"gland_stats.parquet"``); an empty suffix gives the bare entity chain, a transform's prefix or a
    log's name without ``.log``. Entities whose value is None are left out; an unknown entity, or a
    value with anything but letters and digits, raises ValueError.
    """
    given = {k[:-1] if k.endswith("_") else k: v for k, v in entities.items()}
    unknown = sorted(set(given) - set(ENTITY_ORDER))
    if unknown:
        raise ValueError(f"unknown file name entities {unknown}; known: {list(ENTITY_ORDER)}")
    parts = [f"sub-{_check('subject', subject, _SUBJECT)}"]
    if session is not None:
        parts.append(f"ses-{_check('session', session)}")
    parts += [f"{k}-{_check(k, given[k])}" for k in ENTITY_ORDER if given.get(k) is not None]
    if suffix:
        parts.append(_check("suffix", suffix, _SUFFIX))
    return "_".join(parts)


def path(results: str | os.PathLike, subject: str, session: str | None = None, suffix: str = "",
         **entities: str | None) -> str:
    """The per-subject file ``<results>/sub-<id>/[ses-<session>/]`` + :func:`name`; a session file lies
    in the session's folder, a subject-level one (``session=None``) in the subject's."""
    folder = f"{results}/sub-{subject}" + (f"/ses-{session}" if session is not None else "")
    return f"{folder}/{name(subject, session, suffix, **entities)}"


def parse(file: str | os.PathLike) -> dict[str, str | None]:
    """The entities of a file's name: ``subject``, ``session`` (None when absent), the other entities
    present (``trc``, ``from``, ``to``, ``desc``, ``space``, ...), ``suffix`` (the parts after the last
    entity: ``dseg``, ``gland_stats``; None when absent, as in a log name ``sub-S001_ses-psma.log``) and
    ``extension`` (from the name's first dot: ``.nii.gz``, ``.itksnap.txt``; ``""`` when none). The
    folder is not read. A name that does not start with ``sub-<id>``, or has a part before the suffix
    that is not ``<key>-<value>``, raises ValueError."""
    base = os.path.basename(os.fspath(file))
    stem, dot, ext = base.partition(".")
    parts = stem.split("_")
    out: dict[str, str | None] = {"subject": None, "session": None}
    n = len(parts)  # the suffix: the parts after the last entity (gland_stats: two)
    while n > 1 and "-" not in parts[n - 1]:
        n -= 1
    suffix = "_".join(parts[n:]) or None
    for i, part in enumerate(parts[:n]):
        key, sep, value = part.partition("-")
        if not sep or not _VALUE.fullmatch(key) or not _VALUE.fullmatch(value):
            raise ValueError(f"{base}: {part!r} is not a <key>-<value> entity")
        key = {"sub": "subject", "ses": "session"}.get(key, key)
        if (i == 0) != (key == "subject") or (key in out and out[key] is not None):
            raise ValueError(f"{base}: not a sub-<id>[_ses-<session>]... file name")
        out[key] = value
    if not _SUBJECT.fullmatch(out["subject"] or ""):
        raise ValueError(f"{base}: not a sub-<id>[_ses-<session>]... file name")
    if suffix is not None and not all(_VALUE.fullmatch(p) for p in parts[n:]):
        raise ValueError(f"{base}: suffix {suffix!r} holds other characters than letters and digits")
    out["suffix"] = suffix
    out["extension"] = dot + ext
    return out


_WILDCARD = re.compile(r"\{([A-Za-z_]+)\}")


def _with_wildcards(build, *values: str | None, **entities: str | None) -> str:
    """``build(*values, **entities)`` where any value may be a Snakemake wildcard ``{name}``: each
    wildcard stands in as a token of letters (valid in a name) and comes back after the build."""
    tokens: dict[str, str] = {}

    def token(v):
        if v is None or not _WILDCARD.fullmatch(str(v)):
            return v
        t = "WILDCARD" + _WILDCARD.fullmatch(str(v)).group(1).replace("_", "")
        tokens[t] = str(v)
        return t

    out = build(*(token(v) for v in values), **{k: token(v) for k, v in entities.items()})
    for t, v in tokens.items():
        out = out.replace(t, v)
    return out


def name_pattern(suffix: str = "", *, session: str | None = "{session}", **entities: str | None) -> str:
    """:func:`name` as a Snakemake pattern: ``sub-{subject}``, the session ``{session}`` (a fixed
    session, or None for a subject-level file), entity values that may be wildcards
    (``trc="{tracer}"``). ``name_pattern("ct.nii.gz")`` -> ``sub-{subject}_ses-{session}_ct.nii.gz``."""
    return _with_wildcards(lambda subj, ses, **e: name(subj, ses, suffix, **e), "{subject}", session, **entities)


def pattern(results: str | os.PathLike, suffix: str = "", *, session: str | None = "{session}",
            **entities: str | None) -> str:
    """:func:`path` as a Snakemake pattern (the rules' ``output:``), wildcards as in :func:`name_pattern`."""
    return _with_wildcards(lambda subj, ses, **e: path(results, subj, ses, suffix, **e), "{subject}", session,
                           **entities)


def beside(image: str | os.PathLike, extension: str) -> str:
    """The file beside a NIfTI image with another extension: ``X.nii.gz`` or ``X.nii`` -> ``X`` +
    ``extension`` (a label map's table ``.tsv``, an image's sidecar ``.json``)."""
    s = os.fspath(image)
    for ext in (".nii.gz", ".nii"):
        if s.endswith(ext):
            return s[: -len(ext)] + extension
    raise ValueError(f"{s}: a NIfTI image's name ends in .nii.gz or .nii")


def label_table_of(dseg: str | os.PathLike) -> str:
    """The label table written beside a label map: ``X_dseg.nii.gz`` -> ``X_dseg.tsv``."""
    if not os.fspath(dseg).endswith(".nii.gz"):
        raise ValueError(f"{dseg}: a label map's name ends in .nii.gz")
    return beside(dseg, ".tsv")


def transform_prefix_of(affine: str | os.PathLike) -> str:
    """The prefix of a transform's files from its affine: ``P_xfm.mat`` -> ``P`` (the inverse of
    :func:`session_transform_paths`)."""
    s = str(affine)
    if not s.endswith("_xfm.mat"):
        raise ValueError(f"{s}: a transform's affine ends in _xfm.mat")
    return s[: -len("_xfm.mat")]


def session_transform_paths(prefix: str | os.PathLike) -> dict[str, str]:
    """The session transform's files of ``prefix``: ``{affine: P_xfm.mat, warp: P_xfm.nii.gz,
    inverse_warp: P_invxfm.nii.gz}``."""
    p = str(prefix)
    return {"affine": p + "_xfm.mat", "warp": p + "_xfm.nii.gz", "inverse_warp": p + "_invxfm.nii.gz"}


def entities(path: str | os.PathLike) -> dict:
    """The entities of a pipeline file's name (:func:`parse`: ``subject``, ``session``,
    ``desc``, ``suffix`` ...), {} for a name outside the layout (a cohort-level job's log, say)."""
    try:
        return parse(path)
    except ValueError:
        return {}


def session_name(family: str, timepoint: int = 1) -> str:
    """The session of a tracer family's scan at a time point (1 = baseline): ``("psma", 1)`` ->
    ``"psma"``, ``("fapi", 2)`` -> ``"fapi2"``."""
    t = int(timepoint)
    if family not in ("psma", "fapi") or t < 1:
        raise ValueError(f"no session for tracer family {family!r} at time point {timepoint!r}")
    return family if t == 1 else f"{family}{t}"


def is_session(value: str) -> bool:
    """Whether ``value`` is a session name (:data:`SESSION_PATTERN`)."""
    return isinstance(value, str) and re.fullmatch(SESSION_PATTERN, value) is not None


def session_parts(session: str) -> tuple[str, int]:
    """``(tracer family, time point)`` of a session: ``"psma"`` -> ``("psma", 1)``, ``"fapi2"`` ->
    ``("fapi", 2)``; anything else raises ValueError."""
    if not is_session(session):
        raise ValueError(f"{session!r} is not a session (psma or fapi, then a time point from 2 on: psma2, fapi2)")
    m = re.fullmatch(r"(psma|fapi)([0-9]*)", session)
    return m.group(1), int(m.group(2) or 1)


def session_order(session: str) -> tuple[int, int]:
    """Sort key of sessions: by time point, PSMA before FAPI (``psma, fapi, psma2, fapi2, ...``)."""
    family, t = session_parts(session)
    return t, ("psma", "fapi").index(family)


def session_transform_prefix(results: str | os.PathLike, subject: str, moving: str, reference: str) -> str:
    """The prefix of the transform that aligns session ``moving``'s CT to the reference session's
    (:func:`session_transform_paths`): ``<results>/sub-<id>/sub-<id>_from-<moving>_to-<reference>``."""
    return path(results, subject, None, "", from_=moving, to=reference)

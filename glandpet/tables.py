"""Explicit pyarrow schemas of every table glandpet writes, and the one writer that enforces them.

Tables are tidy (one observation per row), snake_case, units in column names, and carry the
provenance columns `pipeline_version` and `config_hash` (except the phantom's truth tables).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from glandpet import __version__

PROVENANCE = [
    pa.field("pipeline_version", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
]

_KEYS = [
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("group", pa.string()),
]

GLAND_STATS = pa.schema(
    _KEYS
    + [
        pa.field("session", pa.string(), nullable=False),
        pa.field("timepoint", pa.int16()),  # 1 = baseline (psma, fapi), 2 = first follow-up (psma2, fapi2), ...
        pa.field("days_from_first_scan", pa.int32()),  # the scan's day, from the subject's first scan (no date)
        pa.field("tracer", pa.string()),
        pa.field("gland", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("volume_ml", pa.float64()),
        pa.field("suv_max", pa.float64()),
        pa.field("suv_peak", pa.float64()),
        pa.field("suv_mean", pa.float64()),
        pa.field("suv_median", pa.float64()),
        pa.field("suv_sd", pa.float64()),
        pa.field("suv_p90", pa.float64()),
        pa.field("total_uptake_ml", pa.float64()),
        pa.field("suv_mean_pvc", pa.float64()),
        pa.field("pvc_method", pa.string()),
        pa.field("pvc_fwhm_mm", pa.float64()),
        pa.field("n_voxels", pa.int64()),
        pa.field("suv_type", pa.string(), nullable=False),
        pa.field("seg_confidence", pa.float64()),  # 0-1 (glandpet.segmentation.confidence); null: none recorded
        pa.field("seg_flag", pa.string()),  # ok | review (confidence under segmentation.review_below)
        pa.field("segmentation_source", pa.string()),  # atlas | corrected
    ]
    + PROVENANCE
)

GLAND_INDEX = pa.schema(
    _KEYS
    + [
        pa.field("timepoint", pa.int16()),  # the PSMA and FAPI scans of one time point (1 = baseline)
        pa.field("gland", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("psma_suv_mean", pa.float64()),
        pa.field("fapi_suv_mean", pa.float64()),
        pa.field("psma_fapi_index", pa.float64()),
        pa.field("index_definition", pa.string(), nullable=False),
        pa.field("voxel_spearman_rho", pa.float64()),
        pa.field("n_voxels", pa.int64()),
        pa.field("voxel_rho_note", pa.string()),  # why voxel_spearman_rho is null (null when it is not)
        pa.field("suv_type", pa.string()),
    ]
    + PROVENANCE
)

#: The fields of a problem record (glandpet.problems.Problem) in every table that lists problems: the
#: DICOM catalog's failures (glandpet.dicom.catalog_failures) and qc.parquet.
PROBLEM_FIELDS = [
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("session", pa.string()),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok | warning | failed
    pa.field("message", pa.string()),
]

QC = pa.schema(PROBLEM_FIELDS + [pa.field("metrics_json", pa.string())] + PROVENANCE)

GLAND_TRUTH = pa.schema(
    [
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("session", pa.string(), nullable=False),
        pa.field("tracer", pa.string(), nullable=False),
        pa.field("gland", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("true_volume_ml", pa.float64(), nullable=False),
        pa.field("true_suv_mean", pa.float64(), nullable=False),
        pa.field("severity", pa.float64()),
        pa.field("fibrotic_fraction", pa.float64()),
        pa.field("psf_fwhm_mm", pa.float64()),  # the PSF the phantom blurred this session's PET with
    ]
)

# A rigid transform as a 4x4 matrix in LPS mm (row-major, 16 values), mapping points of the
# `from_space` to the `to_space`: x_to = M @ x_from.
TRANSFORMS = pa.schema(
    [
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("from_space", pa.string(), nullable=False),
        pa.field("to_space", pa.string(), nullable=False),
        pa.field("matrix_lps", pa.list_(pa.float64(), 16), nullable=False),
        pa.field("rotation_deg", pa.float64()),
        pa.field("translation_mm", pa.float64()),
    ]
)

# Cohort statistics in long form: one row per analysis x gland x (session | group | variable) x statistic.
COHORT_STATS = pa.schema(
    [
        pa.field("analysis", pa.string(), nullable=False),
        pa.field("gland", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("group", pa.string()),
        pa.field("variable", pa.string()),
        pa.field("statistic", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
    ]
    + PROVENANCE
)

# The study's registered outcomes (glandpet.cohort.statistics.registered_outcomes): one row per test. Group
# comparisons (pSS = a vs control = b) and clinical associations of a gland value (per session SUVmax,
# SUVmean, SUVmean after PVC; or the PSMA/FAPI index, session null) with a declared clinical variable.
# family: primary | secondary (definitions, absent clinical columns and methods in the Parquet metadata
# key b"glandpet"); q_value: Benjamini-Hochberg within the family.
OUTCOMES = pa.schema(
    [
        pa.field("family", pa.string(), nullable=False),
        pa.field("analysis", pa.string(), nullable=False),  # group_comparison | clinical_association
        pa.field("gland", pa.string(), nullable=False),
        pa.field("session", pa.string()),  # psma | fapi; null for the index
        pa.field("value", pa.string(), nullable=False),  # suv_max | suv_mean | suv_mean_pvc | psma_fapi_index
        pa.field("variable", pa.string(), nullable=False),  # group, or the clinical column
        pa.field("variable_type", pa.string(), nullable=False),  # group | continuous | ordinal | binary | categorical
        pa.field("subjects", pa.string(), nullable=False),  # pss_vs_control | pss | all
        pa.field("test", pa.string(), nullable=False),  # mann_whitney | spearman | kruskal_wallis
        pa.field("n", pa.int64()),
        pa.field("n_a", pa.int64()),  # pss / positive subjects (Mann-Whitney)
        pa.field("n_b", pa.int64()),  # control / negative subjects
        pa.field("label_a", pa.string()),
        pa.field("label_b", pa.string()),
        pa.field("effect_name", pa.string(), nullable=False),  # rank_biserial | spearman_rho | epsilon_squared
        pa.field("effect", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("statistic", pa.float64()),  # U of sample a | rho | H
        pa.field("p_value", pa.float64()),
        pa.field("q_value", pa.float64()),
        pa.field("n_boot", pa.int64()),
    ]
    + PROVENANCE
)

# Diagnostic value (glandpet.cohort.statistics.diagnostic_table): ROC of pSS vs control per gland (and
# "parotid+submandibular", the mean of the two) for the PSMA/FAPI index and PSMA / FAPI SUVmean alone.
DIAGNOSTIC = pa.schema(
    [
        pa.field("gland", pa.string(), nullable=False),
        pa.field("marker", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),  # higher_in_pss | lower_in_pss (pre-specified)
        pa.field("n_pss", pa.int64(), nullable=False),
        pa.field("n_control", pa.int64(), nullable=False),
        pa.field("auc", pa.float64()),
        pa.field("auc_ci_low", pa.float64()),
        pa.field("auc_ci_high", pa.float64()),
        pa.field("youden_cutoff", pa.float64()),  # in the marker's unit; pSS called at >= (<= if lower_in_pss)
        pa.field("youden_j", pa.float64()),
        pa.field("sensitivity", pa.float64()),
        pa.field("specificity", pa.float64()),
        pa.field("n_boot", pa.int64()),
    ]
    + PROVENANCE
)

# Leave-one-out validation of an atlas library (`glandpet atlas validate`, glandpet/segmentation/atlas_validate.py):
# one row per held-out atlas x gland x side of its contours; the automatic labels from the other atlases.
ATLAS_VALIDATION = pa.schema(
    [
        pa.field("atlas", pa.string(), nullable=False),
        pa.field("gland", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("n_atlases", pa.int64(), nullable=False),
        pa.field("dice", pa.float64()),
        pa.field("msd_mm", pa.float64()),
        pa.field("hd95_mm", pa.float64()),
        pa.field("volume_contour_ml", pa.float64()),
        pa.field("volume_auto_ml", pa.float64()),
        pa.field("volume_error_pct", pa.float64()),
        # the median volume of the gland as the atlases' registrations put it, before fusion (the
        # library's prior: a volume error already there is the atlases', not the fusion's)
        pa.field("volume_atlases_ml", pa.float64()),
        pa.field("confidence", pa.float64()),  # the segmentation's confidence in the gland (None: one voter)
        # the size transfer the run corrected the gland's volume with (segmentation.size_transfer; None: not corrected)
        pa.field("size_transfer", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("cpu_seconds", pa.float64()),
        pa.field("library", pa.string()),
        pa.field("error", pa.string()),
    ]
    + PROVENANCE
)

# The voters behind atlas_validation's automatic volumes (glandpet.segmentation.atlas_validate): one row per
# held-out atlas x gland x side x voting atlas, its contour volume and its volume warped onto the held-out
# scan; with the held-out contour they give the library's size transfer
# (glandpet.segmentation.size_calibration.fit_size_transfer).
ATLAS_VALIDATION_VOTERS = pa.schema(
    [
        pa.field("atlas", pa.string(), nullable=False),  # the held-out scan
        pa.field("gland", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("voter", pa.string(), nullable=False),  # an atlas that voted on the gland
        pa.field("voter_contour_ml", pa.float64()),  # its own contour
        pa.field("voter_warped_ml", pa.float64()),  # that contour warped onto the held-out scan
        pa.field("volume_contour_ml", pa.float64()),  # the held-out scan's contour
    ]
    + PROVENANCE
)

# Change between time points (glandpet.cohort.change.gland_change_table): one row per subject x gland x
# side x quantity x follow-up, against the same subject's baseline; test_retest_pct is the reference
# variability the change is compared with (its source in test_retest_source and in the table's metadata).
GLAND_CHANGE = pa.schema(
    _KEYS
    + [
        pa.field("gland", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("quantity", pa.string(), nullable=False),  # psma_suv_mean, fapi_suv_max, psma_fapi_index, ...
        pa.field("baseline_session", pa.string()),  # psma | fapi (null for the index: the time point's pair)
        pa.field("followup_session", pa.string()),  # psma2, fapi3, ...
        pa.field("timepoint", pa.int16(), nullable=False),  # the follow-up's (2, 3, ...); the baseline is 1
        pa.field("days_from_baseline", pa.int32()),
        pa.field("baseline_value", pa.float64()),
        pa.field("followup_value", pa.float64()),
        pa.field("change_abs", pa.float64()),  # follow-up - baseline, in the quantity's unit (SUV, or the index)
        pa.field("change_pct", pa.float64()),  # 100 x change_abs / baseline_value
        pa.field("test_retest_pct", pa.float64()),
        pa.field("test_retest_source", pa.string()),
        pa.field("beyond_test_retest", pa.bool_()),  # |change_pct| > test_retest_pct
        pa.field("suv_type", pa.string()),
    ]
    + PROVENANCE
)

SCHEMAS: dict[str, pa.Schema] = {
    "atlas_validation": ATLAS_VALIDATION,
    "atlas_validation_voters": ATLAS_VALIDATION_VOTERS,
    "cohort_stats": COHORT_STATS,
    "outcomes": OUTCOMES,
    "diagnostic": DIAGNOSTIC,
    "gland_stats": GLAND_STATS,
    "gland_index": GLAND_INDEX,
    "gland_change": GLAND_CHANGE,
    "qc": QC,
    "gland_truth": GLAND_TRUTH,
    "transforms": TRANSFORMS,
}


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of a configuration mapping (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def provenance(config: Mapping[str, Any] | None = None) -> dict[str, str]:
    return {"pipeline_version": __version__, "config_hash": config_hash(config or {})}


def atomic_path(path: str | Path):
    """A temporary path in the same folder as `path`; rename it onto `path` when complete.

    The file is created empty with mode 0666 filtered by the process umask, like any file a tool
    writes (``tempfile.mkstemp`` would make it 0600, and the rename would carry that onto the
    result: colleagues could not read the tables). Private files (the linkage key) are written
    elsewhere with an explicit 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def table_notes(path: str | Path) -> dict:
    """The JSON notes :func:`write_table` stored with a table ({} when none)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[b"glandpet"]) if b"glandpet" in meta else {}


def to_table(rows_or_frame: Any, schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema` (columns in order, types cast; missing nullable columns null)."""
    import pandas as pd

    df = rows_or_frame if isinstance(rows_or_frame, pd.DataFrame) else pd.DataFrame(list(rows_or_frame))
    cols = {}
    n = len(df)
    for field in schema:
        if field.name in df.columns:
            cols[field.name] = pa.array(df[field.name].tolist(), type=field.type, from_pandas=True)
        elif field.nullable:
            cols[field.name] = pa.nulls(n, type=field.type)
        else:
            raise ValueError(f"table lacks required column {field.name!r}")
    return pa.table(cols, schema=schema)


def write_table(rows_or_frame: Any, schema: pa.Schema | str, path: str | Path,
                metadata: Mapping[str, Any] | None = None) -> pa.Table:
    """Write rows (list of dicts or a DataFrame) as Parquet with an explicit schema, atomically.
    ``metadata``: stored as JSON under the schema metadata key ``b"glandpet"`` (:func:`table_notes`)."""
    if isinstance(schema, str):
        schema = SCHEMAS[schema]
    table = to_table(rows_or_frame, schema)
    if metadata:
        table = table.replace_schema_metadata({b"glandpet": json.dumps(metadata, sort_keys=True, default=str).encode()})
    tmp = atomic_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return table

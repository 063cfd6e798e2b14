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
import re
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

    # a missing subject folder fails that subject only (the index reports it; qc.parquet lists it)
    return list(read_subject_sheet(sheet, config.get("dicom_root") or None, missing_dirs="report")["subject_id"])


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
    import pyarrow.parquet as pq

    cols = ["subject_id", "session", "role", "selected", "tracer_slug"]
    has_problem = "problem" in pq.read_schema(series_path).names
    df = pd.read_parquet(series_path, columns=cols + (["problem"] if has_problem else []))
    keep = df["selected"].fillna(False).astype(bool) & (df["role"] == "pet_ac") & df["session"].isin(SESSIONS)
    if has_problem:
        keep &= df["problem"].isna()  # a session the index found unusable is left out (qc.parquet says why)
    df = df[keep]
    out: dict[str, dict[str, str]] = {}
    for sub, ses, trc in zip(df["subject_id"], df["session"], df["tracer_slug"]):
        out.setdefault(sub, {})[ses] = trc
    return out


def selected_sessions(series_path: str, subject: str) -> dict[str, str]:
    """{session: tracer slug} of the PET series the index selected for a subject, without the sessions
    the index found unusable (the series' ``problem``) and those whose job failed in an earlier run
    (a failure record in ``<results>/work/failed/``, see :func:`failure_records`)."""
    out = dict(_selected(str(series_path), os.path.getmtime(series_path)).get(subject, {}))
    results = Path(series_path).parent.parent
    for rec in failure_records(results):
        if rec["subject_id"] == subject:
            if rec["session"] is None:
                return {}
            out.pop(rec["session"], None)
    return out


# --------------------------------------------------------------------------- job failure records
# A job that fails (any exception in a step run under `log_to`) leaves a record
# `<results>/work/failed/<rule>/<log name>.json` {subject_id, session, stage, status, message}.
# On the next run the failed subject / session is left out of the DAG (so `--keep-going` runs end in
# complete cohort tables) and the cohort tables step copies the record into qc.parquet. Delete the
# record (or the folder) to try the job again; a job that succeeds removes its own record.
_LOG_NAME = re.compile(r"^sub-(?P<subject>[A-Za-z0-9]+)(?:_ses-(?P<session>psma|fapi))?(?:_|\.log$)")


def failure_record_path(log_path: str | os.PathLike) -> Path | None:
    """Where a per-subject job's failure record goes (None for cohort-level jobs)."""
    log_path = Path(log_path)
    if log_path.parent.parent.name != "logs" or not _LOG_NAME.match(log_path.name):
        return None
    results = log_path.parent.parent.parent
    return results / "work" / "failed" / log_path.parent.name / (log_path.name[: -len(".log")] + ".json")


def failure_records(results: str | os.PathLike) -> list[dict]:
    """The job failure records under `<results>/work/failed/` (subject_id, session, stage, status, message).

    Called for every subject while Snakemake builds the DAG: the records are read once per state of
    the folder (its rule subfolders' modification times), not once per call."""
    folder = Path(results) / "work" / "failed"
    if not folder.is_dir():
        return []
    state = tuple((d.name, d.stat().st_mtime_ns) for d in sorted(folder.iterdir()))
    return _read_failure_records(str(folder), state)


@functools.lru_cache(maxsize=8)
def _read_failure_records(folder: str, _state: tuple) -> list[dict]:
    out = []
    for p in sorted(Path(folder).glob("*/*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _record_failure(log_path: str | os.PathLike, exc: BaseException) -> None:
    path = failure_record_path(log_path)
    if path is None:
        return
    m = _LOG_NAME.match(Path(log_path).name)
    message = " ".join(str(exc).split()) or type(exc).__name__
    from .errors import UserError

    if not isinstance(exc, UserError):
        message = f"{type(exc).__name__}: {message}"
    prefix = f"sub-{m['subject']}" + (f" ses-{m['session']}" if m["session"] else "")
    if not message.startswith(prefix):
        message = f"{prefix}: {message}"
    rec = {"subject_id": m["subject"], "session": m["session"], "stage": Path(log_path).parent.name,
           "status": "failed", "message": message[:2000], "log": str(Path(log_path).name)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(rec, path)


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
        except Exception as exc:
            traceback.print_exc(file=fh)
            try:
                _record_failure(path, exc)
            except Exception:  # noqa: BLE001 - the record is a courtesy; the job fails anyway
                traceback.print_exc(file=fh)
            raise
        else:
            stale = failure_record_path(path)
            if stale is not None and stale.exists():
                stale.unlink()
        finally:
            root.removeHandler(handler)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    from .tables import atomic_path

    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def set_threads(threads: int) -> None:
    """Limit ITK/BLAS threads to what Snakemake granted the job."""
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(max(1, int(threads)))


# --------------------------------------------------------------------------- steps
def demo_phantom(outdir: str, subjects: int, seed: int, atlases: int, threads: int = 1) -> None:
    """Generate the demo cohort (or, with subjects=0, only the phantom's atlas set)."""
    from .phantom.cohort import generate_cohort

    generate_cohort(outdir, int(subjects), int(seed), n_atlases=int(atlases), jobs=int(threads), progress=False)


def index_dicom(sheet: str, dicom_root: str, overrides: list[Mapping[str, str]], output: Any, threads: int = 1,
                suv_type: str = "bw", config: Mapping[str, Any] | None = None) -> None:
    """Index the tree, select series per subject and session, and write each subject's selection
    (`work/sub-<id>/sub-<id>_series.json`: the files of the chosen CT and PET per session).

    Problems of one subject or session (missing folder, no PET, no CT, ambiguous PET, a series that
    is not one regular volume, a header that cannot give SUV, undecodable pixel data, ...) do not
    stop the cohort: they go to the failures table (`output.failures`), the session is left out of
    the DAG (:func:`selected_sessions`) and the cohort tables step lists it in qc.parquet.

    A selection file is rewritten only when its content changes, so adding a subject to the
    sheet re-runs the index but none of the other subjects' conversions."""
    from .series_index import index_tree, summary_text, write_index
    from .subjects import read_subject_sheet

    subjects = read_subject_sheet(sheet, dicom_root, missing_dirs="report")
    chosen = {(o["subject_id"], o["session"]): o["series_key"] for o in overrides or []}
    result = index_tree(dicom_root, subjects, jobs=int(threads), overrides=chosen, on_ambiguity="report",
                        suv_type=suv_type)
    if config is not None:  # the pre-flight (glandpet check): stop on config, sheet and atlas problems
        from .preflight import raise_for_problems, run_check

        raise_for_problems(run_check(config, index=result, schema=False), fatal_only=True)
    failures_path = getattr(output, "failures", None)
    write_index(result, output.series, output.files, output.skipped, failures_path=failures_path)
    work = Path(output.files).parent
    for row in result.failures.itertuples():
        (log.error if row.status == "failed" else log.warning)("%s", row.message)
    for subject, selection in session_selections(result.series, result.files).items():
        path = work / f"sub-{subject}" / f"sub-{subject}_series.json"
        text = json.dumps(selection, indent=2, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(text, path)
    log.info("index of %s:\n%s", Path(dicom_root).name, summary_text(result))


def session_selections(series: Any, files: Any) -> dict[str, dict[str, Any]]:
    """{subject: {session: {tracer, tracer_slug, pet_key, ct_key, pet_files, ct_files}}} of the
    selected series (file paths relative to the DICOM root, in slice order)."""
    from .series_index import series_label

    paths = dict(zip(files["series_key"], files["paths"]))
    labels = {row["series_key"]: series_label(row) for row in series.to_dict("records")}
    sel = series[series["selected"].fillna(False).astype(bool) & (series["role"] == "pet_ac")]
    out: dict[str, dict[str, Any]] = {}
    for row in sel.itertuples():
        ct_key = row.paired_ct_key if isinstance(row.paired_ct_key, str) else None
        out.setdefault(row.subject_id, {})[row.session] = {
            "tracer": row.tracer, "tracer_slug": row.tracer_slug, "pet_key": row.series_key, "ct_key": ct_key,
            "pet_files": list(paths.get(row.series_key, [])), "ct_files": list(paths.get(ct_key, [])) if ct_key else [],
            "pet_label": labels[row.series_key], "ct_label": labels.get(ct_key) if ct_key else None,
        }
    for subject in series["subject_id"].unique():
        out.setdefault(subject, {})
    return out


def convert_session(selection_path: str, dicom_root: str, subject: str, session: str, modality: str,
                    output: Any, suv_type: str | None = None) -> None:
    """Convert the selected CT or PET series of one session to NIfTI (PET in Bq/mL + sidecar, and
    with ``suv_type`` the SUV image ``output.suv``: one job per PET, not two)."""
    from .convert import convert_series
    from .errors import UserError

    selection = json.loads(Path(selection_path).read_text()).get(session)
    if not selection:
        raise UserError(f"sub-{subject} ses-{session}: the index selected no PET series for this session")
    files = selection[f"{modality}_files"]
    if not files:
        raise UserError(f"sub-{subject} ses-{session}: the PET series has no CT (no CT shares its frame of "
                        f"reference or study)" if modality == "ct" else f"sub-{subject} ses-{session}: no PET files")
    out = output.ct if modality == "ct" else output.image
    label = f"sub-{subject} ses-{session} {selection.get(f'{modality}_label') or modality.upper() + ' series'}"
    sidecar = convert_series([str(Path(dicom_root) / f) for f in files], out, suv="none", label=label)
    log.info("sub-%s ses-%s %s: %d files -> %s (%s)", subject, session, modality, len(files), out, sidecar.get("Units"))
    if modality == "pet" and suv_type:
        suv_image(output.image, output.sidecar, suv_type, output.suv)


def suv_image(pet_path: str, sidecar_path: str, suv_type: str, out_path: str) -> None:
    """PET in Bq/mL -> SUV of `suv_type`, with the factors the converter derived from the header."""
    import nibabel as nib
    import numpy as np

    from .errors import SUVError
    from .suv import SUV_CHOICES

    sidecar = json.loads(Path(sidecar_path).read_text())
    factors = sidecar.get("SUVFactors") or {}
    key = SUV_CHOICES[suv_type]
    factor, applied = factors.get(key), sidecar.get("AppliedFactor", 1.0)
    if factor is None or (isinstance(factor, list) and any(f is None for f in factor)):
        raise SUVError(f"{Path(pet_path).name}: the header cannot support SUV type '{suv_type}' ({key} is null)")
    img = nib.load(pet_path)
    bqml = np.asarray(img.dataobj, dtype=np.float32)
    per_slice = np.broadcast_to(np.asarray(factor, dtype=np.float64) / np.asarray(applied, dtype=np.float64), (bqml.shape[2],))
    suv = (bqml * per_slice[None, None, :].astype(np.float32)).astype(np.float32)
    write_nifti_like(suv, img, out_path)
    log.info("%s: SUV%s factor %s (per Bq/mL)", Path(out_path).name, suv_type, per_slice[0])


def write_nifti_like(data: Any, ref: Any, out_path: str | os.PathLike) -> None:
    """Write `data` with the exact affine (qform and sform) of the reference image, atomically."""
    import nibabel as nib

    from .tables import atomic_path

    img = nib.Nifti1Image(data, ref.affine)
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = atomic_path(str(out_path))
    tmp_nii = tmp.with_name(tmp.name + ".nii.gz")
    try:
        nib.save(img, tmp_nii)
        os.replace(tmp_nii, out_path)
    finally:
        for t in (tmp, tmp_nii):
            if t.exists():
                t.unlink()


def register_pet_to_ct(ct_path: str, pet_path: str, out_xfm: str, out_qc: str, threads: int = 1) -> None:
    """Rigid PET->CT registration of one session, with its QC record."""
    from .registration import register_pet_to_ct as register

    set_threads(threads)
    metrics = register(ct_path, pet_path, out_xfm, threads=threads)
    status = "warning" if metrics.get("warning") else "ok"
    if metrics.get("warning"):
        log.warning("%s: %s", Path(out_xfm).name, metrics["warning"])
    write_json({"stage": "register", "status": status, "message": metrics.get("warning"), "metrics": metrics}, out_qc)


def align_sessions(psma_ct: str, fapi_ct: str, output: Any, threads: int = 1) -> None:
    """FAPI session CT -> PSMA session CT; writes the affine, the warp and its inverse."""
    from .registration import align_sessions as align

    set_threads(threads)
    prefix = str(output.affine)[: -len("_xfm.mat")]
    metrics = align(psma_ct, fapi_ct, prefix, threads=threads)
    write_json({"stage": "align", "status": "ok", "message": None, "metrics": metrics}, output.qc)


def ct_to_pet_affine(xfm_path: str) -> Any:
    """The rigid CT->PET transform of a session (ITK .mat) as a 4x4 matrix in RAS mm."""
    import numpy as np

    from .registration import transform_matrix

    A, b = transform_matrix(xfm_path)
    m_lps = np.eye(4)
    m_lps[:3, :3], m_lps[:3, 3] = A, b
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ m_lps @ flip


def measure_glands(inputs: Any, output: Any, subject: str, session: str, suv_type: str, pvc: Mapping[str, Any]) -> None:
    """Per-gland statistics in the session's PET space, with partial-volume correction.

    The CT-space label map is carried onto the PET grid as per-voxel label fractions, through the
    PET->CT registration (no interpolation of label values); volumes come from the CT labels.
    """
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from .glands import read_label_table
    from .measure import gland_statistics, label_fractions_on_grid, volume_ml_from_labels, voxel_sizes
    from .pvc import background_regions, body_fraction_from_ct, gtm, rbv_region_means, session_fwhm_mm
    from .tables import atomic_path

    suv_img, ct_img, lab_img = nib.load(inputs.suv), nib.load(inputs.ct), nib.load(inputs.dseg)
    suv = np.asarray(suv_img.dataobj, dtype=np.float32)
    labels = np.asarray(lab_img.dataobj).astype(np.int16)
    table = read_label_table(str(inputs.dseg)[: -len(".nii.gz")] + ".tsv")
    # CT voxel -> PET world: the registration maps CT points to the PET points of the same tissue.
    ct_to_pet = ct_to_pet_affine(inputs.xfm)
    ct_in_pet = ct_to_pet @ lab_img.affine
    values = [lab.index for lab in table]
    fractions = label_fractions_on_grid(labels, ct_in_pet, suv.shape, suv_img.affine, values)
    volumes = volume_ml_from_labels(labels, lab_img.affine, values)
    rows = gland_statistics(suv, fractions, suv_img.affine, table, volumes_ml=volumes)

    method = pvc.get("method", "gtm")
    sidecar_path = getattr(inputs, "sidecar", None)
    psf = session_fwhm_mm(pvc, session, json.loads(Path(sidecar_path).read_text()) if sidecar_path else None)
    fwhm = psf.fwhm_mm
    by_name = {f"{lab.gland}_{lab.side}": fractions[lab.index] for lab in table if fractions[lab.index].sum() > 0}
    corrected: dict[str, float] = {}
    if method != "none" and by_name:
        ct = np.asarray(ct_img.dataobj, dtype=np.float32)
        body = body_fraction_from_ct(ct, ct_to_pet @ ct_img.affine, suv.shape, suv_img.affine)
        regions = dict(by_name)
        regions.update(background_regions(by_name, body))
        vox = voxel_sizes(suv_img.affine)
        corrected = (gtm if method == "gtm" else rbv_region_means)(suv, regions, fwhm, vox)
    for row in rows:
        row.update(subject_id=subject, session=session, suv_type=suv_type, pvc_method=method,
                   pvc_fwhm_mm=fwhm if method != "none" else None,
                   suv_mean_pvc=corrected.get(f"{row['gland']}_{row['side']}"))
    df = pd.DataFrame(rows)
    tmp = atomic_path(output.stats)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, output.stats)
    # the label map on the PET grid (majority label per voxel), for QC and the voxel correlation
    pet_labels = np.zeros(suv.shape, dtype=np.uint8)
    best = np.zeros(suv.shape, dtype=np.float32)
    for value, frac in fractions.items():
        take = (frac >= 0.5) & (frac > best)
        pet_labels[take], best[take] = value, frac[take]
    write_nifti_like(pet_labels, suv_img, output.pet_dseg)
    log.info("sub-%s ses-%s: %d glands measured (PVC %s, FWHM %.2f mm from %s)", subject, session, len(by_name),
             method, fwhm, psf.source)


def gland_index(inputs: Any, out_path: str, subject: str, index_cfg: Mapping[str, Any]) -> None:
    """Per-gland PSMA/FAPI index of one subject, and the within-gland voxel Spearman correlation
    between PSMA and FAPI SUV on the PSMA PET grid (FAPI brought there through both PET->CT
    registrations and the session alignment)."""
    import pandas as pd

    from .gland_index import gland_index_table
    from .tables import atomic_path

    stats = pd.concat([pd.read_parquet(p) for p in inputs.stats], ignore_index=True)
    stats["subject_id"] = subject
    spearman = None
    if "psma_suv" in inputs.keys():
        spearman = _voxel_correlations(inputs, subject)
    definition = index_cfg.get("definition", "ratio")
    df = gland_index_table(stats, definition, index_cfg.get("reference") or None, use_pvc=True, spearman=spearman)
    tmp = atomic_path(out_path)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_path)


def _voxel_correlations(inputs: Any, subject: str) -> Any:
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from .gland_index import voxel_spearman
    from .glands import read_label_table
    from .registration import session_paths, warp

    labels = np.asarray(nib.load(inputs.psma_pet_dseg).dataobj)
    p = session_paths(str(inputs.affine)[: -len("_xfm.mat")])
    # PSMA PET point -> PSMA CT (inverse of CT->PET) -> FAPI CT (session) -> FAPI PET (CT->PET).
    fapi_on_psma = warp(inputs.fapi_suv, inputs.psma_suv,
                        [inputs.fapi_xfm, p["warp"], p["affine"], inputs.psma_xfm],
                        invert=[False, False, False, True]).numpy()
    psma = np.asarray(nib.load(inputs.psma_suv).dataobj, dtype=np.float32)
    rows = []
    for lab in read_label_table(str(inputs.psma_dseg)[: -len(".nii.gz")] + ".tsv"):
        rho, n = voxel_spearman(psma, fapi_on_psma, labels == lab.index)
        rows.append(dict(subject_id=subject, gland=lab.gland, side=lab.side, voxel_spearman_rho=rho, n_voxels=n))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- cohort
def _qc_rows(paths: list[str]) -> list[dict]:
    import re

    rows = []
    for path in paths:
        if not str(path).endswith(".json"):
            continue
        rec = json.loads(Path(path).read_text())
        m = re.search(r"sub-([A-Za-z0-9]+)(?:_ses-(psma|fapi))?_desc-", Path(path).name)
        rows.append(dict(subject_id=m.group(1) if m else "?", session=m.group(2) if m else None,
                         stage=rec.get("stage", "?"), status=rec.get("status", "ok"), message=rec.get("message"),
                         metrics_json=json.dumps(rec.get("metrics", {}), sort_keys=True, default=str)))
    return rows


def _failure_rows(index_failures: str | None, results: Path) -> list[dict]:
    """qc rows of what did not run: the index's failures and warnings, and the job failure records."""
    import pandas as pd

    rows = []
    if index_failures and Path(index_failures).is_file():
        for r in pd.read_parquet(index_failures).to_dict("records"):
            rows.append(dict(subject_id=r["subject_id"], session=r["session"] if isinstance(r["session"], str) else None,
                             stage=r["stage"], status=r["status"], message=r["message"], metrics_json="{}"))
    for r in failure_records(results):
        rows.append(dict(subject_id=r["subject_id"], session=r.get("session"), stage=r.get("stage", "?"),
                         status="failed", message=r.get("message"),
                         metrics_json=json.dumps({"log": r.get("log")}, sort_keys=True)))
    return rows


def cohort_tables(inputs: Any, output: Any, cfg_hash: str, atlases: list[Mapping[str, str]]) -> None:
    """Gather per-subject Parquet files into the cohort tables (one pass each), add the group from
    the subject sheet, the tracer from the index and the provenance columns."""
    import pandas as pd

    from .cohort_stats import aggregate_tables
    from .subjects import read_subject_sheet
    from .tables import GLAND_INDEX, GLAND_STATS, QC, provenance, write_table

    prov = {"pipeline_version": provenance()["pipeline_version"], "config_hash": cfg_hash}
    groups = read_subject_sheet(inputs.sheet, allow_empty_group=True)[["subject_id", "group"]]
    series = pd.read_parquet(inputs.series, columns=["subject_id", "session", "role", "selected", "tracer"])
    tracers = series[series["selected"].fillna(False).astype(bool) & (series["role"] == "pet_ac")]
    tracers = tracers[["subject_id", "session", "tracer"]].drop_duplicates(["subject_id", "session"])

    def gather(paths: list[str], schema: Any) -> Any:  # no file when every subject failed: qc still lists them
        if paths:
            return aggregate_tables(paths).to_pandas()
        return pd.DataFrame(columns=[f.name for f in schema if f.name not in ("pipeline_version", "config_hash")])

    stats = gather(list(inputs.stats), GLAND_STATS)
    stats = stats.drop(columns=[c for c in ("group", "tracer") if c in stats.columns])
    stats = stats.merge(groups, on="subject_id", how="left").merge(tracers, on=["subject_id", "session"], how="left")
    write_table(stats.assign(**prov), GLAND_STATS, output.gland_stats)

    index = gather(list(inputs.index), GLAND_INDEX)
    index = index.drop(columns=[c for c in ("group",) if c in index.columns]).merge(groups, on="subject_id", how="left")
    write_table(index.assign(**prov), GLAND_INDEX, output.gland_index)

    qc = _qc_rows(list(inputs.qc))
    qc += _failure_rows(getattr(inputs, "failures", None), Path(output.qc).parent.parent)
    held = set()
    from .glands import GLANDS, read_label_table

    for atlas in atlases:
        held |= {lab.gland for lab in read_label_table(atlas["label_table"])}
    for gland in GLANDS:
        if gland not in held:
            qc.append(dict(subject_id="*", session=None, stage="segment", status="warning",
                           message=f"no atlas holds the {gland} gland: it is not measured", metrics_json="{}"))
    write_table(pd.DataFrame(qc).assign(**prov) if qc else pd.DataFrame(columns=["subject_id"]), QC, output.qc)
    log.info("cohort tables: %d gland_stats rows, %d gland_index rows, %d qc rows", len(stats), len(index), len(qc))


def _long(df: Any, analysis: str, id_cols: list[str]) -> Any:
    import pandas as pd

    keep = [c for c in id_cols if c in df.columns]
    num = [c for c in df.columns if c not in keep and pd.api.types.is_numeric_dtype(df[c])]
    out = df[keep + num].melt(id_vars=keep, value_vars=num, var_name="statistic", value_name="value")
    out.insert(0, "analysis", analysis)
    return out


def cohort_statistics(inputs: Any, out_path: str) -> None:
    """Per-gland cohort statistics as one long tidy table (analysis, gland, ..., statistic, value)."""
    import pandas as pd

    from . import cohort_stats as cs
    from .subjects import read_subject_sheet
    from .tables import COHORT_STATS, write_table

    gs, gi = pd.read_parquet(inputs.gland_stats), pd.read_parquet(inputs.gland_index)
    prov = gs[["pipeline_version", "config_hash"]].iloc[0].to_dict() if len(gs) else {"pipeline_version": "", "config_hash": ""}
    parts = []
    if gs["group"].nunique() > 1:
        parts.append(_long(cs.compare_groups(gs).rename(columns={"value": "variable"}), "fapi_pss_vs_control",
                           ["gland", "session", "variable"]))
    parts.append(_long(cs.psma_fapi_correlation(gi), "psma_vs_fapi_spearman", ["gland", "group"]))
    parts.append(_long(cs.index_by_group(gi).rename(columns={"value": "variable"}), "index_by_group",
                       ["gland", "group", "variable"]))
    sheet = read_subject_sheet(inputs.sheet, allow_empty_group=True)
    clinical = [c for c in cs.CLINICAL_COLUMNS if c in sheet.columns and sheet[c].notna().any()]
    if clinical:
        assoc = cs.clinical_associations(gi, sheet, clinical=clinical).rename(columns={"clinical": "variable"})
        parts.append(_long(assoc, "index_vs_clinical_spearman", ["gland", "group", "variable"]))
    df = pd.concat(parts, ignore_index=True)
    write_table(df.assign(**prov), COHORT_STATS, out_path)
    log.info("cohort statistics: %d rows from %d analyses", len(df), len(parts))


def cohort_figures(inputs: Any, output: Any) -> None:
    """Cohort figures (PNG + SVG) into the report's figure folder."""
    from .figures import cohort_figures as draw

    out_dir = Path(output.figures)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw(inputs.gland_stats, inputs.gland_index, out_dir)
    Path(output.done).write_text("")


def segment_glands(inputs: Any, output: Any, session: str, atlases: list[Mapping[str, str]], fusion: str,
                   refine_hu: Mapping[str, Any], threads: int = 1, atlases_per_gland: int | None = None,
                   atlases_per_region: int | None = None, preserve_volume: bool = True, refine_intensity: bool = True) -> None:
    """Gland labels in one session's CT space: multi-atlas segmentation on the reference session,
    the session transform (inverse, generic-label interpolation) for the other one."""

    from .glands import read_label_table, write_label_table

    set_threads(threads)
    if "atlases" in inputs.keys():
        from .segmentation import segment_kwargs, segment_subject

        kwargs = segment_kwargs(dict(fusion=fusion, refine_hu=refine_hu, atlases_per_gland=atlases_per_gland,
                                     atlases_per_region=atlases_per_region, preserve_volume=preserve_volume,
                                     refine_intensity=refine_intensity))
        metrics = segment_subject(inputs.ct, [dict(a) for a in atlases], output.dseg, output.table,
                                  threads=threads, **kwargs)
        message = None
        missing = metrics.get("labels_absent")
        if missing:
            message = f"no atlas holds: {', '.join(missing)}"
        write_json({"stage": "segment", "status": "warning" if message else "ok", "message": message,
                    "metrics": metrics}, output.qc)
        return
    from .registration import apply_inverse_session_transform

    prefix = str(inputs.affine)[: -len("_xfm.mat")]
    apply_inverse_session_transform(inputs.ref_dseg, inputs.ct, prefix, out_path=output.dseg,
                                    interpolation="genericLabel")
    ref_table = str(inputs.ref_dseg)[: -len(".nii.gz")] + ".tsv"
    write_label_table(output.table, read_label_table(ref_table))
    write_json({"stage": "segment", "status": "ok", "message": f"labels carried from the reference session to {session}",
                "metrics": {"method": "session_transform"}}, output.qc)


def qc_montage(inputs: Any, out_png: str, subject: str) -> None:
    """Per-subject QC montage on the reference session's CT."""
    from .figures import qc_montage as draw
    from .glands import read_label_table

    keys = set(inputs.keys())
    pets = {s: inputs[f"{s}_suv"] for s in ("psma", "fapi") if f"{s}_suv" in keys}
    xfms = {s: inputs[f"{s}_xfm"] for s in ("psma", "fapi") if f"{s}_xfm" in keys}
    warp = str(inputs.affine)[: -len("_xfm.mat")] if "affine" in keys else None
    labels = read_label_table(str(inputs.dseg)[: -len(".nii.gz")] + ".tsv")
    draw(inputs.ct, pets, inputs.dseg, out_png, title=f"sub-{subject}", pet_to_ct_xfms=xfms,
         session_warp=warp, labels=labels)

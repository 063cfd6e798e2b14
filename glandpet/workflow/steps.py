"""One function per rule: each reads its inputs, calls its stage's package and writes its outputs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from glandpet.layout import entities, is_session, label_table_of
from glandpet.layout import path as layout_path
from glandpet.layout import transform_prefix_of
from glandpet.measure.gland_index import index_pairs, voxel_correlations
from glandpet.registration.transforms import ct_to_pet_affine, set_threads
from glandpet.segmentation.confidence import rank_key, seg_confidence_columns
from glandpet.suv.image import suv_image
from glandpet.workflow.failures import failure_records
from glandpet.problems import Problem, qc_record
from glandpet.writers import write_json, write_nifti_like, write_text_atomic

log = logging.getLogger("glandpet")


def demo_phantom(outdir: str, subjects: int, seed: int, atlases: int, threads: int = 1, followups: int = 0) -> None:
    """Generate the demo cohort (or, with subjects=0, only the phantom's atlas set); ``followups``: pSS
    subjects given a follow-up scan of each tracer with a planted change."""
    from glandpet.phantom.cohort import generate_cohort

    generate_cohort(outdir, int(subjects), int(seed), n_atlases=int(atlases), jobs=int(threads), progress=False,
                    followups=int(followups))


def catalog_dicom(sheet: str, dicom_root: str, overrides: list[Mapping[str, str]], output: Any, threads: int = 1,
                suv_type: str = "bw", config: Mapping[str, Any] | None = None) -> None:
    """Index the tree, select series per subject and session, and write each subject's selection
    (`work/sub-<id>/sub-<id>_series.json`: the files of the chosen CT and PET per session).

    Problems of one subject or session (missing folder, no PET, no CT, ambiguous PET, a series that
    is not one regular volume, a header that cannot give SUV, undecodable pixel data, ...) do not
    stop the cohort: they go to the failures table (`output.failures`), the session is left out of
    the DAG (:func:`selected_sessions`) and the cohort tables step lists it in qc.parquet.

    A selection file is rewritten only when its content changes, so adding a subject to the
    sheet re-runs the index but none of the other subjects' conversions."""
    from glandpet.dicom.catalog import index_tree, summary_text, write_index
    from glandpet.study.subjects import read_subject_sheet

    subjects = read_subject_sheet(sheet, dicom_root, missing_dirs="report")
    chosen = {(o["subject_id"], o["session"]): o["series_key"] for o in overrides or []}
    result = index_tree(dicom_root, subjects, jobs=int(threads), overrides=chosen, on_ambiguity="report",
                        suv_type=suv_type)
    if config is not None:  # the pre-flight (glandpet check): stop on config, sheet and atlas problems
        from glandpet.study.preflight import raise_for_problems, run_check

        raise_for_problems(run_check(config, index=result, schema=False), fatal_only=True)
    failures_path = getattr(output, "failures", None)
    write_index(result, output.series, output.files, output.skipped, failures_path=failures_path)
    work = Path(output.files).parent
    for row in result.failures.itertuples():
        (log.error if row.status == "failed" else log.warning)("%s", row.message)
    for subject, selection in session_selections(result.series, result.files).items():
        path = Path(layout_path(work, subject, suffix="series.json"))
        text = json.dumps(selection, indent=2, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(text, path)
    log.info("index of %s:\n%s", Path(dicom_root).name, summary_text(result))


def session_selections(series: Any, files: Any) -> dict[str, dict[str, Any]]:
    """{subject: {session: {tracer, tracer_slug, pet_key, ct_key, pet_files, ct_files}}} of the
    selected series (file paths relative to the DICOM root, in slice order)."""
    from glandpet.dicom.catalog import series_label

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
    from glandpet.dicom.convert import convert_series
    from glandpet.errors import UserError

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


def register_pet_to_ct(ct_path: str, pet_path: str, out_xfm: str, out_qc: str, threads: int = 1) -> None:
    """Rigid PET->CT registration of one session, with its QC record."""
    from glandpet.registration.pet_to_ct import register_pet_to_ct as register

    set_threads(threads, blas=True)  # ITK and BLAS: what Snakemake granted the job
    metrics = register(ct_path, pet_path, out_xfm, threads=threads)
    status = "warning" if metrics.get("warning") else "ok"
    if metrics.get("warning"):
        log.warning("%s: %s", Path(out_xfm).name, metrics["warning"])
    write_json(qc_record(out_qc, "register", status, metrics.get("warning"), metrics=metrics), out_qc)


def align_sessions(reference_ct: str, moving_ct: str, output: Any, threads: int = 1) -> None:
    """A session's CT -> the reference session's CT; writes the affine, the warp and its inverse."""
    from glandpet.registration.sessions import align_sessions as align

    set_threads(threads, blas=True)  # ITK and BLAS: what Snakemake granted the job
    prefix = transform_prefix_of(output.affine)
    metrics = align(reference_ct, moving_ct, prefix, threads=threads)
    write_json(qc_record(output.qc, "align", "ok", metrics=metrics), output.qc)


def measure_glands(inputs: Any, output: Any, subject: str, session: str, suv_type: str, pvc: Mapping[str, Any],
                   review_below: float | None = None, segmentation_source: str | None = None) -> None:
    """Per-gland statistics in the session's PET space, with partial-volume correction.

    The CT-space label map is carried onto the PET grid as per-voxel label fractions, through the
    PET->CT registration (no interpolation of label values); volumes come from the CT labels. Each
    gland gets the segmentation's confidence and review flag (:func:`seg_confidence_columns`);
    ``segmentation_source`` (None: from the label map's name, ``desc-corrected`` -> "corrected",
    as rules/common.smk's ``dseg`` names it; not a rule param: a callable param's digest would
    differ from the job's and make every failure record of the rule look stale).
    """
    import nibabel as nib
    import pandas as pd

    from glandpet.glands import read_label_table
    from glandpet.measure.session import measure_session
    from glandpet.tables import atomic_path

    if segmentation_source is None:
        segmentation_source = "corrected" if entities(inputs.dseg).get("desc") == "corrected" else "atlas"
    sidecar_path = getattr(inputs, "sidecar", None)
    m = measure_session(nib.load(inputs.suv), nib.load(inputs.ct), nib.load(inputs.dseg),
                        read_label_table(label_table_of(inputs.dseg)), ct_to_pet_affine(inputs.xfm), pvc, session,
                        json.loads(Path(sidecar_path).read_text()) if sidecar_path else None)
    for row in m.rows:
        pvc_columns = {k: row.pop(k) for k in ("pvc_method", "pvc_fwhm_mm", "suv_mean_pvc")}
        row.update(subject_id=subject, session=session, suv_type=suv_type, **pvc_columns,
                   **seg_confidence_columns(getattr(inputs, "seg_qc", None), row["gland"], row["side"], review_below,
                                            segmentation_source))
    df = pd.DataFrame(m.rows)
    if "seg_confidence" in df.columns:  # all null (no confidence recorded) must still be a float column
        df["seg_confidence"] = df["seg_confidence"].astype("float64")
    tmp = atomic_path(output.stats)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, output.stats)
    # the label map on the PET grid (majority label per voxel), for QC and the voxel correlation
    write_nifti_like(m.pet_labels, nib.load(inputs.suv), output.pet_dseg)
    log.info("sub-%s ses-%s: %d glands measured (PVC %s, FWHM %.2f mm from %s)", subject, session, len(m.measured),
             pvc.get("method", "gtm"), m.psf.fwhm_mm, m.psf.source)


def gland_index(inputs: Any, out_path: str, subject: str, index_cfg: Mapping[str, Any]) -> None:
    """Per-gland PSMA/FAPI index of one subject at each time point, and the within-gland voxel Spearman
    correlation between the PSMA and FAPI SUV of a time point on its PSMA PET grid (FAPI brought there
    through both PET->CT registrations and the session alignments, :func:`voxel_correlations`)."""
    import pandas as pd

    from glandpet.measure.gland_index import gland_index_table
    from glandpet.tables import atomic_path

    stats = pd.concat([pd.read_parquet(p) for p in inputs.stats], ignore_index=True)
    stats["subject_id"] = subject
    keys = set(inputs.keys())
    # each time point with both tracers measured (the montage's inputs name each session's SUV, so
    # the pair is known by its PSMA session's PET-grid labels, an index-only input)
    with_suv = [k[: -len("_suv")] for k in keys if k.endswith("_suv") and is_session(k[: -len("_suv")])]
    pairs = [(p, f) for _, p, f in index_pairs(with_suv) if f"{p}_pet_dseg" in keys]
    spearman = pd.concat([voxel_correlations(inputs, subject, p, f) for p, f in pairs], ignore_index=True) \
        if pairs else None
    definition = index_cfg.get("definition", "ratio")
    df = gland_index_table(stats, definition, index_cfg.get("reference") or None, use_pvc=True, spearman=spearman)
    tmp = atomic_path(out_path)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_path)


def qc_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        if not str(path).endswith(".json"):
            continue
        rec = json.loads(Path(path).read_text())
        if "subject_id" not in rec:  # a QC record written before records carried their subject and session
            m = entities(path)
            rec |= {"subject_id": m.get("subject") or "?", "session": m.get("session")}
        rows.append(Problem.from_fields(rec).fields()
                    | {"metrics_json": json.dumps(rec.get("metrics", {}), sort_keys=True, default=str)})
    return rows


def review_rows(stats: Any, qc_paths: list[str]) -> list[dict]:
    """qc rows (stage ``segment_review``, status ``warning``) of the glands flagged ``review`` in
    gland_stats, worst first; ``metrics_json`` holds the gland, its confidence, the reasons, its
    volume and the atlases' (from the session's segment QC JSON, :mod:`glandpet.segmentation.confidence`)."""
    if stats is None or not len(stats) or "seg_flag" not in stats.columns:
        return []
    seg = {}
    for path in qc_paths:
        m = entities(path)
        is_segment_qc = (m.get("desc"), m.get("suffix"), m.get("extension")) == ("segment", "qc", ".json")
        if is_segment_qc and m["session"] and Path(path).is_file():
            metrics = json.loads(Path(path).read_text()).get("metrics") or {}
            seg[(m["subject"], m["session"])] = metrics.get("glands") or {}
    flagged = stats[stats["seg_flag"] == "review"].copy()
    flagged["_c"] = flagged["seg_confidence"].map(rank_key)
    rows = []
    for r in flagged.sort_values(["_c", "subject_id", "session", "gland", "side"]).to_dict("records"):
        name = f"{r['gland']}_{r['side']}"
        e = seg.get((r["subject_id"], r["session"]), {}).get(name) or {}
        conf = None if r["_c"] < 0 else float(r["_c"])
        reasons = list(e.get("reasons") or []) if e else ["no confidence recorded"]
        if conf is not None and not reasons:
            reasons = ["confidence under the review threshold"]
        metrics = {"gland": r["gland"], "side": r["side"], "confidence": conf, "reasons": reasons,
                   "volume_ml": e.get("volume_ml", r.get("volume_ml")), "atlas_volumes_ml": e.get("atlas_volumes_ml", [])}
        conf_txt = "none" if conf is None else f"{conf:.2f}"
        rows.append(dict(subject_id=r["subject_id"], session=r["session"], stage="segment_review", status="warning",
                         message=f"{name}: segmentation confidence {conf_txt} ({'; '.join(reasons)}): review",
                         metrics_json=json.dumps(metrics, sort_keys=True, default=str)))
    return rows


def failure_rows(index_failures: str | None, results: Path) -> list[dict]:
    """qc rows of what did not run: the index's failures and warnings, and the job failure records."""
    import pandas as pd

    rows = []
    if index_failures and Path(index_failures).is_file():
        for r in pd.read_parquet(index_failures).to_dict("records"):
            session = r["session"] if isinstance(r["session"], str) else None
            rows.append(Problem.from_fields(r, session=session).fields() | {"metrics_json": "{}"})
    for r in failure_records(results):
        rows.append(Problem.from_fields(r, status="failed").fields()
                    | {"metrics_json": json.dumps({"log": r.get("log")}, sort_keys=True)})
    return rows


def cohort_tables(inputs: Any, output: Any, cfg_hash: str, atlases: list[Mapping[str, str]]) -> None:
    """Gather per-subject Parquet files into the cohort tables (one pass each), add the group from
    the subject sheet, the tracer and scan day from the index, the time points and the provenance
    columns; the change of each follow-up against the baseline (``output.gland_change``)."""
    import pandas as pd

    from glandpet.cohort.change import TEST_RETEST_PCT, TEST_RETEST_REFERENCE, gland_change_table, with_timepoints
    from glandpet.cohort.statistics import aggregate_tables
    from glandpet.study.subjects import read_subject_sheet
    from glandpet.tables import GLAND_CHANGE, GLAND_INDEX, GLAND_STATS, QC, provenance, write_table

    prov = {"pipeline_version": provenance()["pipeline_version"], "config_hash": cfg_hash}
    groups = read_subject_sheet(inputs.sheet, allow_empty_group=True)[["subject_id", "group"]]
    series = pd.read_parquet(inputs.series, columns=["subject_id", "session", "role", "selected", "tracer",
                                                     "days_from_first_scan"])
    tracers = series[series["selected"].fillna(False).astype(bool) & (series["role"] == "pet_ac")]
    tracers = tracers[["subject_id", "session", "tracer", "days_from_first_scan"]].drop_duplicates(["subject_id",
                                                                                                    "session"])

    def gather(paths: list[str], schema: Any) -> Any:  # no file when every subject failed: qc still lists them
        if paths:
            return aggregate_tables(paths).to_pandas()
        return pd.DataFrame(columns=[f.name for f in schema if f.name not in ("pipeline_version", "config_hash")])

    stats = gather(list(inputs.stats), GLAND_STATS)
    stats = stats.drop(columns=[c for c in ("group", "tracer", "timepoint", "days_from_first_scan")
                                if c in stats.columns])
    stats = stats.merge(groups, on="subject_id", how="left").merge(tracers, on=["subject_id", "session"], how="left")
    stats = with_timepoints(stats)
    write_table(stats.assign(**prov), GLAND_STATS, output.gland_stats)

    # a subject's index file written before time points were (baseline only) has none: timepoint 1
    index = gather(list(inputs.index), GLAND_INDEX)
    index = index.drop(columns=[c for c in ("group",) if c in index.columns]).merge(groups, on="subject_id", how="left")
    index["timepoint"] = (pd.to_numeric(index["timepoint"], errors="coerce").fillna(1).astype("Int64")
                          if "timepoint" in index.columns else pd.array([1] * len(index), dtype="Int64"))
    write_table(index.assign(**prov), GLAND_INDEX, output.gland_index)
    if getattr(output, "gland_change", None):
        change = gland_change_table(stats, index)
        write_table(change.assign(**prov), GLAND_CHANGE, output.gland_change,
                    metadata={"reference": TEST_RETEST_REFERENCE, "test_retest_pct": TEST_RETEST_PCT,
                              "rows": "each follow-up session (psma2, fapi2, ...) against the same subject's "
                                      "baseline session of the tracer; the index time point against time point 1"})
        log.info("gland_change: %d rows (%d subjects with a follow-up)", len(change), change["subject_id"].nunique())

    qc = qc_rows(list(inputs.qc))
    qc += review_rows(stats, list(inputs.qc))
    qc += failure_rows(getattr(inputs, "failures", None), Path(output.qc).parent.parent)
    held = set()
    from glandpet.glands import GLANDS, read_label_table

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


def cohort_statistics(inputs: Any, output: Any, clinical: Mapping[str, str] | None = None) -> None:
    """Per-gland cohort statistics as one long tidy table (analysis, gland, ..., statistic, value);
    the registered outcomes (``output.outcomes``: every value against pSS/control and every declared
    clinical variable of the sheet, typed by ``clinical``, with BH q-values) and the diagnostic ROC
    table (``output.diagnostic``)."""
    import pandas as pd

    from glandpet.cohort import statistics as cs
    from glandpet.study.subjects import read_subject_sheet
    from glandpet.tables import COHORT_STATS, DIAGNOSTIC, OUTCOMES, write_table

    out_path = output if isinstance(output, str) else output.stats
    # the baseline scans: follow-ups are compared with them in gland_change, not with other subjects
    gs, gi = cs.baseline(pd.read_parquet(inputs.gland_stats)), cs.baseline(pd.read_parquet(inputs.gland_index))
    prov = gs[["pipeline_version", "config_hash"]].iloc[0].to_dict() if len(gs) else {"pipeline_version": "", "config_hash": ""}
    parts = []
    if gs["group"].nunique() > 1:
        parts.append(_long(cs.compare_groups(gs).rename(columns={"value": "variable"}), "fapi_pss_vs_control",
                           ["gland", "session", "variable"]))
    parts.append(_long(cs.psma_fapi_correlation(gi), cs.PSMA_FAPI_ANALYSIS, ["gland", "group"]))
    parts.append(_long(cs.index_by_group(gi).rename(columns={"value": "variable"}), "index_by_group",
                       ["gland", "group", "variable"]))
    sheet = read_subject_sheet(inputs.sheet, allow_empty_group=True, clinical=clinical)
    df = pd.concat(parts, ignore_index=True)
    write_table(df.assign(**prov), COHORT_STATS, out_path)
    log.info("cohort statistics: %d rows from %d analyses", len(df), len(parts))
    if isinstance(output, str):
        return
    outcomes, notes = cs.registered_outcomes(gs, gi, sheet, clinical)
    write_table(outcomes.assign(**prov), OUTCOMES, output.outcomes, metadata=notes)
    if notes["clinical_absent"]:
        log.info("clinical columns declared but not in the sheet (not analysed): %s", ", ".join(notes["clinical_absent"]))
    log.info("registered outcomes: %d tests (%d primary, %d secondary with a p-value)", len(outcomes),
             notes["n_tests"]["primary"], notes["n_tests"]["secondary"])
    diag = cs.diagnostic_table(gi)
    write_table(diag.assign(**prov), DIAGNOSTIC, output.diagnostic,
                metadata={"complete_cases": "subjects with the index, PSMA and FAPI SUVmean of the gland",
                          "combined": f"{cs.COMBINED_NAME}: mean of the subject's "
                                      f"{' and '.join(cs.COMBINED_GLANDS)} values",
                          "directions": cs.DIAGNOSTIC_MARKERS})
    log.info("diagnostic table: %d rows", len(diag))


def cohort_figures(inputs: Any, output: Any) -> None:
    """Cohort figures (PNG + SVG) into the report's figure folder; the tests they show are read from
    the statistics tables (``outcomes``, ``diagnostic``, ``cohort_stats``), never recomputed."""
    from glandpet.cohort.figures import cohort_figures as draw

    out_dir = Path(output.figures)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw(inputs.gland_stats, inputs.gland_index, out_dir, outcomes_path=getattr(inputs, "outcomes", None),
         diagnostic_path=getattr(inputs, "diagnostic", None), cohort_stats_path=getattr(inputs, "cohort_stats", None))
    Path(output.done).write_text("")


def build_atlas_template(manifest: str, atlases: list[Mapping[str, str]], threads: int = 1) -> None:
    """The atlas library's template (segmentation.atlas_registration: template), built into the
    folder of ``manifest`` with ``threads`` registrations side by side
    (:func:`glandpet.segmentation.atlas_template.build_template`)."""
    from glandpet.segmentation.atlas_template import build_template

    def progress(done: int, total: int) -> None:
        log.info("atlas template: %d of %d registrations", done, total)

    t = build_template([dict(a) for a in atlases], Path(manifest).parent, workers=threads, progress=progress)
    log.info("atlas template of %d atlases: %s", len(atlases), t.build)


def segment_glands(inputs: Any, output: Any, session: str, atlases: list[Mapping[str, str]], fusion: str,
                   refine_hu: Mapping[str, Any], threads: int = 1, atlases_per_gland: int | None = None,
                   atlases_per_region: int | None = None, preserve_volume: bool = True, refine_intensity: bool = True,
                   linear_stage: str | None = None, size_transfer: Mapping[str, float] | None = None) -> None:
    """Gland labels in one session's CT space: multi-atlas segmentation on the reference session,
    the session transform (inverse, generic-label interpolation) for the other one."""

    from glandpet.glands import read_label_table, write_label_table

    set_threads(threads, blas=True)  # ITK and BLAS: what Snakemake granted the job
    if "atlases" in inputs.keys():
        from glandpet.segmentation.multi_atlas import segment_subject
        from glandpet.segmentation.params import SegmentationParams

        template = None
        if "template" in inputs.keys():  # segmentation.atlas_registration: template (rule build_atlas_template)
            from glandpet.segmentation.atlas_template import load_template

            template = load_template(Path(inputs.template).parent, [dict(a) for a in atlases])
        params = SegmentationParams.from_config(dict(
            fusion=fusion, refine_hu=refine_hu, atlases_per_gland=atlases_per_gland,
            atlases_per_region=atlases_per_region, preserve_volume=preserve_volume,
            refine_intensity=refine_intensity, atlas_registration="template" if template else "pairwise",
            linear_stage=linear_stage, size_transfer=dict(size_transfer or {})))
        metrics = segment_subject(inputs.ct, [dict(a) for a in atlases], output.dseg, output.table, params,
                                  threads=threads, template=template)
        message = None
        missing = metrics.get("labels_absent")
        if missing:
            message = f"no atlas holds: {', '.join(missing)}"
        _label_editor_tables(output, read_label_table(output.table))
        write_json(qc_record(output.qc, "segment", "warning" if message else "ok", message,
                             segmentation_source="atlas", metrics=metrics), output.qc)
        return
    from glandpet.registration.transforms import apply_inverse_session_transform

    prefix = transform_prefix_of(inputs.affine)
    apply_inverse_session_transform(inputs.ref_dseg, inputs.ct, prefix, out_path=output.dseg,
                                    interpolation="genericLabel")
    ref_table = label_table_of(inputs.ref_dseg)
    labels = read_label_table(ref_table)
    write_label_table(output.table, labels)
    _label_editor_tables(output, labels)
    metrics: dict[str, Any] = {"method": "session_transform"}
    ref_qc = getattr(inputs, "ref_qc", None)
    if ref_qc:  # the carried labels are the reference's: so is their per-gland confidence
        ref_metrics = json.loads(Path(ref_qc).read_text()).get("metrics", {})
        if "glands" in ref_metrics:
            metrics["glands"] = ref_metrics["glands"]
    write_json(qc_record(output.qc, "segment", "ok", f"labels carried from the reference session to {session}",
                         segmentation_source="atlas", metrics=metrics), output.qc)


def _label_editor_tables(output: Any, labels: list) -> None:
    """The colour tables beside a session's dseg, for correcting it: 3D Slicer (.ctbl) and ITK-SNAP."""
    from glandpet.glands import write_itksnap_labels, write_slicer_ctbl

    if "ctbl" in output.keys():
        write_slicer_ctbl(output.ctbl, labels)
    if "itksnap" in output.keys():
        write_itksnap_labels(output.itksnap, labels)


def qc_montage(inputs: Any, out_png: str, subject: str, out_thumbnail: str | None = None) -> None:
    """Per-subject QC montage on the reference session's CT with the baseline sessions' PET (and its
    thumbnail, the copy the report embeds)."""
    from glandpet.cohort.figures import montage_thumbnail
    from glandpet.cohort.figures import qc_montage as draw
    from glandpet.glands import read_label_table

    keys = set(inputs.keys())
    pets = {s: inputs[f"{s}_suv"] for s in ("psma", "fapi") if f"{s}_suv" in keys}
    xfms = {s: inputs[f"{s}_xfm"] for s in ("psma", "fapi") if f"{s}_xfm" in keys}
    # the baseline FAPI session aligned to the reference (baseline PSMA) CT
    warp = transform_prefix_of(inputs.fapi_affine) if "fapi_affine" in keys else None
    labels = read_label_table(label_table_of(inputs.dseg))
    draw(inputs.ct, pets, inputs.dseg, out_png, title=f"sub-{subject}", pet_to_ct_xfms=xfms,
         session_warp=warp, labels=labels, review=flagged_glands(inputs.stats if "stats" in keys else [], inputs.dseg))
    if out_thumbnail:
        montage_thumbnail(out_png, out_thumbnail)


def flagged_glands(stats_paths: Any, dseg_path: str) -> dict[str, float | None]:
    """``{gland_side: seg_confidence}`` of the glands flagged ``review`` in the gland_stats of the
    session whose label map ``dseg_path`` is (the montage's), for :func:`glandpet.cohort.figures.qc_montage`."""
    import pandas as pd

    session = entities(dseg_path).get("session")
    out: dict[str, float | None] = {}
    for p in [stats_paths] if isinstance(stats_paths, (str, Path)) else list(stats_paths):
        df = pd.read_parquet(p)
        if "seg_flag" not in df.columns:
            continue
        if session is not None and "session" in df.columns:
            df = df[df["session"] == session]
        for r in df[df["seg_flag"] == "review"].to_dict("records"):
            c = r.get("seg_confidence")
            out[f"{r['gland']}_{r['side']}"] = None if c is None or pd.isna(c) else float(c)
    return out


def apply_correction(inputs: Any, output: Any) -> None:
    """A session's corrected labels into results: its own correction (``inputs.correction``), or the
    reference session's corrected labels carried through the session transform."""
    from glandpet.segmentation import corrections

    if "correction" in inputs.keys():
        corrections.apply_correction(inputs.correction, inputs.ct, inputs.atlas_dseg, output.dseg, output.table,
                                     output.qc)
    else:
        corrections.carry_correction(inputs.ref_dseg, inputs.ct, transform_prefix_of(inputs.affine),
                                     inputs.atlas_dseg, output.dseg, output.table, output.qc)


def report_tables(inputs: Any, output: Any) -> None:
    """The HTML views of the cohort tables for the Snakemake report."""
    from glandpet.cohort.report_tables import write_report_tables

    write_report_tables(inputs.gland_stats, inputs.cohort_stats, inputs.qc, output.statistics, output.gland_values,
                        output.qc, outcomes=inputs.outcomes, gland_index=inputs.gland_index,
                        diagnostic=inputs.diagnostic, out_results=output.results)

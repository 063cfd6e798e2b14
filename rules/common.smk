# Shared paths, subject list and input functions. Every rule reads "inputs -> one call -> outputs".
import atexit
import functools
import os
import time

import pandas as pd

from glandpet import layout
from glandpet.segmentation.corrections import (
    check_corrections,
    corrected_subjects,
    correction_index,
    source_of,
)
from glandpet.glands import SESSIONS as SESSION_FAMILIES
from glandpet.measure.gland_index import index_pairs
from glandpet.workflow.dag import (
    DagLookup,
    atlas_list,
    config_digest,
    finish_run,
    per_attempt,
    plan_after_index,
    reference_session,
    selected_sessions,
    subject_ids,
)
from glandpet.workflow.failures import params_digest

RUN_START = time.time()

RESULTS = config["results"]
DEMO = config["subjects"] == ""
DEMO_DIR = f"{RESULTS}/demo"
SUBJECT_SHEET = f"{DEMO_DIR}/subjects.tsv" if DEMO else config["subjects"]
DICOM_ROOT = f"{DEMO_DIR}/dicom" if DEMO else config["dicom_root"]
PHANTOM_ATLAS_DIR = (
    f"{DEMO_DIR}/atlases" if DEMO else f"{RESULTS}/phantom-atlases/atlases"
)
SUBJECTS = subject_ids(config, SUBJECT_SHEET)
ATLASES = atlas_list(config, PHANTOM_ATLAS_DIR)
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
# segmentation.atlas_registration: template -> the library's template, built once (rules/segment.smk)
ATLAS_TEMPLATE = (
    f"{RESULTS}/work/atlas_template/manifest.json"
    if config["segmentation"]["atlas_registration"] == "template"
    else None
)
SUV_DESC = f"suv{config['suv_type']}"
SUBJECT_QC_PNG = layout.name_pattern("qc.png", session=None)  # sub-{subject}_qc.png
plan_after_index(workflow, f"{RESULTS}/tables/series.parquet")


wildcard_constraints:
    subject=layout.SUBJECT_ID_PATTERN,
    session=layout.SESSION_PATTERN,
    moving=layout.SESSION_PATTERN,
    reference=layout.SESSION_PATTERN,
    tracer=layout.ENTITY_VALUE_PATTERN,


_INDEX_DONE = []


def series_table():
    """The index checkpoint's series table. Once the checkpoint is complete in this run its path
    is remembered: asking Snakemake again for each of ~10 input functions per job cost ~2 s of a
    1,000-subject DAG (an incomplete checkpoint raises, and is asked again next time).
    """
    if not _INDEX_DONE:
        _INDEX_DONE.append(checkpoints.catalog_dicom.get().output.series)
        if (
            workflow.is_main_process
        ):  # a run that planned past the index: say what it leaves out
            atexit.register(run_finished, failed=False)
    return _INDEX_DONE[0]


_RULE_PARAMS = {}


def rule_params():
    """{rule: params digest} of this run: a failure record of a job whose rule's params changed since
    it failed no longer applies (glandpet.workflow.failures.record_is_current)."""
    if not _RULE_PARAMS:
        _RULE_PARAMS.update({r.name: params_digest(r.params) for r in workflow.rules})
    return _RULE_PARAMS


def run_finished(failed):
    """onsuccess / onerror (and at exit): plan again without failed jobs (--keep-going), then print
    what the run left out."""
    series = f"{RESULTS}/tables/series.parquet"
    if not os.path.isfile(series):
        return
    finish_run(
        workflow,
        RESULTS,
        SUBJECTS,
        # a new lookup: jobs of this run changed files
        DagLookup(series, rule_params).sessions,
        rule_params(),
        failed=failed,
        run_start=RUN_START,
    )


def subject_selection(w):
    """The subject's selected series (written by the index checkpoint, rewritten only on change)."""
    series_table()
    return layout.path(f"{RESULTS}/work", w.subject, suffix="series.json")


_DAG_LOOKUP = []


def dag_lookup():
    """Sessions and failed products per subject, worked out once per state of the series table and
    the failure records (glandpet.workflow.dag.DagLookup): input functions ask ~20 times per subject.
    """
    if not _DAG_LOOKUP:
        _DAG_LOOKUP.append(DagLookup(series_table(), rule_params))
    return _DAG_LOOKUP[0]


def sessions(subject):
    """The sessions (psma, fapi, and follow-ups psma2, fapi2, ...) the index selected for a subject,
    without failed ones."""
    series_table()  # an incomplete index checkpoint raises here, as before
    return dag_lookup().sessions(subject)


def tracer(subject, session):
    return sessions(subject)[session]


def ses_file(subject, session, suffix, **entities):
    """A session's file (glandpet.layout.path): ses_file(s, "psma", "dseg.nii.gz", space="ct")."""
    return layout.path(RESULTS, subject, session, suffix, **entities)


def out(suffix, session="{session}", **entities):
    """A per-subject output pattern with the {subject} and {session} wildcards
    (glandpet.layout.pattern); session=None: a file in the subject's folder."""
    return layout.pattern(RESULTS, suffix, session=session, **entities)


def job_log(rule, session="{session}", **entities):
    """A per-subject job's log: logs/<rule>/sub-{subject}[_ses-{session}].log."""
    return f"{LOGS}/{rule}/{layout.name_pattern(session=session, **entities)}.log"


def job_benchmark(rule, session="{session}", **entities):
    """A per-subject job's benchmark: benchmarks/<rule>/sub-{subject}[_ses-{session}].tsv."""
    return f"{BENCH}/{rule}/{layout.name_pattern(session=session, **entities)}.tsv"


def per_session(file_of):
    """The input function of a session file named by file_of(subject, session)."""
    return lambda w: file_of(w.subject, w.session)


def ct_file(subject, session):
    return ses_file(subject, session, "ct.nii.gz")


def pet_file(subject, session):
    return ses_file(subject, session, "pet.nii.gz", trc=tracer(subject, session))


def pet_sidecar_file(subject, session):
    return ses_file(subject, session, "pet.json", trc=tracer(subject, session))


def suv_file(subject, session):
    return ses_file(
        subject, session, "pet.nii.gz", trc=tracer(subject, session), desc=SUV_DESC
    )


def pet_to_ct_file(subject, session):
    return ses_file(subject, session, "xfm.mat", from_="pet", to="ct")


CORRECTIONS = config["segmentation"]["corrections"]


def correction_kind(subject, session):
    """Own (the session has a correction), carried (only the reference session has one), or
    None (the atlas labels). A cached listing of the corrections folder: no file read per call.
    """
    if not CORRECTIONS or subject not in corrected_subjects(CORRECTIONS):
        return None
    index = correction_index(CORRECTIONS)
    return source_of(index, subject, session, reference_session(sessions(subject)))


def study_sessions(subject):
    """The subject's sessions in the study for the corrections' check at workflow start (None before
    the index has run)."""
    series = f"{RESULTS}/tables/series.parquet"
    return selected_sessions(series, subject) if os.path.isfile(series) else None


def segmentation_source(w):
    """Corrected when the session's labels come from a correction (its own, or the reference
    session's carried through the session transform), else "atlas"."""
    return "corrected" if correction_kind(w.subject, w.session) else "atlas"


def dseg_file(subject, session):
    """The labels of this session: the corrected label map when a correction applies, else the atlas
    segmentation (whose job a correction never reruns)."""
    if correction_kind(subject, session):
        return ses_file(subject, session, "dseg.nii.gz", desc="corrected", space="ct")
    return ses_file(subject, session, "dseg.nii.gz", space="ct")


def dseg_table_file(subject, session):
    """The label table beside the session's labels (glandpet.layout.label_table_of)."""
    return layout.label_table_of(dseg_file(subject, session))


def session_transform(subject, session):
    """The files of the transform aligning a session's CT to the subject's reference session's CT:
    affine, warp, inverse_warp ({} for the reference session itself)."""
    ref = reference_session(sessions(subject))
    if session == ref:
        return {}
    return layout.session_transform_paths(
        layout.session_transform_prefix(RESULTS, subject, session, ref)
    )


def session_transform_of(subject, session):
    """session_transform with its keys prefixed by the session (psma2_affine, ...), for a job
    that reads the transforms of several sessions."""
    return {f"{session}_{k}": v for k, v in session_transform(subject, session).items()}


def atlas_files(w):
    files = []
    for a in ATLASES:
        files += [a["ct"], a["labels"], a["label_table"]]
    return files


def segment_inputs(w):
    """The reference session is segmented from the atlases; the other one gets its labels
    through the session transform."""
    ref = reference_session(sessions(w.subject))
    inputs = {"ct": ct_file(w.subject, w.session)}
    if w.session == ref:
        inputs["atlases"] = atlas_files(w)
        if ATLAS_TEMPLATE:
            inputs["template"] = ATLAS_TEMPLATE
    else:
        inputs["ref_dseg"] = ses_file(w.subject, ref, "dseg.nii.gz", space="ct")
        inputs["ref_dseg_table"] = ses_file(w.subject, ref, "dseg.tsv", space="ct")
        inputs["ref_qc"] = ses_file(w.subject, ref, "qc.json", desc="segment")
        inputs.update(session_transform(w.subject, w.session))
    return inputs


def correction_inputs(w):
    """A session's own correction (and its CT), or the reference session's corrected labels and the
    session transform; with the session's atlas dseg (its label table, and the QC's changed voxels).
    """
    kind = correction_kind(w.subject, w.session)
    inputs = {
        "ct": ct_file(w.subject, w.session),
        "atlas_dseg": ses_file(w.subject, w.session, "dseg.nii.gz", space="ct"),
        "atlas_dseg_table": ses_file(w.subject, w.session, "dseg.tsv", space="ct"),
    }
    if kind == "own":
        inputs["correction"] = correction_index(CORRECTIONS)[w.subject, w.session]
    elif kind == "carried":
        ref = reference_session(sessions(w.subject))
        inputs["ref_dseg"] = ses_file(
            w.subject, ref, "dseg.nii.gz", desc="corrected", space="ct"
        )
        inputs.update(session_transform(w.subject, w.session))
    else:
        raise ValueError(
            f"sub-{w.subject} ses-{w.session}: no correction in {CORRECTIONS or 'segmentation.corrections'}"
        )
    return inputs


def subject_stats(subject):
    return [
        ses_file(subject, s, "gland_stats.parquet") for s in sorted(sessions(subject))
    ]


def index_inputs(w):
    """Each session's gland_stats; for every time point with both tracers (glandpet.measure.gland_index
    .index_pairs) each session's images, labels and transforms for the within-gland voxel correlation.
    """
    ss = sessions(w.subject)
    inputs = {"stats": subject_stats(w.subject)}
    for _, psma, fapi in index_pairs(ss):
        for s in (psma, fapi):
            inputs[f"{s}_suv"] = suv_file(w.subject, s)
            inputs[f"{s}_ct"] = ct_file(w.subject, s)
            inputs[f"{s}_xfm"] = pet_to_ct_file(w.subject, s)
            inputs[f"{s}_dseg"] = dseg_file(w.subject, s)
            inputs[f"{s}_dseg_table"] = dseg_table_file(w.subject, s)
            inputs.update(session_transform_of(w.subject, s))
        inputs[f"{psma}_pet_dseg"] = ses_file(
            w.subject, psma, "dseg.nii.gz", space="pet"
        )
    return inputs


def montage_inputs(w):
    """The reference session's CT and labels, and the baseline sessions' SUV (aligned to it)."""
    ss = sessions(w.subject)
    ref = reference_session(ss)
    inputs = {
        "ct": ct_file(w.subject, ref),
        "dseg": dseg_file(w.subject, ref),
        "dseg_table": dseg_table_file(w.subject, ref),
    }
    for s in ss:
        if s in SESSION_FAMILIES:
            inputs[f"{s}_suv"] = suv_file(w.subject, s)
            inputs[f"{s}_xfm"] = pet_to_ct_file(w.subject, s)
            inputs.update(session_transform_of(w.subject, s))
    return inputs


def gland_index_and_montage_inputs(w):
    return {**index_inputs(w), **montage_inputs(w)}


def processed_subjects():
    """The subjects with at least one usable session (the others fail at the index, or failed in
    an earlier run: qc.parquet lists them)."""
    return [s for s in SUBJECTS if sessions(s)]


def indexed_subjects():
    """The processed subjects whose index/montage job has not failed (with the same inputs, params
    and code) in an earlier run: their sessions still reach gland_stats."""
    return [
        s
        for s in processed_subjects()
        if not dag_lookup().product_failed(s, "gland_index_and_montage")
    ]


def all_subject_files(pattern_fn):
    return [f for s in SUBJECTS for f in pattern_fn(s)]


def qc_files(_w=None):
    files = [f"{RESULTS}/tables/series.parquet"]
    for s in processed_subjects():
        ss = sessions(s)
        ref = reference_session(ss)
        for ses in ss:
            files.append(ses_file(s, ses, "qc.json", desc="register"))
            files.append(ses_file(s, ses, "qc.json", desc="segment"))
            if ses != ref:
                files.append(ses_file(s, ses, "qc.json", to=ref, desc="align"))
    return files


def final_outputs(_w=None):
    return [
        f"{RESULTS}/tables/gland_stats.parquet",
        f"{RESULTS}/tables/gland_index.parquet",
        f"{RESULTS}/tables/gland_change.parquet",
        f"{RESULTS}/tables/qc.parquet",
        f"{RESULTS}/tables/cohort_stats.parquet",
        f"{RESULTS}/figures/.done",
        f"{RESULTS}/tables/report/statistics.html",
    ] + [
        f"{RESULTS}/figures/qc/{layout.name(s, suffix='qc.png')}"
        for s in indexed_subjects()
    ]

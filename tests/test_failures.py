"""A faulty cohort (issue 17): a session dropped at the index or failing at run time never takes a
healthy one down; failure records stop applying when what failed changes; the run says at its end
what it left out.

Fast tests on the functions first; then ONE small sheet-based workflow scenario (2 subjects, 1 atlas)
shared by the end-to-end assertions."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pandas as pd
import pytest

from glandpet.workflow import dag
from glandpet.workflow import failures
from glandpet.workflow import steps
from glandpet.errors import UserError


class Job:
    """The parts of a Snakemake job object a failure record reads."""

    def __init__(self, inputs, **params):
        self.input = [str(p) for p in inputs]
        self.params = params

    # Snakemake's Params has items(); a dict does too


def _series(results: Path, subject: str, sessions=("psma", "fapi")) -> str:
    from glandpet.dicom.catalog import SERIES_SCHEMA
    from glandpet.tables import write_table

    path = results / "tables" / "series.parquet"
    rows = [dict(subject_id=subject, session=s, role="pet_ac", selected=True, tracer_slug=s, series_key=s)
            for s in sessions]
    write_table(rows, SERIES_SCHEMA, path)
    dag.clear_caches()
    return str(path)


def _fail(results: Path, rule: str, name: str, job=None, message="boom"):
    with pytest.raises(UserError):
        with failures.log_to(results / "logs" / rule / name, job=job):
            raise UserError(message)


def test_gland_index_and_montage_failure_keeps_the_subjects_sessions(tmp_path):
    """Before: a failed subject-level job (gland_index_and_montage) dropped every session of the subject."""
    results = tmp_path / "results"
    series = _series(results, "B")
    _fail(results, "gland_index_and_montage", "sub-B.log")
    assert dag.selected_sessions(series, "B") == {"psma": "psma", "fapi": "fapi"}
    assert dag.product_failed(results, "B", "gland_index_and_montage")
    # the session alignment failing leaves out the session that needs it, not the reference one
    _fail(results, "align_sessions", "sub-B.log")
    assert dag.selected_sessions(series, "B") == {"psma": "psma"}


def test_a_follow_ups_failed_alignment_leaves_out_that_follow_up_only(tmp_path):
    """Each session other than the reference has its own alignment job, whose log names the moving
    session: its failure drops that session, not the subject's other sessions."""
    results = tmp_path / "results"
    series = _series(results, "B", ("psma", "fapi", "psma2", "fapi2"))
    assert set(dag.selected_sessions(series, "B")) == {"psma", "fapi", "psma2", "fapi2"}
    _fail(results, "align_sessions", "sub-B_ses-psma2_to-psma.log")
    assert set(dag.selected_sessions(series, "B")) == {"psma", "fapi", "fapi2"}


def test_failure_record_is_stale_once_inputs_params_or_code_change(tmp_path, monkeypatch):
    """Before: a record applied forever (not tied to the inputs, params or code that failed)."""
    results = tmp_path / "results"
    series = _series(results, "B")
    suv = tmp_path / "suv.nii.gz"
    suv.write_bytes(b"corrupt")
    job = Job([suv], pvc={"method": "rbv"}, suv_type="bw")
    _fail(results, "measure_glands", "sub-B_ses-psma.log", job=job)
    rec = json.loads((results / "work" / "failed" / "measure_glands" / "sub-B_ses-psma.json").read_text())
    assert set(rec["fingerprint"]) == {"inputs", "params", "code"}
    params_now = {"measure_glands": failures.params_digest(job.params)}
    assert dag.selected_sessions(series, "B", params_now) == {"fapi": "fapi"}  # current: left out
    # the rule's params changed (e.g. back to the default PVC method): the job is retried
    params_default = {"measure_glands": failures.params_digest({"pvc": {"method": "gtm"}, "suv_type": "bw"})}
    assert dag.selected_sessions(series, "B", params_default) == {"psma": "psma", "fapi": "fapi"}
    assert failures.failure_records(results, params_default) == []
    assert len(failures.failure_records(results, params_default, stale=True)) == 1
    # the code changed
    monkeypatch.setattr(failures, "code_digest", lambda: "0" * 16)
    assert dag.selected_sessions(series, "B", params_now) == {"psma": "psma", "fapi": "fapi"}
    monkeypatch.undo()
    assert dag.selected_sessions(series, "B", params_now) == {"fapi": "fapi"}
    # the input was replaced
    time.sleep(0.01)
    suv.write_bytes(b"fixed image")
    assert dag.selected_sessions(series, "B", params_now) == {"psma": "psma", "fapi": "fapi"}
    # a record without a fingerprint (written before fingerprints existed) no longer applies
    p = results / "work" / "failed" / "convert_pet" / "sub-B_ses-fapi_trc-fapi.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"subject_id": "B", "session": "fapi", "stage": "convert_pet", "status": "failed",
                             "message": "old"}))
    assert dag.selected_sessions(series, "B", params_now) == {"psma": "psma", "fapi": "fapi"}


def test_dag_lookup_answers_as_the_functions_and_checks_each_record_once_per_state(tmp_path, monkeypatch):
    """Before: every input function call checked every failure record of the cohort (stat of each record's
    inputs): O(subjects x records) per DAG. DagLookup gives the same answers, checking each record once
    per state of the series table and the records' folder."""
    from glandpet.dicom.catalog import SERIES_SCHEMA
    from glandpet.tables import write_table

    results = tmp_path / "results"
    subjects = [f"S{i}" for i in range(6)]
    path = results / "tables" / "series.parquet"
    write_table([dict(subject_id=s, session=ses, role="pet_ac", selected=True, tracer_slug=ses, series_key=s + ses)
                 for s in subjects for ses in ("psma", "fapi")], SERIES_SCHEMA, path)
    dag.clear_caches()
    series = str(path)
    suv = tmp_path / "suv.nii.gz"
    suv.write_bytes(b"corrupt")
    _fail(results, "measure_glands", "sub-S1_ses-psma.log", job=Job([suv]))
    _fail(results, "align_sessions", "sub-S2.log")
    _fail(results, "gland_index_and_montage", "sub-S3.log")
    _fail(results, "convert_ct_register_pet", "sub-S4_ses-fapi.log")
    _fail(results, "mystery_step", "sub-S5.log")  # any other subject-level failure: the whole subject

    calls = []
    real = failures.record_is_current
    monkeypatch.setattr(failures, "record_is_current", lambda rec, params=None: calls.append(1) or real(rec, params))
    params = {"measure_glands": failures.params_digest({})}  # this run's: S1's record is current
    lookup = dag.DagLookup(series, params)

    def expected():
        return {s: (dag.selected_sessions(series, s, params), dag.product_failed(results, s, "gland_index_and_montage", params))
                for s in subjects}

    def answers():
        return {s: (lookup.sessions(s), lookup.product_failed(s, "gland_index_and_montage")) for s in subjects}

    for _ in range(3):  # Snakemake asks many times per subject
        got = answers()
    assert len(calls) == 5  # each record checked once for all the calls, not once per call
    assert got == expected()
    assert got["S0"][0] == {"psma": "psma", "fapi": "fapi"} and got["S1"][0] == {"fapi": "fapi"}
    assert got["S2"][0] == {"psma": "psma"} and got["S3"] == ({"psma": "psma", "fapi": "fapi"}, True)
    assert got["S4"][0] == {"psma": "psma"} and got["S5"][0] == {}
    lookup.sessions("S0").clear()  # a copy: callers cannot change the next answer
    assert lookup.sessions("S0") == {"psma": "psma", "fapi": "fapi"}
    # a new record (its rule folder changes) and a new series table are seen by the same lookup
    time.sleep(0.01)
    _fail(results, "measure_glands", "sub-S0_ses-fapi.log")
    assert lookup.sessions("S0") == {"psma": "psma"} == dag.selected_sessions(series, "S0", params)
    write_table([dict(subject_id="S0", session="psma", role="pet_ac", selected=True, tracer_slug="psma",
                      series_key="x")], SERIES_SCHEMA, path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert lookup.sessions("S0") == {"psma": "psma"} and lookup.sessions("S1") == {}
    # a failed job's input replaced without either state changing: a new lookup (the end of a run) sees it
    write_table([dict(subject_id="S1", session=ses, role="pet_ac", selected=True, tracer_slug=ses,
                      series_key=ses) for ses in ("psma", "fapi")], SERIES_SCHEMA, path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert lookup.sessions("S1") == {"fapi": "fapi"}
    suv.write_bytes(b"fixed image")
    assert dag.DagLookup(series, lambda: params).sessions("S1") == {"psma": "psma", "fapi": "fapi"}


def test_single_session_index_does_not_need_the_other_session(tmp_path, monkeypatch):
    """Before: a subject left with its PSMA session (its FAPI dropped at the index) crashed with
    AttributeError: 'InputFiles' object has no attribute 'psma_pet_dseg' (the montage's psma_suv key
    made gland_index ask for the voxel correlation)."""
    import glandpet.measure.gland_index as gi

    stats = tmp_path / "stats.parquet"
    pd.DataFrame({"subject_id": ["A"], "gland": ["parotid"]}).to_parquet(stats)
    seen = {}

    def table(df, definition, reference, use_pvc, spearman):
        seen["spearman"] = spearman
        return pd.DataFrame({"subject_id": ["A"]})

    monkeypatch.setattr(gi, "gland_index_table", table)

    class Inputs(NS):
        def keys(self):
            return list(vars(self))

    inputs = Inputs(stats=[str(stats)], psma_suv="x_suv.nii.gz", psma_xfm="x.mat", ct="ct.nii.gz", dseg="d.nii.gz")
    steps.gland_index(inputs, str(tmp_path / "index.parquet"), "A", {"definition": "ratio"})
    assert seen == {"spearman": None}


def test_left_out_summary_counts_and_points_to_qc(tmp_path):
    from glandpet.dicom.catalog import FAILURES_SCHEMA
    from glandpet.tables import write_table

    results = tmp_path / "results"
    write_table([dict(subject_id="A", session="fapi", stage="index", status="failed",
                      message="sub-A ses-fapi: CT series #2 'CT': 1 of its files is truncated"),
                 dict(subject_id="C", session=None, stage="index", status="failed",
                      message="sub-C: its dicom_dir folder holds no files"),
                 dict(subject_id="A", session="psma", stage="index", status="warning", message="a warning")],
                FAILURES_SCHEMA, results / "work" / "index_failures.parquet")
    _fail(results, "measure_glands", "sub-B_ses-fapi.log", message="sub-B ses-fapi: corrupt SUV image")
    usable = {"A": {"psma": "x"}, "B": {}, "C": {}}
    text = dag.left_out_summary(results, ["A", "B", "C"], lambda s: usable[s], causes=2)
    lines = text.splitlines()
    assert lines[0] == "glandpet: this run left out 2 of 3 subject(s), 1 more session(s); causes:"
    assert "[index] sub-A ses-fapi: CT series #2 'CT': 1 of its files is truncated" in lines[1]
    assert "[index] sub-C" in lines[2] and "warning" not in text
    assert lines[3].startswith("  and 1 more; every cause") and str(results / "tables" / "qc.parquet") in lines[3]
    assert "params or the code change" in lines[4]
    assert dag.left_out_summary(tmp_path / "empty", ["A"], lambda s: {"psma": "x"}) is None


# ------------------------------------------------------------------------------------------ the workflow
SITECUSTOMIZE = '''
import os
_poison = os.environ.get("GLANDPET_TEST_POISON")
if _poison:
    import glandpet.workflow as _wf  # the interface the scripts call
    _measure = _wf.measure_glands

    def measure_glands(inputs, output, subject, session, *args, **kw):
        if os.path.isfile(_poison) and open(_poison).read().strip() == f"{subject}:{session}":
            raise ValueError(f"injected failure: the SUV image {os.path.basename(str(inputs.suv))} is corrupt")
        return _measure(inputs, output, subject, session, *args, **kw)

    _wf.measure_glands = measure_glands
'''


@pytest.mark.slow
def test_faulty_cohort_ends_in_one_keep_going_run_and_a_fixed_job_is_taken_up(small_cohort, tmp_path, monkeypatch):
    """The issue's "done when": S001 (pSS, PSMA + FAPI) has one truncated file in its FAPI CT (dropped
    at the index); S002's only session (FAPI) fails at run time in measure_glands (an injected
    failure). ONE `snakemake --keep-going` run ends with S001's PSMA session in gland_stats and
    gland_index (single-session rows), both failures in qc.parquet with their causes, and a summary on
    the terminal. A dry run with nothing changed says the same at its end (no silent exit 0); once the
    failed job's input is replaced, the next run takes it up, nothing deleted by hand."""
    import yaml

    from test_bad_inputs import _series_dirs
    from workflow_run import snakemake

    dicom = tmp_path / "dicom"
    shutil.copytree(small_cohort / "dicom", dicom, copy_function=os.link)
    ct = sorted(_series_dirs(dicom / "S001", "fapi")["ct"].iterdir())[3]
    data = ct.read_bytes()
    ct.unlink()
    ct.write_bytes(data[:-4000])
    shutil.copy(small_cohort / "subjects.tsv", tmp_path / "subjects.tsv")
    atlas = small_cohort / "atlases" / "atlas01"
    results = tmp_path / "results"
    cfg = {"results": str(results), "subjects": str(tmp_path / "subjects.tsv"), "dicom_root": str(dicom),
           "atlases": [{"name": "atlas01", "ct": str(atlas / "ct.nii.gz"), "labels": str(atlas / "labels.nii.gz"),
                        "label_table": str(atlas / "labels.tsv")}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    poison = tmp_path / "poison"
    poison.write_text("S002:fapi")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLANDPET_TEST_POISON", str(poison))

    t0 = time.perf_counter()
    run = snakemake(tmp_path, "--cores", "2", "--keep-going", check=False)
    out = run.stdout + run.stderr
    print(f"keep-going run: {time.perf_counter() - t0:.0f} s")
    assert run.returncode != 0, out[-3000:]  # a job failed: the run says so in its exit status too
    assert "after the catalog_dicom step the plan is" in out, out[-6000:]
    tables = results / "tables"
    stats = pd.read_parquet(tables / "gland_stats.parquet")
    assert set(zip(stats["subject_id"], stats["session"])) == {("S001", "psma")}, out[-6000:]
    index = pd.read_parquet(tables / "gland_index.parquet")
    assert set(index["subject_id"]) == {"S001"}
    qc = pd.read_parquet(tables / "qc.parquet")
    bad = qc[qc["status"] == "failed"]
    got = {(r.subject_id, r.session, r.stage) for r in bad.itertuples()}
    assert got == {("S001", "fapi", "index"), ("S002", "fapi", "measure_glands")}, bad.to_string()
    msgs = dict(zip(bad["subject_id"], bad["message"]))
    assert "truncated" in msgs["S001"] and "injected failure" in msgs["S002"]
    summary = out[out.rindex("glandpet: this run left out"):]
    assert summary.startswith("glandpet: this run left out 1 of 2 subject(s), 1 more session(s)"), summary
    assert "truncated" in summary and "injected failure" in summary and str(tables / "qc.parquet") in summary

    # nothing changed: a dry run plans nothing of S002 and still says what is left out
    poison.unlink()
    dry = snakemake(tmp_path, "-n", "--cores", "2")
    dout = dry.stdout + dry.stderr
    assert "subject=S002" not in dout and "glandpet: this run left out" in dout, dout[-3000:]

    # the failed job's input is replaced (same image, rewritten): the next run takes the job up
    suv = next((results / "sub-S002" / "ses-fapi").glob("*_desc-suvbw_pet.nii.gz"))
    suv.write_bytes(suv.read_bytes())
    t0 = time.perf_counter()
    again = snakemake(tmp_path, "--cores", "2")
    print(f"run after the fix: {time.perf_counter() - t0:.0f} s")
    aout = again.stdout + again.stderr
    assert "rule measure_glands" in aout
    stats = pd.read_parquet(tables / "gland_stats.parquet")
    assert set(zip(stats["subject_id"], stats["session"])) == {("S001", "psma"), ("S002", "fapi")}
    qc = pd.read_parquet(tables / "qc.parquet")
    assert set(qc.loc[qc["status"] == "failed", "subject_id"]) == {"S001"}
    assert not list((results / "work" / "failed").rglob("*.json"))
    # issue 18: one atlas segments this cohort, and nothing can check it (no second atlas): every
    # segmented gland has no confidence and is in the review queue saying why
    # (glandpet.segmentation.confidence.MIN_VOTERS)
    seg = stats[stats["volume_ml"] > 0]
    assert len(seg) and seg["seg_confidence"].isna().all() and set(seg["seg_flag"]) == {"review"}
    review = qc[qc["stage"] == "segment_review"]
    assert set(review["status"]) == {"warning"} and len(review) == int((stats["seg_flag"] == "review").sum())
    assert review["message"].str.contains("one atlas voted").all()

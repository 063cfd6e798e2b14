"""Incremental reruns (issue 6): after a complete run, a change reruns only the jobs it affects.

(a) a measurement parameter (PVC FWHM) is tested in test_workflow.py; here:
(b) adding one subject to the sheet runs only that subject's jobs plus the cohort aggregation;
(c) changing the atlas set reruns segmentation and what follows it only;
(d) a run killed (SIGKILL) in the middle of a job resumes with --rerun-incomplete and ends with
    the same results as an uninterrupted run.

All reuse the shared demo run (``workflow_run``): (b) and (d) in their own folders, on its DICOM
tree and atlases read in place (a study-style config: subject sheet + dicom_root + atlases);
(c) is a dry run of the shared run with a changed config (restored afterwards)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from workflow_run import REPO, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow

PER_SESSION = {"convert_pet", "convert_ct_register_pet", "segment_glands", "measure_glands"}
UPSTREAM_OF_SEGMENTATION = {"demo_phantom", "phantom_atlases", "catalog_dicom", "convert_pet", "convert_ct_register_pet",
                            "align_sessions"}
COHORT = {"cohort_tables", "cohort_statistics", "cohort_figures", "report_tables"}


def planned(out: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run lists."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in out.splitlines():
        m = re.match(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):\s*$", line)
        if m:
            jobs.append((m.group(1), {}))
            continue
        m = re.match(r"^\s*wildcards: (.*)$", line)
        if m and jobs:
            jobs[-1][1].update(kv.split("=", 1) for kv in m.group(1).split(", "))
    return jobs


def study_config(workdir: Path, shared: Path, subject_ids: list[str], **extra) -> None:
    """A study-style config in `workdir`: a subject sheet with `subject_ids` (rows of the demo's
    sheet), the shared run's DICOM tree as dicom_root and its atlases, results in workdir."""
    demo = shared / "results" / "demo"
    sheet = pd.read_csv(demo / "subjects.tsv", sep="\t", dtype=str)
    sheet[sheet["subject_id"].isin(subject_ids)].to_csv(workdir / "subjects.tsv", sep="\t", index=False)
    atlases = [{"name": d.name, "ct": str(d / "ct.nii.gz"), "labels": str(d / "labels.nii.gz"),
                "label_table": str(d / "labels.tsv")} for d in sorted((demo / "atlases").iterdir()) if d.is_dir()]
    write_config(workdir, subjects=str(workdir / "subjects.tsv"), dicom_root=str(demo / "dicom"),
                 atlases=atlases, **extra)


def test_adding_a_subject_runs_only_its_jobs_and_the_cohort_aggregation(workflow_run, tmp_path):
    shared = workflow_run / "results"
    # A finished one-subject study: S001's results of the shared run (copied with their times),
    # S002 not in the sheet yet.
    results = tmp_path / "results"
    shutil.copytree(shared / "sub-S001", results / "sub-S001")
    shutil.copytree(shared / "work" / "sub-S001", results / "work" / "sub-S001")
    (results / "figures" / "qc").mkdir(parents=True)
    shutil.copy2(shared / "figures" / "qc" / "sub-S001_qc.png", results / "figures" / "qc")
    (results / "figures" / "qc" / "thumbnails").mkdir()
    shutil.copy2(shared / "figures" / "qc" / "thumbnails" / "sub-S001_qc.png", results / "figures" / "qc" / "thumbnails")
    study_config(tmp_path, workflow_run, ["S001"])
    proc = snakemake(tmp_path, "--cores", "2")
    done = planned(proc.stdout + proc.stderr)
    assert {r for r, _ in done} <= {"catalog_dicom", "all"} | COHORT, done  # S001's own results were up to date
    assert set(pd.read_parquet(results / "tables" / "gland_stats.parquet")["subject_id"]) == {"S001"}

    # Add S002 to the sheet: the index (a checkpoint) reruns, then the plan is S002's jobs plus the
    # cohort aggregation, nothing of S001.
    time.sleep(1.1)  # the sheet must be newer than the index on coarse-mtime filesystems
    study_config(tmp_path, workflow_run, ["S001", "S002"])
    snakemake(tmp_path, "--cores", "2", str(results / "tables" / "series.parquet"))
    proc = snakemake(tmp_path, "-n", "--cores", "2")
    jobs = planned(proc.stdout + proc.stderr)
    subjects = {w["subject"] for _, w in jobs if "subject" in w}
    assert subjects == {"S002"}, jobs
    rules = {r for r, _ in jobs}
    assert PER_SESSION <= rules, rules  # the new subject's whole chain (a control: FAPI only)
    assert {r for r, w in jobs if "subject" not in w} - {"all"} == COHORT, jobs


def test_changing_the_atlas_set_reruns_segmentation_and_downstream_only(workflow_run):
    atlas_dir = workflow_run / "results" / "demo" / "atlases"
    first = sorted(d for d in atlas_dir.iterdir() if d.is_dir())[0]
    one_atlas = [{"name": first.name, "ct": str(first / "ct.nii.gz"), "labels": str(first / "labels.nii.gz"),
                  "label_table": str(first / "labels.tsv")}]
    jobs = planned_jobs(workflow_run, atlases=one_atlas)
    assert jobs.get("segment_glands") == 3, jobs  # every session of both subjects
    assert jobs.get("measure_glands") == 3 and jobs.get("gland_index_and_montage") == 2, jobs
    assert COHORT <= set(jobs), jobs
    assert not UPSTREAM_OF_SEGMENTATION & set(jobs), jobs


def test_the_template_path_builds_one_template_and_reruns_segmentation_and_downstream_only(workflow_run):
    """segmentation.atlas_registration: template -- one build_atlas_template job for the library,
    the segmentation of every session and what reads it; nothing upstream (issue 21.1)."""
    jobs = planned_jobs(workflow_run, segmentation={"atlas_registration": "template"})
    assert jobs.get("build_atlas_template") == 1, jobs
    assert jobs.get("segment_glands") == 3 and jobs.get("measure_glands") == 3, jobs
    assert COHORT <= set(jobs), jobs
    assert not UPSTREAM_OF_SEGMENTATION & set(jobs), jobs


def incomplete_markers(workdir: Path) -> list[Path]:
    """Snakemake's markers of jobs started but not finished (.snakemake/incomplete)."""
    return [p for p in (workdir / ".snakemake" / "incomplete").rglob("*") if p.is_file()]


def _run_and_kill_mid_job(workdir: Path, target: str, rule: str) -> str:
    """Start snakemake, SIGKILL it and its job (its own process group) while `rule` runs: once the
    job's step has opened its log file (it is past start-up, converting)."""
    log = workdir / "killed-run.log"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "1", target]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text()
            m = re.search(rf"^\s*(?:local)?rule {rule}:\n(?:.*\n)*?\s*log: (\S+)\n(?:.*\n)*?\s*jobid: (\d+)",
                          text, re.M)
            if m and incomplete_markers(workdir) and Path(m.group(1)).is_file():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    return log.read_text()


def test_a_killed_run_resumes_and_equals_an_uninterrupted_run(workflow_run, tmp_path):
    shared = workflow_run / "results"
    suv_local = sorted((shared / "sub-S002" / "ses-fapi").glob("*_desc-suv*_pet.nii.gz"))
    assert len(suv_local) == 1
    rel = suv_local[0].relative_to(shared)
    study_config(tmp_path, workflow_run, ["S002"])
    target = str(tmp_path / "results" / rel)

    text = _run_and_kill_mid_job(tmp_path, target, "convert_pet")
    assert re.search(r"^\s*(?:local)?rule convert_pet:", text, re.M), text[-3000:]
    assert "Finished jobid" not in text.split("rule convert_pet:")[1], "convert_pet finished before the kill"
    assert incomplete_markers(tmp_path), "no job was left incomplete"
    assert not Path(target).exists()

    snakemake(tmp_path, "--unlock")  # the killed run's lock stays behind
    out = snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", target)
    assert "rule convert_pet" in out.stdout + out.stderr
    assert not incomplete_markers(tmp_path)
    # identical to the uninterrupted shared run: PET (Bq/mL), its sidecar and the SUV image
    pet_rel = rel.with_name(re.sub(r"_desc-suv\w+_pet", "_pet", rel.name))
    for r in (rel, pet_rel):
        a, b = nib.load(shared / r), nib.load(tmp_path / "results" / r)
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    sidecar = pet_rel.with_name(pet_rel.name.replace(".nii.gz", ".json"))
    assert json.loads((tmp_path / "results" / sidecar).read_text()) == json.loads((shared / sidecar).read_text())

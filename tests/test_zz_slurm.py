"""The workflow through a real SLURM cluster (issue 6): the SLURM profile (profiles/slurm) and
snakemake-executor-plugin-slurm submit the index, conversion, SUV and PET->CT registration of
both demo subjects with `sbatch`; the results equal those of the shared local run, and the DICOM
input tree is not modified (issue 7's input-safety check).

Named test_zz_* so it runs last (slow). Needs a running cluster: `tests/slurm/start-local-slurm.sh`
(as root) brings one up on this machine, and `pip install -e ".[slurm]"` the plugin. Skipped
only when there is no `sbatch` and GLANDPET_REQUIRE_SLURM is unset; CI sets it, so a missing
cluster fails there instead of skipping."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from workflow_run import REPO, write_config

pytestmark = pytest.mark.slow

def _require_slurm() -> None:
    if shutil.which("sbatch") is None:
        if os.environ.get("GLANDPET_REQUIRE_SLURM"):
            pytest.fail("GLANDPET_REQUIRE_SLURM is set but `sbatch` is not on PATH: run "
                        "tests/slurm/start-local-slurm.sh (as root) first")
        pytest.skip("no SLURM here (`sbatch` absent); tests/slurm/start-local-slurm.sh starts a local cluster")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    assert "UP" in ping.stdout, f"slurmctld is not answering ({ping.stdout.strip()} {ping.stderr.strip()}): " \
                                "run tests/slurm/start-local-slurm.sh"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail('snakemake-executor-plugin-slurm is not installed: pip install -e ".[slurm]"')


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _affine_map(xfm: Path) -> tuple[np.ndarray, np.ndarray]:
    from glandpet.registration.transforms import transform_matrix

    return transform_matrix(str(xfm))


@pytest.fixture(scope="module")
def slurm_run(workflow_run, tmp_path_factory):
    """Conversion, SUV and PET->CT registration of every demo session through SLURM, on the local
    run's DICOM tree and subject sheet (a study-style config: sheet, dicom_root, atlases)."""
    _require_slurm()
    local = workflow_run / "results"
    demo = local / "demo"
    dicom = demo / "dicom"
    before = _tree_digest(dicom)
    assert before, "the shared run produced no DICOM"

    work = tmp_path_factory.mktemp("slurm")
    atlases = [{"name": d.name, "ct": str(d / "ct.nii.gz"), "labels": str(d / "labels.nii.gz"),
                "label_table": str(d / "labels.tsv")} for d in sorted((demo / "atlases").iterdir()) if d.is_dir()]
    write_config(work, subjects=str(demo / "subjects.tsv"), dicom_root=str(dicom), atlases=atlases)

    # Targets: every session's SUV image and PET->CT transform in the local run (the SUV pulls in
    # the PET conversion, the transform the CT conversion; all need the index checkpoint).
    local_targets = sorted(local.glob("sub-*/ses-*/*_desc-suv*_pet.nii.gz")) + \
        sorted(local.glob("sub-*/ses-*/*_from-pet_to-ct_xfm.mat"))
    assert len(local_targets) >= 6, local_targets
    targets = [str(work / "results" / t.relative_to(local)) for t in local_targets]

    logdir = work / "slurm_logs"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--profile", str(REPO / "profiles" / "slurm"),
           # this cluster: one 2-CPU node, no accounting (status from squeue), short status delay
           "--cores", "2", "--jobs", "4", "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "3", "--slurm-no-account",
           "--slurm-logdir", str(logdir), "--slurm-keep-successful-logs", "--latency-wait", "10",
           "--retries", "0", "--keep-going", *targets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"SLURM run failed:\n{log[-8000:]}"
    return {"work": work, "local": local, "slurm": work / "results", "log": log, "logdir": logdir,
            "dicom": dicom, "before": before, "local_targets": local_targets}


def test_jobs_really_went_through_sbatch(slurm_run):
    log = slurm_run["log"]
    run_id = re.search(r"SLURM run ID: (\S+)", log)
    assert run_id, log[-3000:]
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", log)
    # the index checkpoint, then the grouped per-session jobs: fewer SLURM jobs than rule jobs
    assert len(job_ids) >= 2, log[-3000:]
    assert not re.search(r"^\s*localrule (index_dicom|convert_pet|convert_ct_register_pet)\b",
                         log, re.M), "a workflow step ran on the submit host, not through SLURM"
    rules_in_slurm_logs: set[str] = set()
    for job_id in job_ids:
        # SLURM's own record of the job (finished jobs stay listed for MinJobAge seconds)
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        assert f"JobName={run_id.group(1)}" in show, show
        assert "JobState=COMPLETED" in show and "ExitCode=0:0" in show, show
        # the batch job's stdout, written by slurmstepd: the steps it ran inside the allocation
        slurm_logs = list(slurm_run["logdir"].rglob(f"{job_id}.log"))
        assert len(slurm_logs) == 1, (job_id, list(slurm_run["logdir"].rglob("*")))
        rules_in_slurm_logs |= set(re.findall(r"^\s*(?:rule|checkpoint) (\w+):", slurm_logs[0].read_text(), re.M))
    assert {"index_dicom", "convert_pet", "convert_ct_register_pet"} <= rules_in_slurm_logs
    # the per-session steps were grouped: fewer SLURM jobs than rule jobs (the index + 2 per session)
    assert len(job_ids) < 1 + 2 * 3


def test_images_equal_the_local_run(slurm_run):
    local, slurm = slurm_run["local"], slurm_run["slurm"]
    images = []
    for suv in sorted(local.glob("sub-*/ses-*/*_desc-suv*_pet.nii.gz")):  # and its PET (Bq/mL) and CT
        session = suv.name.split("_trc-")[0]
        images += [suv, suv.with_name(re.sub(r"_desc-suv\w+_pet", "_pet", suv.name)), suv.with_name(f"{session}_ct.nii.gz")]
    assert len(images) == 9  # 3 sessions: S001 psma + fapi, S002 (control) fapi
    for f in images:
        a, b = nib.load(f), nib.load(slurm / f.relative_to(local))
        np.testing.assert_array_equal(a.affine, b.affine, err_msg=str(f))
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj), err_msg=str(f))


def test_transforms_equal_the_local_run(slurm_run):
    """PET->CT registration runs on one ITK thread, so its transforms are bit-identical wherever
    they are computed (with 2 threads two runs differed by up to 0.34 mm at the field corners)."""
    local, slurm = slurm_run["local"], slurm_run["slurm"]
    xfms = sorted(local.glob("sub-*/ses-*/*_from-pet_to-ct_xfm.mat"))
    assert len(xfms) == 3
    for f in xfms:
        (A1, b1), (A2, b2) = _affine_map(f), _affine_map(slurm / f.relative_to(local))
        np.testing.assert_array_equal(A1, A2, err_msg=f.name)
        np.testing.assert_array_equal(b1, b2, err_msg=f.name)


def test_dicom_input_tree_unchanged(slurm_run):
    assert _tree_digest(slurm_run["dicom"]) == slurm_run["before"]

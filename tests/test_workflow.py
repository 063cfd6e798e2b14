"""Whole-workflow tests: ONE run of the demo workflow on a small phantom cohort (session fixture),
then many assertions on its outputs. Marked slow: the run takes a few minutes on 2 cores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest

from conftest import REPO
from glandpet import tables

pytestmark = pytest.mark.slow

CONFIG = {"demo": {"subjects": 2, "seed": 1, "atlases": 2}}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(workdir: Path, **extra) -> None:
    import yaml

    cfg = {"results": str(workdir / "results"), **CONFIG, **extra}
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    write_config(workdir)
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.fixture(scope="session")
def results(run) -> Path:
    return run / "results"


def planned_jobs(workdir: Path, **extra) -> dict[str, int]:
    """Jobs a dry run with a changed config would run, by rule."""
    write_config(workdir, **extra)
    try:
        out = snakemake(workdir, "-n", "--cores", "2").stdout
    finally:
        write_config(workdir)
    counts: dict[str, int] = {}
    in_table = False
    for line in out.splitlines():
        if line.startswith("job") and "count" in line:
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    return counts


def test_tables_have_their_schemas(results):
    for name in ("gland_stats", "gland_index", "qc", "cohort_stats"):
        table = pq.read_table(results / "tables" / f"{name}.parquet")
        assert table.schema.equals(tables.SCHEMAS[name]), name


def test_every_subject_and_session_is_measured(results):
    truth = pd.read_parquet(results / "demo" / "truth" / "gland_truth.parquet")
    stats = pd.read_parquet(results / "tables" / "gland_stats.parquet")
    expected = set(map(tuple, truth[["subject_id", "session"]].drop_duplicates().to_numpy()))
    got = set(map(tuple, stats[["subject_id", "session"]].drop_duplicates().to_numpy()))
    assert got == expected
    assert set(stats["group"]) == set(truth["group"])
    assert stats["tracer"].notna().all()
    assert (stats["config_hash"].str.len() == 12).all()


def test_files_follow_the_design_names(results):
    for sub in ("S001", "S002"):
        sub_dir = results / f"sub-{sub}"
        for ses_dir in sub_dir.glob("ses-*"):
            ses = ses_dir.name[4:]
            assert (ses_dir / f"sub-{sub}_ses-{ses}_ct.nii.gz").is_file()
            assert list(ses_dir.glob(f"sub-{sub}_ses-{ses}_trc-*_pet.nii.gz"))
            assert list(ses_dir.glob(f"sub-{sub}_ses-{ses}_trc-*_desc-suvbw_pet.nii.gz"))
            assert (ses_dir / f"sub-{sub}_ses-{ses}_from-pet_to-ct_xfm.mat").is_file()
            assert (ses_dir / f"sub-{sub}_ses-{ses}_space-ct_dseg.nii.gz").is_file()
            assert (ses_dir / f"sub-{sub}_ses-{ses}_space-ct_dseg.tsv").is_file()
    assert list(results.glob("sub-*/sub-*_from-fapi_to-psma_xfm.mat"))
    assert list(results.glob("sub-*/sub-*_from-fapi_to-psma_xfm.nii.gz"))


def test_controls_have_fapi_only_and_null_index(results):
    index = pd.read_parquet(results / "tables" / "gland_index.parquet")
    controls = index[index["group"] == "control"]
    assert len(controls) and controls["psma_suv_mean"].isna().all() and controls["psma_fapi_index"].isna().all()
    pss = index[index["group"] == "pss"]
    assert pss["psma_fapi_index"].notna().any()


def test_qc_table_records_registration(results):
    qc = pd.read_parquet(results / "tables" / "qc.parquet")
    reg = qc[qc["stage"] == "register"]
    assert len(reg) == 3 and set(reg["status"]) <= {"ok", "warning"}
    for metrics in reg["metrics_json"]:
        assert "mi_after" in json.loads(metrics)


def test_figures_and_montages(results):
    for stem in ("psma_vs_fapi", "fapi_by_group", "index_by_group"):
        assert (results / "figures" / "cohort" / f"{stem}.png").stat().st_size > 1000
        assert (results / "figures" / "cohort" / f"{stem}.svg").is_file()
    for sub in ("S001", "S002"):
        assert (results / "figures" / "qc" / f"sub-{sub}_qc.png").stat().st_size > 10000


def test_nothing_left_to_do(run):
    out = snakemake(run, "-n", "--cores", "2").stdout
    assert "Nothing to be done" in out or "nothing to be done" in out.lower()


def test_changing_pvc_fwhm_reruns_only_measurement_and_below(run):
    jobs = planned_jobs(run, pvc={"method": "gtm", "fwhm_mm": {"psma": 7.5, "fapi": 6.5}})
    assert jobs.get("measure_glands", 0) >= 1
    assert not {"convert_ct", "convert_pet", "suv_image", "register_pet_to_ct", "align_sessions",
                "segment_glands", "demo_phantom", "index_dicom"} & set(jobs)


def test_snakemake_report_holds_figures_statistics_and_montages(run):
    report = run / "results" / "report.html"
    snakemake(run, "--report", str(report))
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 100_000
    for needle in ("QC montages", "Figures", "Statistics", "sub-S001_qc.png", "sub-S002_qc.png", "psma_vs_fapi.png",
                   "cohort_stats.parquet"):
        assert needle in html, needle


def test_no_identifier_leaves_the_dicom(results):  # last: the report exists by now
    """No PatientName/ID/BirthDate/Accession/Institution/Physician of the input DICOM appears in
    any output byte (the demo's own DICOM input folder excepted)."""
    needles = set()
    for f in (results / "demo" / "dicom").rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                       "ReferringPhysicianName"):
                v = str(ds.get(kw, "") or "").strip()
                if len(v) >= 6:
                    needles.add(v.encode())
    assert needles
    for f in results.rglob("*"):
        if f.is_file() and "demo" not in f.relative_to(results).parts[:1]:
            data = f.read_bytes()
            if f.suffix == ".gz":
                import gzip

                data = gzip.decompress(data)
            for needle in needles:
                assert needle not in data, f"{needle!r} found in {f}"

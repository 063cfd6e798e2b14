"""Whole-workflow tests: ONE run of the demo workflow on a small phantom cohort (session fixture),
then many assertions on its outputs. Marked slow: the run takes a few minutes on 2 cores."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest

from glandpet import tables
from workflow_run import planned_jobs, snakemake

pytestmark = pytest.mark.slow


def test_tables_have_their_schemas(workflow_results):
    for name in ("gland_stats", "gland_index", "qc", "cohort_stats"):
        table = pq.read_table(workflow_results / "tables" / f"{name}.parquet")
        assert table.schema.equals(tables.SCHEMAS[name]), name


def test_every_subject_and_session_is_measured(workflow_results):
    truth = pd.read_parquet(workflow_results / "demo" / "truth" / "gland_truth.parquet")
    stats = pd.read_parquet(workflow_results / "tables" / "gland_stats.parquet")
    expected = set(map(tuple, truth[["subject_id", "session"]].drop_duplicates().to_numpy()))
    got = set(map(tuple, stats[["subject_id", "session"]].drop_duplicates().to_numpy()))
    assert got == expected
    assert set(stats["group"]) == set(truth["group"])
    assert stats["tracer"].notna().all()
    assert (stats["config_hash"].str.len() == 12).all()


def test_files_follow_the_design_names(workflow_results):
    for sub in ("S001", "S002"):
        sub_dir = workflow_results / f"sub-{sub}"
        for ses_dir in sub_dir.glob("ses-*"):
            ses = ses_dir.name[4:]
            assert (ses_dir / f"sub-{sub}_ses-{ses}_ct.nii.gz").is_file()
            assert list(ses_dir.glob(f"sub-{sub}_ses-{ses}_trc-*_pet.nii.gz"))
            assert list(ses_dir.glob(f"sub-{sub}_ses-{ses}_trc-*_desc-suvbw_pet.nii.gz"))
            assert (ses_dir / f"sub-{sub}_ses-{ses}_from-pet_to-ct_xfm.mat").is_file()
            assert (ses_dir / f"sub-{sub}_ses-{ses}_space-ct_dseg.nii.gz").is_file()
            assert (ses_dir / f"sub-{sub}_ses-{ses}_space-ct_dseg.tsv").is_file()
    assert list(workflow_results.glob("sub-*/sub-*_from-fapi_to-psma_xfm.mat"))
    assert list(workflow_results.glob("sub-*/sub-*_from-fapi_to-psma_xfm.nii.gz"))


def test_controls_have_fapi_only_and_null_index(workflow_results):
    index = pd.read_parquet(workflow_results / "tables" / "gland_index.parquet")
    controls = index[index["group"] == "control"]
    assert len(controls) and controls["psma_suv_mean"].isna().all() and controls["psma_fapi_index"].isna().all()
    pss = index[index["group"] == "pss"]
    assert pss["psma_fapi_index"].notna().any()


def test_qc_table_records_registration(workflow_results):
    qc = pd.read_parquet(workflow_results / "tables" / "qc.parquet")
    reg = qc[qc["stage"] == "register"]
    assert len(reg) == 3 and set(reg["status"]) <= {"ok", "warning"}
    for metrics in reg["metrics_json"]:
        assert "mi_after" in json.loads(metrics)


def test_figures_and_montages(workflow_results):
    for stem in ("psma_vs_fapi", "fapi_by_group", "index_by_group"):
        assert (workflow_results / "figures" / "cohort" / f"{stem}.png").stat().st_size > 1000
        assert (workflow_results / "figures" / "cohort" / f"{stem}.svg").is_file()
    for sub in ("S001", "S002"):
        assert (workflow_results / "figures" / "qc" / f"sub-{sub}_qc.png").stat().st_size > 10000


def test_nothing_left_to_do(workflow_run):
    out = snakemake(workflow_run, "-n", "--cores", "2").stdout
    assert "Nothing to be done" in out or "nothing to be done" in out.lower()


def test_changing_pvc_fwhm_reruns_only_measurement_and_below(workflow_run):
    jobs = planned_jobs(workflow_run, pvc={"method": "gtm", "fwhm_mm": {"psma": 7.5, "fapi": 6.5}})
    assert jobs.get("measure_glands", 0) >= 1
    assert not {"convert_ct", "convert_pet", "suv_image", "register_pet_to_ct", "align_sessions",
                "segment_glands", "demo_phantom", "index_dicom"} & set(jobs)


def test_snakemake_report_holds_figures_statistics_and_montages(workflow_run):
    report = workflow_run / "results" / "report.html"
    snakemake(workflow_run, "--report", str(report))
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 100_000
    for needle in ("QC montages", "Figures", "Statistics", "sub-S001_qc.png", "sub-S002_qc.png", "psma_vs_fapi.png",
                   "cohort_stats.parquet"):
        assert needle in html, needle


def test_no_identifier_leaves_the_dicom(workflow_results):  # last: the report exists by now
    """No PatientName/ID/BirthDate/Accession/Institution/Physician of the input DICOM appears in
    any output byte (the demo's own DICOM input folder excepted)."""
    needles = set()
    for f in (workflow_results / "demo" / "dicom").rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                       "ReferringPhysicianName"):
                v = str(ds.get(kw, "") or "").strip()
                if len(v) >= 6:
                    needles.add(v.encode())
    assert needles
    for f in workflow_results.rglob("*"):
        if f.is_file() and "demo" not in f.relative_to(workflow_results).parts[:1]:
            data = f.read_bytes()
            if f.suffix == ".gz":
                import gzip

                data = gzip.decompress(data)
            for needle in needles:
                assert needle not in data, f"{needle!r} found in {f}"

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
    assert not {"convert_pet", "convert_ct_register_pet", "align_sessions", "segment_glands", "demo_phantom",
                "catalog_dicom"} & set(jobs)
    assert set(jobs) <= {"measure_glands", "gland_index_and_montage", "cohort_tables", "cohort_statistics",
                         "cohort_figures", "report_tables", "all"}, jobs


def test_snakemake_report_holds_figures_statistics_and_montages(workflow_run):
    report = workflow_run / "results" / "report.html"
    snakemake(workflow_run, "--report", str(report))
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 100_000
    for needle in ("QC montages", "Figures", "Statistics", "sub-S001_qc.png", "sub-S002_qc.png", "psma_vs_fapi.png",
                   "cohort_stats.parquet", "Tables", "gland_values.html"):
        assert needle in html, needle


def test_no_identifier_leaves_the_dicom(workflow_run, workflow_results):  # last: the report exists by now
    """The phantom plants unique strings in every identifying DICOM field (PS3.15 basic profile, see
    glandpet.phantom.dicom_writer.IDENTIFYING_FIELDS); none of them appears in any byte of results/
    (NIfTI decompressed, JSON, Parquet, TSV, PNG/SVG, logs, report.html; the demo's own DICOM input
    excepted) nor in Snakemake's logs."""
    import gzip
    import re

    from glandpet.phantom.dicom_writer import IDENTIFYING_FIELDS

    needles: dict[bytes, str] = {}
    seen_fields = set()
    for f in (workflow_results / "demo" / "dicom").rglob("*"):
        if not f.is_file():
            continue
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in IDENTIFYING_FIELDS:
            v = ds.get(kw)
            if v is None or str(v).strip() == "":
                continue
            seen_fields.add(kw)
            values = list(v) if type(v).__name__ == "MultiValue" else [v]
            for x in map(str, values):
                x = x.strip()
                found = [x] + re.findall(r"Z[A-Z]{1,4}[0-9A-F]{6,8}", x)  # the whole value, the planted part
                if ds.data_element(kw).VR == "PN":  # each name component of a person
                    found += [p for p in re.split(r"[\^ ]+", x) if p != "PLANTED"]
                if kw == "PatientBirthDate" and len(x) == 8:
                    found.append(f"{x[:4]}-{x[4:6]}-{x[6:]}")
                needles.update({p.encode(): kw for p in found if len(p) >= 6})
    assert seen_fields == set(IDENTIFYING_FIELDS), set(IDENTIFYING_FIELDS) - seen_fields
    assert sum(n.startswith(b"Z") for n in needles) >= 20  # the planted strings are there to be found
    if not (workflow_results / "report.html").is_file():  # run alone: make the report first
        snakemake(workflow_run, "--report", str(workflow_results / "report.html"))
    targets = [f for f in workflow_results.rglob("*") if f.is_file()
               and f.relative_to(workflow_results).parts[:2] != ("demo", "dicom")]
    targets += [f for f in (workflow_run / ".snakemake" / "log").glob("*") if f.is_file()]
    assert any(f.suffix == ".log" for f in targets) and any(f.name == "report.html" for f in targets)
    leaks = []
    for f in targets:
        data = f.read_bytes()
        if f.name.endswith(".gz"):
            data = gzip.decompress(data)
        for needle, kw in needles.items():
            if needle in data:
                leaks.append(f"{kw} {needle!r} in {f.relative_to(workflow_run)}")
    assert not leaks, "\n".join(leaks[:20])


def test_input_functions_parameters_are_read_once(monkeypatch):
    """Before: Snakemake ran inspect.signature on every input function call (~8 % of a large cohort's
    DAG). remember_input_function_params records them on the functions, where Snakemake reads them."""
    import inspect
    from types import SimpleNamespace as NS

    from snakemake.common import get_function_params

    from glandpet.workflow import dag as wf

    def plain(wildcards):
        return []

    def with_input(wildcards, input):
        return []

    unpacked = NS(_file=NS(callable=with_input))  # how Snakemake holds a flagged callable (unpack)
    rules = [NS(input=["a.txt", plain, unpacked]), NS(input=[plain, lambda w: []])]
    assert wf.remember_input_function_params(NS(rules=rules)) == 3

    def no_signature(*a, **k):
        raise AssertionError("inspect.signature called again")

    monkeypatch.setattr(inspect, "signature", no_signature)
    assert list(get_function_params(plain)) == ["wildcards"]
    assert list(get_function_params(with_input)) == ["wildcards", "input"]

"""Corrected label maps (segmentation.corrections): validation, colour tables, and the round trip on
the shared demo run: a corrected gland reruns measurement and below only, and changes only that
subject's rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from glandpet.segmentation.corrections import CORRECTION_PATTERN, check_corrections, correction_index, load_correction, source_of
from glandpet.errors import UserError
from glandpet.glands import DEFAULT_LABELS, write_itksnap_labels, write_slicer_ctbl


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def ct_and_labels(tmp_path):
    affine = np.diag([0.9, 0.9, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    ct = _nifti(tmp_path / "ct.nii.gz", np.zeros((12, 10, 8), np.int16), affine)
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[2:5, 2:5, 2:4] = 1
    labels[7:10, 2:5, 2:4] = 2
    return ct, labels, affine


def _clear_caches():
    """The folder listing is cached per process (the workflow's input functions); a test that
    changes the folder lists it again."""
    from glandpet.segmentation import corrections

    for f in (corrections._listing, corrections._index, corrections.corrected_subjects):
        f.cache_clear()


def _one_line(err: pytest.ExceptionInfo, name: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(name), msg
    return msg


def test_a_correction_on_the_ct_grid_with_glandpet_labels_loads(tmp_path, ct_and_labels):
    ct, labels, affine = ct_and_labels
    f = _nifti(tmp_path / "sub-A_ses-psma_space-ct_dseg.nii.gz", labels, affine + 1e-4)
    np.testing.assert_array_equal(load_correction(f, ct), labels)


@pytest.mark.parametrize("problem, words", [
    ("shape", "grid 12x10x7"), ("affine", "affine differs"), ("value", "unknown label value(s) 42"),
    ("fraction", "not whole numbers")])
def test_a_bad_correction_is_one_line_naming_the_file(tmp_path, ct_and_labels, problem, words):
    ct, labels, affine = ct_and_labels
    name = "sub-A_ses-psma_space-ct_dseg.nii.gz"
    if problem == "shape":
        labels = labels[:, :, :7]
    elif problem == "affine":
        affine = affine.copy()
        affine[0, 3] += 0.01
    elif problem == "value":
        labels = labels.copy()
        labels[0, 0, 0] = 42
    else:
        labels = labels.astype(np.float32) * 0.5
    f = _nifti(tmp_path / name, labels, affine)
    with pytest.raises(UserError) as err:
        load_correction(f, ct)
    assert words in _one_line(err, name)


def test_the_folder_check_names_a_file_of_no_study_subject_or_session(tmp_path, ct_and_labels):
    ct, labels, affine = ct_and_labels
    folder = tmp_path / "corr"
    folder.mkdir()
    _clear_caches()
    sessions = {"A": {"psma": "x"}, "B": {"psma": "x", "fapi": "y"}}
    ok = _nifti(folder / "sub-B_ses-fapi_space-ct_dseg.nii.gz", labels, affine)
    assert check_corrections(str(folder), ["A", "B"], sessions.get, lambda s, ses: str(ct)) == 1
    assert correction_index(str(folder)) == {("B", "fapi"): str(ok)}
    for bad, words in [("sub-C_ses-psma_space-ct_dseg.nii.gz", "subject C is not in the study"),
                       ("sub-A_ses-fapi_space-ct_dseg.nii.gz", "has no session fapi"),
                       ("sub-A_dseg.nii.gz", "not a correction name")]:
        shutil.copy(ok, folder / bad)
        _clear_caches()
        with pytest.raises(UserError) as err:
            check_corrections(str(folder), ["A", "B"], sessions.get, lambda s, ses: str(ct))
        assert words in _one_line(err, bad)
        (folder / bad).unlink()
    _clear_caches()


def test_which_sessions_use_a_correction():
    idx = {("A", "psma"): "a", ("B", "fapi"): "b"}
    assert source_of(idx, "A", "psma", "psma") == "own"
    assert source_of(idx, "A", "fapi", "psma") == "carried"  # only the reference corrected
    assert source_of(idx, "B", "fapi", "psma") == "own"
    assert source_of(idx, "B", "psma", "psma") is None  # a non-reference correction stays there
    assert CORRECTION_PATTERN.match("sub-S001_ses-psma_space-ct_dseg.dcm")["ext"] == "dcm"


def test_colour_tables_name_every_label_value(tmp_path):
    write_slicer_ctbl(tmp_path / "t.ctbl")
    write_itksnap_labels(tmp_path / "t.txt")
    rows = [line.split() for line in (tmp_path / "t.ctbl").read_text().splitlines() if not line.startswith("#")]
    assert {int(r[0]): r[1] for r in rows if r[0] != "0"} == {lab.index: lab.name for lab in DEFAULT_LABELS}
    assert all(len(r) == 6 and all(0 <= int(c) <= 255 for c in r[2:]) for r in rows)
    snap = [line for line in (tmp_path / "t.txt").read_text().splitlines() if not line.startswith("#")]
    got = {int(line.split()[0]): line.split('"')[1] for line in snap}
    assert got == {0: "Clear Label", **{lab.index: lab.name for lab in DEFAULT_LABELS}}
    colours = {tuple(line.split()[1:4]) for line in snap[1:]}
    assert len(colours) == len(DEFAULT_LABELS)  # left and right of a gland differ in the editor


# ------------------------------------------------------------------ the round trip on the demo run
KEEP = {"apply_correction", "measure_glands", "gland_index_and_montage", "cohort_tables", "cohort_statistics",
        "cohort_figures", "report_tables", "all"}


def _copy_run(workflow_run: Path, dst: Path) -> Path:
    """The shared run's folder (results + .snakemake metadata, mtimes kept), its config pointing at the copy."""
    from workflow_run import write_config

    shutil.copytree(workflow_run, dst, copy_function=shutil.copy2, symlinks=True)
    write_config(dst)
    return dst


def _corrected_subject(results: Path) -> tuple[str, str]:
    """A demo subject with both sessions, and its reference session (psma)."""
    for d in sorted(results.glob("sub-*")):
        if (d / "ses-psma").is_dir() and (d / "ses-fapi").is_dir():
            return d.name[4:], "psma"
    pytest.skip("the demo run has no subject with both sessions")


@pytest.fixture(scope="module")
def corrected_run(workflow_run, tmp_path_factory):
    from workflow_run import planned_jobs, snakemake

    work = _copy_run(workflow_run, tmp_path_factory.mktemp("corrections") / "run")
    results = work / "results"
    subject, ses = _corrected_subject(results)
    sdir = results / f"sub-{subject}" / f"ses-{ses}"
    img = nib.load(sdir / f"sub-{subject}_ses-{ses}_space-ct_dseg.nii.gz")
    labels = np.asarray(img.dataobj).astype(np.uint8)
    from scipy import ndimage

    gland = 1  # parotid_left, dilated by one voxel where the background was
    grown = ndimage.binary_dilation(labels == gland) & (labels == 0)
    labels[grown] = gland
    corr = work / "corrections"
    corr.mkdir()
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), corr / f"sub-{subject}_ses-{ses}_space-ct_dseg.nii.gz")
    before = pd.read_parquet(results / "tables" / "gland_stats.parquet")
    plan = planned_jobs(work, segmentation={"corrections": str(corr)})
    from workflow_run import write_config

    write_config(work, segmentation={"corrections": str(corr)})
    snakemake(work, "--cores", "2")
    after = pd.read_parquet(results / "tables" / "gland_stats.parquet")
    return dict(work=work, subject=subject, session=ses, corr=corr, plan=plan, before=before, after=after,
                grown=int(grown.sum()))


def test_a_correction_plans_measurement_and_below_only(corrected_run):
    plan = corrected_run["plan"]
    assert set(plan) <= KEEP, plan
    assert plan["apply_correction"] == 2  # the reference session's own, carried to the other session
    assert plan["measure_glands"] == 2 and plan["gland_index_and_montage"] == 1


def test_a_correction_changes_only_that_subjects_rows(corrected_run):
    before, after, subject = corrected_run["before"], corrected_run["after"], corrected_run["subject"]
    key = ["subject_id", "session", "gland", "side"]
    # config_hash: the config (its corrections folder) changed for every row
    skip = set(key) | {"segmentation_source", "config_hash"}
    cols = [c for c in before.columns if c in after.columns and c not in skip]
    b, a = before.set_index(key)[cols].sort_index(), after.set_index(key)[cols].sort_index()
    assert b.index.equals(a.index)
    others = b.index.get_level_values("subject_id") != subject
    pd.testing.assert_frame_equal(b[others], a[others])
    vol = [c for c in cols if c.startswith("volume")][0]
    for s in ("psma", "fapi"):
        row = (subject, s, "parotid", "left")
        assert a.loc[row, vol] > b.loc[row, vol]  # the dilated gland, carried to fapi too
        assert a.loc[(subject, s, "parotid", "right"), vol] == b.loc[(subject, s, "parotid", "right"), vol]
    if "segmentation_source" in after.columns:
        src = after.set_index(key)["segmentation_source"]
        assert set(src[src.index.get_level_values("subject_id") == subject]) == {"corrected"}
        assert set(src[src.index.get_level_values("subject_id") != subject]) == {"atlas"}


def test_the_corrected_labels_reach_results_and_the_atlas_result_stays(corrected_run):
    results = corrected_run["work"] / "results"
    subject, ses = corrected_run["subject"], corrected_run["session"]
    sdir = results / f"sub-{subject}" / f"ses-{ses}"
    qc = json.loads((sdir / f"sub-{subject}_ses-{ses}_desc-correction_qc.json").read_text())
    assert qc["segmentation_source"] == "corrected"
    assert qc["metrics"]["changed_voxels_by_label"] == {"1": corrected_run["grown"]}
    corrected = nib.load(sdir / f"sub-{subject}_ses-{ses}_desc-corrected_space-ct_dseg.nii.gz")
    atlas = nib.load(sdir / f"sub-{subject}_ses-{ses}_space-ct_dseg.nii.gz")
    assert np.array_equal(corrected.affine, atlas.affine) and corrected.shape == atlas.shape
    assert int((np.asarray(corrected.dataobj) != np.asarray(atlas.dataobj)).sum()) == corrected_run["grown"]
    seg_qc = json.loads((sdir / f"sub-{subject}_ses-{ses}_desc-segment_qc.json").read_text())
    assert seg_qc["segmentation_source"] == "atlas"
    fapi = results / f"sub-{subject}" / "ses-fapi"
    assert (fapi / f"sub-{subject}_ses-fapi_desc-corrected_space-ct_dseg.nii.gz").is_file()
    carried_qc = json.loads((fapi / f"sub-{subject}_ses-fapi_desc-segment_qc.json").read_text())
    assert carried_qc["segmentation_source"] == "atlas"  # the atlas labels carried: the reference's confidence
    assert carried_qc["metrics"]["method"] == "session_transform"
    assert carried_qc["metrics"].get("glands") == seg_qc["metrics"].get("glands")
    for d in (sdir, fapi):  # colour tables beside each session's dseg, for correcting it
        s = d.name[4:]
        assert (d / f"sub-{subject}_ses-{s}_space-ct_dseg.ctbl").is_file()
        assert (d / f"sub-{subject}_ses-{s}_space-ct_dseg.itksnap.txt").is_file()


def test_after_the_rerun_nothing_is_left_to_do(corrected_run):
    from workflow_run import snakemake

    out = snakemake(corrected_run["work"], "-n", "--cores", "2").stdout
    assert "Nothing to be done" in out, out[-2000:]


def test_a_dicom_seg_correction_reads_as_the_same_labels(corrected_run, tmp_path):
    """A DICOM SEG on the session's CT series (what a PACS viewer saves) is accepted like the NIfTI."""
    import pydicom
    import yaml

    from glandpet.dicom.export import build_seg, session_inputs
    from glandpet.glands import read_label_table

    work, subject, ses = corrected_run["work"], corrected_run["subject"], corrected_run["session"]
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    inp = next(i for i in session_inputs(cfg, [subject])[0] if i.session == ses)
    assert inp.corrected  # measured on the correction: the export takes the corrected map
    img = nib.load(inp.dseg)
    labels = np.asarray(img.dataobj).astype(np.int16)
    seg, _ = build_seg([pydicom.dcmread(f) for f in inp.ct_files], labels, img.affine, read_label_table(inp.table),
                       corrected=True)
    folder = tmp_path / "corr"
    folder.mkdir()
    seg.save_as(folder / f"sub-{subject}_ses-{ses}_space-ct_dseg.dcm")
    _clear_caches()
    ct = lambda s, e: str(work / "results" / f"sub-{s}" / f"ses-{e}" / f"sub-{s}_ses-{e}_ct.nii.gz")  # noqa: E731
    assert check_corrections(str(folder), [subject], lambda s: {"psma": "", "fapi": ""}, ct) == 1
    np.testing.assert_array_equal(load_correction(next(folder.iterdir()), ct(subject, ses)), labels)
    _clear_caches()


@pytest.mark.parametrize("bad", ["grid", "value", "subject", "session"])
def test_a_bad_correction_stops_the_workflow_before_any_job(corrected_run, tmp_path, bad):
    from workflow_run import snakemake, write_config

    work, subject, ses = corrected_run["work"], corrected_run["subject"], corrected_run["session"]
    good = corrected_run["corr"] / f"sub-{subject}_ses-{ses}_space-ct_dseg.nii.gz"
    img = nib.load(good)
    data = np.asarray(img.dataobj).copy()
    folder = tmp_path / "corr"
    folder.mkdir()
    name = {"subject": "sub-ZZ9_ses-psma_space-ct_dseg.nii.gz",
            "session": f"sub-{subject}_ses-ct_space-ct_dseg.nii.gz"}.get(bad, good.name)
    if bad == "grid":
        data = data[:, :, :-1]
    if bad == "value":
        data[data == 1] = 77
    nib.save(nib.Nifti1Image(data, img.affine), folder / name)
    write_config(work, segmentation={"corrections": str(folder)})
    try:
        proc = snakemake(work, "-n", "--cores", "1", check=False)
    finally:
        write_config(work, segmentation={"corrections": str(corrected_run["corr"])})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if name in line]
    assert lines and len(out.splitlines()) <= 8, out

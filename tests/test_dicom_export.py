"""`glandpet export dicom` (glandpet.dicom.export): DICOM SEG + TID 1500 SR per session, the SEG reader
(`seg_to_label_map`), and STOW-RS / QIDO-RS against a real Orthanc.

dciodvfy (Debian's dicom3tools) and Orthanc (Debian's orthanc + orthanc-dicomweb, started by
tests/orthanc/start-local-orthanc.sh) are skipped where absent unless GLANDPET_REQUIRE_ORTHANC is set
(CI sets it, so there a missing validator or PACS fails instead of skipping)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from glandpet.cli import main
from glandpet.dicom.export import GLAND_CODES, LATERALITY_CODES, PRIVATE_SCHEME, build_seg, labels_on_ct_instances, seg_to_label_map, stow
from glandpet.errors import UserError
from glandpet.glands import DEFAULT_LABELS, GLANDS, SIDES, label_value

ORTHANC_URL = os.environ.get("GLANDPET_ORTHANC_URL", "http://127.0.0.1:8042/dicom-web")
REQUIRE = bool(os.environ.get("GLANDPET_REQUIRE_ORTHANC"))


def _require(ok: bool, what: str) -> None:
    if not ok:
        if REQUIRE:
            pytest.fail(f"GLANDPET_REQUIRE_ORTHANC is set but {what}")
        pytest.skip(what)


# ------------------------------------------------------------------------------ code table
def test_code_table_matches_dicom_code_dictionary():
    assert set(GLAND_CODES) == set(GLANDS) and set(LATERALITY_CODES) == set(SIDES)
    for gland, kw in (("parotid", "ParotidGland"), ("submandibular", "SubmandibularGland"), ("lacrimal", "LacrimalGland")):
        c = getattr(codes.SCT, kw)
        assert GLAND_CODES[gland][:2] == (c.value, "SCT")
    for side, kw in (("left", "Left"), ("right", "Right")):
        assert LATERALITY_CODES[side][:2] == (getattr(codes.SCT, kw).value, "SCT")
    assert GLAND_CODES["sublingual"][1] == "SCT"
    assert GLAND_CODES["tubarial"][1] == PRIVATE_SCHEME  # no verifiable SNOMED CT concept
    assert len({v[:2] for v in GLAND_CODES.values()}) == len(GLANDS)


# ------------------------------------------------------------------------------ synthetic CT series
def _ct_series(rows: int, cols: int, origin, row_dir, col_dir, spacing, step, n: int) -> list[Dataset]:
    """n CT instances (in-memory), pixel (r, c) of slice s at origin + c*dc*row_dir + r*dr*col_dir + s*step."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for s in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "TEST^SYNTHETIC", "T0", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, s + 1
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.ImageOrientationPatient = [*map(float, row_dir), *map(float, col_dir)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + s * np.asarray(step, float)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.zeros((rows, cols), np.int16).tobytes()
        out.append(ds)
    return out


def _nifti_affine_of(ct: list[Dataset]) -> np.ndarray:
    """RAS affine of the grid i = column, j = row, k = instance (in list order) of a CT series."""
    d0, d1 = ct[0], ct[1]
    ori = np.asarray(d0.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in d0.PixelSpacing)
    p0 = np.asarray(d0.ImagePositionPatient, float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = ori[:3] * dc, ori[3:] * dr
    lps[:3, 2], lps[:3, 3] = np.asarray(d1.ImagePositionPatient, float) - p0, p0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


GEOMETRIES = {
    # axial, slices listed head-first (descending z): no assumption on slice order
    "axial_descending": dict(origin=(-20.0, -15.0, 40.0), row_dir=(1, 0, 0), col_dir=(0, 1, 0), spacing=(1.5, 1.25),
                             step=(0, 0, -2.5)),
    # row direction flipped (patient's right to left reversed)
    "flipped_rows": dict(origin=(20.0, -15.0, 0.0), row_dir=(-1, 0, 0), col_dir=(0, 1, 0), spacing=(1.0, 1.0),
                         step=(0, 0, 3.0)),
    # gantry tilt: slice origins shift along y from slice to slice (a sheared grid)
    "gantry_tilt": dict(origin=(-20.0, -15.0, 0.0), row_dir=(1, 0, 0), col_dir=(0, 1, 0), spacing=(1.0, 1.0),
                        step=(0, 0.8, 2.5)),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_seg_round_trip_on_synthetic_series(tmp_path, geometry):
    """A label map on a CT series' own grid -> SEG (highdicom) -> seg_to_label_map: identical voxel for voxel,
    and each instance's SEG pixels are the label map's voxels at that instance's world positions."""
    rows, cols, n = 24, 20, 9
    ct = _ct_series(rows, cols, n=n, **GEOMETRIES[geometry])
    affine = _nifti_affine_of(ct)
    rng = np.random.default_rng(3)
    labels = np.zeros((cols, rows, n), np.int16)  # i = column, j = row, k = slice
    labels[2:8, 3:9, 1:4] = label_value("parotid", "left")
    labels[10:15, 12:20, 4:8] = label_value("submandibular", "right")
    labels[16:18, 1:3, 7] = label_value("tubarial", "left")
    labels[(rng.random(labels.shape) < 0.01)] = label_value("lacrimal", "right")
    ct_path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(labels.shape, np.int16), affine), ct_path)
    order = list(range(n))[::-1] if geometry == "axial_descending" else list(range(n))
    shuffled = [ct[i] for i in order]
    sampled = labels_on_ct_instances(labels, affine, shuffled)
    for pos, i in enumerate(order):
        assert np.array_equal(sampled[pos], labels[:, :, i].T)
    seg, segments = build_seg(shuffled, labels, affine, list(DEFAULT_LABELS))
    assert set(segments) == {("parotid", "left"), ("submandibular", "right"), ("tubarial", "left"), ("lacrimal", "right")}
    seg.save_as(tmp_path / "seg.dcm")
    back = seg_to_label_map(tmp_path / "seg.dcm", ct_path)
    assert back.dtype == np.int16 and back.shape == labels.shape
    assert np.array_equal(back, labels)
    # segment coding: gland type + laterality modifier, private scheme declared
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    for item in ds.SegmentSequence:
        gland, side = item.SegmentLabel.rsplit("_", 1)
        t = item.SegmentedPropertyTypeCodeSequence[0]
        assert (t.CodeValue, t.CodingSchemeDesignator) == GLAND_CODES[gland][:2]
        m = t.SegmentedPropertyTypeModifierCodeSequence[0]
        assert (m.CodeValue, m.CodingSchemeDesignator) == LATERALITY_CODES[side][:2]
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME


def test_seg_reader_refuses_other_files(tmp_path):
    ct = _ct_series(8, 8, n=2, **GEOMETRIES["flipped_rows"])
    ct[0].save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    with pytest.raises(UserError, match="not a readable DICOM Segmentation"):
        seg_to_label_map(tmp_path / "ct.dcm", tmp_path / "ct.nii.gz")


def test_stow_errors_name_the_problem(tmp_path):
    f = tmp_path / "x.dcm"
    f.write_bytes(b"not dicom")
    with pytest.raises(UserError, match="unreachable"):
        stow([f], "http://127.0.0.1:9/dicom-web", timeout=5)


def test_export_errors_are_one_line(tmp_path, capsys):
    """Config without results, unknown subject, a session without segmentation, OUTDIR inside results/."""
    results = tmp_path / "results"
    (results / "work" / "sub-S9").mkdir(parents=True)
    (results / "work" / "sub-S9" / "sub-S9_series.json").write_text(
        '{"psma": {"ct_files": ["a/1.dcm"], "pet_files": ["a/2.dcm"]}}')
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"results": str(results), "subjects": "s.tsv", "dicom_root": str(tmp_path)}))
    cases = [
        (["--subjects", "S9"], "sub-S9 ses-psma: no segmentation to export"),
        (["--subjects", "S1"], "subject S1 unknown"),
    ]
    for extra, msg in cases:
        assert main(["export", "dicom", str(cfg), str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert main(["export", "dicom", str(cfg), str(results / "work" / "pacs")]) == 2
    err = capsys.readouterr().err
    assert "inside the results folder" in err and err.count("\n") == 1
    cfg.write_text(yaml.safe_dump({"results": str(tmp_path / "nowhere")}))
    assert main(["export", "dicom", str(cfg), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (results / "work" / "pacs").exists()


def test_corrected_sessions_export_the_corrected_labels(tmp_path):
    """The SEG shows the label map the SR's numbers were measured on: the corrected one when gland_stats
    say segmentation_source = corrected."""
    import pandas as pd

    from glandpet.dicom.export import _measured_on_correction

    for sources, expected in ((["atlas", "atlas"], False), (["atlas", "corrected"], True)):
        p = tmp_path / f"{expected}.parquet"
        pd.DataFrame({"gland": ["parotid"] * 2, "segmentation_source": sources}).to_parquet(p)
        assert _measured_on_correction(p) is expected
    p = tmp_path / "old.parquet"
    pd.DataFrame({"gland": ["parotid"]}).to_parquet(p)
    assert _measured_on_correction(p) is False


# ------------------------------------------------------------------------------ on the demo workflow's results
def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def exported(workflow_run, tmp_path_factory):
    """`glandpet export dicom` of one demo subject (both sessions) into a folder outside results/."""
    results = workflow_run / "results"
    subject = sorted(p.name[4:] for p in (results / "work").glob("sub-*") if p.is_dir())[0]
    before = _tree_digest(results)
    outdir = tmp_path_factory.mktemp("pacs-export")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "dicom", str(workflow_run / "config.yaml"), str(outdir), "--subjects", subject])
    assert rc == 0
    return {"results": results, "subject": subject, "outdir": outdir, "before": before, "printed": buf.getvalue()}


@pytest.mark.slow
def test_export_writes_seg_and_sr_outside_results(exported):
    results, subject, outdir = exported["results"], exported["subject"], exported["outdir"]
    assert _tree_digest(results) == exported["before"], "export changed something under results/"
    files = sorted(outdir.rglob("*.dcm"))
    sessions = sorted(p.name for p in (results / f"sub-{subject}").glob("ses-*")
                      if (p / f"sub-{subject}_{p.name}_space-ct_dseg.nii.gz").is_file())
    assert sessions and len(files) == 2 * len(sessions)
    for ses in sessions:
        base = results / f"sub-{subject}" / ses / f"sub-{subject}_{ses}_"
        seg_path = outdir / f"sub-{subject}" / ses / f"sub-{subject}_{ses}_seg.dcm"
        sr_path = outdir / f"sub-{subject}" / ses / f"sub-{subject}_{ses}_sr.dcm"
        # the SEG read back (highdicom) onto the NIfTI CT grid is the label map, voxel for voxel
        dseg = np.asarray(nib.load(f"{base}space-ct_dseg.nii.gz").dataobj)
        back = seg_to_label_map(seg_path, f"{base}ct.nii.gz")
        assert np.array_equal(back, dseg)
        # the SR's measurements are gland_stats' values, on the CT's patient and study
        import highdicom as hd
        import pandas as pd

        stats = pd.read_parquet(f"{base}gland_stats.parquet")
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
        sr = hd.sr.srread(sr_path)
        assert sr.PatientID == seg.PatientID and sr.StudyInstanceUID == seg.StudyInstanceUID
        groups = sr.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == len(seg.SegmentSequence)
        seg_labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
        index_path = results / f"sub-{subject}" / f"sub-{subject}_gland_index.parquet"
        index = pd.read_parquet(index_path) if index_path.is_file() else pd.DataFrame(columns=["gland", "side", "psma_fapi_index"])
        for g in groups:
            ref = g.referenced_segment
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            gland, side = seg_labels[ref.referenced_segment_numbers[0]].rsplit("_", 1)
            row = stats[(stats.gland == gland) & (stats.side == side)].iloc[0]
            site = g.finding_sites[0]
            assert (site.value.value, site.laterality.value) == (GLAND_CODES[gland][0], LATERALITY_CODES[side][0])
            by = {}
            for m in g.get_measurements():
                by[(m.name.value, m.derivation.value if m.derivation else None, m.method is not None)] = m
            assert by[("118565006", None, False)].value == pytest.approx(row.volume_ml)
            assert by[("118565006", None, False)].unit.value == "ml"
            assert by[("126401", "56851009", False)].value == pytest.approx(row.suv_max)  # SUVbw, Maximum
            assert by[("126401", "56851009", False)].unit.value == "{SUVbw}g/ml"
            assert by[("126401", "126031", False)].value == pytest.approx(row.suv_peak)
            assert by[("126401", "373098007", False)].value == pytest.approx(row.suv_mean)
            assert by[("126401", "373098007", True)].value == pytest.approx(row.suv_mean_pvc)
            ix = index[(index.gland == gland) & (index.side == side)].psma_fapi_index
            if len(ix) and np.isfinite(ix.iloc[0]):
                m = by[("PSMAFAPIINDEX", None, False)]
                assert m.value == pytest.approx(ix.iloc[0]) and m.unit.value == "1"
    # the command's output names no patient: counts and the output path only
    printed = exported["printed"]
    assert f"{len(sessions)} session(s)" in printed and str(outdir) in printed
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert str(ds.PatientID) not in printed and str(ds.PatientName).split("^")[0] not in printed


@pytest.mark.slow
def test_export_objects_pass_dciodvfy(exported):
    _require(shutil.which("dciodvfy") is not None, "dciodvfy (Debian's dicom3tools) is not installed")
    files = sorted(exported["outdir"].rglob("*.dcm"))
    for f in files:
        proc = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, f"{f.name}: {errors[:5]}"


@pytest.mark.slow
def test_export_refuses_outdir_in_results_and_bad_input(workflow_run, tmp_path, capsys):
    results = workflow_run / "results"
    cfg = str(workflow_run / "config.yaml")
    before = _tree_digest(results)
    assert main(["export", "dicom", cfg, str(results / "pacs")]) == 2
    err = capsys.readouterr().err
    assert "inside the results folder" in err and err.count("\n") == 1
    assert not (results / "pacs").exists() and _tree_digest(results) == before
    assert main(["export", "dicom", cfg, str(tmp_path / "o"), "--subjects", "NOSUCH"]) == 2
    assert "subject NOSUCH unknown" in capsys.readouterr().err
    bad = tmp_path / "no-results.yaml"
    bad.write_text(yaml.safe_dump({"results": str(tmp_path / "nowhere")}))
    assert main(["export", "dicom", str(bad), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_stow_to_orthanc_and_find_by_qido(exported):
    import requests

    try:
        up = requests.get(f"{ORTHANC_URL}/studies", timeout=5).status_code == 200
    except requests.RequestException:
        up = False
    _require(up, f"no DICOMweb server at {ORTHANC_URL} (tests/orthanc/start-local-orthanc.sh starts Orthanc)")
    files = sorted(exported["outdir"].rglob("*.dcm"))
    assert stow(files, ORTHANC_URL) == len(files)
    accept = {"Accept": "application/dicom+json"}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        r = requests.get(f"{ORTHANC_URL}/instances", params={"SOPInstanceUID": ds.SOPInstanceUID}, headers=accept, timeout=10)
        assert r.status_code == 200 and len(r.json()) == 1
        assert r.json()[0]["00080060"]["Value"] == [ds.Modality]
        r = requests.get(f"{ORTHANC_URL}/studies", params={"PatientID": ds.PatientID}, headers=accept, timeout=10)
        assert ds.StudyInstanceUID in {s["0020000D"]["Value"][0] for s in r.json()}
    with pytest.raises(UserError, match="HTTP 404"):
        stow(files[:1], ORTHANC_URL.rstrip("/") + "/no-such-root")

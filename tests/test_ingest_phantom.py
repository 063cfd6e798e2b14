"""Ingest on the phantom: the SUV recovered from the DICOM of every vendor equals the SUV the
phantom encoded, and the CT geometry equals the truth label maps' geometry (world coordinates)."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest

from glandpet.dicom.convert import convert_series
from glandpet.dicom.catalog import index_tree


@pytest.fixture(scope="module")
def selected(small_cohort):
    result = index_tree(small_cohort / "dicom", small_cohort / "subjects.tsv")
    files = dict(zip(result.files["series_key"], result.files["paths"]))
    s = result.series
    rows = s[s["selected"] & (s["role"] == "pet_ac")]
    assert len(rows) == 3  # pSS: psma + fapi, control: fapi
    root = small_cohort / "dicom"
    return [(r.subject_id, r.session, [root / p for p in files[r.series_key]], [root / p for p in files[r.paired_ct_key]],
             r.manufacturer) for r in rows.itertuples()]


def test_recovered_suv_equals_the_encoded_suv(selected, small_cohort, tmp_path):
    vendors = set()
    for sub, ses, pet_files, _, manufacturer in selected:
        out = tmp_path / f"{sub}_{ses}_suv.nii.gz"
        convert_series(pet_files, out, suv="bw")
        got = nib.load(out)
        truth = nib.load(small_cohort / "truth" / f"sub-{sub}" / f"ses-{ses}" / f"sub-{sub}_ses-{ses}_desc-suvbw_pet.nii.gz")
        np.testing.assert_allclose(got.affine, truth.affine, atol=1e-3)
        a, b = np.asarray(got.dataobj), np.asarray(truth.dataobj)
        # int16 storage with a per-slice scale: error below one quantum of each slice
        quantum = np.abs(b).max(axis=(0, 1), keepdims=True) / 32767.0
        assert np.all(np.abs(a - b) <= 1.01 * quantum + 1e-6), (sub, ses, manufacturer)
        vendors.add(manufacturer)
    assert len(vendors) >= 2


def test_ct_geometry_matches_truth_labels(selected, small_cohort, tmp_path):
    for sub, ses, _, ct_files, _ in selected:
        out = tmp_path / f"{sub}_{ses}_ct.nii.gz"
        convert_series(ct_files, out)
        truth = nib.load(small_cohort / "truth" / f"sub-{sub}" / f"ses-{ses}" / f"sub-{sub}_ses-{ses}_space-ct_dseg.nii.gz")
        ct = nib.load(out)
        assert ct.shape == truth.shape
        np.testing.assert_allclose(ct.affine, truth.affine, atol=1e-3)
        hu = np.asarray(ct.dataobj)
        labels = np.asarray(truth.dataobj)
        # glands are soft tissue in the CT, not air or bone
        assert -200 < float(np.median(hu[labels > 0])) < 150

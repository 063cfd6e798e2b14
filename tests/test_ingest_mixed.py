"""Indexing a mixed tree: a phantom cohort, real vendor series and junk files side by side.
Every series is classified as the phantom wrote it; every skipped file has its reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from glandpet.dicom.catalog import index_tree


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, small_cohort, shared_data):
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(small_cohort / "dicom", root / "phantom")
    shutil.copytree(shared_data / "real-pet" / "sts001-fdg-wb-ge" / "image", root / "GE" / "A" / "B")
    shutil.copytree(shared_data / "real-pet" / "sts001-petct-cropped", root / "cropped")
    (root / "junk").mkdir()
    (root / "junk" / "README.txt").write_text("not dicom\n")
    (root / "junk" / "blob.bin").write_bytes(bytes(range(256)) * 10)
    some = next((root / "phantom").rglob("*PET_AC*/*"))
    data = some.read_bytes()
    (root / "junk" / "truncated_slice").write_bytes(data[: len(data) // 3])
    shutil.copy(some, root / "junk" / "duplicate_of_a_slice")
    return root, index_tree(root)


def expected_role(desc_folder: str) -> str:
    d = desc_folder.upper()
    if "TOPOGRAM" in d or "SCOUT" in d or "SURVIEW" in d or "LOCALI" in d:
        return "localizer"
    if "NAC" in d:
        return "pet_nac"
    if d.split("_", 1)[1].startswith(("CT", "CTAC")) or "_CT" in d:
        return "ct"
    return "pet_ac"


def test_every_phantom_series_is_classified_as_written(mixed):
    root, result = mixed
    files = result.files.set_index("series_key")["paths"]
    checked = 0
    for row in result.series.itertuples():
        first = files[row.series_key][0]
        parts = Path(first).parts
        if parts[0] != "phantom":
            continue
        assert row.role == expected_role(parts[-2]), (first, row.role)
        if row.role == "pet_ac":
            session = "psma" if "PSMA" in parts[-3] else "fapi"
            assert row.session == session and row.selected
        checked += 1
    assert checked >= 8


def test_real_series_and_pairing(mixed):
    _, result = mixed
    s = result.series
    real = s[s["manufacturer"].fillna("").str.contains("GE", case=False)]
    assert (real["role"] == "pet_ac").any()
    assert (s.loc[s["role"] == "pet_ac", "tracer"].fillna("").str.contains("FDG")).any()
    cropped_pet = s[(s["role"] == "pet_ac") & (s["pairing_rule"] == "frame_of_reference")]
    assert len(cropped_pet) >= 4  # 3 phantom sessions + the real cropped pair


def test_skipped_files_have_reasons(mixed):
    _, result = mixed
    k = result.skipped.set_index("path")["reason"]
    assert "not DICOM" in k.get("junk/README.txt", "") or "not dicom" in k.get("junk/README.txt", "").lower()
    assert k.get("junk/blob.bin")
    assert k.get("junk/truncated_slice")
    reasons = " ".join(k.astype(str)).lower()
    assert "duplicate" in reasons
    assert k.notna().all()

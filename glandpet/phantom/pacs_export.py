"""Lay out a phantom cohort's DICOM like a PACS dump, for tests and benchmarks.

A PACS export rarely has one folder per patient: it holds ``DICOM/<date>/<8 hex>/IM00001``... with
each series in a folder of random name and several patients under each date folder. This module
builds such a tree from a phantom cohort's ``dicom/<subject>/...`` tree, linking (or copying) the
files unchanged. Subjects listed in `own_folder` get a folder of their own instead
(``DICOM/P<8 hex>/<8 hex>/IM...``), so that one export mixes both layouts.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

__all__ = ["build_pacs_export", "clone_patient", "link_or_copy", "reduced_cohort"]


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link `src` at `dst` (same file system), else copy it; the bytes are unchanged."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _series_dirs(subject_dir: Path) -> list[Path]:
    """Folders under a subject's folder that directly hold files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(subject_dir):
        dirnames.sort()
        if filenames:
            out.append(Path(dirpath))
    return sorted(out)


def build_pacs_export(cohort_dicom: str | Path, out: str | Path, *, seed: int = 0, patients_per_date: int = 3,
                      own_folder: tuple[str, ...] | list[str] = (), subjects: list[str] | None = None) -> dict[str, list[str]]:
    """Build `out`/DICOM/... from `cohort_dicom`/<subject>/... (a phantom cohort's ``dicom`` folder).

    Subjects (all, or those in `subjects`) not in `own_folder` are dealt, `patients_per_date` at a
    time, into shared date folders; every series goes to its own random 8-hex folder and its files are
    renamed ``IM00001``, ``IM00002``... Returns {subject: [folders (relative to out) holding its files]}."""
    src = Path(cohort_dicom)
    out = Path(out)
    rng = random.Random(seed)
    names = sorted(p.name for p in src.iterdir() if p.is_dir())
    if subjects is not None:
        names = [n for n in names if n in set(subjects)]
    unknown = set(own_folder) - set(names)
    if unknown:
        raise ValueError(f"own_folder names subjects not in {src}: {sorted(unknown)}")
    shared = [n for n in names if n not in set(own_folder)]
    rng.shuffle(shared)
    used: set[str] = set()

    def hex8() -> str:
        while True:
            h = f"{rng.getrandbits(32):08X}"
            if h not in used:
                used.add(h)
                return h

    base = out / "DICOM"
    layout: dict[str, list[str]] = {}

    def place(name: str, parent: Path) -> None:
        """Copy each series of patient `name` into a random-named folder under `parent`."""
        layout[name] = []
        for sdir in _series_dirs(src / name):
            dst = parent / hex8()
            for k, f in enumerate(sorted(p for p in sdir.iterdir() if p.is_file()), 1):
                link_or_copy(f, dst / f"IM{k:05d}")
            layout[name].append(str(dst.relative_to(out)))

    date0 = 20250101
    for i, name in enumerate(shared):
        place(name, base / str(date0 + i // max(1, patients_per_date)))
    for name in own_folder:
        place(name, base / f"P{hex8()}")
    return layout


def clone_patient(src_dir: str | Path, dst_dir: str | Path, patient_id: str, *, seed: int | str = 0,
                  slice_stride: int = 1, matrix: int | None = None) -> int:
    """Write a copy of every DICOM file under `src_dir` as another patient: new PatientID and
    PatientName, new Study/Series/SOP/FrameOfReference UIDs (consistently mapped, so series, studies
    and frames stay linked). `slice_stride` keeps every n-th file of each folder (uniform slice
    spacing is kept); `matrix` replaces the pixel data by a tiny `matrix` x `matrix` image (pixel
    spacing scaled so the field of view is unchanged): headers for init/check benchmarks. Returns
    the number of files written."""
    import hashlib

    import pydicom
    from pydicom.uid import UID

    src, dst = Path(src_dir), Path(dst_dir)
    uid_map: dict[str, str] = {}

    def new_uid(old: str) -> str:
        if old not in uid_map:
            h = int(hashlib.sha256(f"{seed}|{patient_id}|{old}".encode()).hexdigest()[:30], 16)
            uid_map[old] = f"2.25.{h}"
        return uid_map[old]

    n = 0
    for sdir in _series_dirs(src):
        files = sorted(p for p in sdir.iterdir() if p.is_file())
        keep = files[::max(1, slice_stride)] if len(files) > 2 else files
        for f in keep:
            ds = pydicom.dcmread(f, stop_before_pixels=bool(matrix))  # tiny pixel data replace the image
            if matrix and int(ds.get("NumberOfFrames", 1) or 1) > 1:
                ds = pydicom.dcmread(f)  # multi-frame: copied whole
            ds.PatientID = patient_id
            ds.PatientName = f"CLONE^{patient_id}"
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
                if kw in ds:
                    setattr(ds, kw, new_uid(str(getattr(ds, kw))))
            if "file_meta" in dir(ds) and ds.file_meta is not None and "SOPInstanceUID" in ds:
                ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
            if matrix and "Rows" in ds and int(ds.get("NumberOfFrames", 1) or 1) == 1:
                rows, cols = int(ds.Rows), int(ds.Columns)
                if "PixelSpacing" in ds:
                    ps = [float(x) for x in ds.PixelSpacing]
                    ds.PixelSpacing = [f"{ps[0] * rows / matrix:.6g}", f"{ps[1] * cols / matrix:.6g}"]
                ds.Rows = ds.Columns = matrix
                spp = int(ds.get("SamplesPerPixel", 1) or 1)
                ds.add_new(0x7FE00010, "OW" if int(ds.BitsAllocated) > 8 else "OB",
                           bytes(matrix * matrix * spp * int(ds.BitsAllocated) // 8))
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out, enforce_file_format=False)
            n += 1
    return n


def reduced_cohort(cohort_dicom: str | Path, out: str | Path, patients: dict[str, tuple[str, str]], *,
                   slice_stride: int = 10, matrix: int | None = 16, seed: int | str = 0) -> int:
    """Write ``out/<name>/...`` for each ``name: (source subject, new PatientID)`` by cloning a phantom
    subject's files (:func:`clone_patient`) with fewer slices and a tiny matrix: a cohort of many
    patients whose headers are those of real phantom subjects, for init/check tests and benchmarks.
    Returns the number of files written."""
    src = Path(cohort_dicom)
    return sum(clone_patient(src / s, Path(out) / name, pid, seed=seed, slice_stride=slice_stride, matrix=matrix)
               for name, (s, pid) in patients.items())

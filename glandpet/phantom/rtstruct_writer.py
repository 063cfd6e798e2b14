"""Write a gland label map as a DICOM RTSTRUCT on a CT series (as a planning system exports it).

Contours: per gland label and CT slice, marching squares at level 0.5 on the binary slice
(``contourpy``, which comes with matplotlib), padded by one empty pixel so that every line
closes. On a binary image the 0.5 iso-line passes through the midpoints between inside and
outside pixel centres, so it separates them exactly: re-rasterising with the voxel-centre-inside,
even-odd rule of :mod:`glandpet.dicom.rtstruct` gives back the same mask (holes are their own closed
lines; saddles give separate, non-touching lines). Points are written in LPS mm with 4
decimals, i.e. 1e-4 mm, far below the 0.5-voxel margin to the nearest centre.

The structure set references the CT: same study and FrameOfReferenceUID, an
RTReferencedSeriesSequence listing every CT slice, and per contour the
ReferencedSOPInstanceUID of its slice. ROI names mix the naming styles found in real exports
(TG-263 ``Parotid_L`` / ``Glnd_Submand_R``, ``PAROTID LT``, ``Lt Parotid``, ``L_Parotid``,
``SMG_R``...), chosen per gland from ``style_seed``; an extra combined ROI ``Parotids`` (both
parotids, a common dose-constraint structure) is written too, which no gland map should accept.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from glandpet.glands import DEFAULT_LABELS, Label

#: naming styles: (gland, side) -> ROI name
_GLAND_WORDS = {"parotid": ("Parotid", "PAROTID", "Parotid"), "submandibular": ("Glnd_Submand", "SUBMANDIBULAR", "Submandibular"),
                "sublingual": ("Glnd_Sublingual", "SUBLINGUAL", "Sublingual"), "lacrimal": ("Glnd_Lacrimal", "LACRIMAL", "Lacrimal"),
                "tubarial": ("Glnd_Tubarial", "TUBARIAL", "Tubarial")}


def _style_name(style: int, gland: str, side: str) -> str:
    tg, up, word = _GLAND_WORDS[gland]
    s1, s2, s3 = ("L", "LT", "Lt") if side == "left" else ("R", "RT", "Rt")
    if style == 0:
        return f"{tg}_{s1}"  # TG-263
    if style == 1:
        return f"{up} {s2}"  # PAROTID LT
    if style == 2:
        return f"{s3} {word}"  # Lt Parotid
    if style == 3:
        return f"{s1}_{word}"  # L_Parotid
    if style == 4:
        return f"{word.lower()} {side}"  # parotid left
    if gland == "submandibular":
        return f"SMG_{s1}"
    return f"{word} {s1}"  # Submandibular R


N_STYLES = 6


def roi_names(style_seed: int, labels: tuple[Label, ...] | list[Label] = DEFAULT_LABELS) -> dict[int, str]:
    """Label value -> ROI name, the style drawn per gland (both sides alike) from ``style_seed``."""
    rng = np.random.default_rng(np.random.SeedSequence(style_seed, spawn_key=(7,)))
    style = {g: int(rng.integers(N_STYLES)) for g in _GLAND_WORDS}
    return {lab.index: _style_name(style[lab.gland], lab.gland, lab.side) for lab in labels}


def mask_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed iso-0.5 lines of a 2-D (nx, ny) boolean mask, as (m, 2) arrays of continuous
    (i, j) pixel coordinates, last point not repeated."""
    import contourpy

    ny, nx = mask2d.shape[1], mask2d.shape[0]
    z = np.zeros((ny + 2, nx + 2), dtype=np.float64)
    z[1:-1, 1:-1] = mask2d.T
    gen = contourpy.contour_generator(z=z, name="serial", line_type="Separate", corner_mask=False)
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, float) - 1.0
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) >= 3:
            out.append(pts)
    return out


def _fmt(v: float) -> str:
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def write_rtstruct(path, labels: np.ndarray, affine_lps: np.ndarray, ct_series_dir, *, style_seed: int = 0,
                   label_table=DEFAULT_LABELS, names: dict[int, str] | None = None, series_number: int = 901,
                   extra_rois: bool = True) -> dict:
    """Write ``labels`` ((x, y, z) label map on the grid ``affine_lps``, normally the CT's) as an
    RTSTRUCT referencing the CT series in ``ct_series_dir``; returns ``{"rois": {name: label}}``."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from glandpet.dicom.rtstruct import RTSTRUCT_SOP_CLASS, ct_grid
    from glandpet.phantom.dicom_writer import make_uid

    path = Path(path)
    grid = ct_grid(ct_series_dir)
    ct0 = pydicom.dcmread(min(p for p in Path(ct_series_dir).iterdir() if p.is_file()), stop_before_pixels=True)
    labels = np.asarray(labels)
    A = np.asarray(affine_lps, float)
    ginv = np.linalg.inv(grid.affine_lps)
    names = names or roi_names(style_seed, label_table)
    by_index = {lab.index: lab for lab in label_table}
    present = [int(v) for v in np.unique(labels) if v > 0 and int(v) in by_index]

    ds = Dataset()
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    sop_uid = make_uid(grid.series_uid, "RTSTRUCT", style_seed)
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    fm.ImplementationVersionName = "GLANDPET_PHANTOM"
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    when = dt.datetime(2024, 1, 1, 12, 0, 0)
    for kw in ("StudyDate", "StudyTime"):
        if kw in ct0:
            setattr(ds, kw, ct0.get(kw))
    ds.InstanceCreationDate = ds.StructureSetDate = ds.SeriesDate = ct0.get("StudyDate", when.strftime("%Y%m%d"))
    ds.InstanceCreationTime = ds.StructureSetTime = ds.SeriesTime = "120000"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "RTSTRUCT"
    ds.Manufacturer = "Phantom TPS"
    ds.ManufacturerModelName = "glandpet"
    ds.SeriesDescription = "RTSTRUCT glands"
    for kw in ("AccessionNumber", "ReferringPhysicianName", "StudyDescription", "PatientName", "PatientID",
               "PatientBirthDate", "PatientSex", "PatientAge", "StudyID", "InstitutionName"):
        if kw in ct0:
            setattr(ds, kw, ct0.get(kw))
    ds.StudyInstanceUID = grid.study_uid
    ds.SeriesInstanceUID = make_uid(grid.series_uid, "RTSTRUCT series", style_seed)
    ds.SeriesNumber = str(series_number)
    ds.InstanceNumber = "1"
    ds.FrameOfReferenceUID = grid.frame_of_reference_uid
    ds.StructureSetLabel = "GLANDS"
    ds.StructureSetName = "Salivary and lacrimal glands"

    def img_ref(uid):
        r = Dataset()
        r.ReferencedSOPClassUID = CTImageStorage
        r.ReferencedSOPInstanceUID = uid
        return r

    se = Dataset()
    se.SeriesInstanceUID = grid.series_uid
    se.ContourImageSequence = Sequence([img_ref(u) for u in grid.sop_uids])
    st = Dataset()
    st.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as TPSs write it)
    st.ReferencedSOPInstanceUID = grid.study_uid
    st.RTReferencedSeriesSequence = Sequence([se])
    fr = Dataset()
    fr.FrameOfReferenceUID = grid.frame_of_reference_uid
    fr.RTReferencedStudySequence = Sequence([st])
    ds.ReferencedFrameOfReferenceSequence = Sequence([fr])

    def contours_of(mask: np.ndarray) -> list[Dataset]:
        items = []
        for k in np.nonzero(mask.any(axis=(0, 1)))[0]:
            for poly in mask_contours(mask[:, :, k]):
                w = np.c_[poly, np.full(len(poly), float(k)), np.ones(len(poly))] @ A.T
                kk = round(float((ginv @ w[0])[2]))
                c = Dataset()
                if 0 <= kk < len(grid.sop_uids):
                    c.ContourImageSequence = Sequence([img_ref(grid.sop_uids[kk])])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(poly)
                c.ContourData = [_fmt(v) for v in w[:, :3].ravel()]
                items.append(c)
        return items

    rois: list[tuple[str, np.ndarray, str]] = [(names[v], labels == v, "ORGAN") for v in present]
    par = [lab.index for lab in label_table if lab.gland == "parotid" and lab.index in present]
    if extra_rois and len(par) == 2:
        rois.append(("Parotids", np.isin(labels, par), "AVOIDANCE"))
    ss, rc, obs = [], [], []
    colours = [[255, 0, 0], [0, 128, 255], [0, 200, 0], [255, 160, 0], [200, 0, 200], [0, 200, 200]]
    for n, (name, mask, kind) in enumerate(rois, start=1):
        a = Dataset()
        a.ROINumber = n
        a.ReferencedFrameOfReferenceUID = grid.frame_of_reference_uid
        a.ROIName = name
        a.ROIGenerationAlgorithm = "MANUAL"
        ss.append(a)
        b = Dataset()
        b.ROIDisplayColor = colours[(n - 1) % len(colours)]
        b.ReferencedROINumber = n
        b.ContourSequence = Sequence(contours_of(mask))
        rc.append(b)
        o = Dataset()
        o.ObservationNumber = n
        o.ReferencedROINumber = n
        o.RTROIInterpretedType = kind
        o.ROIInterpreter = ""
        obs.append(o)
    ds.StructureSetROISequence = Sequence(ss)
    ds.ROIContourSequence = Sequence(rc)
    ds.RTROIObservationsSequence = Sequence(obs)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    out = {names[v]: v for v in present}
    if len(rois) > len(present):
        out["Parotids"] = None
    return {"path": str(path), "rois": out}

"""`glandpet export dicom CONFIG OUTDIR [--subjects ID ...] [--stow URL]`: results back where clinicians look.

Per segmented session, two DICOM objects are written to ``OUTDIR/sub-<id>/ses-<session>/``:

* ``sub-<id>_ses-<session>_seg.dcm`` — a **DICOM Segmentation** (binary) of the gland labels on the
  session's original CT series (the instances the DICOM index selected), one segment per gland and
  side. The label map (``..._space-ct_dseg.nii.gz``) is sampled nearest-neighbour at the world
  position of every CT pixel (ImagePositionPatient / ImageOrientationPatient / PixelSpacing, LPS ->
  RAS -> NIfTI voxel), so slice order, a flipped axis or a de-sheared gantry-tilted series need no
  assumption. Segments are coded: category SCT 91723000 "Anatomical Structure", type = the gland
  (:data:`GLAND_CODES`), Segmented Property Type Modifier = laterality (:data:`LATERALITY_CODES`).
* ``sub-<id>_ses-<session>_sr.dcm`` — a **Comprehensive 3D SR** holding a TID 1500 Measurement Report:
  per gland and side one TID 1411 volumetric ROI group that references its segment (and the CT
  series the segment was drawn on) with volume (UCUM ``ml``), SUVmax, SUVpeak, SUVmean and SUVmean
  after partial-volume correction (SUV concept and unit of the study's SUV type, e.g. SUVbw
  ``{SUVbw}g/ml``), and the subject's PSMA/FAPI index (UCUM ``1``). The PET series is referenced in
  the report's image library (TID 1600) and in the evidence.

Both objects carry the patient's identity and study from the CT (a PACS files them with the patient's
study), so OUTDIR must lie outside the ``results:`` folder; nothing under ``results/`` is written, and
nothing identifying is printed (counts and the output path only).

Codes. SNOMED CT (SCT): parotid gland 45289007, submandibular gland 54019009, lacrimal gland 13561001
(all three as in pydicom's DICOM code dictionary, ``pydicom.sr.codedict.codes.SCT``), sublingual gland
88481005 ("Sublingual gland structure", the concept the TG-263 structure-name mapping uses);
laterality left 7771000, right 24028007. The **tubarial gland** has no SNOMED CT concept we could
verify; it is coded in the private scheme ``99GLANDPET`` (code ``TUBARIAL``), as are the
partial-volume-correction method and the PSMA/FAPI index.

:func:`seg_to_label_map` reads such a SEG (or any binary SEG whose segments carry these codes or the
labels ``<gland>_<side>``) back onto a CT NIfTI grid.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glandpet import layout
from glandpet.errors import UserError

__all__ = [
    "GLAND_CODES",
    "LATERALITY_CODES",
    "PRIVATE_SCHEME",
    "export_session",
    "labels_on_ct_instances",
    "run_export",
    "seg_to_label_map",
    "stow",
]

#: Private coding scheme designator for concepts without a verifiable standard code.
PRIVATE_SCHEME = "99GLANDPET"

# (code value, coding scheme designator, code meaning)
GLAND_CODES: dict[str, tuple[str, str, str]] = {
    "parotid": ("45289007", "SCT", "Parotid gland"),
    "submandibular": ("54019009", "SCT", "Submandibular gland"),
    "sublingual": ("88481005", "SCT", "Sublingual gland"),
    "lacrimal": ("13561001", "SCT", "Lacrimal gland"),
    "tubarial": ("TUBARIAL", PRIVATE_SCHEME, "Tubarial gland"),
}
LATERALITY_CODES: dict[str, tuple[str, str, str]] = {
    "left": ("7771000", "SCT", "Left"),
    "right": ("24028007", "SCT", "Right"),
}
ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
#: SUV type (config ``suv_type``) -> (DCM concept, UCUM unit, unit meaning), DICOM CID 85.
SUV_CONCEPTS: dict[str, tuple[tuple[str, str, str], str]] = {
    "bw": (("126401", "DCM", "SUVbw"), "{SUVbw}g/ml"),
    "lbm": (("126406", "DCM", "SUVlbm(James128)"), "{SUVlbm(James128)}g/ml"),
    "lbm_janmahasatian": (("126405", "DCM", "SUVlbm(Janma)"), "{SUVlbm(Janma)}g/ml"),
    "bsa": (("126403", "DCM", "SUVbsa"), "{SUVbsa}cm2/ml"),
    "ibw": (("126404", "DCM", "SUVibw"), "{SUVibw}g/ml"),
}
VOLUME = ("118565006", "SCT", "Volume")
ML = ("ml", "UCUM", "milliliter")
NO_UNITS = ("1", "UCUM", "no units")
MAXIMUM = ("56851009", "SCT", "Maximum")
MEAN = ("373098007", "SCT", "Mean")
PEAK = ("126031", "DCM", "Peak Value Within ROI")
PVC_METHOD = ("PVC", PRIVATE_SCHEME, "Partial volume correction")
INDEX_CONCEPT = ("PSMAFAPIINDEX", PRIVATE_SCHEME, "PSMA/FAPI uptake index")
SEG_SERIES_NUMBER = 9301
SR_SERIES_NUMBER = 9302


def _code(t: tuple[str, str, str]):
    from pydicom.sr.coding import Code

    return Code(t[0], t[1], t[2])


def _code_item(t: tuple[str, str, str]):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = t
    return ds


# ----------------------------------------------------------------------------------------- geometry
def _lps_to_voxel(affine: np.ndarray) -> np.ndarray:
    """4x4 matrix taking LPS world coordinates (DICOM) to NIfTI voxel indices of ``affine`` (RAS)."""
    import numpy as np

    from glandpet.geometry import LPS_TO_RAS

    return np.linalg.inv(affine) @ LPS_TO_RAS


def labels_on_ct_instances(labels: np.ndarray, affine: np.ndarray, instances: list[Any]) -> np.ndarray:
    """The label map (NIfTI array + RAS affine) sampled nearest-neighbour at every pixel of each CT
    instance (pydicom datasets): an array (n_instances, Rows, Columns), 0 outside the map.

    Each instance's pixel centres are mapped by world position (LPS -> RAS -> voxel index, rounded);
    instances whose plane misses the labels' bounding box are not sampled (all 0)."""
    import numpy as np

    m = _lps_to_voxel(np.asarray(affine, dtype=float))
    shape = np.asarray(labels.shape[:3])
    rows, cols = int(instances[0].Rows), int(instances[0].Columns)
    out = np.zeros((len(instances), rows, cols), dtype=labels.dtype)
    nz = np.nonzero(labels)
    if not len(nz[0]):
        return out
    lo = np.array([v.min() for v in nz]) - 0.5
    hi = np.array([v.max() for v in nz]) + 0.5
    for n, ds in enumerate(instances):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise UserError(f"CT instance {n + 1} has {ds.Rows}x{ds.Columns} pixels, the first {rows}x{cols}: not one series")
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient])
        ori = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        origin = m[:3, :3] @ pos + m[:3, 3]  # voxel coordinates of pixel (0, 0)
        step_c = m[:3, :3] @ (ori[:3] * dc)  # per column
        step_r = m[:3, :3] @ (ori[3:] * dr)  # per row
        corners = origin + np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]]) @ np.stack([step_r, step_c])
        if np.any(corners.max(axis=0) < lo) or np.any(corners.min(axis=0) > hi):
            continue
        idx = []
        for ax in range(3):
            coord = origin[ax] + np.arange(rows)[:, None] * step_r[ax] + np.arange(cols)[None, :] * step_c[ax]
            idx.append(np.rint(coord).astype(np.int64))
        ok = np.ones((rows, cols), dtype=bool)
        for ax in range(3):
            ok &= (idx[ax] >= 0) & (idx[ax] < shape[ax])
        out[n][ok] = labels[idx[0][ok], idx[1][ok], idx[2][ok]]
    return out


# ------------------------------------------------------------------------------------------ reader
def _segment_gland(item: Any) -> tuple[str, str] | None:
    """(gland, side) of a SegmentSequence item: its type + laterality modifier codes, else its label."""
    from glandpet.glands import GLANDS, SIDES

    by_code = {(v[0], v[1]): g for g, v in GLAND_CODES.items()}
    lat_code = {(v[0], v[1]): s for s, v in LATERALITY_CODES.items()}
    gland = side = None
    for t in getattr(item, "SegmentedPropertyTypeCodeSequence", []):
        gland = by_code.get((str(t.CodeValue), str(t.CodingSchemeDesignator)))
        for mod in getattr(t, "SegmentedPropertyTypeModifierCodeSequence", []):
            side = lat_code.get((str(mod.CodeValue), str(mod.CodingSchemeDesignator)))
    for mod in getattr(item, "SegmentedPropertyTypeModifierCodeSequence", []):
        side = side or lat_code.get((str(mod.CodeValue), str(mod.CodingSchemeDesignator)))
    if gland and side:
        return gland, side
    label = str(getattr(item, "SegmentLabel", "")).strip().lower().replace(" ", "_")
    g, _, s = label.rpartition("_")
    return (g, s) if g in GLANDS and s in SIDES else None


def _frame_attr(ds: Any, k: int, seq: str, attr: str) -> Any:
    pf = ds.PerFrameFunctionalGroupsSequence[k]
    if seq in pf:
        return getattr(getattr(pf, seq)[0], attr)
    return getattr(getattr(ds.SharedFunctionalGroupsSequence[0], seq)[0], attr)


def seg_to_label_map(seg_path: str | Path, ct_nifti_path: str | Path) -> np.ndarray:
    """Read a binary DICOM Segmentation and return glandpet labels on the grid of a CT NIfTI.

    Contract (used by the corrections workflow to accept corrected SEG files):

    * returns an ``int16`` array with the shape of ``ct_nifti_path``'s image (its first three
      dimensions), in that image's voxel order;
    * values are glandpet's default label values (:data:`glandpet.glands.DEFAULT_LABELS`: parotid
      left/right 1/2, submandibular 3/4, sublingual 5/6, lacrimal 7/8, tubarial 9/10), 0 elsewhere;
    * a segment's gland and side come from its Segmented Property Type code (:data:`GLAND_CODES`)
      and its laterality modifier (:data:`LATERALITY_CODES`), else from a segment label
      ``<gland>_<side>`` (e.g. ``parotid_left``); a segment matching neither raises ``UserError``;
    * geometry by world coordinates: every NIfTI voxel centre is mapped (RAS -> LPS) to the SEG's
      nearest frame plane (within half the plane spacing: Spacing Between Slices, else the closest
      frame planes, at most the slice thickness) and nearest pixel of that plane; voxels
      off the SEG's planes or outside its frames are 0. Where segments overlap, the later segment
      wins. On a CT NIfTI converted from the SEG's source CT series the result is the label map the
      SEG was made from, voxel for voxel.

    Raises ``UserError`` (one line) for a file that is not a readable DICOM Segmentation, a
    fractional SEG, or frames that are not parallel planes.
    """
    import highdicom as hd
    import nibabel as nib
    import numpy as np

    from glandpet.geometry import ras_to_lps
    from glandpet.glands import label_value

    seg_path, ct_nifti_path = Path(seg_path), Path(ct_nifti_path)
    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise UserError(f"{seg_path}: not a readable DICOM Segmentation ({type(exc).__name__}: {exc})") from None
    if str(seg.SegmentationType) != "BINARY":
        raise UserError(f"{seg_path}: segmentation type {seg.SegmentationType} (only BINARY segmentations are read)")
    value_of: dict[int, int] = {}
    for item in seg.SegmentSequence:
        gs = _segment_gland(item)
        if gs is None:
            raise UserError(f"{seg_path}: segment {item.SegmentNumber} ('{getattr(item, 'SegmentLabel', '')}') "
                            f"is no gland glandpet knows (codes or label <gland>_<side>)")
        value_of[int(item.SegmentNumber)] = label_value(*gs)
    img = nib.load(str(ct_nifti_path))
    shape = tuple(int(s) for s in img.shape[:3])
    out = np.zeros(shape, dtype=np.int16)
    n_frames = int(getattr(seg, "NumberOfFrames", 1))
    frames = np.asarray(seg.pixel_array).reshape(n_frames, int(seg.Rows), int(seg.Columns))
    ori = np.asarray([float(v) for v in _frame_attr(seg, 0, "PlaneOrientationSequence", "ImageOrientationPatient")])
    row_dir, col_dir = ori[:3], ori[3:]
    normal = np.cross(row_dir, col_dir)
    planes: dict[tuple, np.ndarray] = {}
    spacing = None
    for k in range(n_frames):
        o = np.asarray([float(v) for v in _frame_attr(seg, k, "PlaneOrientationSequence", "ImageOrientationPatient")])
        if not np.allclose(o, ori, atol=1e-4):
            raise UserError(f"{seg_path}: frames are not parallel planes (orientation differs between frames)")
        sp = tuple(float(v) for v in _frame_attr(seg, k, "PixelMeasuresSequence", "PixelSpacing"))
        if spacing is not None and not np.allclose(sp, spacing):
            raise UserError(f"{seg_path}: pixel spacing differs between frames")
        spacing = sp
        pos = tuple(round(float(v), 4) for v in _frame_attr(seg, k, "PlanePositionSequence", "ImagePositionPatient"))
        seg_no = int(_frame_attr(seg, k, "SegmentIdentificationSequence", "ReferencedSegmentNumber"))
        plane = planes.setdefault(pos, np.zeros((int(seg.Rows), int(seg.Columns)), dtype=np.int16))
        plane[frames[k] > 0] = value_of[seg_no]
    if not planes:
        return out
    pos_arr = np.asarray(list(planes.keys()))
    dist = pos_arr @ normal
    order = np.argsort(dist)
    pos_arr, dist = pos_arr[order], dist[order]
    stack = np.stack([planes[tuple(p)] for p in map(tuple, np.asarray(list(planes.keys()))[order])])
    pm = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence", [None])[0]
    between = float(pm.SpacingBetweenSlices) if pm is not None and pm.get("SpacingBetweenSlices") else None
    thick = float(pm.SliceThickness) if pm is not None and pm.get("SliceThickness") else None
    if between is None:  # no declared spacing: the closest frame planes, at most the slice thickness
        cands = ([float(np.min(np.diff(dist)))] if len(dist) > 1 else []) + ([thick] if thick else [])
        between = min(cands) if cands else 1.0
    half = 0.5 * between
    dr, dc = spacing
    to_lps = ras_to_lps(img.affine)
    # every quantity below is affine in the voxel index (i, j, k): per NIfTI slice, outer sums
    d_ijk = normal @ to_lps[:3, :3]  # plane distance per unit voxel step
    rd_ijk = row_dir @ to_lps[:3, :3]
    cd_ijk = col_dir @ to_lps[:3, :3]
    ii = np.arange(shape[0])[:, None].astype(float)
    jj = np.arange(shape[1])[None, :].astype(float)
    for kz in range(shape[2]):
        base = to_lps[:3, :3] @ np.array([0.0, 0.0, kz]) + to_lps[:3, 3]
        d = normal @ base + ii * d_ijk[0] + jj * d_ijk[1]
        if d.max() < dist[0] - half - 1e-3 or d.min() > dist[-1] + half + 1e-3:
            continue
        if len(dist) > 1:
            p = np.clip(np.searchsorted(dist, d), 1, len(dist) - 1)
            p = np.where(np.abs(d - dist[p - 1]) <= np.abs(d - dist[p]), p - 1, p)
        else:
            p = np.zeros(d.shape, dtype=np.int64)
        on_plane = np.abs(d - dist[p]) <= half + 1e-3
        if not on_plane.any():
            continue
        rel_c = (row_dir @ base + ii * rd_ijk[0] + jj * rd_ijk[1]) - pos_arr[p] @ row_dir
        rel_r = (col_dir @ base + ii * cd_ijk[0] + jj * cd_ijk[1]) - pos_arr[p] @ col_dir
        col = np.rint(rel_c / dc).astype(np.int64)
        row = np.rint(rel_r / dr).astype(np.int64)
        ok = on_plane & (row >= 0) & (row < stack.shape[1]) & (col >= 0) & (col < stack.shape[2])
        out[:, :, kz][ok] = stack[p[ok], row[ok], col[ok]]
    return out


# ------------------------------------------------------------------------------------------ writer
@dataclass
class SessionInputs:
    subject: str
    session: str
    dseg: Path
    table: Path
    stats: Path
    index: Path | None
    ct_files: list[Path]
    pet_files: list[Path]
    corrected: bool = False  # the labels are a hand correction (segmentation.corrections)


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    sessions: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    segments: int = 0
    measurements: int = 0


def _read_instances(files: list[Path], what: str) -> list[Any]:
    """Headers of a series' files (no pixel data). Errors name the file by its number, not its path
    (DICOM folder names may identify the patient)."""
    import pydicom

    out = []
    for n, f in enumerate(files, start=1):
        try:
            out.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
            raise UserError(f"{what}: file {n} of {len(files)} of the selected series cannot be read "
                            f"({type(exc).__name__}); has the DICOM tree changed since the workflow ran?") from None
    return out


def _segment_descriptions(present: list[tuple[int, str, str]], corrected: bool = False) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from glandpet import __version__

    # multi-atlas segmentation: deformable registration of atlases + label fusion (CID 7162 family)
    algo = hd.AlgorithmIdentificationSequence(name="glandpet multi-atlas", version=__version__,
                                              family=codes.cid7162.DeformableModels)
    from glandpet import glands

    editor_rgb = getattr(glands, "editor_rgb", None)  # the label editors' colours, where defined
    out = []
    for n, (idx, gland, side) in enumerate(present, start=1):
        colour = None
        if editor_rgb is not None:
            colour = hd.color.CIELabColor.from_rgb(*editor_rgb(glands.Label(idx, gland, side)))
        desc = hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"{gland}_{side}",
            segmented_property_category=_code(ANATOMICAL_STRUCTURE),
            segmented_property_type=_code(GLAND_CODES[gland]),
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if corrected
                            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC), algorithm_identification=algo,
            tracking_uid=hd.UID(), tracking_id=f"{gland}_{side}", display_color=colour)
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code_item(LATERALITY_CODES[side])]
        out.append(desc)
    return out


def build_seg(ct: list[Any], labels: np.ndarray, affine: np.ndarray, label_table: list[Any],
              corrected: bool = False) -> tuple[Any, dict[tuple[str, str], int]]:
    """The DICOM SEG of a label map on the CT instances; returns (dataset, {(gland, side): segment number}).
    ``corrected``: the map is an automatic segmentation corrected by hand (segment algorithm type
    SEMIAUTOMATIC, content description says so)."""
    import numpy as np

    import highdicom as hd

    from glandpet import __version__

    sampled = labels_on_ct_instances(labels, affine, ct)
    values = set(np.unique(sampled).tolist()) - {0}
    present = [(lab.index, lab.gland, lab.side) for lab in sorted(label_table, key=lambda x: x.index) if lab.index in values]
    if not present:
        raise UserError("the gland label map has no voxel inside the CT series' field of view")
    seg_array = np.zeros(sampled.shape, dtype=np.uint8)
    for n, (idx, _, _) in enumerate(present, start=1):
        seg_array[sampled == idx] = n
    seg = hd.seg.Segmentation(
        source_images=ct, pixel_array=seg_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(present, corrected), series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="glandpet",
        manufacturer_model_name="glandpet", software_versions=__version__, device_serial_number="none",
        content_label="GLANDS",
        content_description="glandpet gland segmentation" + (", corrected by hand" if corrected else ""),
        series_description="glandpet glands (SEG)")
    _declare_private_scheme(seg)
    return seg, {(g, s): n for n, (_, g, s) in enumerate(present, start=1)}


def _declare_private_scheme(ds: Any) -> None:
    """Declare the private coding scheme in the SOP Common module (Coding Scheme Identification)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "glandpet private codes"
    item.CodingSchemeResponsibleOrganization = "glandpet project"
    ds.CodingSchemeIdentificationSequence = [item]


def _finite(v: Any) -> float | None:
    import numpy as np

    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def build_sr(seg: Any, segments: dict[tuple[str, str], int], ct: list[Any], pet: list[Any], stats: Any,
             index: Any | None) -> Any:
    """The Comprehensive 3D SR (TID 1500) of one session's gland measurements."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from glandpet import __version__

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="glandpet", manufacturer_name="glandpet", model_name=__version__))
    context = hd.sr.ObservationContext(observer_device_context=device)
    algo = hd.sr.AlgorithmIdentification(name="glandpet", version=__version__)
    ct_series = hd.sr.SourceSeriesForSegmentation(str(ct[0].SeriesInstanceUID))
    index_of = {}
    if index is not None and len(index):
        index_of = {(r.gland, r.side): _finite(r.psma_fapi_index) for r in index.itertuples()}
    groups = []
    n_meas = 0
    for row in stats.itertuples():
        key = (row.gland, row.side)
        if key not in segments:
            continue
        if str(row.suv_type) not in SUV_CONCEPTS:
            raise UserError(f"gland_stats: SUV type {row.suv_type!r} has no DICOM concept here "
                            f"(expected one of {', '.join(SUV_CONCEPTS)})")
        suv_concept, suv_unit = SUV_CONCEPTS[str(row.suv_type)]
        unit = hd.sr.CodedConcept(suv_unit, "UCUM", suv_unit)
        site = hd.sr.FindingSite(anatomic_location=_code(GLAND_CODES[row.gland]),
                                 laterality=_code(LATERALITY_CODES[row.side]))
        meas = []

        def add(name, value, u, derivation=None, method=None):
            v = _finite(value)
            if v is not None:
                meas.append(hd.sr.Measurement(name=name, value=v, unit=u, derivation=derivation, method=method,
                                              algorithm_id=algo))

        add(_code(VOLUME), row.volume_ml, _code(ML))
        suv = _code(suv_concept)
        add(suv, row.suv_max, unit, derivation=_code(MAXIMUM))
        add(suv, row.suv_peak, unit, derivation=_code(PEAK))
        add(suv, row.suv_mean, unit, derivation=_code(MEAN))
        pvc = PVC_METHOD if not isinstance(row.pvc_method, str) else (PVC_METHOD[0], PVC_METHOD[1],
                                                                     f"{PVC_METHOD[2]} ({row.pvc_method})"[:64])
        add(suv, row.suv_mean_pvc, unit, derivation=_code(MEAN), method=_code(pvc))
        add(_code(INDEX_CONCEPT), index_of.get(key), _code(NO_UNITS))
        n_meas += len(meas)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{row.gland}_{row.side}"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=segments[key], source_series=ct_series),
            finding_type=_code(GLAND_CODES[row.gland]), finding_sites=[site], measurements=meas))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.LN.PETUnspecifiedBodyRegion,
        imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport, referenced_images=pet)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*ct, *pet, seg], content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="glandpet", is_complete=True,
        series_description="glandpet gland measurements (SR)")
    _declare_private_scheme(sr)
    sr._glandpet_n_measurements = n_meas  # noqa: SLF001 - reported by the command
    return sr


def export_session(inp: SessionInputs, outdir: Path) -> tuple[list[Path], int, int]:
    """Write the SEG and SR of one session into ``outdir``; returns (files, n segments, n measurements)."""
    import numpy as np

    import nibabel as nib
    import pandas as pd

    from glandpet.glands import read_label_table

    img = nib.load(str(inp.dseg))
    labels = np.asarray(img.dataobj).astype(np.int16)
    try:
        table = read_label_table(inp.table)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    ct = _read_instances(inp.ct_files, f"sub-{inp.subject} ses-{inp.session} CT")
    pet = _read_instances(inp.pet_files, f"sub-{inp.subject} ses-{inp.session} PET")
    seg, segments = build_seg(ct, labels, img.affine, table, corrected=inp.corrected)
    stats = pd.read_parquet(inp.stats)
    index = pd.read_parquet(inp.index) if inp.index is not None and inp.index.is_file() else None
    sr = build_sr(seg, segments, ct, pet, stats, index)
    files = [Path(layout.path(outdir, inp.subject, inp.session, suffix)) for suffix in ("seg.dcm", "sr.dcm")]
    files[0].parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(files[0])
    sr.save_as(files[1])
    return files, len(segments), int(getattr(sr, "_glandpet_n_measurements", 0))


# ------------------------------------------------------------------------------------------ STOW-RS
def stow(files: list[Path], url: str, timeout: float = 60.0) -> int:
    """Send DICOM files to a DICOMweb server (STOW-RS: POST {url}/studies, multipart/related;
    type="application/dicom"). Returns the number of instances sent; raises UserError with the
    HTTP status code or the connection error on failure."""
    import secrets

    import requests

    boundary = f"glandpet-{secrets.token_hex(12)}"
    parts = []
    for f in files:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + Path(f).read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    target = url.rstrip("/") + "/studies"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    try:
        resp = requests.post(target, data=body, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise UserError(f"PACS at {target} unreachable ({type(exc).__name__})") from None
    if resp.status_code not in (200, 202):
        raise UserError(f"PACS at {target} refused the STOW-RS request: HTTP {resp.status_code} {resp.reason}")
    failed = 0
    try:
        failed = len((resp.json() or {}).get("00081198", {}).get("Value", []))  # Failed SOP Sequence
    except ValueError:
        pass
    if resp.status_code == 202 or failed:  # some instances failed (DICOM PS3.18 10.5.3)
        raise UserError(f"PACS at {target} did not store {failed or 'some'} of {len(files)} instance(s): "
                        f"HTTP {resp.status_code} (see the PACS log)")
    return len(files)


# ------------------------------------------------------------------------------------------ command
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _measured_on_correction(stats: Path) -> bool:
    """Whether gland_stats were measured on a corrected label map (column ``segmentation_source``):
    the SEG then shows that map, the one the SR's numbers come from."""
    import pyarrow.parquet as pq

    if "segmentation_source" not in pq.read_schema(stats).names:
        return False
    col = pq.read_table(stats, columns=["segmentation_source"]).column(0).to_pylist()
    return "corrected" in col


def session_inputs(config: Mapping[str, Any], subjects: list[str] | None = None) -> tuple[list[SessionInputs], list[str]]:
    """The sessions to export (and the sessions skipped for lack of a segmentation, as messages)."""
    if not config.get("results"):
        raise UserError("the config has no `results:` folder (where the workflow wrote its results)")
    results = Path(str(config["results"])).expanduser().resolve()
    if not results.is_dir():
        raise UserError(f"results folder {results} does not exist (run the workflow first)")
    demo = str(config.get("subjects") or "") == ""
    dicom_root = results / "demo" / "dicom" if demo else Path(str(config.get("dicom_root") or "")).expanduser().resolve()
    work = results / "work"
    known = sorted(p.name[4:] for p in work.glob("sub-*") if Path(layout.path(work, p.name[4:], suffix="series.json")).is_file())
    if not known:
        raise UserError(f"{work}: no DICOM index selections (sub-<id>/sub-<id>_series.json): run the workflow first")
    wanted = subjects or known
    for s in wanted:
        if s not in known:
            raise UserError(f"subject {s} unknown: {layout.path(work, s, suffix='series.json')} not found")
    out, skipped = [], []
    for s in wanted:
        selection = json.loads(Path(layout.path(work, s, suffix="series.json")).read_text())
        for ses in sorted(selection):
            sel = selection[ses]
            dseg = Path(layout.path(results, s, ses, "dseg.nii.gz", space="ct"))
            stats = Path(layout.path(results, s, ses, "gland_stats.parquet"))
            if not dseg.is_file() or not stats.is_file() or not sel.get("ct_files"):
                missing = dseg if not dseg.is_file() else stats if not stats.is_file() else "a CT series"
                msg = f"sub-{s} ses-{ses}: no segmentation to export ({missing} not found)"
                if subjects:
                    raise UserError(msg)
                skipped.append(msg)
                continue
            corrected_dseg = layout.path(results, s, ses, "dseg.nii.gz", desc="corrected", space="ct")
            corrected = _measured_on_correction(stats) and Path(corrected_dseg).is_file()
            used = Path(corrected_dseg) if corrected else dseg
            out.append(SessionInputs(
                subject=s, session=ses, dseg=used, table=Path(layout.label_table_of(used)), stats=stats,
                corrected=corrected, index=Path(layout.path(results, s, suffix="gland_index.parquet")),
                ct_files=[dicom_root / f for f in sel["ct_files"]], pet_files=[dicom_root / f for f in sel["pet_files"]]))
    if subjects and not out:
        raise UserError(f"no segmented session for subject(s) {', '.join(subjects)}")
    return out, skipped


def check_outdir(config: Mapping[str, Any], outdir: str | Path) -> Path:
    """OUTDIR, resolved; refused (UserError) when it lies inside the config's results folder."""
    if not config.get("results"):
        raise UserError("the config has no `results:` folder (where the workflow wrote its results)")
    results = Path(str(config["results"])).expanduser().resolve()
    out = Path(outdir).expanduser().resolve()
    if _inside(out, results):
        raise UserError(f"OUTDIR {out} lies inside the results folder {results}: DICOM objects identify the "
                        f"patient and must not go there (choose a folder outside it)")
    return out


def export(config: Mapping[str, Any], outdir: str | Path, subjects: list[str] | None = None,
           stow_url: str | None = None) -> ExportResult:
    """Export every segmented session (or those of ``subjects``) to ``outdir``; see the module docstring."""
    out = check_outdir(config, outdir)
    sessions, skipped = session_inputs(config, subjects)
    res = ExportResult(skipped=skipped)
    for inp in sessions:
        files, n_seg, n_meas = export_session(inp, out)
        res.files += files
        res.sessions.append((inp.subject, inp.session))
        res.segments += n_seg
        res.measurements += n_meas
    if stow_url:
        try:
            stow(res.files, stow_url)
        except UserError as exc:
            raise UserError(f"{exc}; the {len(res.files)} file(s) are written in {out}") from None
    return res


def run_export(args: Any) -> int:
    """`glandpet export dicom` (see :mod:`glandpet.cli`)."""
    from glandpet.study.preflight import load_config

    config = load_config(args.config)
    check_outdir(config, args.outdir)
    session_inputs(config, args.subjects or None)  # bad subjects or results: one line before anything else
    log = sys.stdout
    print("glandpet export dicom: the DICOM objects carry the patient's identity (name, ID, study) from the CT, "
          f"so that a PACS files them with the patient's study; they are written to {Path(args.outdir).resolve()} "
          "only (never under results/).", file=log)
    res = export(config, args.outdir, subjects=args.subjects or None, stow_url=args.stow)
    for msg in res.skipped:
        print(f"  skipped: {msg}", file=log)
    size = sum(f.stat().st_size for f in res.files)
    print(f"glandpet export dicom: {len(res.sessions)} session(s), {res.segments} segment(s), {res.measurements} "
          f"measurement(s): {len(res.files)} DICOM file(s), {size / 1e6:.2f} MB -> {Path(args.outdir).resolve()}", file=log)
    if args.stow:
        print(f"glandpet export dicom: sent {len(res.files)} instance(s) to {args.stow} (STOW-RS)", file=log)
    return 0


def add_subparser(subparsers) -> Any:
    """Register `glandpet export dicom` on the top-level subparsers."""
    ex = subparsers.add_parser("export", help="export results to other systems (DICOM SEG + SR for a PACS)")
    esub = ex.add_subparsers(dest="export_command", required=True, metavar="EXPORT_COMMAND")
    d = esub.add_parser(
        "dicom", help="write per segmented session a DICOM SEG (glands on the CT) and SR (gland measurements)",
        description="Per segmented session: a DICOM Segmentation of the gland labels on the original CT series and a "
                    "DICOM Structured Report (TID 1500) of volume, SUVmax, SUVpeak, SUVmean, SUVmean after PVC and "
                    "the PSMA/FAPI index per gland. The objects identify the patient (a PACS files them with the "
                    "patient's study): OUTDIR must lie outside the results folder.")
    d.add_argument("config", metavar="CONFIG", help="the study config (config.yaml) the workflow ran with")
    d.add_argument("outdir", metavar="OUTDIR", help="output folder (must lie outside the results folder)")
    d.add_argument("--subjects", nargs="+", default=None, metavar="ID", help="only these subjects (pseudonymous ids)")
    d.add_argument("--stow", default=None, metavar="URL",
                   help="also send the objects to this DICOMweb root over STOW-RS (e.g. http://pacs:8042/dicom-web)")
    d.set_defaults(func=run_export)
    return ex

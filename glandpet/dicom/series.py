"""Read one DICOM image series into a float32 volume with exact geometry.

`load_series(files_or_dir)` returns a `Series`:

- `data`: float32 array indexed (i, j, k) = (column, row, slice), like nibabel; per-slice
  RescaleSlope / RescaleIntercept applied (CT in HU, PET in the stored units).
- `affine_lps`: 4x4 mapping voxel (i, j, k) to DICOM patient coordinates (LPS, mm):
  column i moves along the first ImageOrientationPatient cosine by PixelSpacing[1] (column
  spacing), row j along the second cosine by PixelSpacing[0] (row spacing), slice k from the
  first to the last slice position. `affine_ras` = diag(-1, -1, 1, 1) @ affine_lps (NIfTI).
- `datasets`: the slice headers in the volume's slice order (pixel data dropped).

Policy (refuse, never resample; every message names the series):
- a directory holding image instances of several SeriesInstanceUIDs is refused, listing them
  (non-image DICOM objects such as RTSTRUCT/SEG/SR and non-DICOM files are skipped);
- slices are sorted by their position along the slice normal; unequal spacing (a missing
  slice) and gantry tilt (positions not along the normal) are refused (`GeometryError`; a CT
  is then converted through dcm2niix by glandpet.dicom.convert, a PET stays refused); so are differing
  orientations, pixel spacings, matrix sizes, and two different instances at one position
  (multiple stacks, dynamic frames);
- duplicate SOP instances (same SOPInstanceUID) are de-duplicated (first kept);
- enhanced multi-frame images are read through their per-frame / shared functional groups
  (PlanePosition, PlaneOrientation, PixelMeasures, PixelValueTransformation);
- compressed transfer syntaxes are decoded when pydicom has a decoder for them; otherwise
  refused with the transfer syntax name.

The geometry check (:func:`volume_geometry_problem`: one position, spacing, tilt) is public: the DICOM
catalog (:mod:`glandpet.dicom.catalog_grouping`) runs the same check on the headers before any series is read.
So are the steps before it, listing a series' files (:func:`list_series_files`), reading its image instances
(:func:`read_instances`) and taking an instance apart into slices (:func:`slices_of_instance`):
:mod:`glandpet.dicom.ct_dcm2niix` reads the CT series this reader refuses through them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from glandpet.errors import UserError
from glandpet.geometry import LPS_TO_RAS  # also imported from here as dicom_series.LPS_TO_RAS

# Geometry tolerances: absolute (mm) plus relative to the slice spacing.
_ABS_TOL_MM = 0.01
_REL_TOL = 0.05  # real GE whole-body series jitter by ~0.08 mm (2.4 %) at bed overlaps; a missing slice is +100 %
_ORIENT_TOL = 1e-4


class GeometryError(UserError):
    """The slices are not one regular volume. ``kind``: "same_position" (two instances at one
    position), "unequal_spacing" or "tilt" (positions drift off the slice normal); ``modality`` of
    the series. A CT refused for "unequal_spacing" or "tilt" is converted by
    :mod:`glandpet.dicom.ct_dcm2niix` instead; a PET stays refused."""

    def __init__(self, message: str, kind: str, modality: str):
        super().__init__(message)
        self.kind = kind
        self.modality = modality

    def __reduce__(self):  # picklable (process pools) despite the extra arguments
        return (type(self), (str(self), self.kind, self.modality))


@dataclass(frozen=True)
class VolumeGeometryProblem:
    """Why slice positions are not one regular volume: ``kind`` ("same_position", "unequal_spacing"
    or "tilt", as :class:`GeometryError`) and ``message``, which names neither the series nor a remedy."""

    kind: str
    message: str


# what the reader adds to a VolumeGeometryProblem's message when it refuses the series
_REFUSAL = {
    "same_position": "; split the series (one volume per folder)",
    "unequal_spacing": " Refusing rather than resampling",
    "tilt": "; not supported for a PET (a CT is de-sheared by glandpet.dicom.convert)",
}


def volume_geometry_problem(dist: Sequence[float], positions: Sequence[Sequence[float]], normal: np.ndarray,
                            names: Sequence[str] | None = None) -> VolumeGeometryProblem | None:
    """The first reason slices are not one regular volume, with the reader's tolerances, else None.

    `dist`: each slice's position along the unit slice `normal` (mm); `positions`: its
    ImagePositionPatient (LPS mm), in the same order (any order: slices are taken sorted by `dist`,
    stably); `names`: the slices' file names, then named in a "same_position" message. Checked in
    order: two slices at one position (closer than 0.01 mm), unequal spacing (a gap off the mean step
    by more than 0.01 mm + 5 %), positions drifting off the normal (by more than 0.01 mm + 0.1 % of
    the stack's extent: gantry tilt). Used by :func:`load_series` and by the DICOM catalog, which
    checks the headers without reading pixels (:mod:`glandpet.dicom.catalog_grouping`)."""
    dist = np.asarray(dist, dtype=float)
    if len(dist) < 2:
        return None
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    gaps = np.diff(d)
    if np.any(gaps < _ABS_TOL_MM):
        k = int(np.argmin(gaps))
        where = f"{names[order[k]]}, {names[order[k + 1]]}, " if names is not None else ""
        return VolumeGeometryProblem("same_position", f"two different instances at the same slice position ({where}"
                                     f"{d[k]:.3f} mm): multiple stacks or dynamic frames")
    step = (d[-1] - d[0]) / (len(d) - 1)
    dev = np.abs(gaps - step)
    if np.max(dev) > _ABS_TOL_MM + _REL_TOL * step:
        k = int(np.argmax(dev))
        return VolumeGeometryProblem("unequal_spacing", f"unequal slice spacing (gap {gaps[k]:.3f} mm between slices "
                                     f"{k} and {k + 1}, median {np.median(gaps):.3f} mm): missing slices?")
    pos = np.array([positions[i] for i in order], dtype=float)
    perp = (pos - pos[0]) - np.outer(d - d[0], normal)
    off = np.linalg.norm(perp, axis=1)
    if np.max(off) > _ABS_TOL_MM + 1e-3 * abs(d[-1] - d[0]):
        k = int(np.argmax(off))
        angle = np.degrees(np.arctan2(off[k], abs(d[k] - d[0]) or 1.0))
        return VolumeGeometryProblem("tilt", f"slice positions are not along the slice normal (sideways drift "
                                     f"{off[k]:.3f} mm over {abs(d[k] - d[0]):.1f} mm, about {angle:.2f} deg): "
                                     "gantry tilt or sheared stack")
    return None


@dataclass
class Slice:
    """One 2D frame: its header, geometry and (lazily) pixels."""

    ds: pydicom.Dataset
    path: Path
    frame: int | None  # index in a multi-frame instance, else None
    position: np.ndarray  # ImagePositionPatient (3,)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    spacing: tuple[float, float]  # PixelSpacing (row spacing, column spacing)
    slope: float
    intercept: float
    pixels: np.ndarray | None = None  # (rows, cols) stored values


@dataclass
class Series:
    data: np.ndarray
    affine_lps: np.ndarray
    datasets: list[pydicom.Dataset]
    files: list[Path]
    label: str
    modality: str
    slopes: np.ndarray
    intercepts: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def affine_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.affine_lps

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def voxel_size(self) -> np.ndarray:
        return np.linalg.norm(self.affine_lps[:3, :3], axis=0)


def _series_label(path: Path, ds: pydicom.Dataset | None) -> str:
    """A name for messages: folder plus series number/description (no UIDs, no patient data)."""
    label = str(path)
    if ds is not None:
        num = ds.get("SeriesNumber", None)
        desc = str(ds.get("SeriesDescription", "") or "").strip()
        extra = " ".join(x for x in (f"#{num}" if num not in (None, "") else "", f"'{desc}'" if desc else "") if x)
        if extra:
            label += f" (series {extra})"
    return label


def list_series_files(files_or_dir: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[Path], Path]:
    """The files of one series and the folder that names it in messages.

    `files_or_dir`: a folder (its non-hidden files, sorted by name; nothing read, so non-DICOM files
    are still listed, :func:`read_instances` skips them), one file, or a list of files (kept in the
    given order; the folder is the first file's). An empty folder or list, or a path that does not
    exist, is refused (`UserError`). Used by :func:`load_series` and :mod:`glandpet.dicom.ct_dcm2niix`."""
    if isinstance(files_or_dir, (str, os.PathLike)):
        p = Path(files_or_dir)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise UserError(f"{p}: no files in the series folder")
            return files, p
        if p.is_file():
            return [p], p.parent
        raise UserError(f"{p}: no such file or folder")
    files = [Path(f) for f in files_or_dir]
    if not files:
        raise UserError("no files given for the series")
    return files, files[0].parent


def _floats(value, n: int, what: str, label: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except Exception:
        raise UserError(f"{label}: {what} is not numeric ({value!r})") from None
    if arr.size != n:
        raise UserError(f"{label}: {what} has {arr.size} values, expected {n}")
    return arr


def _fg(ds: pydicom.Dataset, frame_item, seq_name: str):
    """Item of a functional-group macro, per-frame first, then shared."""
    if frame_item is not None and seq_name in frame_item:
        return frame_item[seq_name][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and seq_name in shared[0]:
        return shared[0][seq_name][0]
    return None


def _check_decodable(ds: pydicom.Dataset, label: str) -> None:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not ts.is_compressed:
        return
    try:
        from pydicom.pixels.decoders.base import get_decoder  # pydicom >= 3

        dec = get_decoder(ts)
        ok = dec.is_available
    except Exception:  # pragma: no cover - unknown syntax
        ok = False
    if not ok:
        raise UserError(
            f"{label}: pixel data use the compressed transfer syntax '{ts.name}' ({ts}), and no "
            f"decoder for it is installed (pylibjpeg / gdcm plugins); decompress the series first "
            f"(e.g. gdcmconv --raw or dcmdjpeg)"
        )


def slices_of_instance(ds: pydicom.Dataset, path: Path, label: str) -> list[Slice]:
    """The 2D slices of one image instance `ds` read from `path`: one for a classic image, one per
    frame for an enhanced multi-frame image (geometry and rescale from its per-frame / shared
    functional groups).

    Each :class:`Slice` carries the header, position, orientation, pixel spacing, rescale slope and
    intercept; pixels are not decoded (``Slice.pixels`` stays None). An instance that cannot be
    placed in patient space (missing position / orientation / spacing, a multi-frame image without
    per-frame functional groups) is refused (`UserError`, naming `label`, the series). Used by
    :func:`load_series` and :mod:`glandpet.dicom.ct_dcm2niix`."""
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        pffg = ds.PerFrameFunctionalGroupsSequence
        if len(pffg) != nframes:
            raise UserError(f"{label}: {path.name}: {len(pffg)} per-frame functional groups for {nframes} frames")
        for f in range(nframes):
            item = pffg[f]
            pos = _fg(ds, item, "PlanePositionSequence")
            ori = _fg(ds, item, "PlaneOrientationSequence")
            meas = _fg(ds, item, "PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                raise UserError(
                    f"{label}: enhanced multi-frame {path.name} lacks plane position, orientation or "
                    f"pixel measures for frame {f + 1}"
                )
            pvt = _fg(ds, item, "PixelValueTransformationSequence")
            slope = float(pvt.get("RescaleSlope", 1) if pvt is not None else ds.get("RescaleSlope", 1) or 1)
            icpt = float(pvt.get("RescaleIntercept", 0) if pvt is not None else ds.get("RescaleIntercept", 0) or 0)
            out.append(
                Slice(
                    ds=ds,
                    path=path,
                    frame=f,
                    position=_floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", label),
                    orientation=_floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", label),
                    spacing=tuple(_floats(meas.PixelSpacing, 2, "PixelSpacing", label)),
                    slope=slope,
                    intercept=icpt,
                )
            )
        return out
    if nframes > 1:
        raise UserError(
            f"{label}: {path.name} is a multi-frame image without per-frame functional groups "
            f"(NM-style or legacy multi-frame); not supported"
        )
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if key not in ds or ds.get(key) in (None, ""):
            raise UserError(f"{label}: {path.name} lacks {key}; cannot place the slice in patient space")
    slope = ds.get("RescaleSlope", 1)
    icpt = ds.get("RescaleIntercept", 0)
    return [
        Slice(
            ds=ds,
            path=path,
            frame=None,
            position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", label),
            orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", label),
            spacing=tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing", label)),
            slope=float(slope if slope not in (None, "") else 1.0),
            intercept=float(icpt if icpt not in (None, "") else 0.0),
        )
    ]


def read_instances(files: Sequence[Path], label_root: Path | str, headers_only: bool = False
                   ) -> tuple[list[tuple[Path, pydicom.Dataset]], list[str]]:
    """Read all DICOM image instances; skip non-DICOM and non-image objects."""
    out, notes = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=headers_only)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            notes.append(f"skipped {f.name}: not readable DICOM ({type(exc).__name__})")
            continue
        is_image = "Rows" in ds and "Columns" in ds if headers_only else (
            "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds)
        if not is_image:
            notes.append(f"skipped {f.name}: no pixel data ({ds.get('Modality', '?')})")
            continue
        out.append((f, ds))
    if not out:
        raise UserError(f"{label_root}: no DICOM image files found")
    return out, notes


def load_series(files_or_dir, *, read_pixels: bool = True, label: str | None = None) -> Series:
    """Read one series (folder or file list). See module docstring for the policy.

    `label`: how messages name the series (the workflow passes "sub-<id> ses-<session> PET series #N
    'description'", which has no path); default: the folder plus series number and description."""
    files, root = list_series_files(files_or_dir)
    instances, notes = read_instances(files, label or root, headers_only=not read_pixels)

    # One series only.
    by_uid: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for f, ds in instances:
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(by_uid) > 1:
        parts = []
        for uid, items in by_uid.items():
            ds0 = items[0][1]
            desc = str(ds0.get("SeriesDescription", "") or "").strip()
            parts.append(
                f"series #{ds0.get('SeriesNumber', '?')} {ds0.get('Modality', '?')} '{desc}' "
                f"({len(items)} files, UID ...{uid[-8:]})"
            )
        raise UserError(f"{label or root}: the folder mixes {len(by_uid)} series: " + "; ".join(parts)
                        + " — give one series per folder")
    label = label or _series_label(root, instances[0][1])

    # De-duplicate SOP instances.
    seen: dict[str, Path] = {}
    unique = []
    for f, ds in instances:
        sop = str(ds.get("SOPInstanceUID", "")) or f"file:{f}"
        if sop in seen:
            notes.append(f"duplicate SOP instance {f.name} (same as {seen[sop].name}) ignored")
            continue
        seen[sop] = f
        unique.append((f, ds))

    slices: list[Slice] = []
    for f, ds in unique:
        slices.extend(slices_of_instance(ds, f, label))

    # Consistency of orientation, spacing, matrix.
    o0 = slices[0].orientation
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - o0)) > _ORIENT_TOL:
            raise UserError(f"{label}: slices have different ImageOrientationPatient ({s.path.name}); not one volume")
        if np.max(np.abs(np.subtract(s.spacing, slices[0].spacing))) > 1e-4:
            raise UserError(f"{label}: slices have different PixelSpacing ({s.path.name})")
    shapes = {(int(s.ds.Rows), int(s.ds.Columns)) for s in slices}
    if len(shapes) > 1:
        raise UserError(f"{label}: slices have different matrix sizes {sorted(shapes)}")
    rows, cols = shapes.pop()

    r = o0[:3] / np.linalg.norm(o0[:3])
    c = o0[3:] / np.linalg.norm(o0[3:])
    if abs(float(r @ c)) > 1e-3:
        raise UserError(f"{label}: ImageOrientationPatient row and column cosines are not orthogonal")
    n = np.cross(r, c)
    n /= np.linalg.norm(n)
    modality = str(unique[0][1].get("Modality", ""))
    dist = np.array([float(s.position @ n) for s in slices])
    order = np.argsort(dist, kind="stable")
    slices = [slices[i] for i in order]
    dist = dist[order]

    if len(slices) > 1:
        problem = volume_geometry_problem(dist, [s.position for s in slices], n, names=[s.path.name for s in slices])
        if problem is not None:
            raise GeometryError(f"{label}: {problem.message}{_REFUSAL[problem.kind]}", problem.kind, modality)
        gaps = np.diff(dist)
        step = (dist[-1] - dist[0]) / (len(slices) - 1)
        dev = float(np.max(np.abs(gaps - step)))
        if dev > _ABS_TOL_MM:
            notes.append(f"slice spacing varies by up to {dev:.3f} mm around {step:.4f} mm (accepted; mean spacing used)")
        slice_vec = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    else:
        thick = float(slices[0].ds.get("SpacingBetweenSlices", 0) or slices[0].ds.get("SliceThickness", 0) or 1.0)
        slice_vec = n * thick
        notes.append("single slice: slice spacing taken from SpacingBetweenSlices/SliceThickness")

    row_sp, col_sp = slices[0].spacing
    aff = np.eye(4)
    aff[:3, 0] = r * col_sp
    aff[:3, 1] = c * row_sp
    aff[:3, 2] = slice_vec
    aff[:3, 3] = slices[0].position

    slopes = np.array([s.slope for s in slices])
    intercepts = np.array([s.intercept for s in slices])

    data = None
    if read_pixels:
        _check_decodable(unique[0][1], label)
        data = np.empty((cols, rows, len(slices)), dtype=np.float32)
        cache: dict[int, np.ndarray] = {}
        for k, s in enumerate(slices):
            try:
                if s.frame is None:
                    px = s.ds.pixel_array
                else:
                    key = id(s.ds)
                    if key not in cache:
                        cache[key] = s.ds.pixel_array
                    px = cache[key][s.frame] if cache[key].ndim == 3 else cache[key]
            except Exception as exc:
                ts = getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", "?")
                raise UserError(f"{label}: cannot decode pixels of {s.path.name} (transfer syntax {ts}): {exc}") from None
            if px.ndim != 2:
                raise UserError(f"{label}: {s.path.name}: unsupported pixel layout {px.shape} (colour/multi-sample?)")
            sl = px.T.astype(np.float32)
            if s.slope != 1.0:
                sl *= np.float32(s.slope)
            if s.intercept != 0.0:
                sl += np.float32(s.intercept)
            data[:, :, k] = sl
        cache.clear()

    # Drop pixel data from the kept headers (memory); headers follow the volume's slice order.
    if read_pixels:
        for _, ds in unique:
            if "PixelData" in ds:
                del ds.PixelData
    headers = [s.ds for s in slices]
    return Series(
        data=data,
        affine_lps=aff,
        datasets=headers,
        files=[s.path for s in slices],
        label=label,
        modality=str(unique[0][1].get("Modality", "")),
        slopes=slopes,
        intercepts=intercepts,
        notes=notes,
    )


def world_to_voxel(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) world points through the inverse of a 4x4 affine to voxel coordinates."""
    inv = np.linalg.inv(affine)
    return points @ inv[:3, :3].T + inv[:3, 3]

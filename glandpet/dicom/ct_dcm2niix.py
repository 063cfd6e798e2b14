"""CT series that glandpet's own reader refuses (gantry tilt, unequal slice spacing): the tilt is
corrected by glandpet from the DICOM geometry, the spacing made equidistant by dcm2niix through
nipype's ``Dcm2niix`` interface; both are placed and checked against the DICOM.

Why and when
------------
:func:`glandpet.dicom.series.load_series` refuses a stack whose slice positions drift off the slice
normal (gantry tilt) or whose slice gaps differ (a missing slice, mixed spacing): it never
resamples. For the CT that is too strict (the CT only serves registration and segmentation), so
:func:`glandpet.dicom.convert.convert_series` hands such a CT to :func:`convert_ct`. A PET is never
converted here (its SUV needs glandpet's reader); a stack both tilted and unequally spaced, or with
two instances at one position, stays refused.

Gantry tilt: glandpet's own de-shear (:func:`deshear`)
-------------------------------------------------------
The geometry of a tilted series is fully given by each slice's ImagePositionPatient and the
ImageOrientationPatient (a scanner writes column cosines (0, cos t, sin t) and positions that step
along the table only; GantryDetectorTilt is "not intended for mathematical computations"). The
slices are parallel planes; only their in-plane origins drift. Each slice is shifted within its
plane (linear interpolation along its rows / columns, ``scipy.ndimage.map_coordinates``) onto one
rectangular grid: axes the DICOM row, column and slice normal, spacings the PixelSpacing and the
mean gap between the planes, origin the smallest in-plane coordinate over all slices, so the grid
covers every slice (rows outside a slice's field are filled with the darkest value of the series,
at most -1024 HU). The values are not interpolated across slices.

Why not dcm2niix for the tilt. dcm2niix 1.0.20260724 (its ``_Tilt_1`` volume: each slice shifted
along its rows, linear) was run on 15 degree phantoms (both signs, GE and Philips slice order). It
estimates the tilt from the positions and orientation and ignores GantryDetectorTilt (its output was
byte-identical with the tag's sign flipped); its voxel data were right (the vectors between sphere
centroids within 0.4 mm of the truth), but its header origin was off by 24.6, 22.4, 14.6 and 0.1 mm
(a translation along the tilted column and slice axes; only Philips order at -15 deg was right).
Placing its grid from the DICOM extremes did not fix that (pixel correlations 0.21 / 0.78 / 0.21 /
0.79). glandpet's de-shear put the sphere centroids within 0.3 mm of the untilted truth in all four
cases; ``tests/test_ct_dcm2niix.py`` keeps dcm2niix as an independent check of its voxel data (the
inter-sphere vectors of both agree).

Unequal spacing: dcm2niix (through nipype)
-------------------------------------------
dcm2niix writes an equidistant copy (``*_Eq_1.nii``: slices re-interpolated at the smallest gap,
linear).

* The series' files are linked into a private temporary folder (dcm2niix converts whole folders),
  dcm2niix runs there with ``-b n`` (no BIDS JSON at all: even ``-ba y`` keeps InstitutionName,
  StationName and DeviceSerialNumber), ``-z n``, ``-m y``, ``-x n``; the folder is deleted
  afterwards, so nothing dcm2niix writes reaches the results. The NIfTI written to the results is
  glandpet's own (header text ``glandpet+dcm2niix``; dcm2niix puts the acquisition time in
  ``descrip``).
* Placement. dcm2niix's voxel axes are checked to be parallel to the DICOM row, column and
  slice-normal directions with the DICOM spacings; the grid origin is then placed from the DICOM
  positions (each output axis starts at the extreme pixel centre of the series along it: dcm2niix
  starts equidistant slices at the first one).

Check (both)
------------
The DICOM pixel values at the world positions of a sample of their pixel centres are compared with
the converted volume there (linear interpolation); a correlation below ``MIN_CORRELATION`` refuses
the conversion (the message gives it), so a converter that moved the data never yields a silently
misplaced CT.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from glandpet.dicom.series import list_series_files, read_instances, slices_of_instance
from glandpet.errors import UserError
from glandpet.geometry import LPS_TO_RAS, ras_to_lps

MIN_CORRELATION = 0.95  # DICOM pixels vs the converted volume at their world positions
_AXIS_TOL = 1e-3  # direction cosines / relative spacing


def dcm2niix_command() -> str:
    """Absolute path of the dcm2niix executable: the one the ``dcm2niix`` wheel ships, else PATH."""
    try:
        import dcm2niix  # the PyPI wheel: the binary sits in the package folder

        exe = Path(dcm2niix.bin)
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    except (ImportError, AttributeError):
        pass
    import shutil

    exe = shutil.which("dcm2niix")
    if exe is None:
        raise UserError("dcm2niix is not installed (pip install dcm2niix, or conda install -c conda-forge dcm2niix); "
                        "glandpet needs it to convert tilted or unequally spaced CT series")
    return exe


def dcm2niix_version() -> str:
    out = subprocess.run([dcm2niix_command(), "--version"], capture_output=True, text=True, timeout=60)
    for line in (out.stdout + out.stderr).splitlines():
        for word in line.split():
            if word.startswith("v1.") or word.startswith("v2."):
                return word
    return "unknown"


def run_dcm2niix(files: list[Path], workdir: Path, *, name: str = "img") -> tuple[list[Path], str]:
    """Run dcm2niix through nipype on exactly `files` (linked into ``workdir/in``); returns the NIfTI
    files it wrote (in ``workdir/out``) and its standard output. No BIDS sidecar is written."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network on import
    from nipype.interfaces.dcm2nii import Dcm2niix

    src, out = workdir / "in", workdir / "out"
    src.mkdir(parents=True)
    out.mkdir()
    for i, f in enumerate(files):
        os.symlink(Path(f).resolve(), src / f"{i:05d}.dcm")
    exe = dcm2niix_command()
    conv = Dcm2niix(source_dir=str(src), output_dir=str(out), out_filename=name, bids_format=False,
                    compress="n", merge_imgs=1, crop=False, single_file=False, has_private=False, verbose=False,
                    name_conflicts=1)
    conv.inputs.environ = {"PATH": os.path.dirname(exe) + os.pathsep + os.environ.get("PATH", "")}
    try:
        res = conv.run(cwd=str(workdir))
        stdout = res.runtime.stdout or ""
    except Exception as exc:  # noqa: BLE001 - nipype wraps a failing command in a RuntimeError
        raise UserError(f"dcm2niix failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from None
    return sorted(out.glob("*.nii")), stdout


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _read_dicom(files, label: str):
    """Slices of one classic single-frame series with pixels in HU, and their geometry."""
    paths, root = list_series_files(files)
    insts, _ = read_instances(paths, label or root)
    slices = []
    for f, ds in insts:
        slices.extend(slices_of_instance(ds, f, label))
    if any(s.frame is not None for s in slices):
        raise UserError(f"{label}: a multi-frame series cannot be converted through dcm2niix here")
    for s in slices:
        try:
            s.pixels = s.ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - undecodable pixels: say which file
            raise UserError(f"{label}: cannot decode pixels of {s.path.name}: {exc}") from None
    o0 = slices[0].orientation
    r, c = _unit(o0[:3]), _unit(o0[3:])
    n = _unit(np.cross(r, c))
    slices.sort(key=lambda s: float(s.position @ n))
    return slices, r, c, n


def placed_affine(img_affine_ras: np.ndarray, shape, slices, r, c, n, expected_slice_mm: float, label: str) -> np.ndarray:
    """The LPS affine of dcm2niix's output grid from the DICOM geometry (see the module docstring):
    axes checked parallel to the DICOM row / column / normal with the DICOM spacings, origin at the
    series' extreme pixel centre along each axis."""
    a = ras_to_lps(img_affine_ras)
    row_sp, col_sp = slices[0].spacing
    dicom_axes = {"row": (r, col_sp), "column": (c, row_sp), "normal": (n, expected_slice_mm)}
    rows, cols = int(slices[0].ds.Rows), int(slices[0].ds.Columns)
    corners = []
    for s in slices:
        for i in (0, cols - 1):
            for j in (0, rows - 1):
                corners.append(s.position + i * col_sp * r + j * row_sp * c)
    corners = np.array(corners)
    out = np.eye(4)
    used = set()
    for ax in range(3):
        v = a[:3, ax]
        u = _unit(v)
        name = next((k for k, (d, _) in dicom_axes.items() if abs(abs(float(u @ d)) - 1.0) < _AXIS_TOL), None)
        if name is None or name in used:
            raise UserError(f"{label}: dcm2niix's voxel axis {ax} {np.round(u, 4).tolist()} is not along the DICOM "
                            "row, column or slice normal; not converted")
        used.add(name)
        d, sp = dicom_axes[name]
        if abs(np.linalg.norm(v) - sp) > _AXIS_TOL * sp + 1e-3:
            raise UserError(f"{label}: dcm2niix's voxel size along the {name} direction is {np.linalg.norm(v):.4f} mm, "
                            f"the DICOM gives {sp:.4f} mm; not converted")
        unit = d if float(u @ d) > 0 else -d
        out[:3, ax] = unit * sp
        out[:3, 3] += unit * float(np.min(corners @ unit))
    return out


def deshear(slices, r, c, n) -> tuple[np.ndarray, np.ndarray, float]:
    """glandpet's gantry-tilt correction (module docstring): (HU volume (x, y, z) float32, its LPS
    affine, fill value). `slices` sorted along `n`, equally spaced along it (load_series' tolerance),
    pixels decoded; each slice is shifted within its own plane onto one rectangular grid."""
    from scipy.ndimage import map_coordinates

    row_sp, col_sp = slices[0].spacing  # between rows (along c), between columns (along r)
    rows, cols = slices[0].pixels.shape
    pos = np.array([s.position for s in slices], dtype=float)
    a_r, a_c, dist = pos @ r, pos @ c, pos @ n
    step = float(dist[-1] - dist[0]) / (len(slices) - 1)
    r0, c0 = float(a_r.min()), float(a_c.min())
    ncols = cols + int(np.ceil((a_r.max() - r0) / col_sp - 1e-6))
    nrows = rows + int(np.ceil((a_c.max() - c0) / row_sp - 1e-6))
    hu = [s.pixels.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept) for s in slices]
    fill = float(min(-1024.0, min(float(h.min()) for h in hu)))
    jj, ii = np.mgrid[0:nrows, 0:ncols].astype(np.float64)
    out = np.empty((ncols, nrows, len(slices)), np.float32)
    for k, (s, h) in enumerate(zip(slices, hu)):
        # output pixel (ii, jj) of plane k = input pixel (ii + (r0 - a_r[k]) / col_sp, jj + (c0 - a_c[k]) / row_sp)
        coords = np.array([jj + (c0 - a_c[k]) / row_sp, ii + (r0 - a_r[k]) / col_sp])
        out[:, :, k] = map_coordinates(h, coords, order=1, mode="constant", cval=fill, prefilter=False).T
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = r * col_sp, c * row_sp, n * step
    aff[:3, 3] = r0 * r + c0 * c + float(dist[0]) * n
    return out, aff, fill


def sample_check(data: np.ndarray, affine_lps: np.ndarray, slices, r, c, *, n_max: int = 40000,
                 seed: int = 0) -> tuple[float, float, int]:
    """(correlation, median |difference| in HU, n) between DICOM pixel values and `data` (linear
    interpolation) at the world positions of a random sample of DICOM pixel centres (all but each
    slice's outermost rows and columns)."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(seed)
    row_sp, col_sp = slices[0].spacing
    per = max(1, n_max // len(slices))
    inv = np.linalg.inv(affine_lps)
    got, want = [], []
    for s in slices:
        px = s.pixels
        # not the outermost row / column: the tilt-corrected grid holds the fill value half a voxel
        # beyond a slice's field, and interpolating there mixes it in (a boundary effect, not a misplacement)
        jj = rng.integers(1, px.shape[0] - 1, per)
        ii = rng.integers(1, px.shape[1] - 1, per)
        w = s.position[None, :] + ii[:, None] * col_sp * r[None, :] + jj[:, None] * row_sp * c[None, :]
        vox = w @ inv[:3, :3].T + inv[:3, 3]
        inside = np.all((vox > -0.01) & (vox < np.array(data.shape) - 0.99), axis=1)
        if not inside.any():
            continue
        got.append(map_coordinates(data, vox[inside].T, order=1, mode="nearest"))
        want.append(px[jj[inside], ii[inside]] * s.slope + s.intercept)
    if not got:
        return float("nan"), float("nan"), 0
    g, w = np.concatenate(got).astype(float), np.concatenate(want).astype(float)
    if g.std() == 0 or w.std() == 0:
        corr = 1.0 if np.allclose(g, w) else 0.0
    else:
        corr = float(np.corrcoef(g, w)[0, 1])
    return corr, float(np.median(np.abs(g - w))), int(g.size)


def convert_ct(files_or_dir, out_nii, *, label: str, kind: str) -> dict[str, Any]:
    """Convert a CT series refused by glandpet's reader for `kind`: "tilt" (glandpet's :func:`deshear`)
    or "unequal_spacing" (dcm2niix through nipype); write `out_nii` and its sidecar like
    :func:`glandpet.dicom.convert.convert_series` (same fields; ``ConversionSoftware`` names what converted,
    ``ConversionNotes`` what was corrected and the check against the DICOM)."""
    import nibabel as nib

    from glandpet.dicom.convert import _clean_str, write_outputs

    if kind not in ("tilt", "unequal_spacing"):
        raise ValueError(kind)
    slices, r, c, n = _read_dicom(files_or_dir, label)
    if len(slices) < 3:
        raise UserError(f"{label}: tilt or spacing is corrected only with at least 3 slices ({len(slices)} here)")
    ds = slices[0].ds
    dist = np.array([float(s.position @ n) for s in slices])
    gaps = np.diff(dist)
    if kind == "tilt":
        drift = np.array([np.linalg.norm((s.position - slices[0].position) - (d - dist[0]) * n)
                          for s, d in zip(slices, dist)])
        angle = float(np.degrees(np.arctan2(drift[-1], dist[-1] - dist[0])))
        for s in slices:
            s.pixels = s.pixels.astype(np.float32)  # decoded once; deshear and the check read them
        data, aff, fill = deshear(slices, r, c, n)
        note = (f"gantry tilt {angle:.1f} deg corrected by glandpet from the slice positions (each slice "
                f"shifted within its plane onto a rectangular grid, linear; outside a slice's field: {fill:.0f} HU)")
        version, software, expected = None, "glandpet", None
    else:
        mn = float(gaps.min())
        k = int(np.ceil((dist[-1] - dist[0] - 0.5 * gaps[-1]) / mn))  # dcm2niix's count (nii_saveNII3Deq)
        if k > 2 * len(slices):
            k = 2 * len(slices)
            mn = (dist[-1] - dist[0]) / (k - 1)
        expected = mn
        note = (f"unequal slice spacing ({gaps.min():.1f}-{gaps.max():.1f} mm) resampled by dcm2niix to "
                f"{mn:.3f} mm slices (linear)")
        version, software = dcm2niix_version(), "dcm2niix (nipype Dcm2niix) + glandpet"
        with tempfile.TemporaryDirectory(prefix="glandpet-dcm2niix-") as tmp:
            written, stdout = run_dcm2niix([s.path for s in slices], Path(tmp), name="ct")
            pick = [f for f in written if "_Eq" in f.name and "_Tilt" not in f.name]
            if len(pick) != 1:
                tail = " / ".join(x.strip() for x in stdout.splitlines()[-4:] if x.strip())
                raise UserError(f"{label}: dcm2niix wrote no equidistant volume (files: "
                                f"{', '.join(f.name for f in written) or 'none'}; it said: {tail})")
            img = nib.load(pick[0])
            data = np.asarray(img.get_fdata(dtype=np.float32))
            own = img.affine.copy()
        if data.ndim != 3:
            raise UserError(f"{label}: dcm2niix wrote a {data.ndim}-D volume; expected one 3-D CT")
        aff = placed_affine(own, data.shape, slices, r, c, n, expected, label)
    what = "tilt-corrected" if kind == "tilt" else "equidistant"
    corr, mad, n_pts = sample_check(data, aff, slices, r, c)
    if not corr >= MIN_CORRELATION:
        raise UserError(f"{label}: the {what} volume does not match the DICOM at the pixels' world positions "
                        f"(correlation {corr:.3f} < {MIN_CORRELATION} over {n_pts} pixels); not converted")
    check = (f"DICOM pixels vs the volume: correlation {corr:.4f}, median |difference| {mad:.1f} HU "
             f"({n_pts} pixels)")
    if kind == "tilt":
        notes = [note, check]
    else:
        off = float(np.linalg.norm((LPS_TO_RAS @ aff)[:3, 3] - own[:3, 3]))
        notes = [note, f"grid placed from the DICOM positions (dcm2niix's own origin differed by {off:.2f} mm); "
                       + check]
    slopes = np.array([s.slope for s in slices])
    icpts = np.array([s.intercept for s in slices])
    if (np.all(slopes == np.round(slopes)) and np.all(icpts == np.round(icpts)) and np.all(data == np.round(data))
            and data.min() >= -32768 and data.max() <= 32767):
        out = data.astype(np.int16)
    else:
        out = data
    sidecar: dict[str, Any] = {
        "Modality": "CT",
        "Manufacturer": _clean_str(ds.get("Manufacturer")),
        "ManufacturersModelName": _clean_str(ds.get("ManufacturerModelName")),
        "SoftwareVersions": _clean_str(ds.get("SoftwareVersions")),
        "SeriesNumber": int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        "ImageOrientationPatientDICOM": [float(x) for x in ds.ImageOrientationPatient],
        "VoxelSizeMm": [round(float(x), 6) for x in np.linalg.norm(aff[:3, :3], axis=0)],
        "SliceThickness": float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
        "ConversionSoftware": software,
        "ConversionSoftwareVersion": version,
        "ConversionNotes": notes,
        "Units": "HU",
    }
    write_outputs(out, LPS_TO_RAS @ aff, sidecar, Path(out_nii),
                  descrip=b"glandpet" if kind == "tilt" else b"glandpet+dcm2niix")
    return {k: v for k, v in sidecar.items() if v is not None}

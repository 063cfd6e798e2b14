"""Convert one DICOM series to NIfTI + a JSON sidecar without identifiers.

- CT: int16 HU when every slice's rescale gives exact integers in range, else float32 HU.
- PET: float32 Bq/mL (`suv='none'`), or the SUV of the requested type (g/mL; cm2/mL for bsa),
  whatever units the series is stored in (see glandpet.suv.factors).
- Other modalities: float32 rescaled values.
- A CT that glandpet's reader refuses for gantry tilt or unequal slice spacing is converted by
  glandpet.dicom.ct_dcm2niix (tilt: each slice shifted within its plane from the slice positions;
  spacing: slices made equidistant by dcm2niix through nipype; both checked against the DICOM
  pixels); its sidecar's ConversionNotes say what was corrected. A PET is never
  resampled: a tilted or irregular PET stays refused.
- The NIfTI affine is RAS: diag(-1,-1,1,1) @ affine_lps (qform = sform, code 1 scanner).

Sidecar (PET-BIDS names). Times follow the PET-BIDS convention: seconds relative to
`TimeZero`, which we set to the scan start (decay reference for START) so that `ScanStart` = 0
and `InjectionStart` is negative; `TimeZero` and the clock times are given as time of day
(hh:mm:ss, no date) — PET-BIDS wants TimeZero as a time; no calendar date is written.
No patient name, id, birth date, accession, institution, physician, UIDs or dates are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from glandpet.dicom.series import GeometryError, Series, load_series
from glandpet.errors import SUVError, UserError
from glandpet.suv.factors import SUV_CHOICES, suv_result
from glandpet.tables import atomic_path
from glandpet.writers import chmod_default, nifti_image, write_nifti



def _sidecar_path(out_nii: Path) -> Path:
    from glandpet.layout import beside

    try:
        return Path(beside(out_nii, ".json"))
    except ValueError:  # not a NIfTI name: the sidecar is the name + .json
        return out_nii.with_name(out_nii.name + ".json")


def _clean_str(v) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _tracer(ds) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        return out
    rp = seq[0]
    name = _clean_str(rp.get("Radiopharmaceutical"))
    code = rp.get("RadiopharmaceuticalCodeSequence")
    if not name and code:
        name = _clean_str(code[0].get("CodeMeaning"))
    if name:
        out["TracerName"] = name
    nuc = rp.get("RadionuclideCodeSequence")
    if nuc:
        meaning = _clean_str(nuc[0].get("CodeMeaning"))
        if meaning:
            # '^18^Fluorine' -> 'F18'
            import re

            m = re.search(r"\^(\d+)\^\s*([A-Za-z]+)", meaning) or re.match(r"(\d+)\s*([A-Za-z]+)", meaning)
            sym = {"fluorine": "F", "gallium": "Ga", "carbon": "C", "oxygen": "O", "nitrogen": "N",
                   "zirconium": "Zr", "copper": "Cu", "rubidium": "Rb", "iodine": "I", "yttrium": "Y"}
            if m and m.group(2).lower() in sym:
                out["TracerRadionuclide"] = f"{sym[m.group(2).lower()]}{m.group(1)}"
            else:
                out["TracerRadionuclide"] = meaning
    return out


def _tod(dt) -> str | None:
    return dt.strftime("%H:%M:%S") if dt is not None else None


def _pet_sidecar(series: Series, res, suv: str, applied: Any) -> dict[str, Any]:
    ds = series.datasets[0]
    sc: dict[str, Any] = {}
    sc.update(_tracer(ds))
    if res.dose_bq is not None:
        sc["InjectedRadioactivity"] = round(res.dose_bq / 1e6, 4)
        sc["InjectedRadioactivityUnits"] = "MBq"
    if res.half_life_s:
        sc["RadionuclideHalfLife"] = res.half_life_s
    t0 = res.scan_time
    if t0 is not None:
        sc["TimeZero"] = _tod(t0)
        sc["ScanStart"] = 0.0
        if res.injection_time is not None:
            sc["InjectionStart"] = -(t0 - res.injection_time).total_seconds()
            sc["InjectionStartTime"] = _tod(res.injection_time)
    dc = res.decay_correction
    sc["ImageDecayCorrected"] = dc != "NONE"
    if dc == "START":
        sc["ImageDecayCorrectionTime"] = 0.0
    elif dc == "ADMIN" and t0 is not None and res.injection_time is not None:
        sc["ImageDecayCorrectionTime"] = -(t0 - res.injection_time).total_seconds()
    df = ds.get("DecayFactor")
    if df not in (None, ""):
        sc["DecayCorrectionFactor"] = [float(df)]
    afd = ds.get("ActualFrameDuration")
    if afd not in (None, ""):
        sc["FrameDuration"] = [float(afd) / 1000.0]
        sc["FrameTimesStart"] = [0.0]
    sc["ReconMethodName"] = _clean_str(ds.get("ReconstructionMethod"))
    kernel = ds.get("ConvolutionKernel")
    if kernel:
        from glandpet.measure.pvc import recon_filter_from_kernel

        sc["ConvolutionKernel"] = kernel if isinstance(kernel, str) else "\\".join(str(k) for k in kernel)
        filt = recon_filter_from_kernel(kernel)
        if filt is not None:
            sc["ReconFilterType"], sc["ReconFilterSize"] = filt[0], filt[1]
    ci = ds.get("CorrectedImage")
    if ci:
        ci = [str(x) for x in (ci if not isinstance(ci, str) else [ci])]
        sc["AttenuationCorrection"] = "ATTN" in ci
        sc["CorrectedImage"] = ci
    sc["AttenuationCorrectionMethodReference"] = _clean_str(ds.get("AttenuationCorrectionMethod"))
    sc["ScatterCorrectionMethod"] = _clean_str(ds.get("ScatterCorrectionMethod"))
    sc["RandomsCorrectionMethod"] = _clean_str(ds.get("RandomsCorrectionMethod"))
    sc["DicomUnits"] = res.units
    sc["DicomDecayCorrection"] = dc
    if res.weight_kg is not None:
        sc["BodyWeight"] = round(res.weight_kg, 3)
        sc["BodyWeightUnits"] = "kg"
    if res.height_m is not None:
        sc["BodyHeight"] = round(res.height_m, 3)
        sc["BodyHeightUnits"] = "m"
    sc["SUVFactors"] = res.as_json()
    sc["SUVFactors"].pop("scan_time", None)
    sc["SUVFactors"].pop("injection_time", None)
    sc["SUVType"] = suv
    sc["AppliedFactor"] = applied
    if suv == "none":
        sc["Units"] = "Bq/mL"
    elif suv == "bsa":
        sc["Units"] = "cm2/mL"
    else:
        sc["Units"] = "g/mL"
    return {k: v for k, v in sc.items() if v is not None}


def _factor_array(f, n: int) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim == 0:
        return np.full(n, float(a))
    return a


def convert_series(files_or_dir, out_nii, suv: str = "none", *, label: str | None = None) -> dict[str, Any]:
    """Convert one series to `out_nii` (+ sidecar .json beside it); returns the sidecar dict.
    `label`: how error messages name the series (see :func:`glandpet.dicom.series.load_series`).
    Each file is written under a temporary name and renamed when complete (never left half-written)."""
    out_nii = Path(out_nii)
    if suv not in ("none", *SUV_CHOICES):
        raise UserError(f"--suv {suv!r}: expected one of none, {', '.join(SUV_CHOICES)}")
    try:
        series = load_series(files_or_dir, label=label)
    except GeometryError as exc:
        if exc.modality != "CT" or exc.kind not in ("tilt", "unequal_spacing"):
            raise  # a tilted or irregular PET keeps its refusal (SUV needs glandpet's reader)
        from glandpet.dicom.ct_dcm2niix import convert_ct

        return convert_ct(files_or_dir, out_nii, label=label or _folder_label(files_or_dir), kind=exc.kind)
    ds = series.datasets[0]
    modality = series.modality
    data = series.data
    n = data.shape[2]
    sidecar: dict[str, Any] = {
        "Modality": modality,
        "Manufacturer": _clean_str(ds.get("Manufacturer")),
        "ManufacturersModelName": _clean_str(ds.get("ManufacturerModelName")),
        "SoftwareVersions": _clean_str(ds.get("SoftwareVersions")),
        "SeriesNumber": int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        "ImageOrientationPatientDICOM": [float(x) for x in ds.ImageOrientationPatient] if "ImageOrientationPatient" in ds else None,
        "VoxelSizeMm": [round(float(x), 6) for x in series.voxel_size],
        "SliceThickness": float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
        "ConversionSoftware": "glandpet",
        "ConversionNotes": series.notes or None,
    }
    if modality == "PT":
        if suv == "none":
            res = None
            try:
                res = suv_result(series.datasets, series.label)
            except SUVError:
                res = None
            units = str(ds.get("Units", "") or "").upper()
            if units == "BQML":
                applied = 1.0
            elif res is not None and res.bqml_factor is not None:
                applied = res.bqml_factor
            else:
                raise SUVError(
                    f"{series.label}: cannot express Units '{units or 'missing'}' in Bq/mL "
                    f"(needs the dose, decay times and body size of the stored SUV type)"
                )
            if res is None:
                # BQML series with an incomplete SUV header: still a valid Bq/mL image
                sidecar.update({"Units": "Bq/mL", "DicomUnits": units, "SUVFactors": None, "SUVType": "none",
                                "AppliedFactor": 1.0})
                sidecar.update(_tracer(ds))
            else:
                sidecar.update(_pet_sidecar(series, res, suv, applied))
        else:
            res = suv_result(series.datasets, series.label)
            key = SUV_CHOICES[suv]
            applied = res.factors[key]
            if applied is None or (isinstance(applied, list) and any(x is None for x in applied)):
                missing = "PatientSize" if key in ("suvbsa",) else "PatientSex/PatientSize"
                raise SUVError(f"{series.label}: SUV type '{suv}' needs {missing} (0010,0040/1020); missing or not usable")
            sidecar.update(_pet_sidecar(series, res, suv, res.as_json()[key]))
        fac = _factor_array(applied, n).astype(np.float32)
        if np.any(fac != 1.0):
            data = data * fac[None, None, :]
        out = data.astype(np.float32, copy=False)
    elif modality == "CT":
        sidecar["Units"] = "HU"
        if (np.all(series.slopes == np.round(series.slopes)) and np.all(series.intercepts == np.round(series.intercepts))
                and data.min() >= -32768 and data.max() <= 32767):
            out = data.astype(np.int16)
        else:
            out = data
    else:
        out = data
    sidecar = {k: v for k, v in sidecar.items() if v is not None}
    write_outputs(out, series.affine_ras, sidecar, out_nii)
    return sidecar


def _folder_label(files_or_dir) -> str:
    """How messages name a series given without a label: its folder (as load_series does)."""
    if isinstance(files_or_dir, (str, os.PathLike)):
        p = Path(files_or_dir)
        return str(p if p.is_dir() else p.parent)
    first = next(iter(files_or_dir), None)
    return str(Path(first).parent) if first is not None else "series"


def write_outputs(data: np.ndarray, affine_ras: np.ndarray, sidecar: dict[str, Any], out_nii: Path,
                  descrip: bytes = b"glandpet") -> None:
    """Write the NIfTI (RAS affine as qform = sform, code 1) and its sidecar JSON, each atomically."""
    img = nifti_image(data, affine_ras, descrip=descrip)
    sidecar = {k: v for k, v in sidecar.items() if v is not None}
    write_nifti(img, out_nii)
    side = _sidecar_path(out_nii)
    tmp = atomic_path(side)
    try:
        tmp.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
        chmod_default(tmp)
        os.replace(tmp, side)
    finally:
        if tmp.exists():
            tmp.unlink()


def run_convert(args) -> int:
    sc = convert_series(args.series_dir, args.output, suv=args.suv)
    print(f"wrote {args.output} ({sc.get('Modality')}, {sc.get('Units', '')})")
    return 0

"""SUV factors of a PET series: the QIBA vendor-neutral pseudocode as extended by the IBSI SUV
manual (Vacha et al., oncoray/suv_computation).

The core (`compute_suv`) is pure: it works on a plain header dict (`header_from_datasets`
extracts one from pydicom datasets). Keys are DICOM keywords; per-slice values are lists in the
volume's slice order (a scalar means "the same for every slice"):

    Units, DecayCorrection, CorrectedImage, SUVType, SeriesDate, SeriesTime,
    AcquisitionDate[], AcquisitionTime[], AcquisitionDateTime[], FrameReferenceTime[] (ms),
    ActualFrameDuration[] (ms), GEScanDateTime (0009,100D), PhilipsSUVFactor (7053,1000),
    PhilipsActivityFactor (7053,1009), RadiopharmaceuticalStartDateTime,
    RadiopharmaceuticalStartTime, RadionuclideTotalDose, RadionuclideHalfLife,
    PatientWeight, PatientSize, PatientSex, series (a name for messages).

Rules (each decision is appended to `rule`):
- CorrectedImage must hold ATTN, and DECY unless DecayCorrection is NONE.
- Scan time (reference of decay correction START): SeriesDate/Time; when the series time is
  after the earliest acquisition time: GE private (0009,100D); else the IBSI back-computation
  acquisition start + decay-weighted mid-frame time - FrameReferenceTime (per slice; earliest
  kept) where FrameReferenceTime and ActualFrameDuration exist; else the earliest acquisition.
- DecayCorrection ADMIN: no decay (image already referred to the injection time).
- DecayCorrection NONE: each slice decays to its own frame: acquisition start + decay-weighted
  mid-frame time (IBSI/MIRP; frame start when ActualFrameDuration is absent). Factors are then
  per slice: the JSON shows a list (one value per slice, in the NIfTI k order) unless all values
  are equal, when it shows one number.
- Injection: RadiopharmaceuticalStartDateTime; else RadiopharmaceuticalStartTime on the series
  date, moved one day back if it falls after the scan (midnight crossing). Uptake time negative
  or longer than ten half-lives is an error.
- Dose below 1e4 is taken as MBq (x 1e6). Weight above 350 is taken as grams. Size above 3 is
  taken as centimetres.
- Units: BQML; CNTS with Philips 7053,1009 (activity scale -> Bq/mL) or 7053,1000 (SUVbw scale);
  CNTS without either is refused; GML with SUVType (BW default, LBM, LBMJAMES128, LBMJANMA, IBW,
  BSA); CM2ML (SUVbsa). Stored SUV of any type converts to any other type by the ratio of the
  body-size normalisers (the dose and decay cancel).
- Body size: weight (g); BSA Du Bois 0.007184 W^0.425 H^0.725 (cm2); LBM James 1.10W-128(W/H)^2
  (M), 1.07W-148(W/H)^2 (F); LBM Janmahasatian 9270W/(6680+216BMI) (M), 9270W/(8780+244BMI) (F);
  IBW 48.0+1.06(H-152) (M), 45.5+0.91(H-152) (F) (H in cm, as MIRP/IBSI). Sex 'O' (other)
  uses the mean of the male and female formulas (IBSI DRO_2_2 / MIRP); sex absent or any other
  code makes LBM and IBW null. A factor the header cannot support is null.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from glandpet.errors import SUVError

FACTOR_KEYS = ("suvbw", "suvbsa", "suvlbm_james", "suvlbm_janmahasatian", "suvibw")
SUV_CHOICES = {"bw": "suvbw", "bsa": "suvbsa", "lbm": "suvlbm_james", "lbm_janmahasatian": "suvlbm_janmahasatian", "ibw": "suvibw"}
# SUVType (0054,1006) -> our body-size key
_SUVTYPE = {"BW": "suvbw", "BSA": "suvbsa", "LBM": "suvlbm_james", "LBMJAMES128": "suvlbm_james",
            "LBMJANMA": "suvlbm_janmahasatian", "IBW": "suvibw"}

MAX_HALF_LIVES = 10.0


# ----------------------------------------------------------------------------- time parsing
def parse_da_tm(date: str | None, time: str | None) -> datetime | None:
    """DICOM DA + TM -> datetime (None if either is missing)."""
    if not date or not time:
        return None
    date = str(date).strip().replace(".", "").replace("-", "")
    t = parse_tm(time)
    if t is None or len(date) < 8:
        return None
    try:
        d = datetime(int(date[:4]), int(date[4:6]), int(date[6:8]))
    except ValueError:
        return None
    return d + timedelta(seconds=t)


def parse_tm(time: str | None) -> float | None:
    """DICOM TM 'HHMMSS.frac' (or 'HH:MM:SS') -> seconds after midnight."""
    if time is None:
        return None
    s = str(time).strip().replace(":", "")
    if not s:
        return None
    try:
        hh = int(s[0:2])
        mm = int(s[2:4]) if len(s) >= 4 else 0
        ss = float(s[4:]) if len(s) > 4 else 0.0
    except ValueError:
        return None
    return hh * 3600 + mm * 60 + ss


def parse_dt(value: str | None) -> datetime | None:
    """DICOM DT 'YYYYMMDDHHMMSS.frac[+ZZZZ]' -> naive datetime (offset ignored)."""
    if not value:
        return None
    s = str(value).strip()
    for sign in ("+", "-"):
        if sign in s[8:]:
            s = s[: 8 + s[8:].index(sign)]
    if len(s) < 8:
        return None
    return parse_da_tm(s[:8], s[8:] or "000000")


# ----------------------------------------------------------------------------- body size
def body_sizes(weight_kg: float | None, height_cm: float | None, sex: str | None) -> dict[str, float | None]:
    """Normalisers (g, or cm2 for BSA) for every SUV type; None where inputs are missing."""
    out: dict[str, float | None] = {k: None for k in FACTOR_KEYS}
    if not weight_kg or weight_kg <= 0:
        return out
    w = weight_kg
    out["suvbw"] = w * 1000.0
    if not height_cm or height_cm <= 0:
        return out
    h = height_cm
    out["suvbsa"] = 0.007184 * w**0.425 * h**0.725 * 1e4
    bmi = w / (h / 100.0) ** 2
    male = {
        "suvlbm_james": 1.10 * w - 128.0 * (w / h) ** 2,
        "suvlbm_janmahasatian": 9270.0 * w / (6680.0 + 216.0 * bmi),
        "suvibw": 48.0 + 1.06 * (h - 152.0),
    }
    female = {
        "suvlbm_james": 1.07 * w - 148.0 * (w / h) ** 2,
        "suvlbm_janmahasatian": 9270.0 * w / (8780.0 + 244.0 * bmi),
        "suvibw": 45.5 + 0.91 * (h - 152.0),
    }
    s = (sex or "").strip().upper()
    for k in male:
        if s == "M":
            v = male[k]
        elif s in ("F", "W"):
            v = female[k]
        elif s == "O":
            v = 0.5 * (male[k] + female[k])
        else:
            v = None
        out[k] = v * 1000.0 if v is not None and v > 0 else None
    return out


def mid_frame_offset(duration_s: float, half_life_s: float) -> float:
    """Decay-weighted mean time within a frame of `duration_s` (s from the frame start)."""
    if not duration_s or duration_s <= 0:
        return 0.0
    lam = math.log(2.0) / half_life_s
    x = lam * duration_s
    return math.log(x / (1.0 - math.exp(-x))) / lam


# ----------------------------------------------------------------------------- core
@dataclass
class SUVResult:
    factors: dict[str, Any]  # suv key -> float | list[float] | None
    bqml_factor: Any  # rescaled pixel -> Bq/mL (float | list | None)
    units: str
    decay_correction: str
    scan_time: datetime | None
    injection_time: datetime | None
    rule: list[str] = field(default_factory=list)
    dose_bq: float | None = None
    half_life_s: float | None = None
    weight_kg: float | None = None
    height_m: float | None = None
    decay_factor: Any = None  # decay from injection to the decay reference (per slice for NONE)
    stored_suv_type: str | None = None

    def as_json(self) -> dict[str, Any]:
        d = {k: _compact(self.factors.get(k)) for k in FACTOR_KEYS}
        d.update(
            units=self.units,
            decay_correction=self.decay_correction,
            scan_time=self.scan_time.isoformat() if self.scan_time else None,
            injection_time=self.injection_time.isoformat() if self.injection_time else None,
            rule="; ".join(self.rule),
        )
        return d


def _compact(v):
    if isinstance(v, list):
        if all(x is None for x in v):
            return None
        if len(set(v)) == 1:
            return v[0]
    return v


def _per_slice(h: Mapping, key: str, n: int) -> list:
    v = h.get(key)
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{key}: {len(v)} values for {n} slices")
        return list(v)
    return [v] * n


def _num(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


_PER_SLICE_KEYS = ("AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "FrameReferenceTime",
                   "ActualFrameDuration")


def _n_slices(h: Mapping) -> int:
    for k in _PER_SLICE_KEYS:
        v = h.get(k)
        if isinstance(v, (list, tuple)):
            return len(v)
    return 1


def compute_suv(h: Mapping[str, Any]) -> SUVResult:
    """SUV factors from a header dict (see module docstring). Raises SUVError naming the field."""
    name = h.get("series") or "PET series"
    rule: list[str] = []

    def fail(msg: str):
        raise SUVError(f"{name}: {msg}")

    n = _n_slices(h)
    units = str(h.get("Units") or "").strip().upper()
    if not units:
        fail("Units (0054,1001) missing; cannot tell Bq/mL from counts or SUV")
    dc = str(h.get("DecayCorrection") or "").strip().upper()
    if not dc:
        fail("DecayCorrection (0054,1102) missing")
    if dc not in ("START", "ADMIN", "NONE"):
        fail(f"DecayCorrection (0054,1102) is '{dc}', expected START, ADMIN or NONE")
    ci = h.get("CorrectedImage")
    ci = [str(x).strip().upper() for x in (ci if isinstance(ci, (list, tuple)) else ([ci] if ci else []))]
    if "ATTN" not in ci:
        fail(f"CorrectedImage (0028,0051) lacks ATTN (has {ci or 'nothing'}): not attenuation corrected")
    if dc != "NONE" and "DECY" not in ci:
        fail(f"CorrectedImage (0028,0051) lacks DECY while DecayCorrection is {dc}")

    # --- body size
    w = _num(h.get("PatientWeight"))
    if w is not None and w > 350:
        w /= 1000.0
        rule.append("PatientWeight > 350 read as grams")
    if w is not None and w <= 0:
        w = None
    hgt = _num(h.get("PatientSize"))
    if hgt is not None and hgt > 3:
        hgt /= 100.0
        rule.append("PatientSize > 3 read as cm")
    if hgt is not None and hgt <= 0:
        hgt = None
    sizes = body_sizes(w, hgt * 100.0 if hgt else None, h.get("PatientSex"))
    if str(h.get("PatientSex") or "").strip().upper() == "O":
        rule.append("PatientSex O: LBM/IBW are the mean of the male and female formulas")

    # --- what the stored (rescaled) values are
    stored = None  # None: activity (Bq/mL) after `act_factor`; else an SUV key
    act_factor: float | None = 1.0
    stored_scale = 1.0
    suv_type = str(h.get("SUVType") or "").strip().upper()
    if units == "BQML":
        rule.append("Units BQML")
    elif units == "CNTS":
        f_act = _num(h.get("PhilipsActivityFactor"))
        f_suv = _num(h.get("PhilipsSUVFactor"))
        if f_act and f_act > 0:
            act_factor = f_act
            rule.append("Units CNTS: Philips activity scale factor (7053,1009) to Bq/mL")
        elif f_suv and f_suv > 0:
            stored, stored_scale = "suvbw", f_suv
            rule.append("Units CNTS: Philips SUV scale factor (7053,1000) to SUVbw")
        else:
            fail("Units CNTS without the Philips scale factors (7053,1000) SUV or (7053,1009) activity")
    elif units == "GML":
        st = suv_type or "BW"
        if st not in _SUVTYPE or st == "BSA":
            fail(f"Units GML with SUVType (0054,1006) '{st}' not supported")
        stored = _SUVTYPE[st]
        rule.append(f"Units GML, SUVType {st}{' (absent: BW assumed)' if not suv_type else ''}")
        if st == "LBM":
            rule.append("SUVType LBM read as James 128")
    elif units == "CM2ML":
        if suv_type and suv_type != "BSA":
            fail(f"Units CM2ML with SUVType (0054,1006) '{suv_type}' (expected BSA)")
        stored = "suvbsa"
        rule.append("Units CM2ML (SUVbsa)")
    else:
        fail(f"Units (0054,1001) '{units}' cannot be converted to SUV")

    # --- radiopharmaceutical
    dose = _num(h.get("RadionuclideTotalDose"))
    if dose is not None and dose <= 0:
        dose = None
    if dose is not None and dose < 1e4:
        dose *= 1e6
        rule.append("RadionuclideTotalDose < 1e4 read as MBq")
    half = _num(h.get("RadionuclideHalfLife"))
    if half is not None and half <= 0:
        half = None

    # --- times
    series_dt = parse_da_tm(h.get("SeriesDate"), h.get("SeriesTime"))
    acq_dts = []
    adt = _per_slice(h, "AcquisitionDateTime", n)
    ad = _per_slice(h, "AcquisitionDate", n)
    at = _per_slice(h, "AcquisitionTime", n)
    for k in range(n):
        t = parse_dt(adt[k]) if adt[k] else None
        if t is None:
            t = parse_da_tm(ad[k] or h.get("SeriesDate"), at[k])
        acq_dts.append(t)
    frt = [_num(x) for x in _per_slice(h, "FrameReferenceTime", n)]
    afd = [_num(x) for x in _per_slice(h, "ActualFrameDuration", n)]
    known_acq = [t for t in acq_dts if t is not None]
    earliest_acq = min(known_acq) if known_acq else None

    scan_dt: datetime | None = None
    if dc in ("START", "ADMIN"):
        if series_dt is not None and (earliest_acq is None or series_dt <= earliest_acq):
            scan_dt = series_dt
            rule.append("scan time: SeriesDate/SeriesTime")
        elif series_dt is not None or earliest_acq is not None:
            ge = parse_dt(h.get("GEScanDateTime"))
            if ge is not None:
                scan_dt = ge
                rule.append("scan time: GE private (0009,100D) (series time after acquisition)")
            elif half and any(frt[k] is not None and afd[k] and acq_dts[k] for k in range(n)):
                cands = [
                    acq_dts[k] + timedelta(seconds=mid_frame_offset(afd[k] / 1000.0, half) - frt[k] / 1000.0)
                    for k in range(n)
                    if frt[k] is not None and afd[k] and acq_dts[k] is not None
                ]
                scan_dt = min(cands)
                rule.append("scan time: IBSI back-computation acquisition + mid-frame - FrameReferenceTime"
                            + (" (series time after acquisition)" if series_dt else " (no series time)"))
            else:
                scan_dt = earliest_acq
                rule.append("scan time: earliest AcquisitionDate/Time"
                            + (" (series time after acquisition)" if series_dt else " (no series time)"))
    # per-slice reference times for NONE
    slice_dts: list[datetime | None] = []
    if dc == "NONE":
        for k in range(n):
            t = acq_dts[k]
            if t is not None and half and afd[k]:
                t = t + timedelta(seconds=mid_frame_offset(afd[k] / 1000.0, half))
            slice_dts.append(t)
        rule.append("DecayCorrection NONE: each slice decayed to its frame's acquisition start + decay-weighted mid-frame time")
        known = [t for t in acq_dts if t is not None]
        scan_dt = min(known) if known else series_dt

    # --- injection
    inj_dt = parse_dt(h.get("RadiopharmaceuticalStartDateTime"))
    if inj_dt is not None:
        rule.append("injection: RadiopharmaceuticalStartDateTime")
    else:
        tm = h.get("RadiopharmaceuticalStartTime")
        ref_date = h.get("SeriesDate") or (scan_dt.strftime("%Y%m%d") if scan_dt else None)
        inj_dt = parse_da_tm(ref_date, tm)
        if inj_dt is not None:
            rule.append("injection: RadiopharmaceuticalStartTime on the series date")
            if scan_dt is not None and inj_dt > scan_dt:
                inj_dt -= timedelta(days=1)
                rule.append("injection after scan on the same date: previous day (midnight crossing)")

    # --- decay from injection to the image's decay reference
    need_decay = dc in ("START", "NONE")
    decay: Any = 1.0
    decay_missing: str | None = None
    if dc == "ADMIN":
        rule.append("DecayCorrection ADMIN: no decay of the dose")
    if inj_dt is not None and half:
        refs = slice_dts if dc == "NONE" else [scan_dt]
        for t in refs:
            if t is None:
                continue
            up = (t - inj_dt).total_seconds()
            if up < 0:
                fail(f"uptake time is negative ({up / 60:.1f} min): injection "
                     f"{inj_dt.isoformat()} after scan {t.isoformat()} (RadiopharmaceuticalStartDateTime/Time)")
            if up > MAX_HALF_LIVES * half:
                fail(f"uptake time {up / 3600:.1f} h is longer than {MAX_HALF_LIVES:g} half-lives "
                     f"({half:.0f} s): check RadiopharmaceuticalStartDateTime/Time and Series/AcquisitionTime")
    if need_decay:
        if inj_dt is None:
            decay_missing = "RadiopharmaceuticalStartDateTime/RadiopharmaceuticalStartTime (0018,1078/1072) missing"
        elif not half:
            decay_missing = "RadionuclideHalfLife (0018,1075) missing"
        elif dc == "START" and scan_dt is None:
            decay_missing = "SeriesDate/SeriesTime and AcquisitionDate/Time missing (no scan time)"
        elif dc == "NONE" and any(t is None for t in slice_dts):
            decay_missing = "AcquisitionDate/AcquisitionTime missing for some slices (DecayCorrection NONE)"
        else:
            lam = math.log(2.0) / half
            if dc == "START":
                decay = math.exp(-lam * (scan_dt - inj_dt).total_seconds())
            else:
                decay = [math.exp(-lam * (t - inj_dt).total_seconds()) for t in slice_dts]

    # decayed dose (Bq) at the decay reference, scalar or per slice
    def decayed_dose():
        if dose is None or decay_missing:
            return None
        if isinstance(decay, list):
            return [dose * d for d in decay]
        return dose * decay

    dd = decayed_dose()

    def scale(v, f):
        if v is None or f is None:
            return None
        if isinstance(v, list):
            return [x * f for x in v]
        return v * f

    def inv(v):
        if v is None:
            return None
        if isinstance(v, list):
            return [1.0 / x for x in v]
        return 1.0 / v

    factors: dict[str, Any] = {}
    if stored is None:
        # activity concentration: SUV_X = C * size_X / D_decayed
        bq = act_factor
        for k in FACTOR_KEYS:
            factors[k] = scale(inv(dd), None if sizes[k] is None else sizes[k] * bq)
    else:
        # stored SUV of type `stored`, times stored_scale: SUV_X = SUV_T * size_X / size_T
        base = sizes[stored]
        for k in FACTOR_KEYS:
            if k == stored:
                factors[k] = stored_scale
            elif base is None or sizes[k] is None:
                factors[k] = None
            else:
                factors[k] = stored_scale * sizes[k] / base
        bq = None if (base is None or dd is None) else scale(dd, stored_scale / base)
        if dc == "NONE" and bq is not None:
            bq = None  # a stored SUV with no decay correction is ambiguous; refuse Bq/mL
    bqml = bq if stored is None else bq

    if all(factors[k] is None for k in FACTOR_KEYS):
        if decay_missing:
            fail(decay_missing)
        if dose is None:
            fail("RadionuclideTotalDose (0018,1074) missing or not positive")
        if w is None:
            fail("PatientWeight (0010,1030) missing or not positive")
        missing = {"suvlbm_james": "PatientSex/PatientSize", "suvibw": "PatientSex/PatientSize",
                   "suvbsa": "PatientSize", "suvlbm_janmahasatian": "PatientSex/PatientSize"}.get(stored, "body size")
        fail(f"stored SUV type needs {missing} (0010,0040/1020) to convert; missing or not usable")
    if not half and stored is None and dc == "ADMIN":
        pass

    return SUVResult(
        factors=factors,
        bqml_factor=bqml,
        units=units,
        decay_correction=dc,
        scan_time=scan_dt,
        injection_time=inj_dt,
        rule=rule,
        dose_bq=dose,
        half_life_s=half,
        weight_kg=w,
        height_m=hgt,
        decay_factor=decay if not decay_missing else None,
        stored_suv_type=stored,
    )


# ----------------------------------------------------------------------------- header extraction
def _get(ds, key, default=None):
    v = ds.get(key, default)
    return default if v is None else v


def _private(ds, group: int, elem: int):
    tag = (group, elem)
    if tag in ds:
        v = ds[tag].value
        if isinstance(v, bytes):
            v = v.decode("ascii", "replace").strip("\x00 ")
        return v
    return None


def header_from_datasets(ds_list: Sequence, series: str | None = None) -> dict[str, Any]:
    """Plain header dict (see module docstring) from pydicom datasets in slice order."""
    if not ds_list:
        raise SUVError(f"{series or 'PET series'}: no DICOM headers")
    ds0 = ds_list[0]
    rp = None
    seq = ds0.get("RadiopharmaceuticalInformationSequence")
    if seq:
        rp = seq[0]

    def rpv(k):
        return None if rp is None else rp.get(k)

    def s(v):
        return None if v is None else str(v)

    ci = ds0.get("CorrectedImage")
    if ci is not None and not isinstance(ci, str):
        ci = [str(x) for x in ci]
    h: dict[str, Any] = {
        "series": series,
        "Units": s(ds0.get("Units")),
        "DecayCorrection": s(ds0.get("DecayCorrection")),
        "CorrectedImage": ci,
        "SUVType": s(ds0.get("SUVType")),
        "SeriesDate": s(ds0.get("SeriesDate")),
        "SeriesTime": s(ds0.get("SeriesTime")),
        "AcquisitionDate": [s(d.get("AcquisitionDate")) for d in ds_list],
        "AcquisitionTime": [s(d.get("AcquisitionTime")) for d in ds_list],
        "AcquisitionDateTime": [s(d.get("AcquisitionDateTime")) for d in ds_list],
        "FrameReferenceTime": [d.get("FrameReferenceTime") for d in ds_list],
        "ActualFrameDuration": [d.get("ActualFrameDuration") for d in ds_list],
        "GEScanDateTime": s(_private(ds0, 0x0009, 0x100D)),
        "PhilipsSUVFactor": _private(ds0, 0x7053, 0x1000),
        "PhilipsActivityFactor": _private(ds0, 0x7053, 0x1009),
        "RadiopharmaceuticalStartDateTime": s(rpv("RadiopharmaceuticalStartDateTime")),
        "RadiopharmaceuticalStartTime": s(rpv("RadiopharmaceuticalStartTime")),
        "RadionuclideTotalDose": rpv("RadionuclideTotalDose"),
        "RadionuclideHalfLife": rpv("RadionuclideHalfLife"),
        "PatientWeight": ds0.get("PatientWeight"),
        "PatientSize": ds0.get("PatientSize"),
        "PatientSex": s(ds0.get("PatientSex")),
    }
    # GE private (0009,100D) is only meaningful from GE; the IBSI DROs carry it as DT.
    man = str(ds0.get("Manufacturer", "") or "").upper()
    if h["GEScanDateTime"] and not man.startswith("GE"):
        h["GEScanDateTime"] = None
    if h["PhilipsSUVFactor"] is not None or h["PhilipsActivityFactor"] is not None:
        if "PHILIPS" not in man:
            h["PhilipsSUVFactor"] = h["PhilipsActivityFactor"] = None
    if "RadiopharmaceuticalInformationSequence" not in ds0 and "Units" in ds0:
        pass
    return h


def suv_result(ds_list: Sequence, series: str | None = None) -> SUVResult:
    ds0 = ds_list[0] if ds_list else None
    if ds0 is not None and str(ds0.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.130":
        raise SUVError(f"{series or 'PET series'}: Enhanced PET Image Storage: SUV factors not supported yet "
                       f"(geometry and Bq/mL conversion are)")
    if ds0 is not None and str(ds0.get("Modality", "")) != "PT":
        raise SUVError(f"{series or 'series'}: Modality is '{ds0.get('Modality', '')}', not PT")
    return compute_suv(header_from_datasets(ds_list, series))


def suv_factors(ds_list: Sequence, series: str | None = None) -> dict[str, Any]:
    """The JSON of `glandpet suv-factors` from pydicom datasets (slice order = NIfTI k order)."""
    return suv_result(ds_list, series).as_json()


def run_suv_factors(args) -> int:
    from glandpet.dicom.series import load_series

    s = load_series(args.series_dir, read_pixels=False)
    out = suv_factors(s.datasets, s.label)
    json.dump(out, sys.stdout, indent=None)
    sys.stdout.write("\n")
    return 0

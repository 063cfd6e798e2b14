"""Write CT and PET DICOM series the way real PET/CT scanners write them (pydicom 3).

Geometry
--------
Volumes are (x, y, z) arrays; ``affine`` maps a voxel index to LPS millimetres. One file per
slice ``k``: ``pixel_array[r, c] = vol[c, r, k]`` (columns run along the volume's first axis,
rows along its second), ImageOrientationPatient holds the direction cosines of the affine's
first two columns, ImagePositionPatient is ``affine @ (0, 0, k, 1)``, PixelSpacing is
``[row spacing, column spacing] = [|a[:, 1]|, |a[:, 0]|]``. The reader that sorts slices by
position along the normal and applies IPP/IOP/PixelSpacing gets the affine back exactly.

Vendor conventions (``StudyInfo.vendor``)
----------------------------------------
* ``siemens``: Implicit VR, CT unsigned 12 bit (intercept -1024); PET Units BQML,
  DecayCorrection START, per-slice int16 + RescaleSlope, SeriesTime = AcquisitionTime = scan
  start, RadiopharmaceuticalStartDateTime and StartTime, SRT nuclide codes (C-131A3 / C-111A1),
  file names ``PT.0004.0001.IMA``.
* ``ge``: Explicit VR, CT signed 16 bit with padding -2000 (intercept -1024); PET Units BQML,
  START, per-slice slope, SeriesTime *after* the acquisition (reprocessed series), private
  (0009,0010) "GEMS_PETD_01" / (0009,100D) DT = scan start, RadiopharmaceuticalStartTime only
  (the injection date is the series date), file names ``IM<series><instance>`` (no extension).
* ``philips``: Explicit VR, CT unsigned 12 bit; PET Units CNTS with per-slice slope, private
  (7053,0010) "Philips PET Private Group", (7053,1000) SUVbw per count and (7053,1009) Bq/mL per
  count, DecayCorrection START, SCT nuclide codes, numeric file names without extension,
  instance numbers counting from the feet.

UIDs are deterministic (``pydicom.uid.generate_uid`` with entropy sources) so that a cohort is
reproducible for a seed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

from glandpet.phantom.model import PatientInfo, PetInfo, StudyInfo

__all__ = [
    "VENDORS",
    "make_uid",
    "write_ct_series",
    "write_pet_series",
    "write_localizer",
    "radionuclide_info",
    "planted",
    "IDENTIFYING_FIELDS",
]

VENDORS: tuple[str, ...] = ("siemens", "ge", "philips")

GE_PRIVATE_CREATOR = "GEMS_PETD_01"
PHILIPS_PRIVATE_CREATOR = "Philips PET Private Group"

_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root; the phantom is not a scanner

_VENDOR: dict[str, dict] = {
    "siemens": dict(
        manufacturer="SIEMENS",
        model="Biograph128",
        software="VG80B",
        station="MIPETCT01",
        transfer_syntax=ImplicitVRLittleEndian,
        ct_signed=False,
        ct_bits_stored=12,
        ct_kernel="I40f\\3",
        pet_recon="PSF+TOF 4i5s",
        pet_kernel="XYZGAUSSIAN4.00",
        ac_method="CT-derived mu-map,^CT 4 AC: AC_CT",
        scatter="Model-based",
        randoms="DLYD",
        nuclide_scheme="SRT",
        pet_instance_from_head=True,
        ct_instance_from_head=True,
    ),
    "ge": dict(
        manufacturer="GE MEDICAL SYSTEMS",
        model="Discovery MI",
        software="pet_coreload.46.00",
        station="DMIPET",
        transfer_syntax=ExplicitVRLittleEndian,
        ct_signed=True,
        ct_bits_stored=16,
        ct_kernel="STANDARD",
        pet_recon="VPFXS",
        pet_kernel="",
        ac_method="CTAC",
        scatter="Model based",
        randoms="SING",
        nuclide_scheme="SRT",
        pet_instance_from_head=True,
        ct_instance_from_head=True,
    ),
    "philips": dict(
        manufacturer="Philips Medical Systems",
        model="Vereos PET/CT",
        software="3.5.0",
        station="VEREOS1",
        transfer_syntax=ExplicitVRLittleEndian,
        ct_signed=False,
        ct_bits_stored=12,
        ct_kernel="B",
        pet_recon="BLOB-OS-TF",
        pet_kernel="",
        ac_method="CTAC-SG",
        scatter="SS-SIMUL",
        randoms="DLYD",
        nuclide_scheme="SCT",
        pet_instance_from_head=False,
        ct_instance_from_head=False,
    ),
}

# Radionuclide: (SRT code, SCT code, code meaning, positron fraction, half-life s)
_NUCLIDES: dict[str, tuple[str, str, str, float, float]] = {
    "Ga-68": ("C-131A3", "35337001", "^68^Gallium", 0.8891, 4057.74),
    "F-18": ("C-111A1", "77004003", "^18^Fluorine", 0.9686, 6586.2),
}

_OPERATORS = ("MUELLER^ANNA", "SMITH^JOHN", "NGUYEN^LINH", "ROSSI^MARCO", "JANSEN^EVA", "GARCIA^LUIS")
_PHYSICIANS = ("KOCH^PETRA^DR", "BROWN^ALAN^DR", "DUBOIS^CLAIRE^DR", "TANAKA^KENJI^DR")


# ----------------------------------------------------------------------------------------------
# small helpers


def make_uid(*parts: object) -> str:
    """A deterministic DICOM UID derived from ``parts`` (pydicom root, SHA-512 of the parts)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _hash01(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64


def _pick(seq: Sequence[str], *parts: object) -> str:
    return seq[int(_hash01(*parts) * len(seq))]


def planted(kind: str, *parts: object, n: int = 8) -> str:
    """A deterministic, unique and greppable identifier string ``Z`` + kind + hex (privacy tests search
    every output byte for them); `kind` is a short upper-case tag of the field."""
    return f"Z{kind}{hashlib.sha256('|'.join(str(p) for p in parts).encode()).hexdigest()[:n].upper()}"


#: Identifying attributes the writer fills (DICOM PS3.15 Annex E basic profile: each is removed or
#: replaced by a de-identifier). Patient name, id and birth date are the caller's (PatientInfo); the
#: others carry `planted` strings, or the caller's value with a planted part added.
IDENTIFYING_FIELDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID", "PatientComments",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "StationName", "DeviceSerialNumber",
    "PerformedProcedureStepID",
)


def _ds(x: float) -> str:
    """Format a number as a DICOM DS string (at most 16 characters)."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"cannot write non-finite value {x} as DS")
    if x == 0:
        return "0"
    for prec in (12, 11, 10, 9, 8, 7, 6):
        s = f"{x:.{prec}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot format {x} as DS")  # pragma: no cover


def _da(t: dt.datetime | dt.date) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: dt.datetime) -> str:
    return t.strftime("%H%M%S") + f".{t.microsecond // 1000:03d}"


def _dtm(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S") + f".{t.microsecond:06d}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def radionuclide_info(radionuclide: str) -> tuple[str, str, str, float, float]:
    """(SRT code, SCT code, meaning, positron fraction, half-life s) of a radionuclide name
    such as ``"Ga-68"``, ``"68Ga"``, ``"F18"``."""
    key = radionuclide.replace(" ", "").replace("^", "").upper()
    for name, info in _NUCLIDES.items():
        el, mass = name.split("-")
        variants = {f"{el}-{mass}", f"{el}{mass}", f"{mass}{el}", f"{mass}-{el}"}
        if key in {v.upper() for v in variants}:
            return info
    raise ValueError(f"unknown radionuclide {radionuclide!r} (known: {', '.join(_NUCLIDES)})")


def _radiopharmaceutical_code(tracer: str, radionuclide: str) -> Dataset | None:
    """Code for the radiopharmaceutical (DICOM CID 4021) where one exists; FAPI has none."""
    t = tracer.upper().replace(" ", "").replace("_", "-")
    nuc = radionuclide.upper().replace("-", "")
    if "PSMA-11" in t or "PSMA11" in t or "HBED" in t or "GOZETOTIDE" in t:
        return _code("C118961", "NCIt", "PSMA-11 Ga^68^")
    if "PSMA-617" in t or "PSMA617" in t:
        return _code("126759", "DCM", "PSMA-617 Ga^68^")
    if "PSMA-1007" in t or "PSMA1007" in t:
        return _code("126758", "DCM", "PSMA-1007 F^18^")
    if "DCFPYL" in t or "PIFLUFOLASTAT" in t:
        return _code("C116352", "NCIt", "Piflufolastat F^18^")
    if "FDG" in t and nuc == "F18":
        return _code("C-B1031", "SRT", "Fluorodeoxyglucose F^18^")
    return None


# ----------------------------------------------------------------------------------------------
# geometry


def _geometry(affine: np.ndarray, shape: tuple[int, int, int]):
    """IOP (6 floats), PixelSpacing [row, col], slice thickness, IPP per slice (n, 3), normal."""
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    cx, cy, cz = a[:3, 0], a[:3, 1], a[:3, 2]
    sx, sy, sz = (float(np.linalg.norm(v)) for v in (cx, cy, cz))
    if min(sx, sy, sz) <= 0:
        raise ValueError("affine has a zero-length axis")
    ux, uy = cx / sx, cy / sy
    if abs(float(ux @ uy)) > 1e-6:
        raise ValueError("affine's in-plane axes are not orthogonal: not representable as DICOM slices")
    normal = np.cross(ux, uy)
    k = np.arange(shape[2], dtype=float)
    ipp = a[:3, 3][None, :] + k[:, None] * cz[None, :]
    # slice thickness = distance between slice planes
    thickness = abs(float(cz @ normal))
    iop = [*ux.tolist(), *uy.tolist()]
    # tidy -0.0 and 1e-17 noise of axis-aligned affines
    iop = [0.0 if abs(v) < 1e-12 else v for v in iop]
    return iop, [sy, sx], thickness, ipp, normal


def _instance_order(ipp: np.ndarray, normal: np.ndarray, from_head: bool) -> np.ndarray:
    """Instance number (1-based) of each slice k. ``from_head``: instance 1 is the most superior
    slice (largest LPS z along the normal's z sign), as scanners number a head-first scan."""
    pos = ipp @ normal
    sup = pos * (1.0 if normal[2] >= 0 else -1.0)  # position towards the head
    order = np.argsort(-sup if from_head else sup, kind="stable")
    inst = np.empty(len(order), dtype=int)
    inst[order] = np.arange(1, len(order) + 1)
    return inst


# ----------------------------------------------------------------------------------------------
# dataset skeletons


def _vendor(study: StudyInfo) -> dict:
    v = study.vendor.lower()
    if v not in _VENDOR:
        raise ValueError(f"unknown vendor {study.vendor!r} (expected one of {', '.join(VENDORS)})")
    return _VENDOR[v]


def _base_dataset(
    patient: PatientInfo,
    study: StudyInfo,
    *,
    modality: str,
    sop_class: str,
    series_uid: str,
    series_number: int,
    series_description: str,
    series_dt: dt.datetime,
    acquisition_dt: dt.datetime,
    content_dt: dt.datetime,
    image_type: list[str],
) -> Dataset:
    vend = _vendor(study)
    ds = Dataset()
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = "1.2.3"  # replaced per slice
    fm.TransferSyntaxUID = vend["transfer_syntax"]
    fm.ImplementationClassUID = _IMPLEMENTATION_UID
    fm.ImplementationVersionName = "GLANDPET_PHANTOM"
    ds.file_meta = fm

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = image_type
    ds.InstanceCreationDate = _da(content_dt)
    ds.InstanceCreationTime = _tm(content_dt)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2.3"
    ds.StudyDate = _da(study.study_datetime)
    ds.SeriesDate = _da(series_dt)
    ds.AcquisitionDate = _da(acquisition_dt)
    ds.ContentDate = _da(content_dt)
    ds.StudyTime = _tm(study.study_datetime)
    ds.SeriesTime = _tm(series_dt)
    ds.AcquisitionTime = _tm(acquisition_dt)
    ds.ContentTime = _tm(content_dt)
    # identifying fields (IDENTIFYING_FIELDS): unique planted strings, deterministic per patient and study
    key = (patient.patient_id, study.study_uid)
    ds.AccessionNumber = (study.accession_number + planted("A", *key, n=6))[-16:]
    ds.Modality = modality
    ds.Manufacturer = vend["manufacturer"]
    ds.InstitutionName = f"{study.institution_name} {planted('INST', study.institution_name)}"[:64]
    ds.InstitutionAddress = f"{planted('ADDR', study.institution_name)} Hauptstrasse 1, 10115 Berlin"
    ds.InstitutionalDepartmentName = f"Nuklearmedizin {planted('DEPT', study.institution_name)}"
    ds.ReferringPhysicianName = f"{study.referring_physician}^{planted('REF', *key)}"
    ds.RequestingPhysician = f"{planted('REQ', *key)}^PLANTED"
    ds.PhysiciansOfRecord = f"{planted('POR', *key)}^PLANTED"
    ds.NameOfPhysiciansReadingStudy = f"{planted('READ', *key)}^PLANTED"
    ds.StationName = planted("STN", vend["station"], study.institution_name)
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = series_description
    ds.PerformingPhysicianName = f"{_pick(_PHYSICIANS, study.study_uid, 'performing')}^{planted('PERF', *key)}"
    ds.OperatorsName = f"{_pick(_OPERATORS, study.study_uid, 'operator')}^{planted('OPER', *key)}"
    ds.ManufacturerModelName = vend["model"]

    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = planted("ISS", study.institution_name)
    ds.OtherPatientIDs = planted("OPID", patient.patient_id)
    ds.OtherPatientNames = f"{planted('OPN', patient.patient_id)}^PLANTED"
    ds.PatientBirthName = f"{planted('PBN', patient.patient_id)}^PLANTED"
    ds.PatientMotherBirthName = f"{planted('PMN', patient.patient_id)}^PLANTED"
    ds.PatientAddress = f"{planted('PADR', patient.patient_id)} Gartenweg 3, Berlin"
    ds.PatientTelephoneNumbers = planted("TEL", patient.patient_id, n=6)
    ds.PatientComments = f"planted comment {planted('PCOM', patient.patient_id)}"
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{int(patient.age_years):03d}Y"
    ds.PatientSize = _ds(round(patient.height_m, 2))
    ds.PatientWeight = _ds(round(patient.weight_kg, 1))

    ds.BodyPartExamined = "HEADNECK"
    ds.DeviceSerialNumber = planted("SN", study.institution_name, vend["model"])
    ds.SoftwareVersions = vend["software"]
    ds.ProtocolName = "PETCT_HeadNeck_Glands"
    ds.PatientPosition = "HFS"

    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = planted("SID", *key, n=8)
    ds.PerformedProcedureStepID = planted("PPS", *key, n=8)
    ds.SeriesNumber = str(int(series_number))
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = "1"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _image_pixel(ds: Dataset, rows: int, cols: int, signed: bool, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


_LONG_VR = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN", "UT", "UC", "UR"}


def _encode_element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    """Encode one little-endian data element by hand (the fast path for per-slice values)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    g, e = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", g, e, len(value)) + value
    if vr in _LONG_VR:
        return struct.pack("<HH2sHI", g, e, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", g, e, vr.encode(), len(value)) + value


def _file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    body = b"".join(
        [
            _encode_element(0x00020001, "OB", b"\x00\x01", False),
            _encode_element(0x00020002, "UI", sop_class.encode(), False),
            _encode_element(0x00020003, "UI", sop_uid.encode(), False),
            _encode_element(0x00020010, "UI", transfer_syntax.encode(), False),
            _encode_element(0x00020012, "UI", _IMPLEMENTATION_UID.encode(), False),
            _encode_element(0x00020013, "SH", b"GLANDPET_PHANTOM", False),
        ]
    )
    return b"\0" * 128 + b"DICM" + _encode_element(0x00020000, "UL", struct.pack("<I", len(body)), False) + body


class _SliceEncoder:
    """Encodes the constant part of a series' dataset once; per slice only the varying elements
    (SOP Instance UID, Instance Number, IPP, Slice Location, Rescale Slope, Image Index, Pixel
    Data) are encoded, by hand. About 20x faster than ``dcmwrite`` per slice."""

    def __init__(self, ds: Dataset, var_tags: Sequence[int]):
        self.implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        self.sop_class = str(ds.SOPClassUID)
        self.ts = str(ds.file_meta.TransferSyntaxUID)
        self.var_tags = sorted(var_tags)
        charset = ds.get("SpecificCharacterSet", "ISO_IR 100")
        segments: list[list[bytes]] = [[] for _ in range(len(self.var_tags) + 1)]
        for tag in sorted(ds.keys()):
            if int(tag) in self.var_tags:
                continue
            if tag.element == 0 and tag.group > 6:
                continue
            fp = DicomBytesIO()
            fp.is_implicit_VR = self.implicit
            fp.is_little_endian = True
            write_data_element(fp, ds[tag], charset)
            i = int(np.searchsorted(self.var_tags, int(tag)))
            segments[i].append(fp.getvalue())
        self.segments = [b"".join(seg) for seg in segments]

    def encode(self, sop_uid: str, values: dict[int, tuple[str, bytes]]) -> bytes:
        parts = [_file_meta_bytes(self.sop_class, sop_uid, self.ts)]
        for i, tag in enumerate(self.var_tags):
            parts.append(self.segments[i])
            if tag in values:
                vr, val = values[tag]
                parts.append(_encode_element(tag, vr, val, self.implicit))
        parts.append(self.segments[-1])
        return b"".join(parts)


def _str_bytes(v: str | Sequence[str]) -> bytes:
    return (v if isinstance(v, str) else "\\".join(v)).encode("ascii")


def _write_slices(
    ds: Dataset,
    out_dir: Path,
    stored: np.ndarray,  # (x, y, z) integer array, already in the stored dtype
    ipp: np.ndarray,
    normal: np.ndarray,
    instance: np.ndarray,
    names: list[str],
    series_uid: str,
    slopes: list[str] | None = None,
) -> list[Path]:
    """Write one file per slice; returns the paths in instance order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slabs = np.ascontiguousarray(stored.transpose(2, 1, 0)).astype(stored.dtype.newbyteorder("<"), copy=False)
    is_pet = ds.Modality == "PT"
    var = [0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010]
    if is_pet:
        var += [0x00541330]
    if slopes is not None:
        var += [0x00281053]
    enc = _SliceEncoder(ds, var)
    paths: list[Path] = [Path()] * slabs.shape[0]
    for k in range(slabs.shape[0]):
        inst = int(instance[k])
        uid = make_uid(series_uid, "instance", inst)
        vals: dict[int, tuple[str, bytes]] = {
            0x00080018: ("UI", uid.encode()),
            0x00200013: ("IS", str(inst).encode()),
            0x00200032: ("DS", _str_bytes([_ds(v) for v in ipp[k]])),
            0x00201041: ("DS", _ds(float(ipp[k] @ normal)).encode()),
            0x7FE00010: ("OW", slabs[k].tobytes()),
        }
        if is_pet:
            vals[0x00541330] = ("US", struct.pack("<H", inst))
        if slopes is not None:
            vals[0x00281053] = ("DS", slopes[k].encode())
        p = out_dir / names[inst - 1]
        with open(p, "wb") as fh:
            fh.write(enc.encode(uid, vals))
        paths[inst - 1] = p
    return paths


def _file_names(vendor: str, modality: str, series_number: int, n: int) -> list[str]:
    if vendor == "siemens":
        return [f"{modality}.{series_number:04d}.{i:04d}.IMA" for i in range(1, n + 1)]
    if vendor == "ge":
        return [f"IM{series_number:02d}{i:04d}" for i in range(1, n + 1)]
    return [f"{series_number:03d}{i:05d}" for i in range(1, n + 1)]  # philips


# ----------------------------------------------------------------------------------------------
# CT


def write_ct_series(
    out_dir: str | Path,
    hu: np.ndarray,
    affine_lps: np.ndarray,
    patient: PatientInfo,
    study: StudyInfo,
    series_number: int,
    series_description: str,
    series_uid: str | None = None,
    *,
    acquisition_datetime: dt.datetime | None = None,
    kvp: float = 120.0,
    slice_positions: np.ndarray | None = None,
) -> list[Path]:
    """Write a CT Image Storage series, one file per slice (returned in instance order).

    ``hu``: (x, y, z) Hounsfield units; stored as integers with RescaleSlope 1 and
    RescaleIntercept -1024, unsigned 12 bit (Siemens, Philips: HU clipped to -1024..3071) or
    signed 16 bit (GE). ``acquisition_datetime`` defaults to the study date and time.
    A sheared affine (slice step not along the slice normal) writes a gantry-tilted series, with
    GantryDetectorTilt the angle between step and normal, signed as DICOM PS3.3 defines it (negative
    when the top of the gantry leans away from where the table enters; head first supine: positive
    when the image columns run towards +z). A scanner writes ImageOrientationPatient
    1\\0\\0\\0\\cos t\\sin t with ImagePositionPatient stepping along z only: give such an affine
    (columns (0, cos t, sin t) x spacing, slice step (0, 0, +-table feed)). ``slice_positions`` ((z, 3) LPS mm)
    replaces ``affine @ (0, 0, k, 1)`` as the position of slice k (unequally spaced stacks; ``hu``
    must hold the values at those slices).
    """
    out_dir = Path(out_dir)
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3-D (x, y, z) array, got shape {hu.shape}")
    vendor = study.vendor.lower()
    vend = _vendor(study)
    iop, spacing, thickness, ipp, normal = _geometry(affine_lps, hu.shape)
    step = np.asarray(affine_lps, dtype=float)[:3, 2]
    tilt = math.degrees(math.atan2(float(np.linalg.norm(step - (step @ normal) * normal)), abs(float(step @ normal))))
    # DICOM's sign: negative when the top of the gantry leans away from where the table enters. Head
    # first supine (the writer's PatientPosition) the table enters from the feet and the top of the gantry
    # is the first image row (anterior): columns running towards +z (the top towards the feet) = positive.
    col_z = float(np.asarray(affine_lps, dtype=float)[2, 1])
    if col_z < 0:
        tilt = -tilt
    if slice_positions is not None:
        ipp = np.asarray(slice_positions, dtype=float)
        if ipp.shape != (hu.shape[2], 3):
            raise ValueError(f"slice_positions must be ({hu.shape[2]}, 3), got {ipp.shape}")
    if series_uid is None:
        series_uid = make_uid(study.study_uid, "CT", series_number, series_description)
    acq = acquisition_datetime or study.study_datetime
    ds = _base_dataset(
        patient, study, modality="CT", sop_class=CTImageStorage, series_uid=series_uid,
        series_number=series_number, series_description=series_description, series_dt=acq,
        acquisition_dt=acq, content_dt=acq + dt.timedelta(seconds=40),
        image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
    )
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = _ds(thickness)
    ds.KVP = _ds(kvp)
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(max(hu.shape[0] * spacing[1], hu.shape[1] * spacing[0]))
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = _ds(round(tilt, 4)) if abs(tilt) > 1e-6 else "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = str(80 + int(_hash01(series_uid, "mA") * 60))
    ds.Exposure = "40"
    ds.FilterType = "FLAT" if vendor == "siemens" else "BODY FILTER"
    ds.ConvolutionKernel = vend["ct_kernel"]
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.PixelSpacing = [_ds(v) for v in spacing]
    signed = vend["ct_signed"]
    _image_pixel(ds, hu.shape[1], hu.shape[0], signed, vend["ct_bits_stored"])
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if vendor == "ge":
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue (VR resolved: signed pixels)

    stored = np.rint(np.nan_to_num(np.asarray(hu, dtype=np.float32), nan=-1024.0)) + 1024.0
    if signed:
        stored = np.clip(stored, -2000, 32767).astype(np.int16)
    else:
        stored = np.clip(stored, 0, 4095).astype(np.uint16)
    inst = _instance_order(ipp, normal, vend["ct_instance_from_head"])
    names = _file_names(vendor, "CT", series_number, hu.shape[2])
    return _write_slices(ds, out_dir, stored, ipp, normal, inst, names, series_uid)


# ----------------------------------------------------------------------------------------------
# PET


def _frame_reference(lam: float, duration_s: float) -> float:
    """Time (s) after frame start at which the decaying activity equals its frame average."""
    x = lam * duration_s
    if x <= 0:
        return duration_s / 2.0
    return math.log(x / (1.0 - math.exp(-x))) / lam


def _slice_scale(slab: np.ndarray) -> tuple[str, np.ndarray]:
    """Per-slice int16 encoding: (RescaleSlope string, stored int16 slice)."""
    m = float(np.max(np.abs(slab))) if slab.size else 0.0
    if m <= 0:
        return "1", np.zeros(slab.shape, dtype=np.int16)
    s = _ds(m / 32767.0)
    sf = float(s)
    q = np.rint(slab / sf)
    return s, np.clip(q, -32768, 32767).astype(np.int16)


def philips_scale_factors(pet: PetInfo, patient: PatientInfo, series_uid: str) -> tuple[float, float]:
    """(activity concentration factor Bq/mL per count, SUVbw per count) written by the Philips
    variant; the counts are Bq/mL (decay-corrected to scan start) divided by the first."""
    act = float(_ds(2.5 + 2.0 * _hash01(series_uid, "philips-cal")))
    lam = math.log(2.0) / pet.half_life_s
    uptake = (pet.scan_start - pet.injection_datetime).total_seconds()
    dose_at_scan = pet.injected_activity_bq * math.exp(-lam * uptake)
    suv = act * patient.weight_kg * 1000.0 / dose_at_scan
    return act, float(_ds(suv))


def write_pet_series(
    out_dir: str | Path,
    bqml: np.ndarray,
    affine_lps: np.ndarray,
    patient: PatientInfo,
    study: StudyInfo,
    pet: PetInfo,
    series_number: int,
    series_description: str,
    series_uid: str | None = None,
) -> list[Path]:
    """Write a PET Image Storage series in the vendor convention of ``study.vendor``.

    ``bqml``: (x, y, z) activity concentration in Bq/mL, decay-corrected to ``pet.scan_start``.
    Each slice is int16 with its own RescaleSlope (|max| -> 32767). Philips: the pixel values are
    counts, ``counts * (7053,1009)`` gives Bq/mL and ``counts * (7053,1000)`` SUVbw.
    ``pet.attenuation_corrected=False`` writes a NAC series (no ATTN/SCAT in CorrectedImage,
    "NAC" in the description). Returns the files in instance order.
    """
    out_dir = Path(out_dir)
    vol = np.nan_to_num(np.asarray(bqml, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if vol.ndim != 3:
        raise ValueError(f"bqml must be a 3-D (x, y, z) array, got shape {vol.shape}")
    vendor = study.vendor.lower()
    vend = _vendor(study)
    iop, spacing, thickness, ipp, normal = _geometry(affine_lps, vol.shape)
    ac = bool(pet.attenuation_corrected)
    if not ac and "NAC" not in series_description.upper():
        series_description = f"{series_description} NAC".strip()
    if series_uid is None:
        series_uid = make_uid(study.study_uid, "PT", series_number, series_description)

    scan = pet.scan_start
    dur = float(pet.frame_duration_s)
    lam = math.log(2.0) / float(pet.half_life_s)
    t_ref = _frame_reference(lam, dur)
    recon_done = scan + dt.timedelta(seconds=dur + 95)
    if vendor == "ge":
        # a reprocessed series: series time is when the series was created, after the scan
        series_dt = scan + dt.timedelta(seconds=dur + 60 * (8 + int(_hash01(series_uid, "ge-reproc") * 30)))
        content_dt = series_dt
    else:
        series_dt = scan
        content_dt = recon_done

    ds = _base_dataset(
        patient, study, modality="PT", sop_class=PositronEmissionTomographyImageStorage,
        series_uid=series_uid, series_number=series_number, series_description=series_description,
        series_dt=series_dt, acquisition_dt=scan, content_dt=content_dt,
        image_type=["ORIGINAL", "PRIMARY"],
    )
    if vendor == "ge":
        blk = ds.private_block(0x0009, GE_PRIVATE_CREATOR, create=True)
        blk.add_new(0x01, "LO", ["GE Discovery PET Implementation Version 1", "1"])
        blk.add_new(0x0D, "DT", _dtm(scan))  # PET scan_datetime
        blk.add_new(0x0E, "DT", _dtm(scan - dt.timedelta(seconds=50)))  # scan_ready

    # --- equipment / acquisition
    ds.SliceThickness = _ds(thickness)
    ds.CollimatorType = "NONE"
    ds.ActualFrameDuration = str(int(round(dur * 1000)))
    ds.ReconstructionDiameter = _ds(max(vol.shape[0] * spacing[1], vol.shape[1] * spacing[0]))
    if vend["pet_kernel"]:
        ds.ConvolutionKernel = vend["pet_kernel"]
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.PixelSpacing = [_ds(v) for v in spacing]
    _image_pixel(ds, vol.shape[1], vol.shape[0], True, 16)
    ds.RescaleIntercept = "0"

    corr = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"] if ac else ["NORM", "DTIM", "DECY", "RAN"]
    ds.CorrectedImage = corr

    # --- radiopharmaceutical
    srt, sct, meaning, pfrac, _ = (None, None, None, None, None)
    try:
        srt, sct, meaning, pfrac, _ = radionuclide_info(pet.radionuclide)
    except ValueError:
        pass
    item = Dataset()
    item.Radiopharmaceutical = pet.tracer
    item.RadiopharmaceuticalRoute = "Intravenous route"
    item.RadiopharmaceuticalVolume = "0"
    item.RadiopharmaceuticalStartTime = _tm(pet.injection_datetime)
    if vendor in ("siemens", "philips"):
        item.RadiopharmaceuticalStartDateTime = _dtm(pet.injection_datetime)
    item.RadionuclideTotalDose = _ds(round(pet.injected_activity_bq))
    item.RadionuclideHalfLife = _ds(pet.half_life_s)
    if pfrac is not None:
        item.RadionuclidePositronFraction = _ds(pfrac)
    if srt is not None:
        if vend["nuclide_scheme"] == "SCT":
            item.RadionuclideCodeSequence = DicomSequence([_code(sct, "SCT", meaning)])
        else:
            item.RadionuclideCodeSequence = DicomSequence([_code(srt, "SRT", meaning)])
    rcode = _radiopharmaceutical_code(pet.tracer, pet.radionuclide)
    if rcode is not None:
        item.RadiopharmaceuticalCodeSequence = DicomSequence([rcode])
    ew = Dataset()
    ew.EnergyWindowLowerLimit = "435" if vendor == "siemens" else "425"
    ew.EnergyWindowUpperLimit = "650"
    ds.EnergyWindowRangeSequence = DicomSequence([ew])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([item])
    ds.NumberOfSlices = vol.shape[2]

    po = _code("F-10450", "SRT", "recumbent")
    po.PatientOrientationModifierCodeSequence = DicomSequence([_code("F-10340", "SRT", "supine")])
    ds.PatientOrientationCodeSequence = DicomSequence([po])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([_code("F-10470", "SRT", "headfirst")])

    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.Units = "CNTS" if vendor == "philips" else "BQML"
    ds.CountsSource = "EMISSION"
    ds.RandomsCorrectionMethod = vend["randoms"]
    if ac:
        ds.AttenuationCorrectionMethod = vend["ac_method"]
        ds.ScatterCorrectionMethod = vend["scatter"]
    ds.DecayCorrection = "START"
    ds.ReconstructionMethod = vend["pet_recon"]
    ds.FrameReferenceTime = _ds(t_ref * 1000.0)
    ds.DecayFactor = _ds(math.exp(lam * t_ref))
    ds.DoseCalibrationFactor = "1"
    ds.SliceSensitivityFactor = "1"
    if vendor == "siemens":
        ds.RescaleType = "BQML"

    data = vol
    if vendor == "philips":
        act, suv = philips_scale_factors(pet, patient, series_uid)
        blk = ds.private_block(0x7053, PHILIPS_PRIVATE_CREATOR, create=True)
        blk.add_new(0x00, "DS", _ds(suv))  # SUV scale factor: SUVbw per (rescaled) count
        blk.add_new(0x09, "DS", _ds(act))  # activity concentration scale factor: Bq/mL per count
        data = vol / act

    # per-slice slope
    stored = np.empty(vol.shape, dtype=np.int16)
    slopes = []
    for k in range(vol.shape[2]):
        s, q = _slice_scale(data[:, :, k])
        stored[:, :, k] = q
        slopes.append(s)
    inst = _instance_order(ipp, normal, vend["pet_instance_from_head"])
    names = _file_names(vendor, "PT", series_number, vol.shape[2])
    return _write_slices(ds, out_dir, stored, ipp, normal, inst, names, series_uid, slopes)


# ----------------------------------------------------------------------------------------------
# localizer (scout / topogram)


def write_localizer(
    out_dir: str | Path,
    patient: PatientInfo,
    study: StudyInfo,
    series_number: int,
    series_description: str = "Topogram  0.6  T20s",
    series_uid: str | None = None,
    *,
    hu: np.ndarray | None = None,
    affine_lps: np.ndarray | None = None,
    acquisition_datetime: dt.datetime | None = None,
) -> list[Path]:
    """Write a single-slice coronal CT localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER).

    With ``hu`` and an axis-aligned ``affine_lps`` the image is an anterior-posterior projection
    of the volume (columns along +x, rows from head to feet); without them, a synthetic
    head-and-neck silhouette 512 x 512 at 1 mm.
    """
    out_dir = Path(out_dir)
    vendor = study.vendor.lower()
    vend = _vendor(study)
    if series_uid is None:
        series_uid = make_uid(study.study_uid, "LOCALIZER", series_number)
    acq = acquisition_datetime or (study.study_datetime - dt.timedelta(seconds=45))
    ds = _base_dataset(
        patient, study, modality="CT", sop_class=CTImageStorage, series_uid=series_uid,
        series_number=series_number, series_description=series_description, series_dt=acq,
        acquisition_dt=acq, content_dt=acq + dt.timedelta(seconds=5),
        image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    if hu is not None and affine_lps is not None:
        a = np.asarray(affine_lps, float)
        hu = np.asarray(hu, dtype=np.float32)
        mu = np.clip(hu + 1000.0, 0, None) / 1000.0  # relative attenuation
        proj = mu.sum(axis=1) * float(np.linalg.norm(a[:3, 1])) / 10.0  # (x, z), ~cm water
        img = proj.T[::-1, :]  # rows: head (largest z index) -> feet
        dx, dz = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 2]))
        ux, uz = a[:3, 0] / dx, a[:3, 2] / dz
        top = a @ np.array([0.0, (hu.shape[1] - 1) / 2.0, hu.shape[2] - 1, 1.0])
        ipp = top[:3]
        iop = [*ux.tolist(), *(-uz).tolist()]
        spacing = [dz, dx]
        values = -1024.0 + img * 150.0
    else:
        nr = nc = 512
        r, c = np.mgrid[0:nr, 0:nc].astype(np.float32)
        head = ((c - 256) / 85.0) ** 2 + ((r - 150) / 110.0) ** 2 <= 1
        neck = (np.abs(c - 256) < 60) & (r > 220) & (r < 400)
        shoulders = (np.abs(c - 256) < 220) & (r >= 400)
        values = np.full((nr, nc), -1024.0, np.float32)
        values[head | neck | shoulders] = 200.0
        ipp = np.array([-256.0, 0.0, 100.0])
        iop = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        spacing = [1.0, 1.0]
    iop = [0.0 if abs(v) < 1e-12 else v for v in iop]
    ds.ScanOptions = "SURVIEW" if vendor == "philips" else "SCOUT MODE"
    ds.KVP = "120"
    ds.XRayTubeCurrent = "35"
    ds.ConvolutionKernel = "T20s" if vendor == "siemens" else vend["ct_kernel"]
    ds.SliceThickness = "0.6"
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.PixelSpacing = [_ds(v) for v in spacing]
    signed = vend["ct_signed"]
    _image_pixel(ds, values.shape[0], values.shape[1], signed, vend["ct_bits_stored"])
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "200"
    ds.WindowWidth = "1200"
    stored = np.rint(values) + 1024.0
    stored = np.clip(stored, 0, 4095).astype(np.int16 if signed else np.uint16)
    uid = make_uid(series_uid, "instance", 1)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = "1"
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / _file_names(vendor, "CT", series_number, 1)[0]
    pydicom.dcmwrite(p, ds, enforce_file_format=True)
    return [p]

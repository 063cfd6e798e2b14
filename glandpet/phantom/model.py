"""Data model shared by the phantom's parts: the anatomy representation and the acquisition metadata.

Conventions
-----------
* Arrays are indexed (i, j, k) = (x, y, z) like nibabel; ``affine`` maps a voxel index to
  world coordinates in **LPS millimetres** (DICOM patient frame: +x patient left, +y posterior,
  +z superior). NIfTI files store RAS affines: convert with ``LPS_TO_RAS @ affine``.
* The *anatomy frame* is the frame in which an individual is built (head centre near the origin).
  A session places the head in the scanner with a rigid pose ``pose`` (4x4, anatomy -> scanner LPS).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from glandpet.geometry import LPS_TO_RAS  # noqa: F401  (re-exported: phantom.model.LPS_TO_RAS)


class Tissue(IntEnum):
    """Tissue classes of the anatomy label volume (glands live in a separate array)."""

    AIR = 0  # outside the body
    FAT = 1
    SOFT = 2  # skin, generic soft tissue, connective tissue
    MUSCLE = 3
    BONE_CORTICAL = 4
    BONE_SPONGY = 5  # diploe, vertebral bodies, marrow
    BRAIN = 6
    CSF = 7  # ventricles, spinal canal
    AIRWAY = 8  # air inside the body: nasal cavity, sinuses, pharynx, larynx, trachea
    EYE = 9  # vitreous
    TONGUE = 10
    LUNG = 11
    TEETH = 12
    SPINAL_CORD = 13
    VESSEL = 14  # carotid arteries, jugular veins (blood pool)
    MUCOSA = 15  # pharyngeal mucosa, tonsils (Waldeyer ring)
    THYROID = 16
    LYMPH_NODE = 17
    TUMOUR = 18  # a solid-tumour lesion (controls)


@dataclass
class Anatomy:
    """One individual's anatomy on a regular grid in the anatomy frame."""

    tissue: np.ndarray  # uint8 (x, y, z), Tissue codes
    glands: np.ndarray  # uint8 (x, y, z), glandpet.glands.DEFAULT_LABELS values, 0 = no gland
    affine: np.ndarray  # 4x4 voxel index -> anatomy-frame LPS mm
    source: str = "parametric"  # "parametric" or the real label-map case it was built from
    extra: dict = field(default_factory=dict)  # free-form (e.g. head centre, sizes drawn)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


@dataclass
class PatientInfo:
    """Fake but present identifiers, so that de-identification can be tested."""

    name: str  # DICOM PN, e.g. "DOE^JANE"
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str  # "M" | "F" | "O"
    weight_kg: float
    height_m: float
    age_years: int


@dataclass
class StudyInfo:
    study_uid: str
    frame_of_reference_uid: str
    study_datetime: dt.datetime
    study_description: str
    accession_number: str
    institution_name: str
    referring_physician: str
    vendor: str  # "siemens" | "ge" | "philips"


@dataclass
class PetInfo:
    """What a PET header must say about the tracer and the timing.

    The pixel data handed to the writer are activity concentrations in Bq/mL decay-corrected to
    ``scan_start`` (DecayCorrection START), which the writer encodes in the vendor's convention.
    """

    tracer: str  # e.g. "Ga-68 PSMA-11", "Ga-68 FAPI-04", "F-18 FAPI-74"
    radionuclide: str  # "Ga-68" | "F-18"
    half_life_s: float
    injected_activity_bq: float
    injection_datetime: dt.datetime
    scan_start: dt.datetime
    frame_duration_s: float
    psf_fwhm_mm: float
    attenuation_corrected: bool = True

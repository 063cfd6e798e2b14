"""Phantom cohort orchestration: individuals, sessions, DICOM, ground truth and the atlas set.

Layout written under OUTDIR::

    dicom/<subject>/<YYYYMMDD>_<session>/<NN>_<description>/*     CT, PET (+ localizer, NAC PET)
    subjects.tsv                                                   subject sheet
    truth/gland_truth.parquet, truth/transforms.parquet
    truth/sub-<id>/ses-<s>/sub-<id>_ses-<s>_space-ct_dseg.nii.gz   (+ _dseg.tsv)
    atlases/atlasNN/{ct.nii.gz, labels.nii.gz, labels.tsv}
    atlases/atlasNN/dicom/{ct/*, rtstruct.dcm}                      (with atlas_dicom: RT planning export)

Determinism: subject i draws from ``SeedSequence(seed, spawn_key=(0, i))`` and atlas j from
``SeedSequence(seed, spawn_key=(1, j))``, so subject i is the same whatever the cohort size.

Follow-ups (``followups``): the first pSS subjects also get a follow-up scan of each tracer, sessions
``psma2`` and ``fapi2`` (folders ``<YYYYMMDD>_PSMA2``, ``_FAPI2``), ~180 days after the baseline, with
the uptake change :data:`FOLLOWUP_CHANGE` planted in the glands; they draw from their own streams
``SeedSequence(seed, spawn_key=(3, i))`` (:func:`followup_streams`), so every baseline file is the
same with or without them.

With ``anatomy_from`` (real label maps) the subjects take usable cases from the start of the sorted
case list and the atlases from its end (:func:`assign_real_cases`, which reads only those cases);
such an anatomy's frame is the label map's own LPS world (not head-centred): poses rotate about
its own head centre (:func:`head_centre`), and its CT grid is fitted to its body and glands.

Spaces of ``truth/transforms.parquet`` (4x4 LPS matrices, x_to = M @ x_from):
``anatomy -> ct`` (the session's head pose), ``anatomy -> pet`` (pose composed with the
PET-to-CT misalignment), ``pet -> ct`` (what a PET-to-CT registration should find) and, for
subjects with both sessions, ``fapi_ct -> psma_ct`` (session None). A subject with follow-ups also
has ``<follow-up>_ct -> psma_ct`` for each (``psma2_ct``, ``fapi2_ct``; onto ``fapi_ct`` when the
subject has FAPI only) and ``fapi2_ct -> psma2_ct`` (session None). The true change of a gland is
``true_suv_mean`` of ``psma2`` over ``psma`` (``fapi2`` over ``fapi``) in ``truth/gland_truth.parquet``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from glandpet import layout
from glandpet.geometry import LPS_TO_RAS
from glandpet.glands import DEFAULT_LABELS, write_label_table
from glandpet.phantom.model import Anatomy, PatientInfo, PetInfo, StudyInfo, Tissue

VENDORS = ("siemens", "ge", "philips")

#: Per-vendor geometry: CT (pixel mm, matrix, slice mm), PET (pixel mm, matrix, slice mm).
_GEOMETRY = {
    "siemens": {"ct": (0.9766, 256, 3.0), "pet": (3.3, 104, 3.0)},
    "ge": {"ct": (0.9766, 256, 2.5), "pet": (2.73, 128, 2.79)},
    "philips": {"ct": (0.9766, 256, 2.0), "pet": (4.0, 88, 4.0)},
}
_DESCRIPTIONS = {
    "siemens": {"ct": "CT HeadNeck  3.0  B30f", "pet": "PET AC HN 3i21s", "nac": "PET NAC HN", "loc": "Topogram  0.6  T20s"},
    "ge": {"ct": "CTAC 2.5 HN STND", "pet": "PET HN QCFX", "nac": "PET HN NAC", "loc": "Scout"},
    "philips": {"ct": "CT 2mm HN", "pet": "PET AC HN", "nac": "PET NAC HN", "loc": "Surview"},
}

#: The planted change of a follow-up scan (``psma2``, ``fapi2``): the relative change of each gland's
#: true SUVmean from the same tracer's baseline scan, the same for every follow-up subject (after
#: treatment: the parotid and submandibular glands' function recovers, PSMA +25 %, and their
#: inflammation falls, FAPI -30 %; the sublingual glands change less; the lacrimal and tubarial glands
#: not at all, a null to test against). The measurement noise it must stand out from: the phantom's
#: PET noise averages out over a gland (< 1 %); with the true masks partial volume biases every
#: session alike, and the pipeline's own masks measure a gland's SUVmean within ~8 % (parotid) to
#: ~17 % (submandibular) (docs/validation.md).
FOLLOWUP_CHANGE = {
    "psma": {"parotid": 0.25, "submandibular": 0.25, "sublingual": 0.10, "lacrimal": 0.0, "tubarial": 0.0},
    "fapi": {"parotid": -0.30, "submandibular": -0.30, "sublingual": -0.15, "lacrimal": 0.0, "tubarial": 0.0},
}
#: Days from a baseline scan to its follow-up (inclusive range; one draw per subject, both tracers).
FOLLOWUP_DAYS = (166, 194)

_LAST = ["MUELLER", "SMITH", "GARCIA", "JANSEN", "ROSSI", "DUBOIS", "NOVAK", "KOWALSKI", "SILVA", "NIELSEN",
         "BERG", "MARTIN", "LEROY", "HOFFMANN", "BAKER", "EVANS", "PETERS", "WAGNER", "VOGEL", "KELLER",
         "LINDQVIST", "MORENO", "FISCHER", "OLSEN", "BRUNO", "HORVAT", "KRAUSE", "LAMBERT", "MEYER", "RICCI",
         "SANTOS", "TANAKA", "WEBER", "ZIMMER", "ALMEIDA", "COSTA", "DIAZ", "FOURNIER", "GROSS", "HANSEN", "IVANOV"]
_FIRST = {"F": ["ANNA", "MARIA", "ELENA", "SOPHIE", "LAURA", "CLARA", "JULIA", "EVA", "HANNA", "INES", "MARTA",
                "NORA", "PAULA", "ROSA", "SARA", "TERESA", "VERA", "LENA", "IRIS", "GRETA"],
          "M": ["JOHN", "PETER", "LUCAS", "MARCO", "DAVID", "JAN", "THOMAS", "PAUL", "HENRIK", "OSCAR", "LUIS",
                "KARL", "ANDRE", "FELIX", "HUGO", "IVAN", "MAX", "NILS", "OTTO", "RUBEN"]}


# ---------------------------------------------------------------------------------------------
# small helpers


def _rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def _rigid(rng, max_deg: float, max_mm: float, centre=(0.0, 0.0, 0.0), min_deg: float = 0.0) -> np.ndarray:
    """Random rigid transform: rotation about `centre` by an angle in [min_deg, max_deg], translation <= max_mm."""
    R = _rotation(rng.normal(size=3), rng.uniform(min_deg, max_deg))
    t = rng.normal(size=3)
    t = t / np.linalg.norm(t) * rng.uniform(0.2, 1.0) * max_mm
    c = np.asarray(centre, float)
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = c - R @ c + t
    return M


def _angle_deg(M: np.ndarray) -> float:
    return float(math.degrees(math.acos(float(np.clip((np.trace(M[:3, :3]) - 1) / 2, -1, 1)))))


def _uid(rng) -> str:
    return "2.25." + str(int.from_bytes(rng.bytes(15), "big"))


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")


def _write_nifti(path: Path, data: np.ndarray, affine_lps: np.ndarray) -> None:
    from glandpet.writers import nifti_image, write_nifti

    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(nifti_image(data, LPS_TO_RAS @ affine_lps), path)


def assign_groups(n: int, pss_fraction: float) -> list[str]:
    """Deterministic, evenly spread groups; subject i's group does not depend on n (except that with
    n >= 2 a cohort that would hold one group only gets its last subject flipped)."""
    f = float(np.clip(pss_fraction, 0.0, 1.0))
    g = ["pss" if math.floor((i + 1) * f + 0.5) > math.floor(i * f + 0.5) else "control" for i in range(n)]
    if n >= 2 and len(set(g)) == 1 and 0.0 < f < 1.0:
        g[-1] = "control" if g[-1] == "pss" else "pss"
    return g


def subject_id(i: int) -> str:
    return f"S{i + 1:03d}"


# ---------------------------------------------------------------------------------------------
# geometry of a session


#: Rotation centre of the session poses in the parametric anatomy frame (origin between the ear
#: canals): on the midline, 20 mm below the ear canals.
_PARAMETRIC_HEAD_CENTRE = (0.0, 0.0, -20.0)


def head_centre(anat: Anatomy) -> tuple[float, float, float]:
    """The point of the anatomy frame that the session poses rotate about: the parametric
    frame's fixed centre, or the individual's own (``extra["frame"]["head_centre"]``, e.g. the
    real-label individuals, whose frame is the scan's world, not head-centred)."""
    fr = anat.extra.get("frame")
    if fr and "head_centre" in fr:
        return tuple(float(v) for v in fr["head_centre"])
    return _PARAMETRIC_HEAD_CENTRE


def _anatomy_points(anat: Anatomy) -> dict:
    """World points (anatomy frame, mm) of the body (every other voxel in-plane), of the body in
    the grid's lowest slice (where the anatomy is cut) and of what the images must show (glands,
    a control's lesion); cached in ``extra``."""
    key = "_ct_points"
    cached = anat.extra.get(key)
    if cached is not None and cached[0] == id(anat.tissue):
        return cached[1]
    A = anat.affine

    def world(idx):
        return idx @ A[:3, :3].T + A[:3, 3]

    body = anat.tissue > 0
    sub = np.argwhere(body[::2, ::2, :]) * np.array([2, 2, 1])
    k_low = 0 if A[2, 2] > 0 else anat.tissue.shape[2] - 1
    low = np.argwhere(body[:, :, k_low])
    pts = {"body": world(sub), "bottom": world(np.c_[low, np.full(len(low), k_low)]) if len(low) else np.zeros((0, 3)),
           "targets": world(np.argwhere((anat.glands > 0) | (anat.tissue == Tissue.TUMOUR)))}
    anat.extra[key] = (id(anat.tissue), pts)
    return pts


def _ct_grid_landmarks(vendor: str, pose: np.ndarray, anat: Anatomy, rng) -> tuple[tuple[int, int, int], np.ndarray]:
    """CT grid of an anatomy in its own frame (real-label individuals): from the vertex (+4 mm)
    down to where the anatomy grid ends (at least 12 mm below the lowest gland or lesion), centred in-plane
    on the body with a >= 8 mm margin; the vendor's matrix, its pixel enlarged (FOV widened) when
    the head does not fit."""
    px, n, dz = _GEOMETRY[vendor]["ct"]
    P = _anatomy_points(anat)

    def moved(w):
        return w @ pose[:3, :3].T + pose[:3, 3]

    body, targets = moved(P["body"]), moved(P["targets"])
    top = float(body[:, 2].max()) + 4.0
    g_lo = float(targets[:, 2].min()) if len(targets) else float(body[:, 2].min())
    cut = float(moved(P["bottom"])[:, 2].max()) + 1.0 if len(P["bottom"]) else float(body[:, 2].min())
    zmin = min(max(cut, g_lo - 40.0, float(body[:, 2].min())), g_lo - 12.0)
    nz = int(math.ceil((top - zmin) / dz))
    inz = body[(body[:, 2] >= zmin) & (body[:, 2] <= zmin + nz * dz)]
    lo, hi = inz[:, :2].min(0), inz[:, :2].max(0)
    centre = (lo + hi) / 2 + rng.uniform(-3, 3, 2)
    half = float(np.max(np.maximum(hi - centre, centre - lo))) + 8.0 + 1.0  # + a body voxel
    if 2 * half > px * (n - 1):
        px = math.ceil(2 * half / (n - 1) * 1000.0) / 1000.0
    A = np.diag([px, px, dz, 1.0])
    A[:3, 3] = [centre[0] - px * (n - 1) / 2, centre[1] - px * (n - 1) / 2, zmin]
    return (n, n, nz), A


def ct_grid(vendor: str, pose: np.ndarray, anat: Anatomy, rng) -> tuple[tuple[int, int, int], np.ndarray]:
    """Axis-aligned CT grid (shape, LPS affine) covering the vertex to below the thyroid."""
    if "frame" in anat.extra:
        return _ct_grid_landmarks(vendor, pose, anat, rng)
    px, n, dz = _GEOMETRY[vendor]["ct"]
    top = anat.extra.get("vertex_z", 132.0)
    pts = np.array([[0, 5, top + 4, 1], [60, 5, top - 20, 1], [-60, 5, top - 20, 1], [0, 0, -168, 1]], float)
    w = (pose @ pts.T).T
    zmax, zmin = w[:3, 2].max(), w[3, 2]
    nz = int(math.ceil((zmax - zmin) / dz))
    centre = (pose @ np.array([0, -12, 0, 1.0]))[:3] + np.r_[rng.uniform(-3, 3, 2), 0]
    A = np.diag([px, px, dz, 1.0])
    A[:3, 3] = [centre[0] - px * (n - 1) / 2, centre[1] - px * (n - 1) / 2, zmin]
    return (n, n, nz), A


def pet_grid(vendor: str, ct_shape, ct_affine: np.ndarray, rng) -> tuple[tuple[int, int, int], np.ndarray]:
    px, n, dz = _GEOMETRY[vendor]["pet"]
    z0 = ct_affine[2, 3] - rng.uniform(0, 6)
    z1 = ct_affine[2, 3] + ct_affine[2, 2] * (ct_shape[2] - 1) + rng.uniform(0, 6)
    nz = int(math.ceil((z1 - z0) / dz)) + 1
    cx = ct_affine[0, 3] + ct_affine[0, 0] * (ct_shape[0] - 1) / 2
    cy = ct_affine[1, 3] + ct_affine[1, 1] * (ct_shape[1] - 1) / 2
    A = np.diag([px, px, dz, 1.0])
    A[:3, 3] = [cx - px * (n - 1) / 2, cy - px * (n - 1) / 2, z0]
    return (n, n, nz), A


# ---------------------------------------------------------------------------------------------
# individuals


def _build_anatomy(rng, sex, anatomy_from, case_id):
    if anatomy_from:
        from glandpet.phantom.real_anatomy import build_real_anatomy

        return build_real_anatomy(anatomy_from, case_id, rng)
    from glandpet.phantom.anatomy import build_parametric_anatomy

    return build_parametric_anatomy(rng, sex=sex)


def _patient(i: int, sex: str, age: int, rng, ref_date: dt.date) -> PatientInfo:
    last = _LAST[(i * 7 + 3) % len(_LAST)]
    first = _FIRST[sex][(i // len(_LAST) + int(rng.integers(len(_FIRST[sex])))) % len(_FIRST[sex])]
    if i >= len(_LAST):
        last = f"{last}-{_LAST[(i // len(_LAST)) % len(_LAST)]}"
    h = float(np.clip(rng.normal(1.78 if sex == "M" else 1.65, 0.07), 1.5, 2.0))
    bmi = float(np.clip(rng.normal(25.5, 3.8), 18.5, 36))
    w = float(np.clip(round(bmi * h * h, 1), 50, 110))
    born = ref_date - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 360)))
    pid = f"{int(rng.integers(10, 99))}{i + 1:05d}{int(rng.integers(0, 10))}"
    return PatientInfo(name=f"{last}^{first}", patient_id=pid, birth_date=born.strftime("%Y%m%d"), sex=sex,
                       weight_kg=w, height_m=round(h, 2), age_years=int(age))


def _clinical(group: str, severity: float, rng) -> dict:
    if group == "pss":
        s = severity
        return {
            "essdai": int(np.clip(round(2 + 16 * s + rng.normal(0, 3)), 0, 40)),
            "esspri": round(float(np.clip(3.0 + 5.0 * s + rng.normal(0, 1.2), 0, 10)), 1),
            "usf_ml_min": round(float(np.clip(0.35 * (1 - s) ** 1.5 + rng.normal(0, 0.04), 0.0, 0.6)), 2),
            "schirmer_mm": int(np.clip(round(22 * (1 - s) ** 1.5 + rng.normal(0, 2.5)), 0, 35)),
        }
    return {"essdai": None, "esspri": None,
            "usf_ml_min": round(float(np.clip(rng.normal(0.42, 0.1), 0.15, 0.8)), 2),
            "schirmer_mm": int(np.clip(round(rng.normal(20, 6)), 10, 35))}


def add_clinical_columns(sheet, truth, seed: int = 0):
    """The registered clinical variables the sheet lacks (anti_ssa, anti_ssb, igg_g_l, esr_mm_h, crp_mg_l),
    plausible values with planted associations of known sign with the parotid's true PSMA SUVmean
    (mean of both sides) in pSS: IgG and ESR fall as the uptake rises (rho < 0), anti-SSA positive
    subjects have the lower uptake (the lower half of pSS); anti-SSB and CRP carry no association.
    Controls: antibodies negative, laboratory values in the normal range. Returns a new sheet."""
    import pandas as pd

    rng = np.random.default_rng([int(seed), 19])
    t = pd.DataFrame(truth, columns=["subject_id", "session", "gland", "true_suv_mean"]) if not truth \
        else pd.DataFrame(truth)
    par = t[(t["session"] == "psma") & (t["gland"] == "parotid")].groupby("subject_id")["true_suv_mean"].mean()
    out = sheet.copy()
    psma = out["subject_id"].map(par).astype(float).to_numpy()
    pss = (out["group"] == "pss").to_numpy() & np.isfinite(psma)
    z = np.zeros(len(out))
    if pss.sum() >= 2:
        v = psma[pss]
        z[pss] = (v - v.mean()) / (v.std() or 1.0)
    n = len(out)
    med = np.median(psma[pss]) if pss.any() else np.nan
    ssa = np.where(pss, np.where(psma <= med, "positive", "negative"), "negative")
    ssb = np.where(pss, np.where(rng.random(n) < 0.5, "positive", "negative"), "negative")
    cols = {
        "anti_ssa": ssa, "anti_ssb": ssb,
        "igg_g_l": np.where(pss, 16.0 - 3.0 * z + rng.normal(0, 0.8, n), rng.normal(11.0, 1.5, n)).round(1),
        "esr_mm_h": np.clip(np.where(pss, 30.0 - 10.0 * z + rng.normal(0, 3, n), rng.normal(10, 4, n)), 1, 120).round(0),
        "crp_mg_l": np.clip(rng.lognormal(1.0, 0.6, n), 0.2, 50).round(1),
    }
    for c, v in cols.items():
        if c not in out.columns:
            out[c] = v
    return out


# ---------------------------------------------------------------------------------------------
# one subject


def _render_session(anat, suv, hu_anat, ctp, tparams, pose, mis, vendor, rng, pet_kwargs):
    from glandpet.phantom.uptake import render_ct, render_pet

    ct_shape, ct_aff = ct_grid(vendor, pose, anat, rng)
    pet_shape, pet_aff = pet_grid(vendor, ct_shape, ct_aff, rng)
    hu = render_ct(hu_anat, anat.affine, ct_shape, ct_aff, pose, ctp["noise_sd"], rng)
    anat_to_pet = mis @ pose
    pet = render_pet(suv, anat.affine, pet_shape, pet_aff, anat_to_pet, tparams.psf_fwhm_mm, tparams.noise_alpha, rng,
                     **pet_kwargs)
    return (ct_shape, ct_aff, hu), (pet_shape, pet_aff, pet)


def _subject_individual(i: int, group: str, seed: int, anatomy_from=None, case_id=None):
    ss = np.random.SeedSequence(seed, spawn_key=(0, i))
    streams = tuple(np.random.default_rng(s) for s in ss.spawn(6))
    r_demo, r_anat = streams[0], streams[1]
    sex = ("F" if r_demo.random() < 0.9 else "M") if group == "pss" else ("F" if r_demo.random() < 0.45 else "M")
    age = int(np.clip(round(r_demo.normal(55, 12) if group == "pss" else r_demo.normal(63, 10)), 25, 85))
    anat = _build_anatomy(r_anat, sex, anatomy_from, case_id)
    return streams, sex, age, anat


def subject_anatomy(i: int, group: str, seed: int, anatomy_from=None, case_id=None) -> Anatomy:
    """Rebuild subject i's anatomy exactly as :func:`make_subject` builds it (gland labels included;
    a control's tumour lesion is not)."""
    return _subject_individual(i, group, seed, anatomy_from, case_id)[3]


def _xfm_row(sid: str, session: str | None, frm: str, to: str, M: np.ndarray) -> dict:
    """A ``truth/transforms.parquet`` row: ``M`` maps ``frm`` points to ``to`` points (4x4 LPS)."""
    return {"subject_id": sid, "session": session, "from_space": frm, "to_space": to,
            "matrix_lps": [float(v) for v in M.ravel()], "rotation_deg": _angle_deg(M),
            "translation_mm": float(np.linalg.norm(M[:3, 3]))}


def followup_streams(seed: int, i: int) -> tuple[np.random.Generator, dict[str, np.random.Generator]]:
    """Subject i's follow-up streams, ``SeedSequence(seed, spawn_key=(3, i))``: one for the interval,
    one per tracer family (pose, misalignment, grids, timing, UIDs and noise of that follow-up), apart
    from every stream of the baseline, which therefore does not change when follow-ups are added."""
    r_when, r_psma, r_fapi = (np.random.default_rng(s) for s in np.random.SeedSequence(seed, spawn_key=(3, i)).spawn(3))
    return r_when, {"psma": r_psma, "fapi": r_fapi}


def make_subject(outdir: str | Path, i: int, group: str, seed: int, anatomy_from=None, case_id=None,
                 followup: bool = False) -> dict:
    """Generate subject i completely (DICOM + truth label maps); return its table rows.

    ``followup``: also a follow-up scan of each tracer the subject has (sessions ``psma2``, ``fapi2``),
    :data:`FOLLOWUP_DAYS` after that tracer's baseline scan (the same interval for both, so the
    follow-up keeps the baseline's order and spacing of the two scans): the same anatomy and tracer
    parameters (PSF, noise level), the baseline's noise-free SUV map with each gland's uptake scaled by
    :data:`FOLLOWUP_CHANGE`, on the baseline's scanner; a new pose, PET-to-CT misalignment, grids,
    injection and timing, new noise and new Study/Series/Frame-of-reference UIDs, from
    :func:`followup_streams`. The baseline sessions come out byte-identical either way.
    """
    from glandpet.phantom.dicom_writer import write_ct_series, write_localizer, write_pet_series
    from glandpet.phantom.uptake import (ct_hu_map, draw_ct_params, draw_fapi_compound, draw_tracer_params, plant_fibrosis,
                         resample_labels, scale_gland_uptake, slice_profile, suv_map, suv_to_bqml)

    t0 = time.perf_counter()
    outdir = Path(outdir)
    sid = subject_id(i)
    (r_demo, r_anat, r_dis, r_psma, r_fapi, r_geo), sex, age, anat = _subject_individual(
        i, group, seed, anatomy_from, case_id)
    severity = float(np.clip(r_dis.beta(2.2, 2.2), 0.05, 0.98)) if group == "pss" else 0.0
    fib = plant_fibrosis(anat, severity, r_dis) if group == "pss" else None
    lesion = None
    if group == "control":
        from glandpet.phantom.anatomy import add_lesion

        lesion = add_lesion(anat, r_dis)
    base_date = dt.date(2023, 1, 9) + dt.timedelta(days=int(r_demo.integers(0, 540)))
    patient = _patient(i, sex, age, r_demo, base_date)
    clinical = _clinical(group, severity, r_demo)
    ctp = draw_ct_params(r_demo, age)
    hu_anat = slice_profile(ct_hu_map(anat, ctp, r_demo), anat.affine, _GEOMETRY[VENDORS[i % 3]]["ct"][2])
    fapi_compound = draw_fapi_compound(r_demo)
    sessions = ["psma", "fapi"] if group == "pss" else ["fapi"]
    order = sessions if r_demo.random() < 0.5 else sessions[::-1]
    day = {order[0]: 0}
    if len(order) == 2:
        day[order[1]] = int(r_demo.integers(2, 22))
    scanner = VENDORS[i % 3]
    glabels = {lab.index: lab for lab in DEFAULT_LABELS}
    counts = np.bincount(anat.glands.ravel(), minlength=len(DEFAULT_LABELS) + 1)

    def acquire(sess: str, j: int, tp, suv: np.ndarray, means: dict, vendor: str, date: dt.date, r_geo, rng):
        """One session: pose, timing, PET/CT rendering, DICOM and truth files; its truth rows, its
        transform rows and its pose. Draws geometry, timing and UIDs from ``r_geo``, grids and noise
        from ``rng`` (in this order: the baseline's streams must see the same draws as ever)."""
        family = layout.session_parts(sess)[0]
        centre = head_centre(anat)
        pose = _rigid(r_geo, 10.0, 15.0, centre, min_deg=1.0)
        mis = _rigid(r_geo, 1.0, 2.5, (pose @ np.r_[centre, 1.0])[:3])
        # timing and dose
        half = 4062.6 if tp.radionuclide == "Ga-68" else 6586.2
        a_inj = (r_geo.uniform(100e6, 200e6) if tp.radionuclide == "Ga-68" else r_geo.uniform(200e6, 300e6))
        inj = dt.datetime.combine(date, dt.time(8, 0)) + dt.timedelta(
            minutes=int(r_geo.integers(0, 330)), seconds=int(r_geo.integers(0, 60)))
        uptake = float(r_geo.uniform(50, 75) * 60)
        scan = inj + dt.timedelta(seconds=round(uptake))
        frame = float(r_geo.choice([180.0, 240.0, 300.0]))
        study = StudyInfo(
            study_uid=_uid(r_geo), frame_of_reference_uid=_uid(r_geo),
            study_datetime=scan - dt.timedelta(seconds=int(r_geo.integers(150, 300))),
            study_description={"psma": "PET-CT PSMA Kopf-Hals", "fapi": "PET-CT FAPI Kopf-Hals"}[family]
            if vendor == "siemens" else {"psma": "PSMA PET/CT HEAD NECK", "fapi": "FAPI PET/CT HEAD NECK"}[family],
            accession_number=f"A{int(r_geo.integers(1e6, 1e7))}", institution_name="Phantom University Hospital",
            referring_physician="REFERRER^R", vendor=vendor)
        petinfo = PetInfo(tracer=tp.tracer, radionuclide=tp.radionuclide, half_life_s=half, injected_activity_bq=float(a_inj),
                          injection_datetime=inj, scan_start=scan, frame_duration_s=frame, psf_fwhm_mm=tp.psf_fwhm_mm)
        (cts, cta, hu), (pets, peta, pet_suv) = _render_session(anat, suv, hu_anat, ctp, tp, pose, mis, vendor, rng, {})
        delay = (scan - inj).total_seconds()
        bq = suv_to_bqml(pet_suv, a_inj, patient.weight_kg, delay, half)
        sdir = outdir / "dicom" / sid / f"{date.strftime('%Y%m%d')}_{sess.upper()}"
        desc = _DESCRIPTIONS[vendor]
        sn = 1
        if (i + j) % 2 == 0:
            write_localizer(sdir / f"{sn:02d}_{_safe(desc['loc'])}", patient, study, sn, desc["loc"], hu=hu, affine_lps=cta)
        sn = 2
        write_ct_series(sdir / f"{sn:02d}_{_safe(desc['ct'])}", np.rint(hu).astype(np.int16), cta, patient, study, sn, desc["ct"])
        sn = 3 if vendor != "ge" else 4
        write_pet_series(sdir / f"{sn:02d}_{_safe(desc['pet'])}", bq, peta, patient, study, petinfo, sn, desc["pet"])
        if (i + j) % 3 == 1:
            from glandpet.phantom.uptake import render_pet

            nac = render_pet(suv, anat.affine, pets, peta, mis @ pose, tp.psf_fwhm_mm + 0.5, tp.noise_alpha, rng, nac=True)
            nac_info = PetInfo(**{**petinfo.__dict__, "attenuation_corrected": False})
            write_pet_series(sdir / f"{sn + 1:02d}_{_safe(desc['nac'])}", suv_to_bqml(nac, a_inj, patient.weight_kg, delay, half),
                             peta, patient, study, nac_info, sn + 1, desc["nac"])
        # truth: labels in CT space, gland rows, transforms
        lab_ct = resample_labels(anat.glands, anat.affine, cts, cta, pose)
        truth = outdir / "truth"
        _write_nifti(Path(layout.path(truth, sid, sess, "dseg.nii.gz", space="ct")), lab_ct, cta)
        # the SUVbw image the PET DICOM encodes (after blur and noise), on the PET grid
        _write_nifti(Path(layout.path(truth, sid, sess, "pet.nii.gz", desc="suvbw")), pet_suv.astype(np.float32), peta)
        write_label_table(layout.path(truth, sid, sess, "dseg.tsv", space="ct"))
        rows = [{
            "subject_id": sid, "group": group, "session": sess, "tracer": tp.tracer, "gland": lab.gland,
            "side": lab.side, "true_volume_ml": float(counts[idx]) * anat.voxel_volume_ml,
            "true_suv_mean": means.get(idx, float("nan")), "severity": severity,
            "fibrotic_fraction": (fib.fraction.get(idx, 0.0) if fib is not None else 0.0),
            "psf_fwhm_mm": float(tp.psf_fwhm_mm),
        } for idx, lab in glabels.items()]
        xfms = [_xfm_row(sid, sess, frm, to, M) for frm, to, M in
                (("anatomy", "ct", pose), ("anatomy", "pet", mis @ pose), ("pet", "ct", np.linalg.inv(mis)))]
        return rows, xfms, pose

    truth_rows, xfm_rows, poses = [], [], {}
    fu_truth, fu_xfm = [], []
    if followup:
        r_when, r_follow = followup_streams(seed, i)
        interval = int(r_when.integers(FOLLOWUP_DAYS[0], FOLLOWUP_DAYS[1] + 1))
    for sess in sessions:
        j = 0 if sess == "psma" else 1
        rng = r_psma if sess == "psma" else r_fapi
        vendor = scanner if not (len(sessions) == 2 and sess == "fapi" and i % 3 == 2) else VENDORS[(i + 1) % 3]
        tp = draw_tracer_params(sess, severity, rng, fapi_compound=fapi_compound)
        suv, means = suv_map(anat, tp, fib, rng)
        rows, xfms, poses[sess] = acquire(sess, j, tp, suv, means, vendor, base_date + dt.timedelta(days=day[sess]),
                                          r_geo, rng)
        truth_rows += rows
        xfm_rows += xfms
        if followup:
            # the same person and tracer parameters, the glands' uptake changed by the planted factors
            later = layout.session_name(sess, 2)
            factors = {lab.index: 1.0 + FOLLOWUP_CHANGE[sess][lab.gland] for lab in DEFAULT_LABELS}
            suv2, means2 = scale_gland_uptake(anat, suv, factors)
            del suv
            rows, xfms, poses[later] = acquire(later, j + 2, tp, suv2, means2, vendor,
                                               base_date + dt.timedelta(days=day[sess] + interval),
                                               r_follow[sess], r_follow[sess])
            del suv2
            fu_truth += rows
            fu_xfm += xfms
    if len(sessions) == 2:
        xfm_rows.append(_xfm_row(sid, None, "fapi_ct", "psma_ct", poses["psma"] @ np.linalg.inv(poses["fapi"])))
    if followup:
        # every follow-up CT onto the subject's reference baseline CT (PSMA when present); at the
        # follow-up time point also FAPI onto PSMA, as at baseline
        ref = sessions[0]
        pairs = [(layout.session_name(s, 2), ref) for s in sessions]
        if len(sessions) == 2:
            pairs.append(("fapi2", "psma2"))
        fu_xfm += [_xfm_row(sid, None, f"{a}_ct", f"{b}_ct", poses[b] @ np.linalg.inv(poses[a])) for a, b in pairs]
    subj = {"subject_id": sid, "group": group, "dicom_dir": sid, "sex": sex, "age": age, **clinical}
    return {"subject": subj, "truth": truth_rows + fu_truth, "transforms": xfm_rows + fu_xfm,
            "seconds": time.perf_counter() - t0, "lesion": lesion}


def make_atlas(outdir: str | Path, j: int, seed: int, anatomy_from=None, case_id=None, dicom: bool = False) -> dict:
    """Atlas j: another individual's CT (rendered like a subject CT) + gland labels + label table.
    With ``dicom``, also that CT as a DICOM series and its glands as an RTSTRUCT
    (:func:`write_atlas_dicom`); the NIfTI files are the same either way."""
    from glandpet.phantom.uptake import ct_hu_map, draw_ct_params, render_ct, resample_labels, slice_profile

    t0 = time.perf_counter()
    ss = np.random.SeedSequence(seed, spawn_key=(1, j))
    r_demo, r_anat, r_geo = (np.random.default_rng(s) for s in ss.spawn(3))
    sex = "F" if r_demo.random() < 0.6 else "M"
    age = int(np.clip(round(r_demo.normal(58, 12)), 25, 85))
    anat = _build_anatomy(r_anat, sex, anatomy_from, case_id)
    ctp = draw_ct_params(r_demo, age)
    vendor = VENDORS[j % 3]
    hu_anat = slice_profile(ct_hu_map(anat, ctp, r_demo), anat.affine, _GEOMETRY[vendor]["ct"][2])
    pose = _rigid(r_geo, 8.0, 10.0, head_centre(anat))
    cts, cta = ct_grid(vendor, pose, anat, r_geo)
    hu = render_ct(hu_anat, anat.affine, cts, cta, pose, ctp["noise_sd"], r_geo)
    lab = resample_labels(anat.glands, anat.affine, cts, cta, pose)
    adir = Path(outdir) / "atlases" / f"atlas{j + 1:02d}"
    _write_nifti(adir / "ct.nii.gz", np.clip(np.rint(hu), -1024, 3071).astype(np.int16), cta)
    _write_nifti(adir / "labels.nii.gz", lab, cta)
    write_label_table(adir / "labels.tsv")
    if dicom:
        write_atlas_dicom(adir / "dicom", j, seed, vendor, sex, age, np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
                          lab, cta)
    return {"atlas": adir.name, "seconds": time.perf_counter() - t0}


def write_atlas_dicom(ddir: Path, j: int, seed: int, vendor: str, sex: str, age: int, hu: np.ndarray,
                      labels: np.ndarray, affine_lps: np.ndarray) -> None:
    """Atlas j as a radiotherapy planning export: ``ddir/ct/`` (CT series, the vendor's
    convention) and ``ddir/rtstruct.dcm`` (its glands, ROI names in mixed real-world styles).
    Draws from its own stream ``SeedSequence(seed, spawn_key=(2, j))``: the atlas NIfTIs and
    every other output do not change."""
    from glandpet.phantom.dicom_writer import write_ct_series
    from glandpet.phantom.rtstruct_writer import write_rtstruct

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, j)))
    when = dt.datetime(2022, 3, 7, 9, 0) + dt.timedelta(days=int(rng.integers(0, 600)), minutes=int(rng.integers(0, 480)))
    patient = _patient(90000 + j, sex, age, rng, when.date())
    study = StudyInfo(study_uid=_uid(rng), frame_of_reference_uid=_uid(rng), study_datetime=when,
                      study_description="RT PLANNING HEAD NECK", accession_number=f"R{int(rng.integers(1e6, 1e7))}",
                      institution_name="Phantom University Hospital", referring_physician="RADONC^R", vendor=vendor)
    write_ct_series(ddir / "ct", hu, affine_lps, patient, study, 2, "RT Planning CT HN 2mm")
    write_rtstruct(ddir / "rtstruct.dcm", labels, affine_lps, ddir / "ct", style_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------
# the cohort


def _task(kind, *args):
    if kind == "subject":
        return kind, make_subject(*args)
    return kind, make_atlas(*args)


def assign_real_cases(anatomy_from, n_subjects: int, n_atlases: int) -> tuple[list[str], list[str]]:
    """Label-map cases for the subjects and the atlases (disjoint: the atlases are other
    individuals). Subjects take usable cases from the start of the sorted case list, atlases
    from its end (about a third of the cases at most); a case is checked only when it is about
    to be taken and skipped if unusable, so a small cohort reads a few cases, not all of them.
    When there are fewer usable cases than subjects (or atlases), the cases are reused in turn."""
    from glandpet.phantom.real_anatomy import _case_dirs, select_real_cases

    n_total = len(_case_dirs(anatomy_from))
    na = min(n_atlases, max(1, n_total // 3)) if n_atlases > 0 else 0
    ns = min(n_subjects, max(n_total - na, 0))
    first, last = select_real_cases(anatomy_from, ns, na)
    if not first or (n_atlases > 0 and not last):
        raise ValueError(f"{anatomy_from}: need at least {2 if n_atlases > 0 else 1} usable label-map cases "
                         f"(every gland, brain, mandible, spinal canal and orbits labelled), found "
                         f"{len(first) + len(last)}")
    return [first[i % len(first)] for i in range(n_subjects)], [last[j % len(last)] for j in range(n_atlases)]


def followup_subjects(groups: list[str], followups: int) -> list[int]:
    """The subjects (indices) given a follow-up: the first ``followups`` pSS subjects (each has both
    sessions); all of them when there are fewer."""
    if int(followups) < 0:
        raise ValueError(f"followups must be >= 0, got {followups}")
    return [i for i, g in enumerate(groups) if g == "pss"][: int(followups)]


def generate_cohort(outdir, n_subjects: int, seed: int, anatomy_from=None, n_atlases: int = 3,
                    pss_fraction: float = 0.6, jobs: int = 1, progress: bool = True, atlas_dicom: bool = False,
                    followups: int = 0) -> dict:
    """Write a phantom cohort under ``outdir``; returns a summary dict (counts, seconds).
    ``atlas_dicom``: also write each atlas as DICOM CT + RTSTRUCT (``atlases/<name>/dicom/``).
    ``followups``: the first that many pSS subjects (:func:`followup_subjects`) also get a follow-up
    scan of each tracer ~180 days later with a planted change (:func:`make_subject`,
    :data:`FOLLOWUP_CHANGE`; sessions ``psma2``, ``fapi2`` in the truth tables); 0 writes exactly
    the cohort of earlier releases."""
    from glandpet.tables import GLAND_TRUTH, TRANSFORMS, write_table

    t0 = time.perf_counter()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    groups = assign_groups(n_subjects, pss_fraction)
    cases_s, cases_a = [None] * n_subjects, [None] * n_atlases
    if anatomy_from:
        cases_s, cases_a = assign_real_cases(anatomy_from, n_subjects, n_atlases)
    later = set(followup_subjects(groups, followups))
    tasks = [("subject", outdir, i, groups[i], seed, anatomy_from, cases_s[i], i in later) for i in range(n_subjects)]
    tasks += [("atlas", outdir, j, seed, anatomy_from, cases_a[j], atlas_dicom) for j in range(n_atlases)]
    results = []
    from glandpet.progress import Progress

    bar = Progress(len(tasks), "glandpet phantom", unit="individuals", quiet=not progress)
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
            futs = [ex.submit(_task, *t) for t in tasks]
            for n, f in enumerate(futs, 1):
                results.append(f.result())
                bar.update()
    else:
        for n, t in enumerate(tasks, 1):
            results.append(_task(*t))
            bar.update()
    subj = [r for k, r in results if k == "subject"]
    import pandas as pd

    sheet = pd.DataFrame([s["subject"] for s in subj])
    sheet = add_clinical_columns(sheet, [r for s in subj for r in s["truth"]], seed)
    for c in ("essdai", "schirmer_mm"):
        sheet[c] = sheet[c].astype("Int64")
    sheet.to_csv(outdir / "subjects.tsv", sep="\t", index=False, na_rep="")
    (outdir / "truth").mkdir(exist_ok=True)
    write_table([r for s in subj for r in s["truth"]], GLAND_TRUTH, outdir / "truth" / "gland_truth.parquet")
    write_table([r for s in subj for r in s["transforms"]], TRANSFORMS, outdir / "truth" / "transforms.parquet")
    secs = time.perf_counter() - t0
    n_pss = sum(g == "pss" for g in groups)
    summary = {"subjects": n_subjects, "pss": n_pss, "control": n_subjects - n_pss,
               "sessions": sum(len({r["session"] for r in s["truth"]}) for s in subj), "atlases": n_atlases,
               "followups": len(later), "seconds": secs, "outdir": str(outdir)}
    fu = f" ({len(later)} follow-up subject{'s' * (len(later) != 1)})" if later else ""
    bar.close(f"glandpet phantom: {n_subjects} subjects ({n_pss} pss, {n_subjects - n_pss} control), "
              f"{summary['sessions']} sessions{fu}, {n_atlases} atlases in {secs:.1f} s -> {outdir}")
    return summary


def run_phantom(args) -> int:
    """The `glandpet phantom` command."""
    from glandpet.errors import UserError

    if args.subjects < 1:
        raise UserError("--subjects must be at least 1")
    if not 0.0 <= args.pss_fraction <= 1.0:
        raise UserError("--pss-fraction must be between 0 and 1")
    if getattr(args, "followups", 0) < 0:
        raise UserError("--followups must be 0 or more")
    if args.anatomy_from and not Path(args.anatomy_from).is_dir():
        raise UserError(f"--anatomy-from: {args.anatomy_from} is not a folder")
    jobs = args.jobs if args.jobs and args.jobs > 0 else (os.cpu_count() or 1)
    generate_cohort(args.outdir, args.subjects, args.seed, anatomy_from=args.anatomy_from, n_atlases=args.atlases,
                    pss_fraction=args.pss_fraction, jobs=jobs, progress=True,
                    atlas_dicom=bool(getattr(args, "atlas_dicom", False)), followups=int(getattr(args, "followups", 0)))
    return 0

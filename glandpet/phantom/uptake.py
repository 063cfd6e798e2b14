"""Tracer physiology and PET/CT image formation of the phantom.

* :func:`draw_tracer_params` draws an individual's per-tissue and per-gland SUVs for a tracer
  (``psma``: Ga-68 PSMA-11; ``fapi``: Ga-68 FAPI-04 or F-18 FAPI-74), scaled by disease severity.
* :func:`plant_fibrosis` draws the focal fibrotic zones of a pSS subject's glands: a soft weight
  field w in [0, 1] shared by both tracers (PSMA x (1 - a w), FAPI x (1 + b w) in the same voxels).
* :func:`suv_map` builds the noise-free SUVbw map on the anatomy grid (the ground truth).
* :func:`scale_gland_uptake` changes the glands' uptake of such a map by known factors (follow-up scans).
* :func:`render_pet` resamples it into a session's PET grid through the pose composed with the
  PET-to-CT misalignment, blurs it with the tracer's Gaussian PSF, averages it down to the PET
  voxels, and adds mean-proportional-variance noise; :func:`suv_to_bqml` converts to Bq/mL.
* :func:`ct_hu_map` / :func:`render_ct` do the same for the CT in Hounsfield units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from glandpet.glands import DEFAULT_LABELS, GLANDS
from glandpet.phantom.model import Anatomy, Tissue

N_TISSUE = max(int(t) for t in Tissue) + 1

RADIONUCLIDES = {"Ga-68": 4062.6, "F-18": 6586.2}  # half-life (s)

#: Nominal per-tissue SUVbw (mean of the population).
_TISSUE_SUV = {
    "psma": {
        Tissue.AIR: 0.0, Tissue.FAT: 0.25, Tissue.SOFT: 0.6, Tissue.MUSCLE: 0.7, Tissue.BONE_CORTICAL: 0.35,
        Tissue.BONE_SPONGY: 1.0, Tissue.BRAIN: 0.15, Tissue.CSF: 0.1, Tissue.AIRWAY: 0.0, Tissue.EYE: 0.2,
        Tissue.TONGUE: 1.1, Tissue.LUNG: 0.35, Tissue.TEETH: 0.3, Tissue.SPINAL_CORD: 0.3, Tissue.VESSEL: 1.5,
        Tissue.MUCOSA: 2.8, Tissue.THYROID: 1.6, Tissue.LYMPH_NODE: 1.2, Tissue.TUMOUR: 2.5,
    },
    "fapi": {
        Tissue.AIR: 0.0, Tissue.FAT: 0.3, Tissue.SOFT: 0.8, Tissue.MUSCLE: 1.0, Tissue.BONE_CORTICAL: 0.4,
        Tissue.BONE_SPONGY: 0.8, Tissue.BRAIN: 0.1, Tissue.CSF: 0.1, Tissue.AIRWAY: 0.0, Tissue.EYE: 0.2,
        Tissue.TONGUE: 1.2, Tissue.LUNG: 0.3, Tissue.TEETH: 0.3, Tissue.SPINAL_CORD: 0.3, Tissue.VESSEL: 1.5,
        Tissue.MUCOSA: 1.5, Tissue.THYROID: 2.0, Tissue.LYMPH_NODE: 1.0, Tissue.TUMOUR: 9.0,
    },
}

#: Nominal normal-gland SUVmean (controls, severity 0).
_GLAND_SUV = {
    "psma": {"parotid": 13.0, "submandibular": 13.5, "sublingual": 6.0, "lacrimal": 10.0, "tubarial": 9.5},
    "fapi": {"parotid": 1.8, "submandibular": 2.2, "sublingual": 1.6, "lacrimal": 1.6, "tubarial": 1.7},
}

#: CT numbers (HU) by tissue: (mean, individual SD). Muscle: real head-and-neck planning CTs
#: (24 scans) have their muscle peak at 45-55 HU (drawn within that band, see draw_ct_params);
#: fat: -103 HU median in the muscle-free fat of a real 1 mm PET/CT (docs/phantom_calibration.md).
_TISSUE_HU = {
    Tissue.AIR: (-1000, 0), Tissue.FAT: (-100, 6), Tissue.SOFT: (45, 5), Tissue.MUSCLE: (50, 2.5),
    Tissue.BONE_CORTICAL: (1250, 120), Tissue.BONE_SPONGY: (380, 60), Tissue.BRAIN: (34, 2), Tissue.CSF: (6, 2),
    Tissue.AIRWAY: (-985, 5), Tissue.EYE: (12, 3), Tissue.TONGUE: (62, 5), Tissue.LUNG: (-840, 25),
    Tissue.TEETH: (2200, 250), Tissue.SPINAL_CORD: (38, 3), Tissue.VESSEL: (42, 4), Tissue.MUCOSA: (55, 5),
    Tissue.THYROID: (105, 15), Tissue.LYMPH_NODE: (38, 4), Tissue.TUMOUR: (45, 5),
}
#: muscle CT number band of real planning CTs (HU): the draw is clipped to it
MUSCLE_HU_RANGE = (45.0, 55.0)

#: Per-patient gland CT numbers (HU): (median, SD of a normal draw, clip low, clip high). From the
#: per-patient mean HU inside manual gland contours of 50 real PSMA PET/CT scans (1 mm class CT),
#: median (IQR): parotid R -12 (-29 to 16), L -4 (-27 to 18) -> -8 (-28 to 17), SD = IQR / 1.349
#: = 33; submandibular 30 (13 to 52) -> SD 29; lacrimal R 48 (39 to 59), L 41 (32 to 54) -> 45 (35
#: to 57), SD 16. The parotid's clip is the range of per-scan parotid medians on 24 real planning CTs
#: (-44 to +49 HU, non-enhanced) widened by ~15 HU. Sublingual and tubarial glands were not
#: measured: the sublingual gland follows the subject's submandibular draw (same kind of tissue,
#: +- 5 HU), the tubarial (seromucous, under the nasopharyngeal mucosa) stays near mucosa.
GLAND_HU = {"parotid": (-8.0, 33.0, -60.0, 65.0), "submandibular": (30.0, 29.0, -35.0, 95.0),
            "lacrimal": (45.0, 16.0, 5.0, 90.0), "tubarial": (48.0, 4.0, 35.0, 60.0)}
#: left-right difference of one patient's gland (SD, HU): the two parotids of a real planning CT
#: differ by a median 4 HU (24 scans)
GLAND_SIDE_SD_HU = 4.0
#: parotid CT number change per year of age around the cohort mean (fatty involution)
PAROTID_HU_PER_YEAR = -0.4
MEAN_AGE, AGE_SD = 58.0, 12.0

#: Fat around the glands (what a one-voxel ring around a real parotid holds): on 24 real planning
#: CTs (3.8-5.1 mm voxels) the ring held 5-71 % voxels below -30 HU, median 38 % (IQR 29-46 %),
#: the more the fattier the gland (-45 HU glands: 58-62 %, +50 HU glands: 5-33 %), and its median
#: differed from the gland's by -48..+19 HU (median -6, |difference| median 9, IQR 4-18). The
#: phantom paints fat septa (a smooth random field, 2.5 mm correlation) into the soft tissue of a
#: shell of PERIGLAND_MM around each parotid and submandibular gland (its soft tissue, fat and
#: muscle become a fat / soft-tissue mixture), with a per-subject fat fraction that follows the
#: gland's CT number (PERIGLAND_FAT); the lacrimal glands have the orbital fat of the anatomy
#: beside them.
PERIGLAND_MM = 6.0
#: correlation length of the fat septa field (mm): fat lobules that fill a 4 mm voxel
PERIGLAND_CORR_MM = 6.0
#: Glands whose shell's non-fat part has the gland's own CT number (fat-infiltrated connective
#: tissue, fascia, intraparotid nodes): with soft tissue (45 HU) there instead, the ring's median
#: stood 25-45 HU above a fatty parotid's, where real rings read 6 HU below the gland (median).
PERIGLAND_LIKE_GLAND = ("parotid",)
#: (fat fraction at gland -5 HU, change per HU of the gland, SD, low, high) of the shell. Submandibular: "mostly bordered by fat" (submandibular space), no real
#: ring figure measured: half of the shell, less for dense glands.
#: Painted fractions read about 0.6x lower in the coarse (4 mm) ring, as partial volume mixes the
#: septa with soft tissue: 0.5 at -5 HU gives about the real median ring fat fraction (0.38).
PERIGLAND_FAT = {"parotid": (0.5, -0.004, 0.07, 0.2, 0.85), "submandibular": (0.65, -0.004, 0.08, 0.3, 0.85)}

#: CT noise (HU SD) and texture. A real 1 mm PET/CT (GE, 140 kV) gave a noise SD of 11-13 HU in
#: muscle and fat (after removing a 9 x 9 in-plane local mean) and neighbour correlations of
#: 0.14-0.35 (x), 0.66-0.71 (y) in-plane, 0.22-0.28 between 3.3 mm slices: Gaussian-filtered
#: white noise with NOISE_SIGMA_VOX (in-plane, slices) gives 0.40 in-plane and 0.25 across slices.
NOISE_SD_HU = (10.0, 15.0)
NOISE_SIGMA_VOX = (0.52, 0.52, 0.42)


@dataclass
class TracerParams:
    session: str  # psma | fapi
    tracer: str  # e.g. "Ga-68 PSMA-11"
    radionuclide: str
    tissue_suv: np.ndarray  # (N_TISSUE,) float32
    gland_suv: dict  # label value -> base SUV (before fibrotic zones and heterogeneity)
    psf_fwhm_mm: float
    noise_alpha: float  # variance = alpha * mean (SUV units) on the PET voxels
    extra: dict = field(default_factory=dict)


def draw_fapi_compound(rng: np.random.Generator) -> tuple[str, str]:
    """Which FAPI compound an individual gets: (tracer, radionuclide)."""
    return ("F-18 FAPI-74", "F-18") if rng.random() < 0.4 else ("Ga-68 FAPI-04", "Ga-68")


def draw_tracer_params(session: str, severity: float, rng: np.random.Generator, *,
                       fapi_compound: tuple[str, str] | None = None) -> TracerParams:
    """An individual's uptake pattern for a tracer; severity in [0, 1] (0: no gland disease)."""
    if session == "psma":
        tracer, nuc = "Ga-68 PSMA-11", "Ga-68"
    else:
        tracer, nuc = fapi_compound or draw_fapi_compound(rng)
    lut = np.zeros(N_TISSUE, np.float32)
    for t, v in _TISSUE_SUV[session].items():
        lut[int(t)] = v * float(np.clip(rng.normal(1.0, 0.12), 0.7, 1.4))
    if session == "fapi" and nuc == "F-18":
        lut *= 0.9  # FAPI-74 slightly lower background than FAPI-04
    sev = float(np.clip(severity, 0.0, 1.0))
    person = float(np.clip(rng.normal(1.0, 0.1), 0.75, 1.3))  # shared across this person's glands
    gsuv = {}
    for lab in DEFAULT_LABELS:
        base = _GLAND_SUV[session][lab.gland] * person * float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15))
        if session == "psma":
            base *= 1.0 - 0.6 * sev * float(np.clip(rng.normal(1.0, 0.15), 0.6, 1.3))
        else:
            base *= 1.0 + 1.2 * sev * float(np.clip(rng.normal(1.0, 0.2), 0.5, 1.5))
        gsuv[lab.index] = float(base)
    if nuc == "Ga-68":
        fwhm = float(rng.uniform(6.5, 7.5))
        alpha = float(rng.uniform(0.02, 0.04))
    else:
        fwhm = float(rng.uniform(5.0, 6.0))
        alpha = float(rng.uniform(0.01, 0.02))
    return TracerParams(session, tracer, nuc, lut, gsuv, fwhm, alpha)


@dataclass
class Fibrosis:
    """Focal fibrotic zones: per gland label a (slices, weight) pair on the anatomy grid."""

    weights: dict  # label -> (slices, float32 weight array in [0,1] over the gland's box)
    fraction: dict  # label -> fraction of the gland's voxels with weight > 0.5
    psma_drop: float  # PSMA x (1 - psma_drop * w)
    fapi_gain: float  # FAPI x (1 + fapi_gain * w)


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) per array axis of an axis-aligned grid (the phantom grids are; the real
    anatomy's voxels are anisotropic, e.g. 1 x 1 x 2.5 mm)."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def _gland_boxes(anat: Anatomy) -> dict:
    key = "_gland_boxes"
    if key in anat.extra and anat.extra.get("_gland_boxes_id") == id(anat.glands):
        return anat.extra[key]
    out = {}
    objs = ndimage.find_objects(anat.glands)
    for lab in DEFAULT_LABELS:
        if lab.index - 1 < len(objs) and objs[lab.index - 1] is not None:
            out[lab.index] = objs[lab.index - 1]
    anat.extra[key] = out
    anat.extra["_gland_boxes_id"] = id(anat.glands)
    return out


#: Probability that a pSS gland receives focal fibrotic zones; the others are diseased only
#: through the subject's severity (uniform PSMA drop / FAPI rise), so the truth holds glands
#: with and without planted zones (``fibrotic_fraction`` 0) to test the voxel correlation on.
ZONE_PROBABILITY = {"parotid": 0.65, "submandibular": 0.65, "sublingual": 0.5, "lacrimal": 0.5, "tubarial": 0.5}


def plant_fibrosis(anat: Anatomy, severity: float, rng: np.random.Generator) -> Fibrosis:
    """Plant a few smooth fibrotic blobs in a random part of the glands (each gland with
    :data:`ZONE_PROBABILITY`, one draw per gland), covering more with higher severity. Glands
    drawn without zones get ``fraction`` 0 and no weight field."""
    sp = _spacing(anat.affine)
    h = float(sp[0])
    f = sp / h  # voxel size per axis in units of the first axis' (1, 1, 1 on isotropic grids)
    weights, frac = {}, {}
    sev = float(np.clip(severity, 0, 1))
    if sev <= 0:
        return Fibrosis({}, {lab.index: 0.0 for lab in DEFAULT_LABELS}, 0.0, 0.0)
    for lab, sl in _gland_boxes(anat).items():
        gname = next(L.gland for L in DEFAULT_LABELS if L.index == lab)
        m = anat.glands[sl] == lab
        if rng.random() >= ZONE_PROBABILITY[gname]:
            frac[lab] = 0.0
            continue
        idx = np.argwhere(m)
        target = float(np.clip(0.08 + 0.35 * sev + rng.normal(0, 0.05), 0.03, 0.6))
        nz = int(np.clip(1 + round(3 * sev * rng.uniform(0.6, 1.4)), 1, 5))
        vol = len(idx) * float(np.prod(sp))
        r_mm = (target * vol / nz * 3 / (4 * math.pi)) ** (1 / 3)
        r_mm = float(np.clip(r_mm, 2.5, 12.0))
        w = np.zeros(m.shape, np.float32)
        I, J, K = np.ogrid[tuple(slice(0, n) for n in m.shape)]
        for _ in range(nz):
            c = idx[rng.integers(len(idx))]
            rr = r_mm / h * rng.uniform(0.75, 1.25)
            d2 = ((I - c[0]) * f[0]) ** 2 + ((J - c[1]) * f[1]) ** 2 + ((K - c[2]) * f[2]) ** 2
            # smooth plateau: 1 inside ~rr, falling off over ~0.5 rr
            w = np.maximum(w, np.exp(-((np.maximum(d2 / rr ** 2, 0.0)) ** 2) * 0.7).astype(np.float32))
        w *= m
        weights[lab] = (sl, w)
        frac[lab] = float((w[m] > 0.5).mean())
    for lab in DEFAULT_LABELS:
        frac.setdefault(lab.index, 0.0)
    return Fibrosis(weights, frac, psma_drop=float(rng.uniform(0.55, 0.8)), fapi_gain=float(rng.uniform(2.0, 3.5)))


def _smooth_field(shape, rng, corr_vox) -> np.ndarray:
    """Zero-mean unit-SD smooth random field (coarse noise, blurred, upsampled linearly);
    ``corr_vox``: correlation length in voxels, one number or one per axis."""
    corr = np.broadcast_to(np.asarray(corr_vox, float), (len(shape),))
    steps = [max(float(c) / 2.0, 1.0) for c in corr]
    cs = tuple(max(int(math.ceil(n / step)) + 3, 4) for n, step in zip(shape, steps))
    f = ndimage.gaussian_filter(rng.standard_normal(cs).astype(np.float32), 1.0, mode="wrap")
    f /= f.std() + 1e-6
    zoom = [(c - 1) / max(n - 1, 1) for c, n in zip(cs, shape)]
    coords = np.ogrid[tuple(slice(0, n) for n in shape)]
    return ndimage.map_coordinates(
        f, np.broadcast_arrays(*[c * z for c, z in zip(coords, zoom)]), order=1, mode="nearest"
    ).astype(np.float32)


def suv_map(anat: Anatomy, params: TracerParams, fib: Fibrosis | None, rng: np.random.Generator,
            heterogeneity: float = 0.09) -> tuple[np.ndarray, dict]:
    """Noise-free SUVbw map on the anatomy grid, and the true SUVmean per gland label.

    Glands: base SUV x (1 + heterogeneity x smooth field) (the field drawn from ``rng``, so it is
    independent between tracers when each tracer has its own stream), times the fibrotic zone
    factor shared by both tracers.
    """
    suv = params.tissue_suv[anat.tissue]
    means = {}
    sp = _spacing(anat.affine)
    for lab, sl in _gland_boxes(anat).items():
        m = anat.glands[sl] == lab
        hf = _smooth_field(m.shape, rng, corr_vox=5.0 / sp)
        v = np.float32(params.gland_suv[lab]) * (1.0 + np.float32(heterogeneity) * hf)
        if fib is not None and lab in fib.weights:
            w = fib.weights[lab][1]
            if params.session == "psma":
                v = v * (1.0 - np.float32(fib.psma_drop) * w)
            else:
                v = v * (1.0 + np.float32(fib.fapi_gain) * w)
        sub = suv[sl]
        sub[m] = v[m]
        means[lab] = float(sub[m].mean())
    return suv, means


def scale_gland_uptake(anat: Anatomy, suv: np.ndarray, factors: dict) -> tuple[np.ndarray, dict]:
    """A copy of a noise-free SUV map (:func:`suv_map`) with each gland label's voxels multiplied by
    ``factors[label]`` (missing labels: 1), and the new true SUVmean per gland label, computed as
    :func:`suv_map` computes it. The within-gland pattern (heterogeneity, fibrotic zones) and the
    rest of the body stay as they were: a follow-up scan with a known change of the glands' uptake."""
    lut = np.ones(max(int(anat.glands.max()), max(factors, default=0)) + 1, np.float32)
    for lab, f in factors.items():
        lut[int(lab)] = np.float32(f)
    out = suv * lut[anat.glands]
    means = {}
    for lab, sl in _gland_boxes(anat).items():
        means[lab] = float(out[sl][anat.glands[sl] == lab].mean())
    return out, means


# ---------------------------------------------------------------------------------------------
# rendering


def _block_mean(a: np.ndarray, k) -> np.ndarray:
    """Mean over blocks of k voxels (one number, or one per axis)."""
    k = tuple(int(v) for v in np.broadcast_to(np.asarray(k), (3,)))
    if k == (1, 1, 1):
        return a
    s = tuple((n // kk) * kk for n, kk in zip(a.shape, k))
    a = a[: s[0], : s[1], : s[2]]
    return a.reshape(s[0] // k[0], k[0], s[1] // k[1], k[1], s[2] // k[2], k[2]).mean(axis=(1, 3, 5), dtype=np.float32)


def _resample(src: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine: np.ndarray, world_dst_to_src: np.ndarray,
              order: int, cval: float, output=np.float32) -> np.ndarray:
    """Sample `src` at the voxels of the destination grid; world_dst_to_src maps destination-world
    points to source-world points (4x4)."""
    M = np.linalg.inv(src_affine) @ world_dst_to_src @ dst_affine
    return ndimage.affine_transform(src, M, output_shape=tuple(dst_shape), order=order, mode="constant",
                                    cval=cval, output=output, prefilter=False)


def render_pet(suv: np.ndarray, anat_affine: np.ndarray, pet_shape, pet_affine: np.ndarray, anat_to_pet: np.ndarray,
               psf_fwhm_mm: float, noise_alpha: float, rng: np.random.Generator, *, add_noise: bool = True,
               nac: bool = False) -> np.ndarray:
    """SUV image on the PET grid: pre-average to 2 mm, Gaussian PSF, sample on a fine grid covering
    the body, average down to the PET voxels, then noise with variance proportional to the mean."""
    sp = _spacing(anat_affine)
    k0 = np.array([max(1, int(round(2.0 / h))) for h in sp])  # per axis: anisotropic anatomy grids
    coarse = _block_mean(suv, k0)
    caff = anat_affine.copy()
    caff[:3, :3] = anat_affine[:3, :3] * k0[None, :]
    caff[:3, 3] = anat_affine[:3, 3] + anat_affine[:3, :3] @ ((k0 - 1) / 2.0)
    hc = sp * k0
    pet_vox = np.abs(np.diag(pet_affine)[:3])
    kf = [max(1, int(math.floor(v / 1.6))) for v in pet_vox]
    # PSF variance left after the pre-averaging (box) and the linear interpolation
    sig2 = (psf_fwhm_mm / 2.3548) ** 2 - hc ** 2 / 12.0 - hc ** 2 / 6.0 * 0.5
    sig = np.sqrt(np.maximum(sig2, 0.25))
    blurred = ndimage.gaussian_filter(coarse, sig / hc, mode="constant", truncate=3.0)
    # the fine grid: PET voxels subdivided by kf, only over the box that holds the body
    corners = np.array([[i, j, k, 1.0] for i in (0, suv.shape[0]) for j in (0, suv.shape[1]) for k in (0, suv.shape[2])])
    w = (anat_to_pet @ anat_affine @ corners.T).T[:, :3]
    inv = np.linalg.inv(pet_affine)
    idx = (inv[:3, :3] @ w.T).T + inv[:3, 3]
    lo = np.clip(np.floor(idx.min(0)).astype(int) - 3, 0, np.array(pet_shape))
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + 4, 0, np.array(pet_shape))
    out = np.zeros(pet_shape, np.float32)
    if np.all(hi > lo):
        n = hi - lo
        fine_aff = pet_affine.copy()
        fine_aff[:3, :3] = pet_affine[:3, :3] / np.array(kf)[None, :]
        fine_aff[:3, 3] = pet_affine[:3, :3] @ (lo - 0.5 + 0.5 / np.array(kf)) + pet_affine[:3, 3]
        fshape = tuple(int(a * b) for a, b in zip(n, kf))
        fine = _resample(blurred, caff, fshape, fine_aff, np.linalg.inv(anat_to_pet), order=1, cval=0.0)
        sub = fine.reshape(n[0], kf[0], n[1], kf[1], n[2], kf[2]).mean(axis=(1, 3, 5), dtype=np.float32)
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = sub
    if nac:
        body = out > 0.05
        d = ndimage.distance_transform_edt(body, sampling=pet_vox)
        out = out * np.exp(-0.0096 * 0.8 * np.minimum(d, 80.0)).astype(np.float32) * 2.2
        out = ndimage.gaussian_filter(out, 0.6)
    if add_noise:
        z = rng.standard_normal(pet_shape, dtype=np.float32)
        z = ndimage.gaussian_filter(z, 0.65)
        z /= z.std() + 1e-6
        var = np.float32(noise_alpha) * np.maximum(out, 0) + np.float32(4e-4)
        out = np.maximum(out + np.sqrt(var) * z, 0.0)
    return out.astype(np.float32)


def suv_to_bqml(suv: np.ndarray, injected_activity_bq: float, weight_kg: float, delay_s: float,
                half_life_s: float) -> np.ndarray:
    """Bq/mL decay-corrected to scan start: C = SUV * A_inj * exp(-ln2 dt / T1/2) / (weight_g)."""
    f = injected_activity_bq * math.exp(-math.log(2) * delay_s / half_life_s) / (weight_kg * 1000.0)
    return (suv * np.float32(f)).astype(np.float32)


def draw_ct_params(rng: np.random.Generator, age: float = 50.0) -> dict:
    """Individual CT numbers: tissue LUT, gland HU per label (:data:`GLAND_HU`, the parotid
    fattier with age), the fat fraction of each gland's surrounding shell (:data:`PERIGLAND_FAT`)
    and the noise SD."""
    lut = np.zeros(N_TISSUE, np.float32)
    for t, (m, sd) in _TISSUE_HU.items():
        lut[int(t)] = m + sd * rng.normal()
    lut[int(Tissue.MUSCLE)] = np.clip(lut[int(Tissue.MUSCLE)], *MUSCLE_HU_RANGE)
    person = {}
    for g, (med, sd, lo, hi) in GLAND_HU.items():
        v = med + sd * rng.normal()
        if g == "parotid":
            # age explains part of the spread: keep the total SD at `sd`
            v = med + PAROTID_HU_PER_YEAR * (age - MEAN_AGE) + math.sqrt(max(sd ** 2 - (PAROTID_HU_PER_YEAR * AGE_SD) ** 2, 1.0)) * rng.normal()
        person[g] = float(np.clip(v, lo, hi))
    person["sublingual"] = person["submandibular"] + 5.0 * rng.normal()
    gl, shell = {}, {}
    for lab in DEFAULT_LABELS:
        gl[lab.index] = person[lab.gland] + GLAND_SIDE_SD_HU * rng.normal()
        if lab.gland in PERIGLAND_FAT:
            f0, slope, fsd, lo, hi = PERIGLAND_FAT[lab.gland]
            shell[lab.index] = float(np.clip(f0 + slope * (gl[lab.index] + 5.0) + fsd * rng.normal(), lo, hi))
    return {"lut": lut, "gland_hu": gl, "perigland_fat": shell, "noise_sd": float(rng.uniform(*NOISE_SD_HU))}


_SHELL_SOFT = np.zeros(256, bool)
for _t in (Tissue.FAT, Tissue.SOFT, Tissue.MUSCLE, Tissue.LYMPH_NODE):
    _SHELL_SOFT[int(_t)] = True


def ct_hu_map(anat: Anatomy, ct: dict, rng: np.random.Generator) -> np.ndarray:
    """Noise-free HU on the anatomy grid, before pose, blur and noise: the tissue LUT, the glands
    (own HU, lobulation texture) and the fat septa of each gland's surrounding shell."""
    hu = ct["lut"][anat.tissue]
    sp = _spacing(anat.affine)
    fat_hu, soft_hu = np.float32(ct["lut"][int(Tissue.FAT)]), np.float32(ct["lut"][int(Tissue.SOFT)])
    shells = ct.get("perigland_fat", {})
    pad = np.ceil(PERIGLAND_MM / sp).astype(int) + 1
    for lab, sl in _gland_boxes(anat).items():
        gname = next(L.gland for L in DEFAULT_LABELS if L.index == lab)
        if lab in shells:
            # fat septa around the gland: within PERIGLAND_MM, soft tissue becomes fat where a smooth
            # field is low, so that `shells[lab]` of the shell is fat (the fat already there counts)
            bsl = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(sl, pad, anat.glands.shape))
            g = anat.glands[bsl] == lab
            d = ndimage.distance_transform_edt(~g, sampling=sp)
            t = anat.tissue[bsl]
            shell = (d > 0) & (d <= PERIGLAND_MM) & _SHELL_SOFT[t] & (anat.glands[bsl] == 0)
            if shell.any():
                # the shell's own tissue (fat planes of the anatomy, muscle, the 1-voxel rim of the
                # real-label individuals) is replaced by the drawn mixture: no continuous outline
                field = _smooth_field(g.shape, rng, corr_vox=PERIGLAND_CORR_MM / sp)
                thr = np.quantile(field[shell], float(shells[lab]))
                sub = hu[bsl]
                sub[shell & (field <= thr)] = fat_hu
                other = soft_hu if gname not in PERIGLAND_LIKE_GLAND else np.float32(ct["gland_hu"][lab])
                sub[shell & (field > thr)] = other
        m = anat.glands[sl] == lab
        tex = _smooth_field(m.shape, rng, corr_vox=3.0 / sp) * np.float32(12.0 if gname == "parotid" else 4.0)
        v = np.float32(ct["gland_hu"][lab]) + tex
        sub = hu[sl]
        sub[m] = v[m]
    return hu


def slice_profile(hu_anat: np.ndarray, anat_affine: np.ndarray, slice_mm: float = 2.5) -> np.ndarray:
    """Blur the anatomy-grid HU along z by a CT slice profile (done once per individual)."""
    h = float(abs(anat_affine[2, 2]))
    return ndimage.gaussian_filter1d(hu_anat, sigma=max(slice_mm / 2.3548 / h, 0.3), axis=2, truncate=2.0)


def render_ct(hu_anat: np.ndarray, anat_affine: np.ndarray, ct_shape, ct_affine: np.ndarray, anat_to_ct: np.ndarray,
              noise_sd: float, rng: np.random.Generator) -> np.ndarray:
    """HU on the CT grid: trilinear resampling (partial volume) of `hu_anat` (already blurred by
    :func:`slice_profile`), slight in-plane blur, correlated noise."""
    img = _resample(hu_anat, anat_affine, ct_shape, ct_affine, np.linalg.inv(anat_to_ct), order=1, cval=-1000.0)
    z = rng.standard_normal(ct_shape, dtype=np.float32)
    z = ndimage.gaussian_filter(z, NOISE_SIGMA_VOX)
    z *= np.float32(noise_sd / (z.std() + 1e-6))
    img = ndimage.gaussian_filter(img, (0.5, 0.5, 0.0)) + z
    return img


def resample_labels(labels: np.ndarray, anat_affine: np.ndarray, shape, affine: np.ndarray, anat_to_world: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label array into another grid (world = anat_to_world @ anatomy).
    Only the destination box that can hold non-zero labels is computed."""
    out = np.zeros(tuple(shape), np.uint8)
    nz = np.nonzero(labels.any(axis=(1, 2)))[0], np.nonzero(labels.any(axis=(0, 2)))[0], np.nonzero(labels.any(axis=(0, 1)))[0]
    if any(len(v) == 0 for v in nz):
        return out
    lo = [v[0] - 1 for v in nz]
    hi = [v[-1] + 2 for v in nz]
    corners = np.array([[i, j, k, 1.0] for i in (lo[0], hi[0]) for j in (lo[1], hi[1]) for k in (lo[2], hi[2])])
    idx = (np.linalg.inv(affine) @ anat_to_world @ anat_affine @ corners.T).T[:, :3]
    a = np.clip(np.floor(idx.min(0)).astype(int) - 1, 0, np.array(shape))
    b = np.clip(np.ceil(idx.max(0)).astype(int) + 2, 0, np.array(shape))
    if np.any(b <= a):
        return out
    sub_aff = affine.copy()
    sub_aff[:3, 3] = affine[:3, :3] @ a + affine[:3, 3]
    out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = _resample(labels, anat_affine, tuple(b - a), sub_aff,
                                                      np.linalg.inv(anat_to_world), order=0, cval=0, output=np.uint8)
    return out


__all__ = [
    "TracerParams", "Fibrosis", "ZONE_PROBABILITY", "draw_tracer_params", "draw_fapi_compound", "plant_fibrosis", "suv_map",
    "scale_gland_uptake", "render_pet", "suv_to_bqml", "draw_ct_params", "ct_hu_map", "render_ct", "resample_labels", "GLANDS",
]

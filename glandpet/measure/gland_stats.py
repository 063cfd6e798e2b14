"""Per-gland SUV statistics in PET space (the `gland_stats` table), with fractional label edges.

Labels are drawn on the CT grid (sub-millimetre to ~1 mm), the PET grid is coarser (2-4 mm).
A PET voxel at a gland edge is only partly gland. This module therefore works with **label
fractions**: for every PET voxel, the fraction of its volume covered by each label.

Conventions
-----------
* Arrays are indexed (i, j, k) = (x, y, z) like nibabel; an ``affine`` maps a voxel index to LPS
  millimetres (see :mod:`glandpet.phantom.model`). Anything that takes an affine also accepts the
  three voxel sizes in mm where only the voxel geometry matters (the grid must be orthogonal).
* SUV images may hold NaN / inf (outside the reconstructed field of view): such voxels are
  ignored everywhere (statistics, peak sphere, counts).

How label fractions are computed (:func:`label_fractions_on_grid`)
------------------------------------------------------------------
Each PET voxel is supersampled with ``s_x * s_y * s_z`` regularly spaced sub-points (default: at
least two sub-points per CT voxel along each PET axis, 2..10 per axis); every sub-point takes the
label of the CT voxel it falls in (nearest CT voxel, *no interpolation of label values*); the
fraction of a label is the share of sub-points carrying it. This is the volume (area-weighted)
overlap of the CT label map with the PET voxel, up to the sampling error of one sub-point layer.
Fractions of all labels in a voxel sum to at most 1.

Statistics (:func:`gland_statistics`) — the choices, and why
-----------------------------------------------------------
Let ``f_v`` be the gland's fraction in PET voxel ``v`` and ``s_v`` its SUV.

``volume_ml``
    From the CT label map when given (``volumes_ml``, e.g. :func:`volume_ml_from_labels`):
    the count of CT voxels x the CT voxel volume, which is exact for the segmentation as drawn.
    Otherwise ``sum_v f_v`` x the PET voxel volume (the same number up to supersampling error).
``suv_mean``
    Fraction-weighted mean ``sum f_v s_v / sum f_v``: the mean of the PET image over the
    segmented volume when each PET voxel is taken as uniform inside. It uses every partial
    voxel with its true weight (no arbitrary 50 % cut), is unbiased with respect to the
    segmentation's volume, and is the same regional mean the GTM uses as its observed value
    (``t_i`` in :mod:`glandpet.measure.pvc`), so ``suv_mean`` and ``suv_mean_pvc`` are comparable.
``suv_sd``
    Fraction-weighted standard deviation with the reliability-weights correction
    ``sum f (s - mean)^2 / (V1 - V2 / V1)``, ``V1 = sum f``, ``V2 = sum f^2``; with a binary
    mask it is exactly the sample SD (``ddof=1``).
``suv_median``, ``suv_p90``
    Fraction-weighted percentiles: the voxels sorted by SUV, each sits at the cumulative weight
    strictly below it divided by ``sum f - f_last``, linear interpolation in between. With a
    binary mask this is exactly ``numpy.percentile`` (``method='linear'``).
``suv_max``, ``suv_peak``, ``n_voxels``
    Defined on the gland's *majority voxels* (``f_v >= 0.5``, ``fraction_threshold``): a voxel
    that is mostly outside the gland must not report a neighbour's hot spot (e.g. the parotid
    next to the ear canal, the submandibular gland next to a lymph node). ``n_voxels`` is the
    number of majority voxels. A gland too small or thin to own a majority voxel (a thin
    lacrimal gland at 4 mm voxels) falls back to its voxel(s) of largest fraction.
``suv_peak``
    PERCIST-style: the mean SUV inside a sphere of 1 cm^3 (radius 6.2035 mm), whose centre is
    placed on a majority voxel's centre so as to maximise that mean. The sphere mean is exact on
    the voxel grid: every voxel contributes its SUV times the volume of its intersection with
    the sphere (:func:`sphere_kernel`: analytic along z, 2-D midpoint rule over x-y, then
    renormalised to the exact sphere volume), so anisotropic voxels are handled and a voxel
    cut by the sphere counts in proportion. The sphere samples the whole image, not only the
    gland (as in PERCIST). Where the sphere reaches outside the image (or onto non-finite
    voxels) the mean is taken over the part of the sphere inside valid image data.
``total_uptake_ml``
    ``suv_mean x volume_ml`` (SUV g/mL x mL: "mL" in the name by the table's convention).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from glandpet.glands import DEFAULT_LABELS, Label, read_label_table

#: Radius (mm) of the 1 cm^3 sphere of SUVpeak: (3 / (4 pi) * 1000 mm^3) ** (1/3).
PEAK_RADIUS_MM: float = (3000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # 6.2035049...
#: A voxel belongs to a gland for SUVmax / SUVpeak / n_voxels when its fraction is at least this.
FRACTION_THRESHOLD: float = 0.5

STAT_KEYS: tuple[str, ...] = (
    "volume_ml",
    "suv_max",
    "suv_peak",
    "suv_mean",
    "suv_median",
    "suv_sd",
    "suv_p90",
    "total_uptake_ml",
    "n_voxels",
)


# --------------------------------------------------------------------------------------------
# Grid geometry
# --------------------------------------------------------------------------------------------
def voxel_sizes(affine_or_sizes: np.ndarray | Sequence[float], *, require_orthogonal: bool = True) -> np.ndarray:
    """Voxel sizes (mm, 3,) from a 4x4 (or 3x3) affine, or the sizes themselves.

    With ``require_orthogonal`` a sheared grid (non-orthogonal axes) raises ValueError.
    """
    a = np.asarray(affine_or_sizes, dtype=float)
    if a.shape in ((3,), (1,)) or a.ndim == 0:
        sizes = np.broadcast_to(a, (3,)).astype(float)
    elif a.shape in ((4, 4), (3, 3)):
        m = a[:3, :3]
        sizes = np.linalg.norm(m, axis=0)
        if require_orthogonal:
            cos = (m.T @ m) / np.outer(sizes, sizes)
            off = np.abs(cos - np.eye(3)).max()
            if off > 1e-4:
                raise ValueError(f"voxel axes are not orthogonal (max |cos| {off:.2g}): sheared grids are not supported")
    else:
        raise ValueError(f"expected a 4x4 affine or 3 voxel sizes, got shape {a.shape}")
    if np.any(~np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"voxel sizes must be positive, got {sizes}")
    return sizes


def _voxel_volume_mm3(affine_or_sizes) -> float:
    a = np.asarray(affine_or_sizes, dtype=float)
    if a.shape in ((4, 4), (3, 3)):
        return float(abs(np.linalg.det(a[:3, :3])))
    return float(np.prod(voxel_sizes(a)))


def _as_label_table(label_table) -> list[Label]:
    if label_table is None:
        return list(DEFAULT_LABELS)
    if isinstance(label_table, (str, Path)):
        return read_label_table(label_table)
    out = []
    for lab in label_table:
        if isinstance(lab, Label):
            out.append(lab)
        elif isinstance(lab, Mapping):
            out.append(Label(int(lab["index"]), str(lab["gland"]), str(lab["side"])))
        else:
            out.append(Label(int(lab[0]), str(lab[1]), str(lab[2])))
    return out


# --------------------------------------------------------------------------------------------
# Volumes and label fractions
# --------------------------------------------------------------------------------------------
def volume_ml_from_labels(
    labels: np.ndarray, affine: np.ndarray | Sequence[float], label_values: Iterable[int] | None = None
) -> dict[int, float]:
    """Volume (mL) of each label value: voxel count x voxel volume (``|det affine|``).

    ``label_values``: the labels to report (absent ones give 0.0); default every positive value present.
    """
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError("labels must be integer-valued")
        lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError("labels must be non-negative")
    counts = np.bincount(lab.ravel().astype(np.int64, copy=False)) if lab.size else np.zeros(1, np.int64)
    vml = _voxel_volume_mm3(affine) / 1000.0
    if label_values is None:
        label_values = [int(v) for v in np.nonzero(counts)[0] if v > 0]
    return {int(v): (float(counts[v]) * vml if 0 <= v < counts.size else 0.0) for v in label_values}


def _bbox(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Inclusive-exclusive bounding box of a non-empty 3-D boolean mask."""
    lo, hi = [], []
    for ax in range(3):
        nz = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]) + 1)
    return lo, hi


def auto_supersample(affine_ct: np.ndarray, affine_pet: np.ndarray, per_ct_voxel: int = 2) -> tuple[int, int, int]:
    """Sub-points per PET voxel along each PET axis: ``per_ct_voxel`` per (smallest) CT voxel,
    clamped to ``per_ct_voxel``..10."""
    ct_min = float(voxel_sizes(affine_ct, require_orthogonal=False).min())
    pet = voxel_sizes(affine_pet, require_orthogonal=False)
    return tuple(int(min(max(math.ceil(per_ct_voxel * p / ct_min - 1e-9), per_ct_voxel), 10))  # type: ignore[return-value]
                 for p in pet)


def label_fractions_on_grid(
    labels_ct: np.ndarray,
    affine_ct: np.ndarray,
    pet_shape: Sequence[int],
    affine_pet: np.ndarray,
    label_values: Iterable[int],
    *,
    supersample: int | Sequence[int] | None = None,
    dtype=np.float32,
) -> dict[int, np.ndarray]:
    """Fraction of every PET voxel covered by each label of a CT-grid label map.

    Each PET voxel is sampled at ``s_x * s_y * s_z`` regular sub-points (``supersample``; default
    two per CT voxel along each PET axis, clamped to 2..10); a sub-point takes the label of the CT
    voxel containing it (nearest CT voxel: label values are never interpolated); sub-points outside
    the CT grid have no label. Returns ``{label: fraction array of pet_shape}`` (``dtype``; zeros for
    labels absent from the map). Works for any relative pose of the two grids (both affines map
    voxel indices to the same world frame). Only the PET voxels near the labels are sampled.
    """
    labels_ct = np.asarray(labels_ct)
    affine_ct = np.asarray(affine_ct, dtype=float)
    affine_pet = np.asarray(affine_pet, dtype=float)
    pet_shape = tuple(int(n) for n in pet_shape)
    values = np.array(sorted({int(v) for v in label_values}), dtype=np.int64)
    out = {int(v): np.zeros(pet_shape, dtype=dtype) for v in values}
    if values.size == 0 or labels_ct.size == 0:
        return out

    # Crop the CT to the bounding box of the labels of interest; remap to compact indices 1..n.
    hit = np.isin(labels_ct, values)
    if not hit.any():
        return out
    lo, hi = _bbox(hit)
    crop = labels_ct[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.int64)
    pos = np.searchsorted(values, crop)
    pos_c = np.minimum(pos, values.size - 1)
    compact = np.where(values[pos_c] == crop, pos_c + 1, 0).astype(np.uint8 if values.size < 255 else np.int32)
    del hit, crop, pos, pos_c

    # PET bounding box of the CT crop (its voxel corners mapped into PET index space).
    ct_to_pet = np.linalg.inv(affine_pet) @ affine_ct
    corners = np.array(
        [[lo[0] - 0.5 if a else hi[0] - 0.5, lo[1] - 0.5 if b else hi[1] - 0.5, lo[2] - 0.5 if c else hi[2] - 0.5, 1.0]
         for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    )
    pc = (ct_to_pet @ corners.T)[:3]
    plo = np.maximum(np.floor(pc.min(axis=1) + 0.5).astype(int) - 1, 0)
    phi = np.minimum(np.ceil(pc.max(axis=1) - 0.5).astype(int) + 2, pet_shape)
    if np.any(phi <= plo):
        return out
    bshape = tuple(int(n) for n in (phi - plo))
    nvox = int(np.prod(bshape))

    if supersample is None:
        ss = auto_supersample(affine_ct, affine_pet)
    else:
        ss = tuple(int(s) for s in np.broadcast_to(np.asarray(supersample), (3,)))
        if min(ss) < 1:
            raise ValueError("supersample must be >= 1")

    pet_to_ct = np.linalg.inv(affine_ct) @ affine_pet
    m = pet_to_ct[:3, :3]
    ii, jj, kk = np.meshgrid(*(np.arange(plo[a], phi[a], dtype=float) for a in range(3)), indexing="ij")
    base = np.stack([ii.ravel(), jj.ravel(), kk.ravel()])  # PET voxel centres (3, nvox)
    base = m @ base + pet_to_ct[:3, 3:4] - np.array(lo, dtype=float)[:, None]  # CT-crop continuous index
    del ii, jj, kk
    cshape = np.array(compact.shape)
    nl = values.size
    counts = np.zeros((nl + 1) * nvox, dtype=np.int32)
    vid = np.arange(nvox, dtype=np.int64)
    offs = [((np.arange(s) + 0.5) / s) - 0.5 for s in ss]
    for du in offs[0]:
        for dv in offs[1]:
            for dw in offs[2]:
                d = m @ np.array([du, dv, dw])
                idx = np.floor(base + d[:, None] + 0.5).astype(np.int64)
                inside = np.all((idx >= 0) & (idx < cshape[:, None]), axis=0)
                lab = np.zeros(nvox, dtype=np.int64)
                lab[inside] = compact[idx[0, inside], idx[1, inside], idx[2, inside]]
                counts += np.bincount(lab * nvox + vid, minlength=(nl + 1) * nvox).astype(np.int32)
    counts = counts.reshape(nl + 1, *bshape)
    nsub = float(np.prod(ss))
    sl = tuple(slice(int(plo[a]), int(phi[a])) for a in range(3))
    for n, v in enumerate(values, start=1):
        out[int(v)][sl] = (counts[n] / nsub).astype(dtype)
    return out


# --------------------------------------------------------------------------------------------
# SUVpeak sphere
# --------------------------------------------------------------------------------------------
def _disc_quadrant_area(y: np.ndarray, z: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Signed area of {Y^2 + Z^2 < rho^2} within the rectangle spanned by (0, 0) and (y, z)."""
    sy, sz = np.sign(y), np.sign(z)
    a = np.minimum(np.abs(y), rho)
    b = np.minimum(np.abs(z), rho)
    rho2 = rho * rho
    inside = a * a + b * b <= rho2
    ts = np.sqrt(np.clip(rho2 - b * b, 0.0, None))  # where the circle's height equals b (ts < a outside)

    def prim(t):  # integral_0^t sqrt(rho^2 - u^2) du
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(rho > 0, t / np.where(rho > 0, rho, 1.0), 0.0)
        return 0.5 * (t * np.sqrt(np.clip(rho2 - t * t, 0.0, None)) + rho2 * np.arcsin(np.clip(ratio, -1.0, 1.0)))

    g = np.where(inside, a * b, b * ts + prim(a) - prim(ts))
    return sy * sz * g


def sphere_kernel(voxel_size_mm: Sequence[float], radius_mm: float = PEAK_RADIUS_MM, *, n_sub: int | None = None) -> np.ndarray:
    """Fraction of each voxel's volume inside a sphere centred on the centre voxel's centre.

    Returns an odd-shaped array ``w`` (values in [0, 1]) with ``sum(w) * voxel volume == 4/3 pi r^3``.
    For each of ``n_sub`` x-slices per voxel (midpoint rule; default one per 0.01 mm, 64..2048) the area of the sphere's disc
    cross-section inside each voxel's y-z rectangle is computed in closed form; the tiny residual
    of the x-integration (~1e-6 relative) is removed by renormalising the partial voxels to the
    exact sphere volume.
    """
    sx, sy, sz = (float(v) for v in voxel_sizes(voxel_size_mm))
    r = float(radius_mm)
    if r <= 0:
        raise ValueError("radius must be positive")
    half = [int(math.floor(r / s + 0.5)) + 1 for s in (sx, sy, sz)]  # voxel i overlaps if (|i|-0.5) s < r
    nxv, nyv, nzv = (2 * h + 1 for h in half)
    if n_sub is None:
        n_sub = int(min(2048, max(64, math.ceil(sx / 0.01))))
    px = ((np.arange(nxv * n_sub) + 0.5) / n_sub - nxv / 2.0) * sx  # x midpoints (mm)
    rho = np.sqrt(np.clip(r * r - px**2, 0.0, None))[:, None, None]
    yb = (np.arange(nyv + 1) - nyv / 2.0) * sy  # voxel boundaries (mm)
    zb = (np.arange(nzv + 1) - nzv / 2.0) * sz
    S = _disc_quadrant_area(yb[None, :, None], zb[None, None, :], rho)  # (nx*n_sub, nyv+1, nzv+1)
    area = S[:, 1:, 1:] - S[:, :-1, 1:] - S[:, 1:, :-1] + S[:, :-1, :-1]  # (nx*n_sub, nyv, nzv)
    w = area.reshape(nxv, n_sub, nyv, nzv).sum(axis=1) / (n_sub * sy * sz)
    w = np.clip(w, 0.0, 1.0)
    exact = 4.0 / 3.0 * math.pi * r**3 / (sx * sy * sz)
    full = w >= 1.0 - 1e-12
    w[full] = 1.0
    part = w[~full].sum()
    if part > 0:
        w[~full] *= (exact - w[full].sum()) / part
    return w


def _peak_at(suv: np.ndarray, centres: np.ndarray, kernel: np.ndarray) -> float:
    """Max over ``centres`` (N,3 voxel indices) of the kernel-weighted mean of finite SUV."""
    from scipy.signal import fftconvolve

    half = np.array(kernel.shape) // 2
    lo = centres.min(axis=0) - half
    hi = centres.max(axis=0) + half + 1
    shape = np.array(suv.shape)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, shape)
    block = np.zeros(tuple(hi - lo))
    valid = np.zeros(tuple(hi - lo))
    dst = tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(src_lo, src_hi, lo))
    src = suv[tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi))].astype(float)
    ok = np.isfinite(src)
    block[dst] = np.where(ok, src, 0.0)
    valid[dst] = ok
    num = fftconvolve(block, kernel, mode="valid")  # kernel symmetric: convolution == correlation
    den = fftconvolve(valid, kernel, mode="valid")
    c = centres - centres.min(axis=0)
    n = num[c[:, 0], c[:, 1], c[:, 2]]
    d = den[c[:, 0], c[:, 1], c[:, 2]]
    good = d > 1e-6 * kernel.sum()
    if not good.any():
        return float("nan")
    return float(np.max(n[good] / d[good]))


def suv_peak(
    suv: np.ndarray,
    centre_mask: np.ndarray,
    affine_or_voxel_size: np.ndarray | Sequence[float],
    radius_mm: float = PEAK_RADIUS_MM,
    *,
    kernel: np.ndarray | None = None,
) -> float:
    """PERCIST SUVpeak: max over voxel centres in ``centre_mask`` of the exact 1 cm^3-sphere mean SUV."""
    centres = np.argwhere(np.asarray(centre_mask, dtype=bool))
    if centres.size == 0:
        return float("nan")
    if kernel is None:
        kernel = sphere_kernel(voxel_sizes(affine_or_voxel_size), radius_mm)
    return _peak_at(np.asarray(suv), centres, kernel)


# --------------------------------------------------------------------------------------------
# Weighted statistics
# --------------------------------------------------------------------------------------------
def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float | Sequence[float]) -> np.ndarray | float:
    """Weighted quantile(s), ``q`` in [0, 1]; equals ``numpy.quantile`` (linear) for equal weights.

    Sorted values sit at ``c_k = (cumulative weight strictly below k) / (sum w - w_last)``.
    """
    v = np.asarray(values, dtype=float).ravel()
    w = np.asarray(weights, dtype=float).ravel()
    keep = w > 0
    v, w = v[keep], w[keep]
    qs = np.atleast_1d(np.asarray(q, dtype=float))
    if v.size == 0:
        res = np.full(qs.shape, np.nan)
    elif v.size == 1:
        res = np.full(qs.shape, v[0])
    else:
        o = np.argsort(v, kind="stable")
        v, w = v[o], w[o]
        below = np.concatenate([[0.0], np.cumsum(w)[:-1]])
        denom = below[-1]
        c = below / denom
        res = np.interp(qs, c, v)
    return float(res[0]) if np.ndim(q) == 0 else res


def _weighted_stats(s: np.ndarray, f: np.ndarray) -> dict[str, float]:
    v1 = f.sum()
    mean = float((f * s).sum() / v1)
    v2 = (f * f).sum()
    denom = v1 - v2 / v1
    sd = float(math.sqrt(max((f * (s - mean) ** 2).sum() / denom, 0.0))) if denom > 1e-12 else float("nan")
    med, p90 = weighted_quantile(s, f, [0.5, 0.9])
    return {"suv_mean": mean, "suv_sd": sd, "suv_median": float(med), "suv_p90": float(p90)}


def _empty_row(lab: Label, volume: float | None) -> dict:
    row = {"gland": lab.gland, "side": lab.side, "label": lab.index}
    row.update({k: None for k in STAT_KEYS})
    row["volume_ml"] = volume
    row["n_voxels"] = 0
    return row


def gland_statistics(
    suv: np.ndarray,
    labels: np.ndarray | Mapping[int, np.ndarray],
    affine: np.ndarray | Sequence[float],
    label_table=None,
    *,
    volumes_ml: Mapping[int, float] | None = None,
    fraction_threshold: float = FRACTION_THRESHOLD,
    peak_radius_mm: float = PEAK_RADIUS_MM,
) -> list[dict]:
    """Per-gland statistics of one SUV image (see the module docstring for every definition).

    Parameters
    ----------
    suv
        SUV image (x, y, z), float; non-finite voxels are ignored.
    labels
        Either an integer label map on the SUV grid (binary membership), or ``{label value:
        fraction array}`` from :func:`label_fractions_on_grid`.
    affine
        The SUV grid's 4x4 affine (voxel -> LPS mm), or its three voxel sizes in mm.
    label_table
        ``list[Label]``, a label-table TSV path, or None for :data:`DEFAULT_LABELS`.
    volumes_ml
        ``{label value: mL}`` measured on the CT label map (:func:`volume_ml_from_labels`); labels
        missing here get ``sum(fraction) x PET voxel volume``.

    Returns one dict per label of the table, in table order, with keys ``gland, side, label`` and
    :data:`STAT_KEYS`. A gland with no finite voxel gets None statistics and ``n_voxels = 0``.
    """
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3-D, got shape {suv.shape}")
    table = _as_label_table(label_table)
    vox_ml = _voxel_volume_mm3(affine) / 1000.0
    kernel = sphere_kernel(voxel_sizes(affine), peak_radius_mm)
    finite = np.isfinite(suv)
    label_map = None
    if not isinstance(labels, Mapping):
        label_map = np.asarray(labels)
        if label_map.shape != suv.shape:
            raise ValueError(f"label map shape {label_map.shape} differs from SUV shape {suv.shape}")
    rows = []
    for lab in table:
        if label_map is not None:
            frac = (label_map == lab.index).astype(np.float32)
        else:
            frac = labels.get(lab.index)
            if frac is None:
                rows.append(_empty_row(lab, None if not volumes_ml or lab.index not in volumes_ml else float(volumes_ml[lab.index])))
                continue
            frac = np.asarray(frac)
            if frac.shape != suv.shape:
                raise ValueError(f"fraction map of label {lab.index} has shape {frac.shape}, SUV {suv.shape}")
        if volumes_ml is not None and lab.index in volumes_ml:
            volume = float(volumes_ml[lab.index])
        else:
            volume = float(np.sum(frac, dtype=np.float64)) * vox_ml
        sel = (frac > 0) & finite
        idx = np.nonzero(sel)
        if idx[0].size == 0:
            rows.append(_empty_row(lab, volume))
            continue
        f = frac[idx].astype(np.float64)
        s = suv[idx].astype(np.float64)
        row = {"gland": lab.gland, "side": lab.side, "label": lab.index, "volume_ml": volume}
        row.update(_weighted_stats(s, f))
        major = f >= fraction_threshold
        n_major = int(major.sum())
        if n_major == 0:  # too thin / small for a majority voxel: use its most-covered voxel(s)
            major = f >= f.max() - 1e-6
        centres = np.stack(idx, axis=1)[major]
        row["suv_max"] = float(s[major].max())
        row["suv_peak"] = _peak_at(suv, centres, kernel)
        row["total_uptake_ml"] = row["suv_mean"] * volume
        row["n_voxels"] = n_major
        rows.append({k: row.get(k) for k in ("gland", "side", "label") + STAT_KEYS})
    return rows

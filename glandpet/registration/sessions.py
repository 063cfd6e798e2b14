"""CT->CT alignment of a subject's two sessions: anatomy search, rigid, affine and SyN stages."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import tempfile
import time

import numpy as np

from glandpet.layout import session_transform_paths
from glandpet.registration.field_of_view import (
    BODY_HU,
    HEAD_NECK_DEPTH_MM,
    HEAD_NECK_MARGIN_MM,
    body_com,
    body_mask,
    crop,
    head_centre,
    head_neck_box,
    resample_iso,
    world_coords,
)
from glandpet.registration.pet_to_ct import mutual_information
from glandpet.registration.transforms import (
    as_float,
    load_ants,
    rotation_angle_deg,
    run_registration,
    set_threads,
    transform_matrix,
    translation_transform,
)

#: CT->CT registrations run on a head-and-neck crop resampled to this spacing.
CT_CT_SPACING_MM = 2.0


#: Rigid then affine (Mattes MI): moments-free centre-of-mass (body mask) initialisation, coarse
#: levels of 8 and 4 mm capture rotations of 10-15 degrees without the 18-degree false optimum
#: an unconstrained affine found from a raw start.
CT_CT_RIGID = dict(
    transform="Rigid[0.1]", bins=32, sampling=0.25, iterations=(200, 100, 30),
    shrink=(4, 2, 1), smooth_vox=(2, 1, 0), convergence=(1e-6, 10),
)


CT_CT_AFFINE = dict(
    transform="Affine[0.1]", bins=32, sampling=0.25, iterations=(100, 50, 0),
    shrink=(4, 2, 1), smooth_vox=(2, 1, 0), convergence=(1e-6, 10),
)


#: Deformable stage for the session alignment (same subject: small deformations). Mattes MI, dense,
#: at the 8 and 4 mm levels: CC (radius 2) with a 2 mm level took >10 min on a loaded machine.
SESSION_SYN = dict(
    transform="SyN[0.2,3,0]", metric="MI", bins=32, sampling=1.0, iterations=(40, 20, 0),
    shrink=(4, 2, 1), smooth_vox=(2, 1, 0), convergence=(1e-6, 10),
)


def prepare_ct(img, spacing_mm: float = CT_CT_SPACING_MM, depth_mm: float = HEAD_NECK_DEPTH_MM,
               margin_mm: float = HEAD_NECK_MARGIN_MM):
    """Head-and-neck crop of a CT, resampled to ``spacing_mm``; returns (image, body mask image)."""
    ants = load_ants()
    img = as_float(img)
    lo, hi = head_neck_box(img, depth_mm, margin_mm)
    c = crop(img, lo, hi)
    r = resample_iso(c, spacing_mm)
    m = body_mask(r)
    mask = ants.from_numpy(m.astype(np.float32), origin=r.origin, spacing=r.spacing, direction=r.direction)
    return r, mask


#: anatomy search (:func:`anatomy_translation`): grid spacing (mm) of the exhaustive translation
#: search, and the share of the smaller scan's body that any candidate must overlap.
SEARCH_SPACING_MM = 8.0


SEARCH_MIN_OVERLAP = 0.5


def _correlate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``C[k] = sum_i b[i] a[i + k - (n_b - 1)]`` for every shift (FFT, 'full' size)."""
    from scipy.signal import fftconvolve

    return fftconvolve(a, b[::-1, ::-1, ::-1], mode="full")


def _masked_ncc(f: np.ndarray, mf: np.ndarray, m: np.ndarray, mm: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of ``f`` and ``m`` over their overlap, for every integer shift
    at once (Padfield, IEEE TIP 2012: each sum over the overlap is one FFT correlation with the
    validity masks ``mf``, ``mm``)."""
    f, m = f * mf, m * mm
    n = np.maximum(_correlate(mm, mf), 1.0)
    sf, sm = _correlate(mm, f), _correlate(m, mf)
    cov = _correlate(m, f) - sf * sm / n
    vf = np.maximum(_correlate(mm, f * f) - sf ** 2 / n, 1e-6)
    vm = np.maximum(_correlate(m * m, mf) - sm ** 2 / n, 1e-6)
    return cov / np.sqrt(vf * vm)


def _search_features(hu: np.ndarray) -> list[np.ndarray]:
    """The two images compared by the anatomy search: soft tissue (HU clipped to [-200, 300]: fat,
    muscle, airways, the body outline) and bone (0 below 150 HU, 1 from 550 HU)."""
    return [np.clip(hu, -200.0, 300.0), np.clip((hu - 150.0) / 400.0, 0.0, 1.0)]


def anatomy_translation(fixed, moving, spacing_mm: float = SEARCH_SPACING_MM,
                        min_overlap: float = SEARCH_MIN_OVERLAP, moving_box=None) -> np.ndarray:
    """Translation ``t`` (LPS mm, fixed point x -> moving point x + t) that best superposes the
    anatomy of two CTs, found from the images alone (no shared world frame needed).

    Scans of different patients (or scanners) share no world frame, and their fields of view
    differ: one stops just above the parotids, another runs from the vertex to the chest, so the
    body's centre of mass or its most superior point are no landmarks. Here every translation on a
    ``spacing_mm`` grid is scored at once (FFT) by the normalised cross-correlation of the two
    scans over their overlap, averaged over a soft-tissue and a bone image
    (:func:`_search_features`: skull base, mandible and cervical spine, present in every
    head-and-neck scan, dominate the bone term). Candidates whose overlap holds less than
    ``min_overlap`` of the smaller scan's body (on either side) are not considered, so that a
    sliver of overlap cannot win. Measured on 60 random pairs of 24 real planning CTs (error of the
    translation at the parotids' midpoint): median 20 mm, 90th percentile 35 mm, against 32 / 77 mm
    for the body centres of mass; the rigid and affine stages started from it do the rest.

    ``moving_box`` (world LPS ``(lo, hi)``): only the moving scan's anatomy inside it is searched
    for (a region of interest, e.g. an atlas's glands with a margin), and a candidate must overlap
    ``min_overlap`` of that region; used by
    :func:`glandpet.segmentation.atlas_registration.register_atlas_linear`."""
    ants = load_ants()
    f = resample_iso(as_float(fixed), spacing_mm)
    mv = resample_iso(as_float(moving), spacing_mm)
    # the moving scan on a grid with the fixed scan's axes (integer shifts = world translations)
    d = np.asarray(f.direction, float)
    sh = np.array(mv.shape) - 1
    corners = np.array([[a, b, c] for a in (0, sh[0]) for b in (0, sh[1]) for c in (0, sh[2])])
    loc = world_coords(mv, corners) @ d
    lo = loc.min(0)
    n = np.ceil((loc.max(0) - lo) / spacing_mm).astype(int) + 1
    ref = ants.make_image(tuple(int(v) for v in n), spacing=(spacing_mm,) * 3, origin=tuple(d @ lo),
                          direction=d)
    m = ants.resample_image_to_target(mv, ref, interp_type="linear").numpy().astype(np.float64)
    valid = ants.resample_image_to_target(mv * 0 + 1, ref, interp_type="linear").numpy() > 0.5
    m[~valid] = -1000.0
    if moving_box is not None:
        w = world_coords(ref, np.argwhere(np.ones(m.shape, bool))).reshape(m.shape + (3,))
        valid &= ((w >= np.asarray(moving_box[0], float)) & (w <= np.asarray(moving_box[1], float))).all(-1)
    fa = f.numpy().astype(np.float64)
    mf, mm = np.ones(fa.shape), valid.astype(np.float64)
    score = sum(_masked_ncc(a, mf, b, mm) for a, b in zip(_search_features(fa), _search_features(m))) / 2.0
    if moving_box is not None:
        score[_correlate(mm, mf) < min_overlap * mm.sum()] = -np.inf
    else:
        bf, bm = (fa > BODY_HU).astype(np.float64), ((m > BODY_HU) & valid).astype(np.float64)
        need = min_overlap * min(bf.sum(), bm.sum())
        score[(_correlate(mm, bf) < need) | (_correlate(bm, mf) < need)] = -np.inf
    k = np.array(np.unravel_index(int(np.argmax(score)), score.shape))
    shift = k - (np.array(fa.shape) - 1)
    return np.asarray(ref.origin, float) - np.asarray(f.origin, float) + d @ (shift * spacing_mm)


def register_ct_to_ct(fixed, moving, outprefix: str, stages: list[dict], *, com_init: bool = True,
                      init: str = "com", fixed_mask=None, verbose: bool = False) -> dict:
    """Register prepared CTs (ANTs images) with the given stages. Initial translation (``init``):
    ``"com"``, the centres of mass of the body masks aligned (robust to HU offsets, unlike intensity
    moments of CT; right for two sessions of one patient on one table), or ``"search"``, the
    anatomy found from the images (:func:`anatomy_translation`: scans of different patients with
    different fields of view). ``com_init=False``: no initial translation."""
    cf = body_com(fixed)
    if not com_init:
        t = np.zeros(3)
    elif init == "search":
        t = anatomy_translation(fixed, moving)
    elif init == "com":
        t = body_com(moving) - cf
    else:
        raise ValueError(f"init must be 'com' or 'search', not {init!r}")
    initial = [translation_transform(t, outprefix + "init.mat", centre=cf)]
    return run_registration(fixed, moving, stages, outprefix, initial=initial, fixed_mask=fixed_mask,
                            verbose=verbose)


def align_sessions(fixed_ct, moving_ct, out_prefix, threads: int = 1, *, spacing_mm: float = CT_CT_SPACING_MM,
                   syn: dict | None = None, verbose: bool = False) -> dict:
    """Align the FAPI session's CT (moving) to the PSMA session's CT (fixed).

    Rigid -> affine -> SyN on the head-and-neck crop of both CTs at ``spacing_mm`` (the warp is
    defined on the fixed crop only: outside it the transform is the affine). Writes
    ``{out_prefix}_xfm.mat`` (affine), ``{out_prefix}_xfm.nii.gz`` (warp) and
    ``{out_prefix}_invxfm.nii.gz`` (inverse warp); together they map PSMA-CT points to FAPI-CT
    points (fixed -> moving). Returns paths and metrics (MI / CC before and after, seconds,
    rotation and displacement of the affine at the head centre).
    """
    set_threads(threads)
    ants = load_ants()
    t0 = time.perf_counter()
    f, fmask = prepare_ct(ants.image_read(str(fixed_ct)), spacing_mm)
    m, _ = prepare_ct(ants.image_read(str(moving_ct)), spacing_mm, margin_mm=HEAD_NECK_MARGIN_MM + 20)
    paths = session_transform_paths(out_prefix)
    Path(paths["affine"]).parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="gp_sess_")
    try:
        register_ct_to_ct(f, m, os.path.join(tmp, "s"), [CT_CT_RIGID, CT_CT_AFFINE, syn or SESSION_SYN],
                          verbose=verbose)
        shutil.copyfile(os.path.join(tmp, "s0GenericAffine.mat"), paths["affine"])
        shutil.copyfile(os.path.join(tmp, "s1Warp.nii.gz"), paths["warp"])
        shutil.copyfile(os.path.join(tmp, "s1InverseWarp.nii.gz"), paths["inverse_warp"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    before = ants.resample_image_to_target(m, f, interp_type="linear")
    after = ants.apply_transforms(f, m, [paths["warp"], paths["affine"]], interpolator="linear")
    A, b = transform_matrix(paths["affine"])
    c = head_centre(f)
    out = dict(paths)
    out.update({
        "mi_before": mutual_information(f, before),
        "mi_after": mutual_information(f, after),
        "cc_before": _cc(f, before, fmask),
        "cc_after": _cc(f, after, fmask),
        "affine_rotation_deg": rotation_angle_deg(A / np.cbrt(abs(np.linalg.det(A)))),
        "affine_displacement_mm": float(np.linalg.norm(A @ c + b - c)),
        "seconds": time.perf_counter() - t0,
    })
    return out


def _cc(a, b, mask) -> float:
    x = a.numpy()[mask.numpy() > 0]
    y = b.numpy()[mask.numpy() > 0]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])

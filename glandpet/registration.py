"""Rigid PET->CT registration and CT->CT session alignment with ANTsPy.

Transform convention (ANTs / ITK, used by every file this module writes)
------------------------------------------------------------------------
A registration has a *fixed* and a *moving* image. The transform it writes maps **points of the
fixed space to points of the moving space** (LPS millimetres). That is the direction needed to
resample the moving image onto the fixed grid (``ants.apply_transforms(fixed, moving, [xfm])``).

* ``register_pet_to_ct``: fixed = CT, moving = PET. The ``from-pet_to-ct`` ``.mat`` maps a CT
  point to the PET point that images the same tissue; apply it as is to bring PET (or SUV)
  images into CT space, and *inverted* to bring CT-space label maps onto the PET grid
  (:func:`glandpet.segmentation.labels_to_pet`).
* ``align_sessions``: fixed = the PSMA session's CT, moving = the FAPI session's CT. The composed
  transform ``[warp, affine]`` maps PSMA-CT points to FAPI-CT points; apply it to bring FAPI
  images into PSMA space (:func:`apply_session_transform`), and its inverse
  ``[affine^-1, inverse warp]`` to bring PSMA-space labels into FAPI space
  (:func:`apply_inverse_session_transform`).

Schedules are explicit (see the module constants): ANTsPy's presets run long fixed affine
schedules and ignore some arguments, so this module drives ``antsRegistration`` directly
through ANTsPy's library entry point, one call per registration with all its stages.

Images are read with ANTs (ITK: LPS world coordinates); NIfTI files on disk store RAS affines.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .layout import session_transform_paths

# ------------------------------------------------------------------ schedules (documented choices)
#: PET->CT: the CT is smoothed and resampled to this spacing first (the PET is ~4 mm): 28 s -> ~4 s.
PET_CT_SPACING_MM = 3.0
#: PET->CT rigid, two stages. Mattes MI (32 bins) copes with the PET/CT intensity relation; on a
#: 3 mm grid the levels are 12, 6, 3 mm; the correction expected from the shared frame of reference
#: is small (a few mm / degrees), so a 0.1 step is safe. The rotation centre is the head centre (see
#: translation_transform): with ANTs' default centre (world origin) a 2.7 deg rotation was
#: recovered as 1.4 deg.
#: Stage 1, the 12 mm level, samples every voxel: it is cheap (1/64 of the grid), and with 10 %
#: sampling it had only ~1,000 samples, whose noise moved the transform ~1 mm before the finer
#: levels started; 24 runs (8 sampling seeds x identity and two known rigid moves of the test
#: phantom) ended up to 1.36 mm from the truth at the glands (median 0.63), with this stage
#: 0.82 (median 0.48). Dense sampling on every level gets 0.53 but costs 20 s.
PET_CT_COARSE = dict(
    transform="Rigid[0.1]", bins=32, sampling=1.0, iterations=(100,),
    shrink=(4,), smooth_vox=(2,), convergence=(1e-6, 10),
)
#: Stage 2, the 6 and 3 mm levels, 10 % regular sampling (4.4 s CPU vs 11.8 s at 25 %, no loss of
#: accuracy on the real-anatomy phantom; at least 60,000 samples on small grids). Both stages on
#: the real-anatomy phantom: 7.6 s a session (one stage: 6.8 s), residual at the glands median
#: 0.49 mm over 8 sessions x 2 seeds (one stage: 0.48).
PET_CT_RIGID = dict(
    transform="Rigid[0.1]", bins=32, sampling=0.1, iterations=(100, 50),
    shrink=(2, 1), smooth_vox=(1, 0), convergence=(1e-6, 10),
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

#: head-and-neck crop: this far below the top of the body (vertex), with this margin around the body.
HEAD_NECK_DEPTH_MM = 280.0
HEAD_NECK_MARGIN_MM = 10.0
BODY_HU = -500.0

#: QC: a PET->CT correction above these is implausible for a shared frame of reference.
WARN_DISPLACEMENT_MM = 10.0
WARN_ROTATION_DEG = 5.0


# ------------------------------------------------------------------ threads and low-level runner
#: environment variables holding a thread count: ITK's (read by ANTs' thread pool), then the BLAS /
#: OpenMP ones that :func:`set_threads` also sets with ``blas=True``.
ITK_THREAD_VARS = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",)
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def set_threads(threads: int | None, *, blas: bool = False) -> int:
    """Set the ITK thread count used by ANTs (environment variable read by ITK's thread pool) and,
    with ``blas=True``, the OpenMP / OpenBLAS / MKL ones too (the workflow's steps limit all of them
    to what Snakemake granted the job). Returns the count set: ``threads``, at least 1.

    ITK reads it once, at its first use in the process: every workflow job is a fresh process, so
    the rule's ``threads`` hold; a second call with another count in the same process has no effect.
    """
    n = max(1, int(threads or 1))
    for var in ITK_THREAD_VARS + (BLAS_THREAD_VARS if blas else ()):
        os.environ[var] = str(n)
    return n


def _ants():
    import ants  # imported lazily: the thread variable must be set first

    return ants


def _as_float(img):
    return img.clone("float")


def _stage_args(stage: dict, fixed_str: str, moving_str: str, mask_opt: str | None) -> list[str]:
    metric = stage.get("metric", "MI")
    if metric == "MI" and float(stage.get("sampling", 1.0)) >= 1.0:
        m = f"MI[{fixed_str},{moving_str},1,{stage['bins']}]"  # dense
    elif metric == "MI":
        m = f"MI[{fixed_str},{moving_str},1,{stage['bins']},Regular,{stage['sampling']}]"
    elif metric == "CC":
        m = f"CC[{fixed_str},{moving_str},1,{stage['radius']}]"
    elif metric == "MeanSquares":
        m = f"MeanSquares[{fixed_str},{moving_str},1,0,Regular,{stage.get('sampling', 0.25)}]"
    else:
        raise ValueError(f"unknown metric {metric!r}")
    thr, win = stage["convergence"]
    its = "x".join(str(i) for i in stage["iterations"])
    args = [
        "--transform", stage["transform"],
        "--metric", m,
        "--convergence", f"[{its},{thr},{win}]",
        "--shrink-factors", "x".join(str(s) for s in stage["shrink"]),
        "--smoothing-sigmas", "x".join(str(s) for s in stage["smooth_vox"]) + "vox",
    ]
    if mask_opt:
        args += ["--masks", mask_opt]
    return args


def run_registration(fixed, moving, stages: list[dict], outprefix: str, initial: list[str] | None = None,
                     fixed_mask=None, moving_mask=None, seed: int = 1, verbose: bool = False) -> dict:
    """One ``antsRegistration`` call with the given stages (in-memory ANTs images).

    ``initial``: transform files for ``--initial-moving-transform`` (applied in ITK order).
    Returns ``{"fwdtransforms": [...], "invtransforms": [...], "warped": image}`` like
    ``ants.registration`` (forward list for ``apply_transforms(fixed, moving, fwd)``).
    Transforms are collapsed: at most one affine (``0GenericAffine.mat``, including the initial
    linear transforms) and one warp (``1Warp.nii.gz`` + ``1InverseWarp.nii.gz``).
    """
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    fixed = _as_float(fixed)
    moving = _as_float(moving)
    warped = fixed.clone()
    inv_warped = moving.clone()
    fs, ms = get_pointer_string(fixed), get_pointer_string(moving)
    mask_opt = None
    keep = []
    if fixed_mask is not None or moving_mask is not None:
        parts = []
        for m in (fixed_mask, moving_mask):
            if m is None:
                parts.append("NA")
            else:
                mb = (m != 0).clone("unsigned char")
                keep.append(mb)
                parts.append(get_pointer_string(mb))
        mask_opt = f"[{parts[0]},{parts[1]}]"
    args = ["--dimensionality", "3", "--float", "1", "--collapse-output-transforms", "1",
            "--winsorize-image-intensities", "[0.005,0.995]", "--use-histogram-matching", "0",
            "--random-seed", str(int(seed))]
    for t in initial or []:
        args += ["--initial-moving-transform", t]
    for st in stages:
        args += _stage_args(st, fs, ms, mask_opt)
    args += ["--output", f"[{outprefix},{get_pointer_string(warped)},{get_pointer_string(inv_warped)}]"]
    if verbose:
        args += ["-v", "1"]
    rc = get_lib_fn("antsRegistration")(process_arguments(args))
    if rc != 0:
        raise RuntimeError(f"antsRegistration failed (exit {rc}); arguments: {' '.join(args)}")
    aff = outprefix + "0GenericAffine.mat"
    warp = outprefix + "1Warp.nii.gz"
    inv = outprefix + "1InverseWarp.nii.gz"
    fwd, invl = [], []
    if os.path.exists(warp):
        fwd.append(warp)
    if os.path.exists(aff):
        fwd.append(aff)
        invl.append(aff)
    if os.path.exists(inv):
        invl.append(inv)
    return {"fwdtransforms": fwd, "invtransforms": invl, "warped": warped, "inv_warped": inv_warped}


# ------------------------------------------------------------------ geometry helpers
def world_coords(img, index: np.ndarray) -> np.ndarray:
    """LPS coordinates (N, 3) of voxel indices (N, 3) of an ANTs image."""
    d = np.asarray(img.direction, float)
    sp = np.asarray(img.spacing, float)
    org = np.asarray(img.origin, float)
    return (np.asarray(index, float) * sp) @ d.T + org


def body_mask(img, threshold: float = BODY_HU) -> np.ndarray:
    """Largest connected body component of a CT (HU > threshold), as a numpy bool array."""
    from scipy import ndimage as ndi

    m = img.numpy() > threshold
    lab, n = ndi.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    return m


def head_neck_box(img, depth_mm: float = HEAD_NECK_DEPTH_MM, margin_mm: float = HEAD_NECK_MARGIN_MM,
                  body: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index box (lower, upper inclusive) of the head and neck: the body within ``depth_mm``
    below its most superior point (LPS +z), plus ``margin_mm`` all round, clipped to the image."""
    if body is None:
        body = body_mask(img)
    idx = np.argwhere(body)
    if len(idx) == 0:
        return np.zeros(3, int), np.array(img.shape) - 1
    sub = idx[:: max(1, len(idx) // 200000)]
    z = world_coords(img, sub)[:, 2]
    ztop = z.max()
    zall = world_coords(img, idx)[:, 2]
    keep = idx[zall >= ztop - depth_mm]
    sp = np.asarray(img.spacing, float)
    marg = np.ceil(margin_mm / sp).astype(int)
    lo = np.maximum(keep.min(0) - marg, 0)
    hi = np.minimum(keep.max(0) + marg, np.array(img.shape) - 1)
    return lo, hi


def crop(img, lo, hi):
    return _ants().crop_indices(img, [int(v) for v in lo], [int(v) + 1 for v in hi])


def resample_iso(img, spacing_mm: float, interp: str = "linear", smooth: bool = True):
    """Resample to an isotropic grid (anti-aliasing Gaussian first when downsampling)."""
    ants = _ants()
    sp = np.asarray(img.spacing, float)
    if smooth and np.any(spacing_mm > sp * 1.2):
        sig = [max(0.0, 0.5 * math.sqrt(max(spacing_mm**2 - s**2, 0.0))) for s in sp]
        img = ants.smooth_image(img, sig, sigma_in_physical_coordinates=True)
    return ants.resample_image(img, (spacing_mm,) * 3, use_voxels=False,
                               interp_type=0 if interp == "linear" else 1)


def body_com(img, threshold: float = BODY_HU) -> np.ndarray:
    m = body_mask(img, threshold)
    idx = np.argwhere(m)
    if len(idx) == 0:
        return world_coords(img, (np.array(img.shape) - 1)[None] / 2.0)[0]
    return world_coords(img, idx.mean(0)[None])[0]


def head_centre(img, depth_mm: float = 180.0) -> np.ndarray:
    """Centroid (LPS mm) of the body in the ``depth_mm`` below the vertex (a head-centre proxy)."""
    m = body_mask(img)
    idx = np.argwhere(m)
    if len(idx) == 0:
        return world_coords(img, (np.array(img.shape) - 1)[None] / 2.0)[0]
    w = world_coords(img, idx)
    w = w[w[:, 2] >= w[:, 2].max() - depth_mm]
    return w.mean(0)


def translation_transform(t_lps, path: str, centre=(0.0, 0.0, 0.0)) -> str:
    """Write an ITK affine that maps x -> x + t (LPS mm), with its centre (the centre of rotation
    of the linear stages initialised from it) at ``centre``. A centre far from the anatomy (the
    world origin can be a metre away) couples rotations with huge translations and stalls the
    optimiser: always pass the image or head centre."""
    ants = _ants()
    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="float", dimension=3,
                                    translation=tuple(float(v) for v in t_lps),
                                    center=tuple(float(v) for v in centre))
    ants.write_transform(tx, path)
    return path


#: ITK transform types whose 12 parameters are the row-major matrix A then the translation t,
#: about the fixed centre c: T(x) = A (x - c) + c + t
_MATRIX_OFFSET_TYPES = ("AffineTransform", "MatrixOffsetTransformBase")


def transform_matrix(xfm_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``T(x) = A x + b`` (LPS mm) for a linear ITK transform file.

    The ``.mat`` files ANTs writes for affine transforms are read directly (no ANTs import: 3.8 s
    of every measurement job went to importing ANTsPy to read 15 numbers); other files and
    transform types are read through ANTs."""
    if str(xfm_path).endswith(".mat"):
        from scipy.io import loadmat

        try:
            content = loadmat(str(xfm_path))
        except (ValueError, TypeError, OSError):  # not a MATLAB-format file: let ITK read it
            content = {}
        params = [v for k, v in content.items() if k.split("_")[0] in _MATRIX_OFFSET_TYPES]
        if len(params) == 1 and params[0].size == 12 and "fixed" in content and content["fixed"].size == 3:
            p = np.asarray(params[0], float).ravel()
            A, t, c = p[:9].reshape(3, 3), p[9:], np.asarray(content["fixed"], float).ravel()
            return A, t + c - A @ c
    ants = _ants()
    tx = ants.read_transform(xfm_path)
    b = np.asarray(tx.apply_to_point((0.0, 0.0, 0.0)), float)
    A = np.column_stack([np.asarray(tx.apply_to_point(tuple(e)), float) - b for e in np.eye(3) * 100.0]) / 100.0
    return A, b


def rotation_angle_deg(A: np.ndarray) -> float:
    c = (np.trace(A) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


#: QC mutual information: joint histogram of MI_BINS x MI_BINS over the fixed CT's body, each image
#: clipped to its MI_CLIP_PERCENTILES first.
MI_BINS = 64
MI_CLIP_PERCENTILES = (0.5, 99.5)


def _mi(fixed, moving_on_fixed) -> float:
    """Mutual information (nats; larger = better aligned) of two images on one grid, for QC.

    Counted over the fixed CT's body (``body_mask``) from a 64 x 64 joint histogram, each image
    clipped to its 0.5-99.5th percentiles. Not ANTs' ``image_mutual_information``: that returns
    the ITK v4 metric value, the NEGATIVE Mattes MI (an optimiser minimises it; it was negated
    here, so the sign was right), but with 32 bins spanning each image's full range over the whole
    field, and a hot focus (the demo's PET maximum is 9x its 99th percentile) or dental metal
    leaves the body in two or three bins: it barely moved with alignment and fell after half the
    demo's PET->CT registrations that brought the PET 1-3 mm nearer its CT (issue 17;
    tests/test_registration.py test_pet_to_ct_qc_reports_the_improvement)."""
    mask = body_mask(fixed)
    if mask.sum() < 2:
        return float("nan")
    values = []
    for img in (fixed, moving_on_fixed):
        v = img.numpy()[mask].astype(np.float64)
        lo, hi = np.percentile(v, MI_CLIP_PERCENTILES)
        values.append(np.clip(v, lo, hi))
    joint, _, _ = np.histogram2d(values[0], values[1], bins=MI_BINS)
    p = joint / joint.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum())


# ------------------------------------------------------------------ PET -> CT
def register_pet_to_ct(ct_path, pet_path, out_xfm, threads: int = 1, *, spacing_mm: float = PET_CT_SPACING_MM,
                       verbose: bool = False) -> dict:
    """Rigid PET->CT registration (Mattes MI), started from identity (shared frame of reference).

    Run it with ``threads=1`` (the workflow does): ITK's multi-threaded Mattes MI accumulates the
    joint-histogram derivatives in a run-dependent order, so two runs with 2 threads ended up to
    0.34 mm apart at the corners of the field; one thread gives bit-identical transforms on every
    run on a machine, in ~7.5 s per session (measured on the real-anatomy phantom). Another CPU
    may round differently (on the test phantom's identity case a CI machine ended 1.04 mm from
    the truth where this machine ended 0.55 mm), which is why the schedule is made robust to
    sampling noise (see PET_CT_COARSE).

    Writes ``out_xfm``: an ITK transform mapping **CT points to PET points** (fixed = CT,
    moving = PET). Returns QC metrics: ``mi_before``, ``mi_after`` (mutual information of the CT
    and the PET on the 3 mm CT grid, over the body, see ``_mi``; larger = better aligned), ``rotation_deg``, ``translation_mm`` (the transform's translation at the
    head centre, CT->PET), ``displacement_mm`` (|T(c) - c| at the head centre c),
    ``head_centre_lps``, ``seconds``, and ``warning`` (None, or why the correction is implausible).
    """
    set_threads(threads)
    ants = _ants()
    t0 = time.perf_counter()
    ct = ants.image_read(str(ct_path))
    pet = ants.image_read(str(pet_path))
    ct3 = resample_iso(_as_float(ct), spacing_mm)
    pet = _as_float(pet)
    c = head_centre(ct3)
    tmp = tempfile.mkdtemp(prefix="gp_pet2ct_")
    try:
        init = translation_transform((0.0, 0.0, 0.0), os.path.join(tmp, "init.mat"), centre=c)
        # at least ~60k metric samples on small grids (few samples make the optimum noisy)
        sampling = min(1.0, max(PET_CT_RIGID["sampling"], 60000.0 / np.prod(ct3.shape)))
        stages = [PET_CT_COARSE, dict(PET_CT_RIGID, sampling=sampling)]
        reg = run_registration(ct3, pet, stages, os.path.join(tmp, "r"), initial=[init], verbose=verbose)
        out_xfm = str(out_xfm)
        Path(out_xfm).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reg["fwdtransforms"][-1], out_xfm)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    before = ants.resample_image_to_target(pet, ct3, interp_type="linear")
    after = ants.apply_transforms(ct3, pet, [out_xfm], interpolator="linear")
    A, b = transform_matrix(out_xfm)
    disp = A @ c + b - c
    rot = rotation_angle_deg(A)
    dmm = float(np.linalg.norm(disp))
    warn = None
    if dmm > WARN_DISPLACEMENT_MM or rot > WARN_ROTATION_DEG:
        warn = (f"implausibly large PET->CT correction: {dmm:.1f} mm at the head centre, {rot:.1f} deg "
                f"(limits {WARN_DISPLACEMENT_MM:g} mm, {WARN_ROTATION_DEG:g} deg): check the frame of "
                "reference, patient motion between CT and PET, or a failed registration")
    return {
        "mi_before": _mi(ct3, before),
        "mi_after": _mi(ct3, after),
        "rotation_deg": rot,
        "translation_mm": [float(v) for v in disp],
        "displacement_mm": dmm,
        "head_centre_lps": [float(v) for v in c],
        "seconds": time.perf_counter() - t0,
        "threads": int(os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"]),
        "warning": warn,
    }


# ------------------------------------------------------------------ CT -> CT
def prepare_ct(img, spacing_mm: float = CT_CT_SPACING_MM, depth_mm: float = HEAD_NECK_DEPTH_MM,
               margin_mm: float = HEAD_NECK_MARGIN_MM):
    """Head-and-neck crop of a CT, resampled to ``spacing_mm``; returns (image, body mask image)."""
    ants = _ants()
    img = _as_float(img)
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
                        min_overlap: float = SEARCH_MIN_OVERLAP) -> np.ndarray:
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
    for the body centres of mass; the rigid and affine stages started from it do the rest."""
    ants = _ants()
    f = resample_iso(_as_float(fixed), spacing_mm)
    mv = resample_iso(_as_float(moving), spacing_mm)
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
    fa = f.numpy().astype(np.float64)
    mf, mm = np.ones(fa.shape), valid.astype(np.float64)
    score = sum(_masked_ncc(a, mf, b, mm) for a, b in zip(_search_features(fa), _search_features(m))) / 2.0
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
    ants = _ants()
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
        "mi_before": _mi(f, before),
        "mi_after": _mi(f, after),
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


def _write(img, out_path, label: bool):
    ants = _ants()
    out_path = str(out_path)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if label:
        arr = np.rint(img.numpy()).astype(np.int16)
        img = ants.from_numpy(arr, origin=img.origin, spacing=img.spacing, direction=img.direction)
        img = img.clone("unsigned char") if arr.min() >= 0 and arr.max() < 256 else img
    ants.image_write(img, out_path)
    return out_path


def warp(moving, reference, transforms: list[str], out_path=None, interpolation: str = "linear",
         invert: list[bool] | None = None, default_value: float = 0.0):
    """Resample ``moving`` onto ``reference`` through ``transforms`` (ANTs order, each mapping the
    reference side to the moving side unless inverted). ``interpolation``: linear | genericLabel |
    nearestNeighbor | bSpline. Paths or ANTs images in; an ANTs image out (written if out_path)."""
    ants = _ants()
    mv = ants.image_read(str(moving)) if not ants.is_image(moving) else moving
    ref = ants.image_read(str(reference)) if not ants.is_image(reference) else reference
    label = interpolation in ("genericLabel", "nearestNeighbor", "multiLabel")
    if not label:
        mv = _as_float(mv)
    out = ants.apply_transforms(ref, mv, [str(t) for t in transforms], interpolator=interpolation,
                                whichtoinvert=invert, defaultvalue=default_value)
    if out_path is not None:
        _write(out, out_path, label)
    return out


def apply_session_transform(image, fixed_ref, xfm_prefix, out_path=None, interpolation: str = "linear",
                            default_value: float = 0.0):
    """Bring an image of the moving (FAPI) session into the fixed (PSMA) session's space."""
    p = session_transform_paths(xfm_prefix)
    return warp(image, fixed_ref, [p["warp"], p["affine"]], out_path, interpolation, [False, False], default_value)


def apply_inverse_session_transform(image, moving_ref, xfm_prefix, out_path=None,
                                    interpolation: str = "genericLabel", default_value: float = 0.0):
    """Bring an image (e.g. a label map) of the fixed (PSMA) session into the moving (FAPI) session's space."""
    p = session_transform_paths(xfm_prefix)
    return warp(image, moving_ref, [p["affine"], p["inverse_warp"]], out_path, interpolation, [True, False],
                default_value)

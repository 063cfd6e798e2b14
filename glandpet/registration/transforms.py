"""ANTs registrations run, stored and applied: stage arguments, transform files, thread settings and warps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from glandpet.layout import session_transform_paths

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


def load_ants():
    import ants  # imported lazily: the thread variable must be set first

    return ants


def as_float(img):
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

    fixed = as_float(fixed)
    moving = as_float(moving)
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


def translation_transform(t_lps, path: str, centre=(0.0, 0.0, 0.0)) -> str:
    """Write an ITK affine that maps x -> x + t (LPS mm), with its centre (the centre of rotation
    of the linear stages initialised from it) at ``centre``. A centre far from the anatomy (the
    world origin can be a metre away) couples rotations with huge translations and stalls the
    optimiser: always pass the image or head centre."""
    ants = load_ants()
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
    ants = load_ants()
    tx = ants.read_transform(xfm_path)
    b = np.asarray(tx.apply_to_point((0.0, 0.0, 0.0)), float)
    A = np.column_stack([np.asarray(tx.apply_to_point(tuple(e)), float) - b for e in np.eye(3) * 100.0]) / 100.0
    return A, b


def rotation_angle_deg(A: np.ndarray) -> float:
    c = (np.trace(A) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _write(img, out_path, label: bool):
    ants = load_ants()
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
    ants = load_ants()
    mv = ants.image_read(str(moving)) if not ants.is_image(moving) else moving
    ref = ants.image_read(str(reference)) if not ants.is_image(reference) else reference
    label = interpolation in ("genericLabel", "nearestNeighbor", "multiLabel")
    if not label:
        mv = as_float(mv)
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


def ct_to_pet_affine(xfm_path: str) -> Any:
    """The rigid CT->PET transform of a session (ITK .mat) as a 4x4 matrix in RAS mm."""
    import numpy as np

    from glandpet.geometry import transform_lps_to_ras

    A, b = transform_matrix(xfm_path)
    m_lps = np.eye(4)
    m_lps[:3, :3], m_lps[:3, 3] = A, b
    return transform_lps_to_ras(m_lps)

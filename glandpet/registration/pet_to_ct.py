"""Rigid PET->CT registration of one session (fixed = CT, moving = PET), with its mutual-information QC."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import tempfile
import time

import numpy as np

from glandpet.registration.field_of_view import body_mask, head_centre, resample_iso
from glandpet.registration.transforms import (
    as_float,
    load_ants,
    rotation_angle_deg,
    run_registration,
    set_threads,
    transform_matrix,
    translation_transform,
)

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


#: QC: a PET->CT correction above these is implausible for a shared frame of reference.
WARN_DISPLACEMENT_MM = 10.0


WARN_ROTATION_DEG = 5.0


#: QC mutual information: joint histogram of MI_BINS x MI_BINS over the fixed CT's body, each image
#: clipped to its MI_CLIP_PERCENTILES first.
MI_BINS = 64


MI_CLIP_PERCENTILES = (0.5, 99.5)


def mutual_information(fixed, moving_on_fixed) -> float:
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
    and the PET on the 3 mm CT grid, over the body, see ``mutual_information``; larger = better aligned), ``rotation_deg``, ``translation_mm`` (the transform's translation at the
    head centre, CT->PET), ``displacement_mm`` (|T(c) - c| at the head centre c),
    ``head_centre_lps``, ``seconds``, and ``warning`` (None, or why the correction is implausible).
    """
    set_threads(threads)
    ants = load_ants()
    t0 = time.perf_counter()
    ct = ants.image_read(str(ct_path))
    pet = ants.image_read(str(pet_path))
    ct3 = resample_iso(as_float(ct), spacing_mm)
    pet = as_float(pet)
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
        "mi_before": mutual_information(ct3, before),
        "mi_after": mutual_information(ct3, after),
        "rotation_deg": rot,
        "translation_mm": [float(v) for v in disp],
        "displacement_mm": dmm,
        "head_centre_lps": [float(v) for v in c],
        "seconds": time.perf_counter() - t0,
        "threads": int(os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"]),
        "warning": warn,
    }

"""Gland labels of a subject's scans: the multi-atlas segmentation of its CT
(:func:`segment_subject`), and label maps carried to the PET grid and the other session, with their
volumes.

:func:`segment_subject` (one subject CT, N atlases, :class:`~glandpet.segmentation.params.SegmentationParams`)
runs the stages in order:

1. Head-and-neck crop of the subject CT (the output grid: native resolution), and the same crop
   resampled to ``spacing_mm`` (4 mm) for the whole-field stage.
2. Atlas registration (:mod:`glandpet.segmentation.atlas_registration`): per atlas, stage A on the
   whole head and neck, then per region stage B; the atlases' labels carried onto the subject; per
   gland, the atlases that vote (selection by local similarity, lost and truncated atlases left out).
3. Fusion per region (:mod:`glandpet.segmentation.fusion`): per gland by JLF or a
   (volume-preserving) vote.
4. With ``size_transfer``, each such gland resized for what registration does not carry of the
   patient's gland size (:mod:`glandpet.segmentation.size_calibration`).
5. Refinement (:mod:`glandpet.segmentation.refinement`): each fused gland's boundary moves, within
   a few millimetres, by the subject's own CT numbers; optionally a fixed HU window per gland.
6. Per-gland confidence (:mod:`glandpet.segmentation.confidence`), the label map on the full subject grid,
   its label table and the metrics.

Labels of glands that no atlas holds are absent from the output and listed in the metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from glandpet.registration import field_of_view
from glandpet.layout import beside
from glandpet.registration import transforms
from glandpet.segmentation import confidence as SC
from glandpet.glands import DEFAULT_LABELS, read_label_table, write_label_table
from glandpet.segmentation.atlas_registration import (LABEL_BY_INDEX, RegionFit, WholeField, register_region,
                                                      register_whole_field, region_voters)
from glandpet.segmentation.fusion import fuse_region, fusion_per_gland, voters_of
from glandpet.segmentation.params import SegmentationParams
from glandpet.segmentation.refinement import refine_segmentation
from glandpet.segmentation.size_calibration import calibrate_glands, voters_signed_distance

#: ``gland_side`` -> label value of the default table.
LABEL_VALUE_BY_NAME = {lab.name: lab.index for lab in DEFAULT_LABELS}


def segment_subject(subject_ct_path, atlases: list[dict], out_dseg, out_tsv,
                    params: SegmentationParams = SegmentationParams(), threads: int = 1, *,
                    workdir: str | None = None, verbose: bool = False, template=None) -> dict:
    """Segment the glands in one subject CT with a multi-atlas registration and label fusion.

    ``atlases``: list of ``{"name", "ct", "labels", "label_table"}`` (paths). ``params``: how
    (:class:`~glandpet.segmentation.params.SegmentationParams`). Writes ``out_dseg`` (uint8, the
    subject CT's grid, DEFAULT_LABELS values) and ``out_tsv`` (``index, gland, side`` of the labels
    present in the union of the atlas tables). Returns metrics: seconds per step, per-atlas scores
    and selection, glands present/absent, volumes in mL. With ``workdir`` given, the transforms and
    each atlas's warped labels (``atlas_<name>_labels.nii.gz``, before fusion) are kept there.
    ``template``: the atlases' template (:class:`glandpet.segmentation.atlas_template.AtlasTemplate`)
    when ``params.atlas_registration`` is ``"template"``; None: read from (or built into) its cache
    (:func:`glandpet.segmentation.atlas_template.template_for`).
    """
    method_of = fusion_per_gland(params.fusion)
    if not atlases:
        raise ValueError("segment_subject needs at least one atlas")
    transforms.set_threads(threads)
    ants = transforms.load_ants()
    t_all = time.perf_counter()
    timing: dict[str, float] = {}
    if params.atlas_registration == "template" and template is None:
        from glandpet.segmentation.atlas_template import template_for

        t = time.perf_counter()
        template = template_for(atlases, workers=threads)
        timing["template"] = time.perf_counter() - t
    elif params.atlas_registration != "template":
        template = None
    tmp = workdir or tempfile.mkdtemp(prefix="gp_seg_")
    os.makedirs(tmp, exist_ok=True)
    try:
        t = time.perf_counter()
        subj_full = ants.image_read(str(subject_ct_path)).clone("float")
        lo, hi = field_of_view.head_neck_box(subj_full)
        subj_out = field_of_view.crop(subj_full, lo, hi)  # output grid (native resolution)
        subj_glob = field_of_view.resample_iso(subj_out, params.spacing_mm)
        timing["prepare"] = time.perf_counter() - t

        t = time.perf_counter()
        field = register_whole_field(subj_glob, atlases, params.regions, params.spacing_mm,
                                     params.atlases_per_region, tmp, verbose, template=template,
                                     linear_stage=params.linear_stage)
        timing["register_global"] = time.perf_counter() - t
        fused = np.zeros(subj_out.shape, np.uint8)
        timing.update({"register_regions": 0.0, "select": 0.0, "fuse": 0.0})
        per_atlas_out = [np.zeros(subj_out.shape, np.uint8) for _ in field.names] if workdir else None
        region_info, gland_conf, consensus = {}, {}, {}
        for rname, rlabels, margin, stages in field.plan:
            t = time.perf_counter()
            region = register_region(subj_out, subj_glob, field, rname, rlabels, margin, stages,
                                     params.region_spacing_mm, tmp, verbose)
            if region is None:
                continue
            timing["register_regions"] += time.perf_counter() - t
            if not region.atlases:
                continue
            t = time.perf_counter()
            weights, voters, r_holds = region_voters(region, field, params.select, params.atlases_per_gland)
            timing["select"] += time.perf_counter() - t
            t = time.perf_counter()
            fr = fuse_region(region, r_holds, voters, weights, method_of, params.preserve_volume, tmp)
            gland_conf.update(_region_confidence(region, fr, r_holds, voters, weights, field,
                                                  params.atlases_per_gland))
            _paste(fused, per_atlas_out, region, fr)
            consensus.update(_voters_consensus(region, r_holds, voters, params.size_transfer))
            region_info[rname] = _region_entry(region)
            timing["fuse"] += time.perf_counter() - t
        timing["register_atlases"] = timing["register_global"] + timing["register_regions"]
        all_labels = sorted(field.all_labels)

        subj_np = subj_out.numpy()
        # ---- volumes corrected for the library's size transfer (glandpet.segmentation.size_calibration),
        # before the refinement: the subject's CT, where it shows the boundary, has the last word
        size_info: dict = {}
        if params.size_transfer:
            t = time.perf_counter()
            fused, size_info = calibrate_glands(fused, subj_np, subj_out.spacing, gland_conf,
                                                params.size_transfer, LABEL_VALUE_BY_NAME, consensus)
            timing["size_calibration"] = time.perf_counter() - t

        fused, refine_info, seconds = refine_segmentation(fused, subj_np, subj_out.spacing,
                                                          params.refine_intensity, params.refine)
        timing.update(seconds)

        # ---- per-gland confidence (glandpet.segmentation.confidence): final volume (against the
        # voters' median: a large size correction, an atypical gland, lowers it), CT boundary evidence
        t = time.perf_counter()
        glands_conf = _gland_confidence(gland_conf, fused, subj_np, subj_out.spacing)
        for name, rec in size_info.items():
            glands_conf[name]["size_calibration"] = rec
        timing["confidence"] = time.perf_counter() - t

        # ---- write on the full subject grid
        t = time.perf_counter()
        Path(out_dseg).parent.mkdir(parents=True, exist_ok=True)
        _save_on_subject_grid(fused, subject_ct_path, lo, hi, out_dseg)
        if per_atlas_out is not None:
            for a, n in enumerate(field.names):
                _save_on_subject_grid(per_atlas_out[a], subject_ct_path, lo, hi,
                                      os.path.join(tmp, f"atlas_{n}_labels.nii.gz"))
        present = [lab for lab in DEFAULT_LABELS if lab.index in all_labels]
        write_label_table(out_tsv, present)
        timing["write"] = time.perf_counter() - t
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    vox_ml = float(np.prod(subj_out.spacing)) / 1000.0
    absent = [lab.name for lab in DEFAULT_LABELS if lab.index not in all_labels]
    return {
        "fusion": {g: m for g, m in method_of.items() if any(lab.gland == g for lab in present)},
        "preserve_volume": bool(params.preserve_volume),
        "refine_intensity": bool(params.refine_intensity),
        "n_atlases": len(atlases),
        "atlas_registration": params.atlas_registration,
        **({"template": field.template} if field.template else {}),
        "atlases": field.per_atlas,
        "regions": region_info,
        "labels_present": [lab.name for lab in present],
        "labels_absent": absent,
        "volumes_ml": {lab.name: float((fused == lab.index).sum() * vox_ml) for lab in present},
        "glands": glands_conf,
        "refine": refine_info,
        **({"size_transfer": dict(params.size_transfer)} if params.size_transfer else {}),
        "seconds": timing,
        "seconds_total": time.perf_counter() - t_all,
        "threads": int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")),
    }


def _region_confidence(region: RegionFit, fused_region: np.ndarray, holds, voters, weights,
                       field: WholeField, atlases_per_gland: int | None) -> dict[str, dict]:
    """Confidence signals of each gland of the region (:func:`glandpet.segmentation.confidence.region_signals`):
    its voters' warped labels against the fusion, and their number against the voters expected
    (the atlases holding the gland, at most ``atlases_per_gland``); with the voters' names and
    contour volumes (for :mod:`glandpet.segmentation.size_calibration`)."""
    vox_ml_o = float(np.prod(region.out_ref.spacing)) / 1000.0
    out = {}
    for L in region.labels:
        ks = voters_of(L, holds, voters)
        if not ks:
            continue
        entry = SC.region_signals(
            [region.labels_out[k] == L for k in ks], fused_region == L, [weights[k].get(L, 0.0) for k in ks],
            field.held_by.get(L, len(ks)), vox_ml_o, atlases_per_gland)
        entry["voters"] = [field.names[region.atlases[k]] for k in ks]
        entry["atlas_native_ml"] = [field.native_ml[region.atlases[k]].get(L, 0.0) for k in ks]
        out[LABEL_BY_INDEX[L].name] = entry
    return out


def _voters_consensus(region: RegionFit, holds, voters, size_transfer) -> dict[str, tuple]:
    """For each gland of the region with a size transfer: its voters' mean signed distance on the
    region's box of the output grid (:func:`glandpet.segmentation.size_calibration.voters_signed_distance`),
    which guides the size correction."""
    out = {}
    sl = tuple(slice(a, b + 1) for a, b in zip(region.out_lo, region.out_hi))
    for L in region.labels:
        lab = LABEL_BY_INDEX[L]
        ks = voters_of(L, holds, voters)
        if lab.gland in size_transfer and ks:
            out[lab.name] = (sl, voters_signed_distance([region.labels_out[k] == L for k in ks],
                                                        region.out_ref.spacing))
    return out


def _gland_confidence(gland_conf: dict[str, dict], fused: np.ndarray, ct: np.ndarray, spacing) -> dict[str, dict]:
    """Each gland's confidence entry (:func:`glandpet.segmentation.confidence.gland_entry`) from its region
    signals and the final label map: final volume, CT boundary evidence."""
    vox_ml_f = float(np.prod(spacing)) / 1000.0
    glands_conf = {}
    for name, entry in gland_conf.items():
        lab = next(x for x in DEFAULT_LABELS if x.name == name)
        SC.final_signals(entry, fused == lab.index, ct, spacing, vox_ml_f)
        glands_conf[name] = SC.gland_entry(entry)
    return glands_conf


def _paste(fused: np.ndarray, per_atlas_out: list[np.ndarray] | None, region: RegionFit,
           fused_region: np.ndarray) -> None:
    """The region's fused labels (and each atlas's warped labels) into the free voxels of the
    output grid's maps."""
    sl = tuple(slice(a, b + 1) for a, b in zip(region.out_lo, region.out_hi))
    view = fused[sl]
    put = (fused_region > 0) & (view == 0)
    view[put] = fused_region[put]
    if per_atlas_out is not None:
        for k, a in enumerate(region.atlases):
            v = per_atlas_out[a][sl]
            p = (region.labels_out[k] > 0) & (v == 0)
            v[p] = region.labels_out[k][p]


def _region_entry(region: RegionFit) -> dict:
    """The metrics' record of a region: its glands, box (LPS mm) and registration grid."""
    out_ref = region.out_ref
    return {"labels": [LABEL_BY_INDEX[L].name for L in region.labels],
            "box_lps_mm": [list(map(float, field_of_view.world_coords(out_ref, np.zeros((1, 3)))[0])),
                           list(map(float, field_of_view.world_coords(out_ref, (np.array(out_ref.shape) - 1)[None])[0]))],
            "grid": list(region.fix.shape), "atlases": len(region.atlases)}


def _save_on_subject_grid(arr: np.ndarray, subject_ct_path, lo, hi, path) -> None:
    """A label map of the head-and-neck crop (voxel box ``lo``..``hi`` inclusive) written as uint8
    on the full grid of the subject CT (its affine as qform and sform)."""
    import nibabel as nib

    from glandpet.writers import write_nifti_like

    nii = nib.load(str(subject_ct_path))
    full = np.zeros(nii.shape[:3], np.uint8)
    full[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = arr
    write_nifti_like(full, nii, path)



# ------------------------------------------------------------------ labels elsewhere, volumes
def labels_to_pet(dseg_ct_path, pet_path, pet_to_ct_xfm, out_path) -> str:
    """Resample a CT-space label map onto the PET grid (genericLabel: labels stay labels).

    ``pet_to_ct_xfm`` is the file written by :func:`glandpet.registration.pet_to_ct.register_pet_to_ct`
    (it maps CT points to PET points); it is applied inverted, so each PET voxel reads the label
    of the CT point it images."""
    transforms.warp(str(dseg_ct_path), str(pet_path), [str(pet_to_ct_xfm)], out_path, interpolation="genericLabel",
             invert=[True])
    return str(out_path)


def labels_to_session(dseg_fixed_path, moving_ct_path, session_xfm_prefix, out_dseg, out_tsv=None,
                      label_table=None) -> str:
    """Carry a label map of the fixed (PSMA) session onto the moving (FAPI) session's CT grid
    through the inverse session transform (:func:`glandpet.registration.sessions.align_sessions`)."""
    transforms.apply_inverse_session_transform(str(dseg_fixed_path), str(moving_ct_path), session_xfm_prefix, out_dseg,
                                        interpolation="genericLabel")
    if out_tsv is not None:
        src = label_table or _tsv_beside(dseg_fixed_path)
        labs = read_label_table(src) if src and Path(src).exists() else list(DEFAULT_LABELS)
        write_label_table(out_tsv, labs)
    return str(out_dseg)


def _tsv_beside(dseg_path) -> str:
    try:
        return beside(dseg_path, ".tsv")
    except ValueError:  # not a NIfTI name: the table is the name + .tsv
        return str(dseg_path) + ".tsv"


def gland_volumes_ml(dseg_path, label_table=None) -> dict[str, float]:
    """Volume in mL of each labelled gland (``gland_side`` -> mL) from a label map's own grid.
    Labels come from ``label_table`` or the ``.tsv`` beside the map, else DEFAULT_LABELS."""
    import nibabel as nib

    img = nib.load(str(dseg_path))
    arr = np.asarray(img.dataobj)
    vox_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    src = label_table or _tsv_beside(dseg_path)
    labs = read_label_table(src) if src and Path(src).exists() else list(DEFAULT_LABELS)
    counts = np.bincount(np.rint(arr).astype(np.int64).ravel(), minlength=max(lab.index for lab in labs) + 1)
    return {f"{lab.gland}_{lab.side}": float(counts[lab.index] * vox_ml) for lab in labs}

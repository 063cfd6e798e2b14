"""Multi-atlas segmentation of the salivary and lacrimal glands in CT, and labels on the PET grid.

Pipeline of :func:`segment_subject` (one subject CT, N atlases):

1. Head-and-neck crop of the subject CT (the output grid: native resolution), and the same crop
   resampled to ``spacing_mm`` (2 mm) for registration.
2. Per atlas, stage A (whole head and neck): body centre-of-mass initialisation -> rigid -> affine
   -> SyN, one ``antsRegistration`` call with explicit schedules
   (:data:`ATLAS_STAGES`). ANTsPy's ``SyN`` presets run a fixed 2100x1200x1200 affine and ignore
   the affine iterations; driving the stages directly keeps the schedule under control.
3. Per atlas, stage B (regional, :data:`REGIONS`): glands far from the skull (submandibular,
   sublingual) move with neck flexion, which a whole-field registration does not follow. A second
   affine + SyN on a crop around the stage-A labels of those glands, at ``region_spacing_mm``,
   registers the stage-A-warped atlas CT to the subject; labels of those glands are carried
   through B o A in one resampling.
4. Labels carried with ``genericLabel`` onto the output grid; atlas label values mapped to
   :data:`glandpet.glands.DEFAULT_LABELS` through each atlas's label table.
5. Atlas selection per gland (optional): the local normalised cross-correlation between the warped
   atlas CT and the subject around that gland; an atlas whose score is a low outlier among the
   atlases is left out of that gland's vote (a registration lost at the affine stage).
6. Fusion: ``majority`` (per-label vote among the atlases that hold the label; ties broken by the
   atlases' local similarity) or ``jlf`` (ANTs joint label fusion, background included as a
   label so it cannot fill its search region).
7. Optional CT refinement per gland (HU window inside a dilated fused label).

Labels of glands that no atlas holds are absent from the output and listed in the metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from glandpet.glands import DEFAULT_LABELS, Label, label_value, read_label_table, write_label_table
from glandpet import registration as reg

#: atlas -> subject, stage A (whole head-and-neck crop, 2 mm). SyN with Mattes MI at the 8 and 4 mm
#: levels only (CC and a 2 mm level cost 3-5x more for little gain at this stage).
ATLAS_SYN = dict(
    transform="SyN[0.25,3,0]", metric="MI", bins=32, sampling=1.0, iterations=(40, 20, 0),
    shrink=(4, 2, 1), smooth_vox=(2, 1, 0), convergence=(1e-6, 10),
)
ATLAS_STAGES = [reg.CT_CT_RIGID, reg.CT_CT_AFFINE, ATLAS_SYN]

#: stage B: affine + SyN on a regional crop (finer grid, glands far from the skull).
REGION_AFFINE = dict(
    transform="Affine[0.1]", bins=32, sampling=0.5, iterations=(100, 50, 20),
    shrink=(4, 2, 1), smooth_vox=(2, 1, 0), convergence=(1e-6, 10),
)
REGION_SYN = dict(
    transform="SyN[0.25,3,0]", metric="MI", bins=32, sampling=1.0, iterations=(40, 20, 10),
    shrink=(4, 2, 1), smooth_vox=(2, 1, 0), convergence=(1e-6, 10),
)
#: regions of stage B: name -> (label values whose stage-A positions define the crop and which are
#: taken from stage B, margin in mm).
REGIONS: dict[str, tuple[tuple[int, ...], float]] = {
    "submandibular": ((label_value("submandibular", "left"), label_value("submandibular", "right"),
                       label_value("sublingual", "left"), label_value("sublingual", "right")), 25.0),
}

#: default CT refinement windows (HU) if ``refine=True`` is passed; configurable per gland.
DEFAULT_REFINE = {
    "parotid": {"hu": [-100.0, 80.0], "dilate_mm": 3.0, "smooth_mm": 1.0},
}

LABEL_BY_INDEX = {lab.index: lab for lab in DEFAULT_LABELS}


# ------------------------------------------------------------------ small helpers
def _ants():
    return reg._ants()


def _np_to_img(arr, like):
    return _ants().from_numpy(np.asarray(arr, dtype=np.float32), origin=like.origin, spacing=like.spacing,
                              direction=like.direction)


def relabel_to_default(arr: np.ndarray, table: list[Label]) -> np.ndarray:
    """Map an atlas label array to DEFAULT_LABELS values through its label table (others -> 0)."""
    lut = np.zeros(int(max([int(arr.max())] + [lab.index for lab in table])) + 1, np.uint8)
    for lab in table:
        lut[lab.index] = label_value(lab.gland, lab.side)
    a = np.rint(arr).astype(np.int64)
    a[(a < 0) | (a >= len(lut))] = 0
    return lut[a]


def _box_from_mask(mask: np.ndarray, img, margin_mm: float):
    sp = np.asarray(img.spacing, float)
    idx = np.argwhere(mask)
    m = np.ceil(margin_mm / sp).astype(int)
    lo = np.maximum(idx.min(0) - m, 0)
    hi = np.minimum(idx.max(0) + m, np.array(mask.shape) - 1)
    return lo, hi


def _world_box(img, lo, hi):
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    w = reg.world_coords(img, corners)
    return w.min(0), w.max(0)


def _inside_world_box(img, wlo, whi) -> np.ndarray:
    """Bool array: voxel centres of ``img`` inside the axis-aligned LPS box."""
    shp = img.shape
    grids = np.meshgrid(*[np.arange(n) for n in shp], indexing="ij")
    idx = np.stack([g.ravel() for g in grids], 1)
    w = reg.world_coords(img, idx)
    ok = np.all((w >= wlo) & (w <= whi), axis=1)
    return ok.reshape(shp)


def local_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    if x.size < 10 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def select_atlases(scores: dict[str, float], min_gap: float = 0.05, k_mad: float = 3.0) -> list[str]:
    """Atlases kept for one gland: drop low outliers (score < median - max(min_gap, k*1.4826*MAD))."""
    if len(scores) <= 2:
        return list(scores)
    v = np.array(list(scores.values()))
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    thr = med - max(min_gap, k_mad * mad)
    keep = [n for n, s in scores.items() if s >= thr]
    return keep or [max(scores, key=scores.get)]


# ------------------------------------------------------------------ fusion
def majority_vote(label_maps: list[np.ndarray], holds: list[set[int]], labels: list[int],
                  weights: list[dict[int, float]] | None = None,
                  voters: dict[int, list[int]] | None = None) -> np.ndarray:
    """Per-label majority vote.

    ``label_maps[a]``: atlas a's labels on the output grid; ``holds[a]``: label values atlas a
    holds (an atlas that lacks a gland does not vote on it: neither for nor against).
    ``voters[L]``: indices of the atlases allowed to vote on L (atlas selection; default: holders).
    A voxel gets label L when more than half of L's voters say L. An exact half is a tie, broken by
    ``weights[a][L]`` (e.g. the atlas's local similarity around L): L wins if its supporters weigh
    more than its opponents; equal weights (or none) leave the voxel background. Two labels both
    winning a voxel (possible with different voter sets): the larger vote fraction, then the
    larger weighted fraction, then the smaller label value.
    """
    shp = label_maps[0].shape
    best = np.zeros(shp, np.uint8)
    best_score = np.zeros(shp, np.float32)
    for L in sorted(labels):
        vs = voters.get(L) if voters else None
        if vs is None:
            vs = [a for a in range(len(label_maps)) if L in holds[a]]
        vs = [a for a in vs if L in holds[a]]
        if not vs:
            continue
        n = len(vs)
        count = np.zeros(shp, np.float32)
        wsum = np.zeros(shp, np.float32)
        wtot = 0.0
        for a in vs:
            w = float(weights[a].get(L, 1.0)) if weights else 1.0
            hit = label_maps[a] == L
            count += hit
            wsum += w * hit
            wtot += w
        frac = count / n
        wfrac = wsum / wtot if wtot > 0 else frac
        win = (frac > 0.5) | ((frac == 0.5) & (wfrac > 0.5 + 1e-6))
        score = frac + 1e-3 * wfrac
        take = win & (score > best_score)
        best[take] = L
        best_score[take] = score[take]
    return best


def joint_label_fusion_probs(target, atlas_cts: list, atlas_labels: list, labels: list[int], mask,
                             workdir: str, beta: float = 2.0, rad: int = 2, r_search: int = 3) -> dict[int, object]:
    """ANTs joint label fusion returning one probability image per label value *including 0*.

    ``ants.joint_label_fusion`` assigns every voxel of its mask to the most probable *foreground*
    label (background is not a label there), which fills the whole search region. Here the
    background is its own label (value ``max+1`` in the call, mapped back to 0), and the
    caller takes the arg-max over background and glands.
    """
    ants = _ants()
    bg = max(labels) + 1
    labs = []
    for lab in atlas_labels:
        arr = lab.numpy().copy()
        arr[arr == 0] = bg
        labs.append(_np_to_img(arr, lab))
    out_prefix = os.path.join(workdir, "jlf_")
    res = ants.joint_label_fusion(target, mask, atlas_list=atlas_cts, beta=beta, rad=rad, label_list=labs,
                                  r_search=r_search, output_prefix=out_prefix, verbose=False)
    probs = {}
    for num, img in zip(res["segmentation_numbers"], res["probabilityimages"]):
        probs[0 if num == bg else int(num)] = img
    return probs


# ------------------------------------------------------------------ refinement
def refine_labels(dseg: np.ndarray, ct: np.ndarray, spacing, rules: dict) -> tuple[np.ndarray, dict]:
    """CT refinement: for each gland in ``rules`` ({gland: {"hu": [lo, hi], "dilate_mm": r,
    "smooth_mm": s}}), the label becomes the voxels of the label dilated by r whose smoothed HU is
    inside the window, kept where connected to the original label, holes filled. A result below
    half the original volume is rejected (the original is kept) and reported."""
    out = dseg.copy()
    info = {}
    sp = np.asarray(spacing, float)
    cache = {}
    for lab in DEFAULT_LABELS:
        rule = rules.get(lab.gland)
        if not rule:
            continue
        m = dseg == lab.index
        if not m.any():
            continue
        s = float(rule.get("smooth_mm", 1.0))
        if s not in cache:
            cache[s] = ndi.gaussian_filter(ct.astype(np.float32), s / sp) if s > 0 else ct
        cts = cache[s]
        lo, hi = rule["hu"]
        r = float(rule.get("dilate_mm", 3.0))
        # work in a bounding box for speed
        idx = np.argwhere(m)
        pad = np.ceil((r + 3) / sp).astype(int)
        a = np.maximum(idx.min(0) - pad, 0)
        b = np.minimum(idx.max(0) + pad + 1, np.array(m.shape))
        sl = tuple(slice(i, j) for i, j in zip(a, b))
        mb = m[sl]
        dil = ndi.distance_transform_edt(~mb, sampling=sp) <= r
        cand = dil & (cts[sl] >= lo) & (cts[sl] <= hi) & ((dseg[sl] == 0) | mb)
        lab_cc, n = ndi.label(cand)
        keep_ids = np.unique(lab_cc[mb & cand])
        keep_ids = keep_ids[keep_ids > 0]
        new = np.isin(lab_cc, keep_ids)
        new = ndi.binary_fill_holes(new) & (dil)
        v0, v1 = int(mb.sum()), int(new.sum())
        if v1 < 0.5 * v0:
            info[lab.name] = {"voxels_before": v0, "voxels_after": v0, "rejected": True}
            continue
        region = out[sl]
        region[mb] = 0
        region[new & ((region == 0))] = lab.index
        out[sl] = region
        info[lab.name] = {"voxels_before": v0, "voxels_after": int((out[sl] == lab.index).sum()), "rejected": False}
    return out, info


# ------------------------------------------------------------------ the subject pipeline
def _load_atlas(atlas: dict):
    ants = _ants()
    name = str(atlas.get("name") or Path(atlas["ct"]).parent.name)
    ct = ants.image_read(str(atlas["ct"])).clone("float")
    lab = ants.image_read(str(atlas["labels"]))
    table = read_label_table(atlas["label_table"])
    arr = relabel_to_default(lab.numpy(), table)
    labimg = _np_to_img(arr, lab)
    holds = {label_value(t.gland, t.side) for t in table} & set(int(v) for v in np.unique(arr) if v > 0)
    return name, ct, labimg, holds


def segment_subject(subject_ct_path, atlases: list[dict], out_dseg, out_tsv, fusion: str = "majority",
                    threads: int = 1, refine: dict | bool | None = None, *, spacing_mm: float = 2.0,
                    region_spacing_mm: float = 1.5, regions: dict | None = None, select: bool = True,
                    workdir: str | None = None, verbose: bool = False) -> dict:
    """Segment the glands in one subject CT with a multi-atlas registration and label fusion.

    ``atlases``: list of ``{"name", "ct", "labels", "label_table"}`` (paths). ``fusion``:
    ``"majority"`` or ``"jlf"``. ``refine``: None/False, True (:data:`DEFAULT_REFINE`), or a dict
    ``{gland: {"hu": [lo, hi], "dilate_mm": r, "smooth_mm": s}}``. ``regions``: stage-B regions
    (default :data:`REGIONS`; ``{}`` disables stage B). ``select``: per-gland atlas selection.

    Writes ``out_dseg`` (uint8, the subject CT's grid, DEFAULT_LABELS values) and ``out_tsv``
    (``index, gland, side`` of the labels present in the union of the atlas tables). Returns metrics:
    seconds per step, per-atlas scores and selection, glands present/absent, volumes in mL.
    """
    if fusion not in ("majority", "jlf"):
        raise ValueError(f"fusion must be 'majority' or 'jlf', not {fusion!r}")
    if not atlases:
        raise ValueError("segment_subject needs at least one atlas")
    reg.set_threads(threads)
    ants = _ants()
    import nibabel as nib

    regions = REGIONS if regions is None else regions
    if refine is True:
        refine = DEFAULT_REFINE
    t_all = time.perf_counter()
    timing: dict[str, float] = {}
    tmp = workdir or tempfile.mkdtemp(prefix="gp_seg_")
    os.makedirs(tmp, exist_ok=True)
    try:
        t = time.perf_counter()
        subj_full = ants.image_read(str(subject_ct_path)).clone("float")
        lo, hi = reg.head_neck_box(subj_full)
        subj_out = reg.crop(subj_full, lo, hi)  # output grid (native resolution)
        subj_reg = reg.resample_iso(subj_out, spacing_mm)
        subj_reg_np = subj_reg.numpy()
        timing["prepare"] = time.perf_counter() - t

        names, holds, lab_out, lab_reg, ct_reg, per_atlas = [], [], [], [], [], {}
        for i, atlas in enumerate(atlases):
            t = time.perf_counter()
            name, a_ct, a_lab, a_holds = _load_atlas(atlas)
            a_prep, _ = reg.prepare_ct(a_ct, spacing_mm, margin_mm=reg.HEAD_NECK_MARGIN_MM + 20)
            pre = os.path.join(tmp, f"a{i}_")
            ra = reg.register_ct_to_ct(subj_reg, a_prep, pre, ATLAS_STAGES, verbose=verbose)
            tA = time.perf_counter() - t
            fwdA = ra["fwdtransforms"]
            la_reg = ants.apply_transforms(subj_reg, a_lab, fwdA, interpolator="genericLabel").numpy()
            la_reg = np.rint(la_reg).astype(np.uint8)
            ca_reg = ra["warped"].numpy()
            la_out = np.rint(ants.apply_transforms(subj_out, a_lab, fwdA, interpolator="genericLabel").numpy()).astype(np.uint8)
            t = time.perf_counter()
            stage_b = {}
            for rname, (rlabels, margin) in regions.items():
                rl = [L for L in rlabels if L in a_holds]
                msk = np.isin(la_reg, rl)
                if not rl or msk.sum() < 5:
                    continue
                blo, bhi = _box_from_mask(msk, subj_reg, margin)
                wlo, whi = _world_box(subj_reg, blo, bhi)
                # fixed: the subject's native crop inside that box, at region_spacing_mm
                ilo, ihi = _world_to_index(subj_out, wlo, whi)
                olo, ohi = np.floor(ilo).astype(int), np.ceil(ihi).astype(int)
                olo = np.clip(olo, 0, np.array(subj_out.shape) - 1)
                ohi = np.clip(ohi, 0, np.array(subj_out.shape) - 1)
                fix = reg.resample_iso(reg.crop(subj_out, olo, ohi), region_spacing_mm)
                mov = ants.apply_transforms(fix, a_ct, fwdA, interpolator="linear")
                cen = reg.world_coords(fix, (np.array(fix.shape) - 1)[None] / 2.0)[0]
                rpre = os.path.join(tmp, f"a{i}_{rname}_")
                init = reg.translation_transform((0, 0, 0), rpre + "init.mat", centre=cen)
                rb = reg.run_registration(fix, mov, [REGION_AFFINE, REGION_SYN], rpre, initial=[init],
                                          verbose=verbose)
                fwdB = rb["fwdtransforms"] + fwdA
                lb_out = np.rint(ants.apply_transforms(subj_out, a_lab, fwdB, interpolator="genericLabel").numpy()).astype(np.uint8)
                flo, fhi = _world_box(fix, np.zeros(3, int), np.array(fix.shape) - 1)
                inside = _inside_world_box(subj_out, flo, fhi)
                sel = np.isin(la_out, rl)
                la_out[sel] = 0
                put = np.isin(lb_out, rl) & inside & (la_out == 0)
                la_out[put] = lb_out[put]
                # the regional result also on the registration grid (scores, JLF)
                lb_reg = np.rint(ants.apply_transforms(subj_reg, a_lab, fwdB, interpolator="genericLabel").numpy()).astype(np.uint8)
                cb_reg = ants.apply_transforms(subj_reg, a_ct, fwdB, interpolator="linear").numpy()
                inside_r = _inside_world_box(subj_reg, flo, fhi)
                selr = np.isin(la_reg, rl)
                la_reg[selr] = 0
                putr = np.isin(lb_reg, rl) & inside_r & (la_reg == 0)
                la_reg[putr] = lb_reg[putr]
                ca_reg = np.where(inside_r, cb_reg, ca_reg)
                stage_b[rname] = {"box_lps_mm": [list(map(float, flo)), list(map(float, fhi))]}
            tB = time.perf_counter() - t
            names.append(name)
            holds.append(a_holds)
            lab_out.append(la_out)
            lab_reg.append(la_reg)
            ct_reg.append(ca_reg)
            per_atlas[name] = {"seconds_stage_a": tA, "seconds_stage_b": tB, "labels_held": sorted(a_holds),
                               "regions": stage_b}
        timing["register_atlases"] = sum(v["seconds_stage_a"] + v["seconds_stage_b"] for v in per_atlas.values())

        # ---- scores and selection (per label, on the registration grid)
        t = time.perf_counter()
        all_labels = sorted(set().union(*holds))
        weights = [dict() for _ in names]
        voters: dict[int, list[int]] = {}
        sp_reg = np.asarray(subj_reg.spacing, float)
        for L in all_labels:
            union = np.zeros(subj_reg.shape, bool)
            for a in range(len(names)):
                if L in holds[a]:
                    union |= lab_reg[a] == L
            holders = [a for a in range(len(names)) if L in holds[a]]
            if not union.any():
                voters[L] = holders
                continue
            region = ndi.binary_dilation(union, iterations=max(1, int(round(6.0 / sp_reg.min()))))
            sc = {a: local_ncc(subj_reg_np, ct_reg[a], region) for a in holders}
            for a, s in sc.items():
                weights[a][L] = max(s, 1e-3)
                per_atlas[names[a]].setdefault("local_ncc", {})[LABEL_BY_INDEX[L].name] = round(s, 4)
            if select:
                keep = select_atlases({str(a): s for a, s in sc.items()})
                voters[L] = [int(a) for a in keep]
            else:
                voters[L] = holders
            dropped = [names[a] for a in holders if a not in voters[L]]
            if dropped:
                for n in dropped:
                    per_atlas[n].setdefault("dropped_for", []).append(LABEL_BY_INDEX[L].name)
        timing["select"] = time.perf_counter() - t

        # ---- fusion on the output grid
        t = time.perf_counter()
        if fusion == "majority":
            fused = majority_vote(lab_out, holds, all_labels, weights=weights, voters=voters)
        else:
            fused = _fuse_jlf(subj_reg, subj_out, ct_reg, lab_reg, holds, voters, all_labels, tmp)
        timing["fuse"] = time.perf_counter() - t

        refine_info = {}
        if refine:
            t = time.perf_counter()
            fused, refine_info = refine_labels(fused, subj_out.numpy(), subj_out.spacing, refine)
            timing["refine"] = time.perf_counter() - t

        # ---- write on the full subject grid
        t = time.perf_counter()
        nii = nib.load(str(subject_ct_path))
        full = np.zeros(nii.shape[:3], np.uint8)
        full[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = fused
        Path(out_dseg).parent.mkdir(parents=True, exist_ok=True)
        out = nib.Nifti1Image(full, nii.affine)
        out.set_qform(nii.affine, 1)
        out.set_sform(nii.affine, 1)
        nib.save(out, str(out_dseg))
        present = [lab for lab in DEFAULT_LABELS if lab.index in all_labels]
        write_label_table(out_tsv, present)
        timing["write"] = time.perf_counter() - t
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    vox_ml = float(np.prod(subj_out.spacing)) / 1000.0
    absent = [lab.name for lab in DEFAULT_LABELS if lab.index not in all_labels]
    return {
        "fusion": fusion,
        "n_atlases": len(atlases),
        "atlases": per_atlas,
        "labels_present": [lab.name for lab in present],
        "labels_absent": absent,
        "volumes_ml": {lab.name: float((fused == lab.index).sum() * vox_ml) for lab in present},
        "refine": refine_info,
        "seconds": timing,
        "seconds_total": time.perf_counter() - t_all,
        "threads": int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")),
    }


def _world_to_index(img, wlo, whi):
    d = np.asarray(img.direction, float)
    sp = np.asarray(img.spacing, float)
    org = np.asarray(img.origin, float)
    corners = np.array([[a, b, c] for a in (wlo[0], whi[0]) for b in (wlo[1], whi[1]) for c in (wlo[2], whi[2])])
    idx = ((corners - org) @ d) / sp
    return idx.min(0), idx.max(0)


def _fuse_jlf(subj_reg, subj_out, ct_reg, lab_reg, holds, voters, all_labels, tmp):
    """JLF on the registration grid (bounding box of all candidate labels), probabilities
    resampled linearly onto the output grid, arg-max over background and glands."""
    ants = _ants()
    cand = np.zeros(subj_reg.shape, bool)
    for lr in lab_reg:
        cand |= lr > 0
    if not cand.any():
        return np.zeros(subj_out.shape, np.uint8)
    lo, hi = _box_from_mask(cand, subj_reg, 10.0)
    sl = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    tgt = reg.crop(subj_reg, lo, hi)
    mask = _np_to_img(ndi.binary_dilation(cand, iterations=3)[sl].astype(np.float32), tgt)
    # an atlas that lacks a gland would vote background for it: JLF runs per gland over its holders
    probs_out = {0: None}
    best = np.zeros(subj_out.shape, np.uint8)
    best_p = np.full(subj_out.shape, 0.5, np.float32)  # a gland needs p > 0.5 against background
    for L in all_labels:
        vs = voters.get(L) or [a for a in range(len(lab_reg)) if L in holds[a]]
        if not vs:
            continue
        cts = [_np_to_img(ct_reg[a][sl], tgt) for a in vs]
        if len(vs) == 1:
            p = (lab_reg[vs[0]][sl] == L).astype(np.float32)
        else:
            labs = [_np_to_img((lab_reg[a][sl] == L).astype(np.float32), tgt) for a in vs]
            d = tempfile.mkdtemp(dir=tmp, prefix=f"jlf{L}_")
            pr = joint_label_fusion_probs(tgt, cts, labs, [1], mask, d)
            p = pr[1].numpy() if 1 in pr else np.zeros(tgt.shape, np.float32)
        pimg = _np_to_img(p, tgt)
        po = ants.resample_image_to_target(pimg, subj_out, interp_type="linear").numpy()
        take = po > best_p
        best[take] = L
        best_p[take] = po[take]
    return best


# ------------------------------------------------------------------ labels elsewhere, volumes
def labels_to_pet(dseg_ct_path, pet_path, pet_to_ct_xfm, out_path) -> str:
    """Resample a CT-space label map onto the PET grid (genericLabel: labels stay labels).

    ``pet_to_ct_xfm`` is the file written by :func:`glandpet.registration.register_pet_to_ct`
    (it maps CT points to PET points); it is applied inverted, so each PET voxel reads the label
    of the CT point it images."""
    reg.warp(str(dseg_ct_path), str(pet_path), [str(pet_to_ct_xfm)], out_path, interpolation="genericLabel",
             invert=[True])
    return str(out_path)


def labels_to_session(dseg_fixed_path, moving_ct_path, session_xfm_prefix, out_dseg, out_tsv=None,
                      label_table=None) -> str:
    """Carry a label map of the fixed (PSMA) session onto the moving (FAPI) session's CT grid
    through the inverse session transform (:func:`glandpet.registration.align_sessions`)."""
    reg.apply_inverse_session_transform(str(dseg_fixed_path), str(moving_ct_path), session_xfm_prefix, out_dseg,
                                        interpolation="genericLabel")
    if out_tsv is not None:
        src = label_table or _tsv_beside(dseg_fixed_path)
        labs = read_label_table(src) if src and Path(src).exists() else list(DEFAULT_LABELS)
        write_label_table(out_tsv, labs)
    return str(out_dseg)


def _tsv_beside(dseg_path) -> str:
    p = str(dseg_path)
    for ext in (".nii.gz", ".nii"):
        if p.endswith(ext):
            return p[: -len(ext)] + ".tsv"
    return p + ".tsv"


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

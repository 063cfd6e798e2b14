"""Label fusion of the multi-atlas segmentation: the atlases' warped labels of one region combined
into one label map, per gland by vote, volume-preserving shape averaging or joint label fusion.

Fusion per region (glands of no region: with the stage-A result), chosen per gland
(:data:`AUTO_FUSION` by default: JLF for every gland but the lacrimal glands, which are voted;
:func:`fusion_per_gland`): ``majority`` (per-label vote among the atlases that hold the label, ties
broken by the atlases' local similarity, :func:`majority_vote`; with volume preservation, the
default: shape-based averaging at the voters' median volume, :func:`shape_average_fusion`) or
``jlf`` (ANTs joint label fusion, background included as a label so it cannot fill its search
region, :func:`joint_label_fusion_probs`; a gland under its voters' median volume is then grown to
it along its probability, :data:`JLF_KEEPS_VOLUME`). :func:`fuse_region` does one region.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from scipy import ndimage as ndi

from glandpet.registration import field_of_view
from glandpet.registration import transforms
from glandpet.segmentation.atlas_registration import LABEL_BY_INDEX, RegionFit, box_from_mask, np_to_img

#: label fusion per gland for ``fusion="auto"`` (the default). Joint label fusion weighs each
#: atlas voxel by how well the intensity patch around it matches the subject, so it uses the weak
#: gland-to-fat/muscle contrast that a vote ignores. Measured (4 real-anatomy subjects, 3
#: atlases, median Dice parotid / submandibular / sublingual / lacrimal / tubarial):
#: plain majority 0.757 / 0.451 / 0.519 / 0.435 / 0.437, plain JLF 0.843 / 0.608 / 0.551 / 0.306 /
#: 0.363 (JLF's arg-max shrinks the small glands: see :data:`JLF_KEEPS_VOLUME`). With volume
#: preservation (the default): vote (shape-based averaging) for the lacrimal and tubarial glands,
#: JLF for the rest 0.843 / 0.613 / 0.615 / 0.511 / 0.468; JLF everywhere 0.844 / 0.618 / 0.614 /
#: 0.505 / 0.521; this mix takes the better of each: JLF except for the ~60-voxel (2 mm region grid)
#: lacrimal glands. 175 CPU-s per subject (JLF runs per gland on a box around its candidates only).
#: Without volume preservation the tubarial glands do better by vote (0.437 vs 0.363).
AUTO_FUSION: dict[str, str] = {"parotid": "jlf", "submandibular": "jlf", "sublingual": "jlf",
                               "lacrimal": "majority", "tubarial": "jlf"}
FUSION_METHODS = ("majority", "jlf")

#: fusion shrinks small glands: where the atlases disagree by a few millimetres about a gland a
#: few millimetres thick, a vote (or JLF's p > 0.5) keeps only their overlap. Measured (4
#: real-anatomy subjects, 3 atlases, medians of fused / voters' median volume / truth, mL):
#: lacrimal 0.48 / 0.63 / 0.70, tubarial 0.56 / 0.85 / 0.90, sublingual 1.49 / 2.03 / 3.36 -- but
#: not the parotid on the phantom (24.6 / 25.8 / 20.6), where JLF's intensity match sets the
#: boundary. On real CT, where the parotid is nearly as dense as its surroundings, JLF shrank it
#: too: one held-out scan, 4 atlases kept, fused / voters' median / truth voxels: right 401 / 500 /
#: 487, left 386 / 486 / 592 (Dice 0.759 / 0.738; at the voters' median volume 0.770 / 0.772).
#: With ``preserve_volume`` every JLF-fused gland (this was glands under 5 mL only) is therefore
#: kept at least at its voters' median volume; vote-fused glands always take it
#: (:func:`shape_average_fusion`).
JLF_KEEPS_VOLUME = True


def fusion_per_gland(fusion) -> dict[str, str]:
    """gland -> fusion method from ``"majority"``, ``"jlf"``, ``"auto"`` (:data:`AUTO_FUSION`) or a
    mapping ``{gland: method}`` (glands it leaves out: :data:`AUTO_FUSION`)."""
    if isinstance(fusion, str):
        if fusion == "auto":
            return dict(AUTO_FUSION)
        if fusion not in FUSION_METHODS:
            raise ValueError(f"fusion must be 'auto', 'majority', 'jlf' or a mapping gland -> method, not {fusion!r}")
        return {g: fusion for g in AUTO_FUSION}
    out = dict(AUTO_FUSION)
    for gland, method in dict(fusion).items():
        if gland not in AUTO_FUSION:
            raise ValueError(f"fusion: unknown gland {gland!r} (expected one of {', '.join(AUTO_FUSION)})")
        if method not in FUSION_METHODS:
            raise ValueError(f"fusion: {gland}: method must be 'majority' or 'jlf', not {method!r}")
        out[gland] = method
    return out



def voters_of(label: int, holds: list[set[int]], voters: dict[int, list[int]] | None) -> list[int]:
    """The atlases that vote on ``label``: ``voters[label]`` if given (atlas selection), else every
    atlas holding it; an atlas that does not hold the label never votes on it."""
    vs = voters.get(label) if voters else None
    if vs is None:
        vs = range(len(holds))
    return [a for a in vs if label in holds[a]]


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
        vs = voters_of(L, holds, voters)
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


def signed_distance_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Signed distance (mm) to the mask's boundary: negative inside, positive outside."""
    return ndi.distance_transform_edt(~mask, sampling=spacing) - ndi.distance_transform_edt(mask, sampling=spacing)


def _top_voxels(score: np.ndarray, n: int) -> np.ndarray:
    """Bool mask of the ``n`` voxels with the highest ``score`` (ties broken by position)."""
    out = np.zeros(score.shape, bool)
    n = int(min(max(n, 0), score.size))
    if n:
        order = np.argsort(-score.ravel(), kind="stable")[:n]
        out.ravel()[order] = True
    return out


def shape_average_fusion(label_maps: list[np.ndarray], holds: list[set[int]], labels: list[int], spacing,
                         weights: list[dict[int, float]] | None = None,
                         voters: dict[int, list[int]] | None = None) -> np.ndarray:
    """Volume-preserving shape-based averaging (Rohlfing & Maurer 2007, with the volume fixed).

    Per label, the (weighted) mean over its voters of their signed distance maps (mm, negative
    inside) ranks the voxels; the label takes as many voxels as the median of its voters' volumes.
    A vote (or the mean shape's zero level) shrinks a small structure whenever the atlases
    disagree about its position: with three atlases a few millimetres apart, a 0.7 mL gland comes
    out at half its volume. Ranking by mean distance keeps the consensus shape and position; fixing
    the volume keeps the atlases' consensus size. Arguments as :func:`majority_vote`; a voxel
    claimed by two labels goes to the one it lies deeper in."""
    sp = np.asarray(spacing, float)
    shp = label_maps[0].shape
    best = np.zeros(shp, np.uint8)
    best_d = np.full(shp, np.inf, np.float32)
    for L in sorted(labels):
        vs = [a for a in voters_of(L, holds, voters) if (label_maps[a] == L).any()]
        if not vs:
            continue
        union = np.zeros(shp, bool)
        for a in vs:
            union |= label_maps[a] == L
        lo, hi = np.argwhere(union).min(0), np.argwhere(union).max(0)
        pad = np.ceil(5.0 / sp).astype(int) + 1
        lo, hi = np.maximum(lo - pad, 0), np.minimum(hi + pad + 1, np.array(shp))
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        dsum, wtot, vols = np.zeros([b - a for a, b in zip(lo, hi)], np.float32), 0.0, []
        for a in vs:
            m = label_maps[a][sl] == L
            w = float(weights[a].get(L, 1.0)) if weights else 1.0
            dsum += w * signed_distance_mm(m, sp)
            wtot += w
            vols.append(int(m.sum()))
        mean_d = dsum / wtot
        take = _top_voxels(-mean_d, int(round(float(np.median(vols)))))
        view_b, view_d = best[sl], best_d[sl]
        win = take & (mean_d < view_d)
        view_b[win] = L
        view_d[win] = mean_d[win]
    return best


def joint_label_fusion_probs(target, atlas_cts: list, atlas_labels: list, labels: list[int], mask,
                             workdir: str, beta: float = 2.0, rad: int = 2, r_search: int = 3) -> dict[int, object]:
    """ANTs joint label fusion returning one probability image per label value *including 0*.

    ``ants.joint_label_fusion`` assigns every voxel of its mask to the most probable *foreground*
    label (background is not a label there), which fills the whole search region. Here the
    background is its own label (value ``max+1`` in the call, mapped back to 0), and the
    caller takes the arg-max over background and glands.
    """
    ants = transforms.load_ants()
    bg = max(labels) + 1
    labs = []
    for lab in atlas_labels:
        arr = lab.numpy().copy()
        arr[arr == 0] = bg
        labs.append(np_to_img(arr, lab))
    out_prefix = os.path.join(workdir, "jlf_")
    res = ants.joint_label_fusion(target, mask, atlas_list=atlas_cts, beta=beta, rad=rad, label_list=labs,
                                  r_search=r_search, output_prefix=out_prefix, verbose=False)
    probs = {}
    for num, img in zip(res["segmentation_numbers"], res["probabilityimages"]):
        probs[0 if num == bg else int(num)] = img
    return probs


def _fuse_jlf(fix, out_ref, ct_fix, lab_fix, holds, voters, labels, tmp, min_voxels=None):
    """JLF on the region's registration grid, per gland over its voters (an atlas lacking a gland
    would vote background for it) and within a box around that gland's candidates only (the union
    of its voters' labels, dilated by more than the search radius: elsewhere every atlas says
    background), background included as a label; probabilities resampled linearly onto the output
    grid, arg-max over background and glands. ``min_voxels`` ({label: n}): a gland left smaller
    than n voxels grows into the free voxels of highest probability until it has n."""
    ants = transforms.load_ants()
    best = np.zeros(out_ref.shape, np.uint8)
    best_p = np.full(out_ref.shape, 0.5, np.float32)  # a gland needs p > 0.5 against background
    probs = {}
    for L in labels:
        vs = voters_of(L, holds, voters)
        cand = np.zeros(fix.shape, bool)
        for k in vs:
            cand |= lab_fix[k] == L
        if not vs or not cand.any():
            continue
        lo, hi = box_from_mask(cand, fix, 10.0)
        sl = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
        tgt = field_of_view.crop(fix, lo, hi)
        if len(vs) == 1:
            p = (lab_fix[vs[0]][sl] == L).astype(np.float32)
        else:
            mask = np_to_img(ndi.binary_dilation(cand, iterations=3)[sl].astype(np.float32), tgt)
            cts = [np_to_img(ct_fix[k][sl], tgt) for k in vs]
            labs = [np_to_img((lab_fix[k][sl] == L).astype(np.float32), tgt) for k in vs]
            d = tempfile.mkdtemp(dir=tmp, prefix=f"jlf{L}_")
            pr = joint_label_fusion_probs(tgt, cts, labs, [1], mask, d)
            p = pr[1].numpy() if 1 in pr else np.zeros(tgt.shape, np.float32)
        po = ants.resample_image_to_target(np_to_img(p, tgt), out_ref, interp_type="linear").numpy()
        take = po > best_p
        best[take] = L
        best_p[take] = po[take]
        if min_voxels and L in min_voxels:
            probs[L] = po
    for L, po in probs.items():
        short = int(min_voxels[L]) - int((best == L).sum())
        if short > 0:
            score = np.where((best == 0) & (po > 0.01), po, -1.0)
            grow = _top_voxels(score, short) & (score > 0)
            best[grow] = L
    return best


def fuse_region(region: RegionFit, holds: list[set[int]], voters: dict[int, list[int]],
                weights: list[dict[int, float]], method_of: dict[str, str], preserve_volume: bool,
                workdir: str) -> np.ndarray:
    """One region's fused labels on its part of the output grid (``region.out_ref``): the glands
    whose method (``method_of``, :func:`fusion_per_gland`) is ``jlf`` by :func:`_fuse_jlf` (with
    ``preserve_volume``, each kept at least at its voters' median volume), then the others by
    :func:`shape_average_fusion` (``preserve_volume``) or :func:`majority_vote` in the voxels
    left free. ``holds``, ``voters``, ``weights``: indexed like ``region.atlases``
    (:func:`glandpet.segmentation.atlas_registration.region_voters`)."""
    rlabels, out_ref, lab_o = region.labels, region.out_ref, region.labels_out
    by_jlf = [L for L in rlabels if method_of[LABEL_BY_INDEX[L].gland] == "jlf"]
    by_vote = [L for L in rlabels if L not in by_jlf]
    fr = np.zeros(out_ref.shape, np.uint8)
    if by_jlf:
        small = {}
        if preserve_volume:
            vox_ml = float(np.prod(out_ref.spacing)) / 1000.0
            for L in by_jlf:
                med = float(np.median([(lab_o[k] == L).sum() for k in voters.get(L, [])] or [0]))
                if med > 0 and (JLF_KEEPS_VOLUME or med * vox_ml < 5.0):
                    small[L] = int(round(med))
        fr = _fuse_jlf(region.fix, out_ref, region.cts, region.labels_fix, holds, voters, by_jlf, workdir,
                       min_voxels=small)
    if by_vote and preserve_volume:
        fv = shape_average_fusion(lab_o, holds, by_vote, out_ref.spacing, weights=weights, voters=voters)
    elif by_vote:
        fv = majority_vote(lab_o, holds, by_vote, weights=weights, voters=voters)
    if by_vote:
        free = (fr == 0) & (fv > 0)
        fr[free] = fv[free]
    return fr

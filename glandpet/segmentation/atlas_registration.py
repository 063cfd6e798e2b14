"""Stages A and B of the multi-atlas segmentation: every atlas registered onto one subject CT (whole
field, then per region), its labels carried onto the subject's grids, and the choice of the atlases
that register and vote in each region and on each gland.

1. Per atlas, stage A (whole head and neck, :data:`ATLAS_STAGES`, on the subject's head-and-neck
   crop resampled to ``spacing_mm``, 4 mm): initialisation from the images
   (:func:`glandpet.registration.sessions.anatomy_translation`: scans of different patients share no world
   frame and their fields of view differ -- one stops just above the parotids, another runs from
   the chest to the vertex -- so the body's centre of mass or top is no landmark; every translation
   is scored by the NCC of soft-tissue and bone images over the overlap) -> rigid -> affine
   (Mattes MI, masked to the atlas's glands' box and started twice: :func:`register_atlas_linear`;
   ``linear_stage: whole_crop``: over the whole crops, in one call with the SyN) -> SyN (Mattes MI)
   at the 8 and 4 mm levels, ``antsRegistration`` calls with explicit schedules. ANTsPy's ``SyN`` presets run a fixed
   2100x1200x1200 affine and ignore the affine iterations; driving the stages directly keeps the
   schedule under control. With a large atlas library (``atlases_per_region``) the linear stages
   run for every atlas first; per region only the atlases most similar to the subject after them
   (:func:`preselect_atlases`) go on to the SyN and to stage B. An atlas whose stage-A gland lies
   more than :data:`LOST_MM` from the atlases' consensus (a strict majority around the medoid of
   their positions) was lost at registration
   (:func:`lost_atlases`): for that gland it neither sets the region's box nor votes. (The local
   NCC selection of step 4 let lost atlases vote on real CT, 0-3 of 5 per scan: it scores an
   atlas where *it* puts the gland, presumably where a misplaced atlas's soft tissue can match the
   subject's as well.) All of this: :func:`register_whole_field`.
2. Stage B (:func:`register_region`), per region of :data:`REGIONS` and per atlas: a regional
   registration of the stage-A-warped atlas CT to a crop of the subject around the union over
   atlases of the stage-A positions of the region's glands (+ margin), at ``region_spacing_mm``; the
   region's labels go through B o A in one resampling. Every atlas sees the same crop, so their
   local similarities compare. Under the mandible (submandibular, sublingual: they move with neck
   flexion and jaw position, which the whole-field warp does not follow) an affine then a CC SyN
   (:data:`REGION_STAGES`); around the parotid and tubarial glands, and around the lacrimal
   glands, a CC SyN (:data:`REGION_SYN`) on top of stage A.
3. Labels carried with ``genericLabel`` onto the region's registration grid and its part of the
   output grid; atlas label values mapped to :data:`glandpet.glands.DEFAULT_LABELS` through each
   atlas's label table (:func:`relabel_to_default`).
4. Atlas selection per gland (:func:`region_voters`, optional): the local normalised
   cross-correlation between the warped atlas CT and the subject within :data:`SCORE_DILATE_MM` of
   that gland (on the region's grid); an atlas whose score is a low outlier among the atlases is
   left out of that gland's vote (a lost registration). The scores also break voting ties. With
   many atlases only the :data:`ATLASES_PER_GLAND` most similar vote on a gland. An atlas whose
   contour of a gland is a low volume outlier among the atlases
   (:func:`glandpet.glands.volume_outliers`: a truncated contour) does not vote on that gland at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from glandpet.registration import field_of_view
from glandpet.registration import sessions
from glandpet.registration import transforms
from glandpet.glands import DEFAULT_LABELS, Label, label_value, read_label_table, volume_outliers


#: stage A grid: the whole head-and-neck crop resampled to 4 mm (levels 8 and 4 mm). Rigid and
#: affine (Mattes MI), then SyN (MI, dense) at the same two levels: on one real-anatomy subject and
#: atlas it took 25 CPU-s and lifted the parotid Dice from 0.53 (affine) to 0.67; a regional
#: affine + SyN at 1.5 mm (MI: 33 CPU-s; CC radius 2: > 170 CPU-s) around the parotids did worse
#: (0.50) than this coarse whole-field warp *instead of* it. Since every gland now gets a regional
#: CC stage on top (:data:`REGIONS`), stage A is the regions' starting point: 10 iterations at the
#: 4 mm level (was 20) pay for them. Dropping the stage-A SyN altogether (regions started from the
#: affine) was worse (4 real-anatomy subjects, 3 atlases, medians: parotid 0.731 vs 0.752,
#: tubarial 0.408 vs 0.443, submandibular 0.343 vs 0.364) and not cheaper (176 CPU-s / subject:
#: the regional stages then resample the full-resolution atlas at every level).
ATLAS_SPACING_MM = 4.0
ATLAS_RIGID = dict(
    transform="Rigid[0.1]", bins=32, sampling=0.25, iterations=(200, 100),
    shrink=(2, 1), smooth_vox=(1, 0), convergence=(1e-6, 10),
)
ATLAS_AFFINE = dict(
    transform="Affine[0.1]", bins=32, sampling=0.25, iterations=(100, 50),
    shrink=(2, 1), smooth_vox=(1, 0), convergence=(1e-6, 10),
)
ATLAS_SYN = dict(
    transform="SyN[0.25,3,0]", metric="MI", bins=32, sampling=1.0, iterations=(40, 10),
    shrink=(2, 1), smooth_vox=(1, 0), convergence=(1e-6, 10),
)
ATLAS_STAGES = [ATLAS_RIGID, ATLAS_AFFINE, ATLAS_SYN]
#: with preselection (``atlases_per_region``) stage A runs as two calls: these linear stages for
#: every atlas, then the SyN, started from that affine, for the atlases some region preselected
#: (:func:`preselect_atlases`); without it, :data:`ATLAS_STAGES` in one call.
ATLAS_LINEAR_STAGES = [ATLAS_RIGID, ATLAS_AFFINE]

#: stage A's linear stages look at the atlas's glands, not its whole field of view. Real scans
#: differ in what they show (one runs from the chest to mid-head, another stops at the orbits; the
#: OpenKBP planning CTs are blanked to -1000 outside a box around the planning region), and Mattes
#: MI over two whole crops then matched shoulders to jaws and a blanked box's edge to the skin:
#: from a translation 2 mm from right, the rigid stage ended 91 mm away (okbp-train-17 <-
#: okbp-train-33). So both linear stages sample only within :data:`LINEAR_ROI_MARGIN_MM` of the
#: box around the atlas's glands (moving mask; the fixed mask is that box where the start puts it)
#: and within the bodies (dilated 2 voxels: the skin edge counts, far air does not); they start
#: twice -- from the whole-scan search and from a search for the atlas's gland box alone
#: (:func:`glandpet.registration.sessions.anatomy_translation`, ``moving_box``, margin
#: :data:`LINEAR_SEARCH_MARGIN_MM`) -- and the result whose CT matches the subject better (NCC of
#: soft tissue within the gland box as it maps it) is kept: :func:`register_atlas_linear`.
#: Measured on 26 pairs of the 24 real OpenKBP CTs (error at the parotids' midpoint after the
#: affine, mm): one start, unmasked: median 17.4, 90th percentile 53.8, 9 pairs over 30 mm; masked,
#: the better of two starts: 9.7 / 21.8, 1 over 30 mm. On a one-atlas phantom segmentation
#: (the README walkthrough's subject) the submandibular Dice rose with it too: 0.12 / 0.22 -> 0.31 /
#: 0.36, and with each of 3 other phantom atlases alone 0.35 / 0.23 -> 0.57 / 0.31, 0.26 / 0.16 ->
#: 0.56 / 0.39, 0.81 / 0.60 -> 0.81 / 0.69.
LINEAR_ROI_MARGIN_MM = 30.0
LINEAR_SEARCH_MARGIN_MM = 40.0
#: ``segmentation.linear_stage``: ``gland_box`` (the default, :func:`register_atlas_linear`) or
#: ``whole_crop`` (the method before it); the README's "Segmentation" gives the measurements of both.
LINEAR_STAGES = ("gland_box", "whole_crop")

#: stage B grid and schedules, started from stage A (the stage-A-warped atlas CT on the region's
#: 2 mm grid). The deformable part is SyN with the local cross-correlation metric (CT to CT: same
#: modality, CC follows local edges that MI over a whole crop averages away), radius 2, at the
#: region's 8 and 4 mm levels only. Measured on one subject/atlas pair each, over stage A alone:
#: parotid 0.74/0.74 -> 0.76/0.76 and 0.34/0.48 -> 0.59/0.68, tubarial 0.11/0.12 -> 0.27/0.24 for
#: +9..20 CPU-s per atlas (parotid + lacrimal regions); adding the 2 mm level (30x10 iterations)
#: gained no more (0.78/0.76, 0.52/0.69) for +56..77 CPU-s, and MI SyN at 8/4/2 mm (40x20x10)
#: gained less (0.74/0.74) for more time than CC at 8/4 mm.
REGION_SPACING_MM = 2.0
#: regional affine (MI) at the 8 and 4 mm levels: the lower region only (neck flexion, jaw).
REGION_AFFINE = dict(
    transform="Affine[0.1]", bins=32, sampling=0.25, iterations=(100, 50),
    shrink=(4, 2), smooth_vox=(2, 1), convergence=(1e-6, 10),
)
REGION_SYN = dict(
    transform="SyN[0.25,3,0]", metric="CC", radius=2, iterations=(40, 20),
    shrink=(4, 2), smooth_vox=(2, 1), convergence=(1e-6, 10),
)
REGION_STAGES = [REGION_AFFINE, REGION_SYN]
#: the lacrimal glands (~0.4-1 mL, a few millimetres thick against the bony orbit) also get the
#: region grid's own 2 mm level, one box per orbit. Measured (4 real-anatomy subjects, 3 atlases,
#: fusion auto, median Dice): lacrimal 0.514 -> 0.542 with one box around both orbits (single-atlas
#: medians 0.33 / 0.41 / 0.48 -> 0.37 / 0.46 / 0.47), but ~12 s per atlas (was ~3); one box per
#: orbit: 0.532, 2.5 + 2.5 s per atlas; the other glands unchanged.
ORBIT_SYN = dict(REGION_SYN, iterations=(40, 20, 10), shrink=(4, 2, 1), smooth_vox=(2, 1, 0))

_L = label_value
#: regions of stage B: name -> (label values, margin in mm around the union over atlases of their
#: stage-A positions[, stages]). A label belongs to the first region that lists it; labels of no
#: region keep the stage-A transform. The glands under the mandible move with neck flexion and
#: jaw position, which the whole-field warp does not follow: affine + SyN there. The parotids and
#: tubarial glands (one box around both sides) and the lacrimal glands get a regional CC SyN on
#: top of stage A. Measured (4 real-anatomy subjects, 3 atlases, majority, median Dice over
#: subjects and sides; two runs each: ITK's threaded MI is not run-to-run identical), old schedule
#: (stage B only under the mandible, MI) -> this one: parotid 0.699/0.702 -> 0.739/0.757,
#: submandibular 0.375/0.377 -> 0.359/0.350 (single-atlas medians 0.41/0.16/0.33 -> 0.41/0.21/0.36),
#: sublingual 0.502/0.506 -> 0.514/0.566, lacrimal 0.388/0.419 -> 0.449/0.445, tubarial
#: 0.405/0.387 -> 0.434/0.438; user+sys CPU per subject (3 atlases, 2 threads, idle machine)
#: 130 -> 144 s (max 163). The same regions with stage A's full
#: 40x20 SyN, a regional 2 mm affine level and a 20 mm parotid margin: parotid 0.752, tubarial
#: 0.443, lacrimal 0.432, submandibular 0.364, but 170-191 CPU-s on a loaded machine (budget 170).
#: With majority voting, submandibular stayed low because the atlases place it wrongly (JLF, which
#: weighs atlases by the local intensity match, lifts it to ~0.61; see :data:`AUTO_FUSION`):
#: single-atlas medians 0.41 / 0.21 / 0.36; in two of the four subjects the gland's centre lies
#: 16-19 mm below the mandible's lower border (0-4 mm in the other subjects and in every atlas),
#: a position no atlas shows and no CT landmark (weak gland contrast) can pull it to; one atlas's
#: right gland is 1.0 mL (truncated contour).
REGIONS: dict[str, tuple] = {
    "lower": ((_L("submandibular", "left"), _L("submandibular", "right"), _L("sublingual", "left"),
               _L("sublingual", "right")), 25.0, REGION_STAGES),
    "upper": ((_L("parotid", "left"), _L("parotid", "right"), _L("tubarial", "left"),
               _L("tubarial", "right")), 15.0, [REGION_SYN]),
    "orbit_left": ((_L("lacrimal", "left"),), 20.0, [ORBIT_SYN]),
    "orbit_right": ((_L("lacrimal", "right"),), 20.0, [ORBIT_SYN]),
}
#: local similarity of an atlas for a gland: NCC within this distance of the atlases' labels.
SCORE_DILATE_MM = 6.0
#: per gland, only the most similar atlases vote (after the outlier rejection). Measured with 10
#: real-anatomy atlases (4 subjects, majority, median Dice): all 10 vote -> the 5 most similar per
#: gland: parotid 0.780 -> 0.784, submandibular 0.477 -> 0.534, sublingual 0.447 -> 0.459,
#: lacrimal 0.432 -> 0.480, tubarial 0.333 -> 0.450 (top 3: 0.767 / 0.522 / 0.440 / 0.468 / 0.473).
#: With 5 atlases or fewer it changes nothing.
ATLASES_PER_GLAND = 5
#: with a larger atlas library, per region only this many atlases -- the most similar to the
#: subject after the affine stage -- get the deformable stages (SyN of stage A, stage B: ~2/3 of
#: an atlas's time). 0: every atlas (the default: accuracy first). See :func:`preselect_atlases`.
ATLASES_PER_REGION = 0
#: preselection scores an atlas within this distance of the region's glands: after an affine the
#: glands' own neighbourhood is weak-contrast soft tissue; 20 mm takes in the bone, air and fat
#: around them. Measured (4 real-anatomy subjects, 10 atlases, fusion auto, median Dice parotid /
#: submandibular / sublingual / lacrimal / tubarial, CPU-s per subject on 2 cores): all 10 atlases
#: 0.874 / 0.730 / 0.685 / 0.563 / 0.576, 711 s; 5 per region scored within 6 mm 0.856 / 0.696 /
#: 0.688 / 0.547 / 0.498, 449 s; within 20 mm 0.861 / 0.728 / 0.698 / 0.551 / 0.554, 403 s (8-9 of
#: the 10 atlases still get the stage-A SyN: the regions choose different ones). 3 atlases, for
#: comparison: 0.875 / 0.646 / 0.695 / 0.532 / 0.514, 184 s.
PRESELECT_DILATE_MM = 20.0

#: with an atlas template (:mod:`glandpet.segmentation.atlas_template`), per region only this many
#: atlases -- the most similar after the composed stage A -- get stage B (``atlases_per_region: 0``).
#: Measured (4 real-anatomy subjects, 10 atlases, 1 ITK thread, loaded machine; median Dice parotid /
#: submandibular / sublingual / lacrimal / tubarial, CPU-s per subject): pairwise 0.819 / 0.808 /
#: 0.713 / 0.625 / 0.600, 602 s; template with 4: 0.813 / 0.784 / 0.672 / 0.576 / 0.606, 197 s.
#: One subject with the orbits at 6 (a mapping ``{region: k}`` is accepted) or all 10: lacrimal
#: 0.47 / 0.49 -> 0.52 / 0.56 or 0.62 / 0.60, +20 or +65 CPU-s. On real CT (parotid, 2 scans) the
#: template path lost ~0.1 Dice against pairwise (README, "Atlases and cost").
TEMPLATE_ATLASES_PER_REGION = 4

#: label value -> :class:`glandpet.glands.Label` of the default table (names in the metrics).
LABEL_BY_INDEX = {lab.index: lab for lab in DEFAULT_LABELS}


# ------------------------------------------------------------------ small helpers
def np_to_img(arr, like):
    """An ANTs float image of ``arr`` on the grid of the ANTs image ``like``."""
    return transforms.load_ants().from_numpy(np.asarray(arr, dtype=np.float32), origin=like.origin, spacing=like.spacing,
                                  direction=like.direction)


def relabel_to_default(arr: np.ndarray, table: list[Label]) -> np.ndarray:
    """Map an atlas label array to DEFAULT_LABELS values through its label table (others -> 0)."""
    lut = np.zeros(int(max([int(arr.max())] + [lab.index for lab in table])) + 1, np.uint8)
    for lab in table:
        lut[lab.index] = label_value(lab.gland, lab.side)
    a = np.rint(arr).astype(np.int64)
    a[(a < 0) | (a >= len(lut))] = 0
    return lut[a]


def box_from_mask(mask: np.ndarray, img, margin_mm: float):
    """Voxel index box (lo, hi inclusive) of ``mask`` on ``img``'s grid, grown by ``margin_mm``."""
    sp = np.asarray(img.spacing, float)
    idx = np.argwhere(mask)
    m = np.ceil(margin_mm / sp).astype(int)
    lo = np.maximum(idx.min(0) - m, 0)
    hi = np.minimum(idx.max(0) + m, np.array(mask.shape) - 1)
    return lo, hi


def _world_box(img, lo, hi):
    """The axis-aligned LPS box (mm) around the voxel box ``lo``..``hi`` of ``img``."""
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    w = field_of_view.world_coords(img, corners)
    return w.min(0), w.max(0)


def _world_to_index(img, wlo, whi):
    """The (continuous) voxel index box of ``img`` around the LPS box ``wlo``..``whi``."""
    d = np.asarray(img.direction, float)
    sp = np.asarray(img.spacing, float)
    org = np.asarray(img.origin, float)
    corners = np.array([[a, b, c] for a in (wlo[0], whi[0]) for b in (wlo[1], whi[1]) for c in (wlo[2], whi[2])])
    idx = ((corners - org) @ d) / sp
    return idx.min(0), idx.max(0)


# ------------------------------------------------------------------ atlas selection
def local_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of ``a`` and ``b`` within ``mask`` (0 if too few or flat voxels)."""
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    if x.size < 10 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def similarity_near(subject: np.ndarray, cts: dict[int, np.ndarray], near: np.ndarray, spacing,
                    dilate_mm: float) -> dict[int, float]:
    """Local NCC of each warped atlas CT (``cts``: atlas -> array) with the subject within
    ``dilate_mm`` of the mask ``near`` (all of the grid if ``near`` is empty)."""
    sp = np.asarray(spacing, float)
    around = (ndi.binary_dilation(near, iterations=max(1, int(round(dilate_mm / sp.min()))))
              if near.any() else np.ones(subject.shape, bool))
    return {a: local_ncc(subject, ct, around) for a, ct in cts.items()}


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



def gland_voters(scores: dict[int, float], select: bool = True, top_k: int | None = ATLASES_PER_GLAND) -> list[int]:
    """The atlases that vote on one gland: ``scores`` (atlas -> local similarity around the gland);
    low outliers dropped (``select``, :func:`select_atlases`), then the ``top_k`` most similar kept
    (None or 0: all). The order is the atlases' own."""
    keep = [int(k) for k in select_atlases({str(k): v for k, v in scores.items()})] if select else list(scores)
    if top_k and len(keep) > top_k:
        best = set(sorted(keep, key=lambda k: (-scores[k], k))[:top_k])
        keep = [k for k in keep if k in best]
    return sorted(keep)


def preselect_atlases(subject: np.ndarray, warped_cts: list[np.ndarray], warped_labels: list[np.ndarray],
                      holds: list[set[int]], region_labels: dict[str, list[int]], spacing,
                      k: int | Mapping[str, int] | None,
                      dilate_mm: float = SCORE_DILATE_MM) -> tuple[dict[str, list[int]], dict[str, dict[int, float]]]:
    """Per region, the atlases that get the deformable registration (atlas preselection).

    ``subject``, ``warped_cts[a]``, ``warped_labels[a]``: the subject CT and each atlas's CT and
    labels after the affine stage, on one grid of ``spacing`` (mm). Per region, every atlas holding
    one of its labels is scored by the local NCC within ``dilate_mm`` of the union of
    their warped labels of the region; for each label of the region its ``k`` best-scoring holders
    are kept (so a gland few atlases hold is not lost), the region keeping the union of those.
    ``k`` None or 0, or no more holders than ``k``: every holder; a mapping: ``k`` per region
    (a region it does not name, or names with 0: every holder). Returns ``(region -> atlas
    indices, region -> {atlas: score})``; regions no atlas holds are left out."""
    chosen: dict[str, list[int]] = {}
    scores: dict[str, dict[int, float]] = {}
    for rname, labels in region_labels.items():
        holders = [a for a in range(len(holds)) if any(L in holds[a] for L in labels)]
        if not holders:
            continue
        kr = k.get(rname, 0) if isinstance(k, Mapping) else k
        if not kr or len(holders) <= kr:
            chosen[rname] = holders
            continue
        union = np.zeros(subject.shape, bool)
        for a in holders:
            union |= np.isin(warped_labels[a], labels)
        sc = similarity_near(subject, {a: warped_cts[a] for a in holders}, union, spacing, dilate_mm)
        ranked = sorted(holders, key=lambda a: (-sc[a], a))
        keep: set[int] = set()
        for L in labels:
            keep |= set([a for a in ranked if L in holds[a]][:kr])
        chosen[rname] = sorted(keep)
        scores[rname] = sc
    return chosen, scores


#: an atlas whose stage-A position of a gland (centroid) lies farther than this from the consensus
#: position (the medoid of a strict majority of the atlases) was lost at registration
#: (:func:`lost_atlases`).
LOST_MM = 20.0


def lost_atlases(warped_labels: list[np.ndarray], holds: list[set[int]], spacing,
                 lost_mm: float = LOST_MM) -> list[set[int]]:
    """Per atlas, the labels for which its registration was lost: its warped gland's centroid lies
    more than ``lost_mm`` from the consensus position of that gland. On real scans a lost atlas puts
    the parotid entirely beside the true gland (Dice 0.00-0.02 with the truth), where the others
    agree within a few millimetres; its local image similarity, measured where *it* puts the gland,
    need not be an outlier, so the position consensus decides.

    The consensus is the medoid of the centroids (the atlas with the smallest summed distance to the
    others) and the atlases within ``lost_mm`` of it; it must hold a strict majority of the atlases
    whose warped gland exists, else there is no consensus and no atlas is called lost for that gland
    (two pairs of atlases 50 mm apart, or atlases scattered more than ``lost_mm``: rejecting by the
    per-axis median then rejected every atlas of a real scan and left the gland empty). An atlas
    whose warped gland vanished is always lost. Needs 3 holders (with two there is nothing to
    decide)."""
    sp = np.asarray(spacing, float)
    out: list[set[int]] = [set() for _ in warped_labels]
    for L in sorted(set().union(*holds) if holds else set()):
        cen = {}
        for a, lab in enumerate(warped_labels):
            if L in holds[a]:
                idx = np.argwhere(lab == L)
                cen[a] = idx.mean(0) * sp if len(idx) else None
        if len(cen) < 3:
            continue
        found = [a for a, c in cen.items() if c is not None]
        for a, c in cen.items():
            if c is None and found:
                out[a].add(L)
        if len(found) < 3:
            continue
        pts = np.array([cen[a] for a in found])
        dist = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=2)
        medoid = int(np.argmin(dist.sum(1)))
        near = dist[medoid] <= lost_mm
        if 2 * int(near.sum()) <= len(found):
            continue  # no majority agrees on where the gland is: nothing to decide from positions
        for k, a in enumerate(found):
            if not near[k]:
                out[a].add(L)
    return out


# ------------------------------------------------------------------ loading and warping atlases
def atlas_head_neck_box(ct) -> tuple[np.ndarray, np.ndarray]:
    """The voxel box of an atlas CT that stage A registers: its head and neck with 30 mm more margin
    than a subject's (the subject's crop then lies inside the atlas's)."""
    return field_of_view.head_neck_box(ct, margin_mm=field_of_view.HEAD_NECK_MARGIN_MM + 30)


def atlas_head_neck(ct):
    """An atlas CT cropped to :func:`atlas_head_neck_box`."""
    return field_of_view.crop(ct, *atlas_head_neck_box(ct))


def atlas_name(atlas: dict) -> str:
    """An atlas's name: its ``name``, else its folder's."""
    return str(atlas.get("name") or Path(atlas["ct"]).parent.name)


def _load_atlas(atlas: dict):
    """An atlas's name, CT, label map in DEFAULT_LABELS values, the labels it holds and their volumes (mL)."""
    ants = transforms.load_ants()
    name = atlas_name(atlas)
    ct = ants.image_read(str(atlas["ct"])).clone("float")
    lab = ants.image_read(str(atlas["labels"]))
    table = read_label_table(atlas["label_table"])
    arr = relabel_to_default(lab.numpy(), table)
    labimg = np_to_img(arr, lab)
    holds = {label_value(t.gland, t.side) for t in table} & set(int(v) for v in np.unique(arr) if v > 0)
    vox_ml = float(np.prod(lab.spacing)) / 1000.0
    counts = np.bincount(arr.ravel(), minlength=max(holds, default=0) + 1)
    volumes = {L: float(counts[L]) * vox_ml for L in holds}
    return name, ct, labimg, holds, volumes


def _gland_box_world(lab_img) -> tuple[np.ndarray, np.ndarray]:
    """World (LPS) box of every gland in an atlas's label map; the whole image if it holds none."""
    mask = lab_img.numpy() > 0
    if not mask.any():
        return _world_box(lab_img, np.zeros(3, int), np.array(lab_img.shape) - 1)
    return _world_box(lab_img, *box_from_mask(mask, lab_img, 0.0))


def _box_mask(img, lo, hi, shift=None):
    """Voxels of ``img`` whose world position (+ ``shift``) lies in the box, within the body
    dilated by 2 voxels; an ANTs image."""
    ants = transforms.load_ants()
    w = field_of_view.world_coords(img, np.argwhere(np.ones(img.shape, bool)))
    if shift is not None:
        w = w + shift
    m = ((w >= lo) & (w <= hi)).all(1).reshape(img.shape)
    m &= ndi.binary_dilation(field_of_view.body_mask(img), iterations=2)
    return ants.from_numpy(m.astype(np.float32), origin=img.origin, spacing=img.spacing, direction=img.direction)


def register_atlas_linear(subj_glob, a_prep, a_lab, outprefix: str, verbose: bool = False) -> dict:
    """Stage A's rigid + affine of one atlas (``a_prep``: its head-and-neck crop at the subject's
    grid spacing; ``a_lab``: its labels) onto ``subj_glob``, masked to its glands' box and started
    twice (:data:`LINEAR_ROI_MARGIN_MM`): the start whose result matches the subject's CT better
    is kept. Returns ``run_registration``'s dict plus ``start`` (``"scan"`` | ``"glands"``) and
    ``ncc`` per start."""
    ants = transforms.load_ants()
    glo, ghi = _gland_box_world(a_lab)
    lo, hi = glo - LINEAR_ROI_MARGIN_MM, ghi + LINEAR_ROI_MARGIN_MM
    moving_mask = _box_mask(a_prep, lo, hi)
    starts = {"scan": sessions.anatomy_translation(subj_glob, a_prep),
              "glands": sessions.anatomy_translation(subj_glob, a_prep, spacing_mm=a_prep.spacing[0],
                                                     moving_box=(glo - LINEAR_SEARCH_MARGIN_MM,
                                                                 ghi + LINEAR_SEARCH_MARGIN_MM))}
    centre = field_of_view.body_com(subj_glob)
    subj = subj_glob.numpy()
    body = ndi.binary_dilation(field_of_view.body_mask(subj_glob), iterations=2)
    best, nccs = None, {}
    for name, t in starts.items():
        if best is not None and np.linalg.norm(t - starts["scan"]) < 2 * float(subj_glob.spacing[0]):
            continue  # the same start: nothing new to try
        pre = f"{outprefix}{name}_"
        init = transforms.translation_transform(t, pre + "init.mat", centre=centre)
        r = transforms.run_registration(subj_glob, a_prep, ATLAS_LINEAR_STAGES, pre, initial=[init],
                                        fixed_mask=_box_mask(subj_glob, lo, hi, shift=t), moving_mask=moving_mask,
                                        verbose=verbose)
        where = (ants.apply_transforms(subj_glob, moving_mask, r["fwdtransforms"], interpolator="nearestNeighbor").numpy() > 0.5) & body
        w = r["warped"].numpy()[where]
        ncc = float(np.corrcoef(np.clip(subj[where], -200, 300), np.clip(w, -200, 300))[0, 1]) if where.sum() > 10 else -1.0
        nccs[name] = round(ncc if np.isfinite(ncc) else -1.0, 4)
        if best is None or nccs[name] > best[1]:
            best = (r, nccs[name], name)
    r, _, name = best
    r["start"], r["ncc"] = name, nccs
    return r


def _warp_labels(ref, lab_img, fwd) -> np.ndarray:
    """A label map carried onto ``ref``'s grid through the transforms ``fwd`` (genericLabel), uint8."""
    ants = transforms.load_ants()
    return np.rint(ants.apply_transforms(ref, lab_img, fwd, interpolator="genericLabel").numpy()).astype(np.uint8)


def _sub_box(img, wlo, whi):
    """Voxel index box (lo, hi inclusive) of ``img`` covering the LPS box, clipped to the image."""
    ilo, ihi = _world_to_index(img, wlo, whi)
    lo = np.clip(np.floor(ilo).astype(int), 0, np.array(img.shape) - 1)
    hi = np.clip(np.ceil(ihi).astype(int), 0, np.array(img.shape) - 1)
    return lo, hi


def _region_plan(regions: dict, all_labels: set[int]) -> list[tuple[str, list[int], float, list[dict]]]:
    """(name, label values, margin mm, stages) of each regional stage that has labels, then a
    'global' pseudo-region holding the labels of no region (they keep the stage-A transform)."""
    plan, used = [], set()
    for rname, spec in regions.items():
        labels, margin = spec[0], spec[1]
        stages = spec[2] if len(spec) > 2 else REGION_STAGES
        ls = [L for L in labels if L in all_labels and L not in used]
        if ls:
            plan.append((rname, ls, float(margin), stages))
            used |= set(ls)
    rest = sorted(all_labels - used)
    if rest:
        plan.append(("global", rest, 0.0, []))
    return plan


# ------------------------------------------------------------------ stage A: the whole field
@dataclass
class WholeField:
    """Every atlas after stage A: what the regions start from, and the per-atlas metrics so far.
    Atlases are indexed by their position in the list given to :func:`register_whole_field`."""

    names: list[str]
    holds: list[set[int]]  # per atlas, the labels it votes on (after the volume and position checks)
    held_by: dict[int, int]  # label -> number of atlases whose map holds it (before the checks)
    cts: list  # the atlases' head-and-neck CT crops (ANTs images)
    labels: list  # their label maps (DEFAULT_LABELS values, ANTs images)
    transforms: list[list[str]]  # stage-A forward transforms (atlas -> subject)
    labels_whole_field: list[np.ndarray]  # stage-A labels on the whole-field grid
    plan: list[tuple[str, list[int], float, list[dict]]]  # :func:`_region_plan`
    chosen: dict[str, list[int]]  # region -> the atlases registered there (:func:`preselect_atlases`)
    per_atlas: dict[str, dict]  # atlas name -> metrics (seconds, selections)
    native_ml: list[dict[int, float]]  # per atlas, its contours' volumes (label -> mL, the atlas's own grid)
    template: dict | None = None  # the template path: its key and the subject's registration to it

    @property
    def all_labels(self) -> set[int]:
        """The labels some atlas votes on."""
        return set().union(*self.holds)


def register_whole_field(subj_glob, atlases: list[dict], regions: dict, spacing_mm: float,
                         atlases_per_region: int | Mapping[str, int] | None, workdir: str, verbose: bool = False,
                         template=None, linear_stage: str = LINEAR_STAGES[0]) -> WholeField:
    """Stage A of every atlas onto ``subj_glob`` (the subject's head-and-neck crop at ``spacing_mm``):
    rigid -> affine -> SyN (:data:`ATLAS_STAGES`); with more atlases than ``atlases_per_region``,
    the linear stages for all, then the SyN for the atlases some region preselects
    (:func:`preselect_atlases`). Atlas contours that are low volume outliers
    (:func:`glandpet.glands.volume_outliers`) or lost at registration (:func:`lost_atlases`) are
    taken out of ``holds``. Transforms go to ``workdir``.

    ``template`` (:class:`glandpet.segmentation.atlas_template.AtlasTemplate`, built from these
    atlases): instead of one stage A per atlas, the subject is registered once to the template with
    :data:`ATLAS_STAGES` and each atlas's stage A is the composition subject <- template <- atlas;
    per region only ``atlases_per_region`` (0: :data:`TEMPLATE_ATLASES_PER_REGION`) atlases, the
    most similar after it, go on to stage B.

    ``linear_stage`` (pairwise only): ``"gland_box"`` -- the rigid + affine of
    :func:`register_atlas_linear` (masked to the atlas's glands, two starts), then the SyN from it;
    ``"whole_crop"`` -- rigid + affine + SyN over the two head-and-neck crops, started from the
    whole-scan search (:func:`glandpet.registration.sessions.register_ct_to_ct`)."""
    if linear_stage not in LINEAR_STAGES:
        raise ValueError(f"linear_stage must be one of {LINEAR_STAGES}, not {linear_stage!r}")
    if template is not None and not atlases_per_region:
        atlases_per_region = TEMPLATE_ATLASES_PER_REGION
    ks = atlases_per_region.values() if isinstance(atlases_per_region, Mapping) else [atlases_per_region or 0]
    preselect = any(0 < k < len(atlases) for k in ks)
    names, holds, a_cts, a_labs, fwdA, la_glob, per_atlas, a_vols = [], [], [], [], [], [], {}, []
    a_preps, warped_affine = [], []
    to_template = None
    if template is not None:  # the subject once to the template; each atlas through it
        ta = time.perf_counter()
        ants = transforms.load_ants()
        rt = sessions.register_ct_to_ct(subj_glob, ants.image_read(str(template.image)),
                                        os.path.join(workdir, "template_"), ATLAS_STAGES, init="search", verbose=verbose)
        to_template = {"fwd": rt["fwdtransforms"], "seconds": time.perf_counter() - ta}
    for i, atlas in enumerate(atlases):
        ta = time.perf_counter()
        name, a_ct, a_lab, a_holds, vols = _load_atlas(atlas)
        a_vols.append(vols)
        alo, ahi = atlas_head_neck_box(a_ct)
        a_ct = field_of_view.crop(a_ct, alo, ahi)
        a_lab = field_of_view.crop(a_lab, alo, ahi)
        if to_template is not None:
            fwd = to_template["fwd"] + template.transforms_of(name)
            if preselect:
                warped_affine.append(transforms.load_ants().apply_transforms(subj_glob, a_ct, fwd,
                                                                             interpolator="linear").numpy())
        else:
            a_prep = field_of_view.resample_iso(a_ct, spacing_mm)
            if linear_stage == "gland_box":
                ra = register_atlas_linear(subj_glob, a_prep, a_lab, os.path.join(workdir, f"a{i}_"), verbose)
                per_atlas_linear = {"start": ra["start"], "linear_ncc": ra["ncc"]}
                if not preselect:  # the SyN of stage A, started from the affine
                    ra["fwdtransforms"] = transforms.run_registration(
                        subj_glob, a_prep, [ATLAS_SYN], os.path.join(workdir, f"a{i}_syn_"), initial=ra["fwdtransforms"],
                        verbose=verbose)["fwdtransforms"]
            else:
                ra = sessions.register_ct_to_ct(subj_glob, a_prep, os.path.join(workdir, f"a{i}_"),
                                                ATLAS_LINEAR_STAGES if preselect else ATLAS_STAGES, init="search",
                                                verbose=verbose)
                per_atlas_linear = {}
            fwd = ra["fwdtransforms"]
            if preselect:
                a_preps.append(a_prep)
                warped_affine.append(ra["warped"].numpy())
        names.append(name)
        holds.append(a_holds)
        a_cts.append(a_ct)
        a_labs.append(a_lab)
        fwdA.append(fwd)
        la_glob.append(_warp_labels(subj_glob, a_lab, fwd))
        per_atlas[name] = {"seconds_stage_a": time.perf_counter() - ta, "seconds_stage_b": 0.0,
                           "labels_held": sorted(a_holds), "regions": {}}
        if to_template is not None:
            per_atlas[name]["via_template"] = True
        else:
            per_atlas[name].update(per_atlas_linear)

    held_by = {L: sum(L in h for h in holds) for L in set().union(*holds)}  # for the confidence
    # an atlas whose contour of a gland is a low volume outlier (truncated) does not vote on it
    for a, bad in enumerate(volume_outliers(a_vols)):
        if bad:
            holds[a] = holds[a] - bad
            per_atlas[names[a]]["excluded_small_contour"] = sorted(LABEL_BY_INDEX[L].name for L in bad)
    # an atlas whose stage-A gland lies far from the other atlases' consensus was lost at
    # registration: it neither sets the region's box nor registers there nor votes
    for a, bad in enumerate(lost_atlases(la_glob, holds, subj_glob.spacing)):
        if bad:
            holds[a] = holds[a] - bad
            per_atlas[names[a]]["lost_at_stage_a"] = sorted(LABEL_BY_INDEX[L].name for L in bad)
    plan = _region_plan(regions, set().union(*holds))
    chosen, pre_scores = preselect_atlases(subj_glob.numpy(), warped_affine, la_glob, holds,
                                           {rname: rl for rname, rl, _, _ in plan}, subj_glob.spacing,
                                           atlases_per_region if preselect else 0, PRESELECT_DILATE_MM)
    del warped_affine
    for rname, sc in pre_scores.items():
        for a, v in sc.items():
            per_atlas[names[a]].setdefault("preselect_ncc", {})[rname] = round(v, 4)
    for a in range(len(names)):
        per_atlas[names[a]]["preselected_for"] = [r for r, vs in chosen.items() if a in vs]
        if not preselect or to_template is not None or not per_atlas[names[a]]["preselected_for"]:
            continue
        ta = time.perf_counter()
        rs = transforms.run_registration(subj_glob, a_preps[a], [ATLAS_SYN], os.path.join(workdir, f"a{a}_syn_"),
                                  initial=fwdA[a], verbose=verbose)
        fwdA[a] = rs["fwdtransforms"]
        la_glob[a] = _warp_labels(subj_glob, a_labs[a], fwdA[a])
        per_atlas[names[a]]["seconds_stage_a"] += time.perf_counter() - ta
    return WholeField(names=names, holds=holds, held_by=held_by, cts=a_cts, labels=a_labs, transforms=fwdA,
                      labels_whole_field=la_glob, plan=plan, chosen=chosen, per_atlas=per_atlas, native_ml=a_vols,
                      template=None if to_template is None else {
                          "key": template.key[:16], "seconds_to_template": round(to_template["seconds"], 2)})


# ------------------------------------------------------------------ stage B: one region
@dataclass
class RegionFit:
    """The atlases registered in one region: the region's grids and each atlas's warped CT and
    labels (the region's labels only). ``atlases[k]`` is the index (in :class:`WholeField`) of the
    atlas whose images are ``cts[k]``, ``labels_fix[k]``, ``labels_out[k]``."""

    name: str
    labels: list[int]
    fix: object  # the subject on the region's registration grid (ANTs image)
    out_ref: object  # the subject on the region's part of the output grid (ANTs image)
    out_lo: np.ndarray  # that part's voxel box in the output grid (inclusive)
    out_hi: np.ndarray
    atlases: list[int]
    cts: list[np.ndarray]  # warped atlas CTs on ``fix``
    labels_fix: list[np.ndarray]  # warped atlas labels on ``fix``
    labels_out: list[np.ndarray]  # warped atlas labels on ``out_ref``


def register_region(subj_out, subj_glob, field: WholeField, rname: str, rlabels: list[int], margin: float,
                    stages: list[dict], region_spacing_mm: float, workdir: str,
                    verbose: bool = False) -> RegionFit | None:
    """Stage B in one region of ``field.plan``: the subject cropped around the union over the
    region's atlases of their stage-A positions of its glands (+ ``margin`` mm) at
    ``region_spacing_mm``, every atlas chosen for the region registered to it (``stages``, started
    from stage A; none for the ``global`` pseudo-region, which keeps stage A on the whole-field
    grid), its labels carried through B o A. ``subj_out``: the output grid (native resolution);
    ``subj_glob``: the whole-field grid. None if the region has no box (under 2 voxels)."""
    ants = transforms.load_ants()
    if rname == "global":
        fix, out_lo, out_hi = subj_glob, np.zeros(3, int), np.array(subj_out.shape) - 1
    else:
        # the region: the union over atlases of the stage-A positions of its glands, + margin
        msk = np.zeros(subj_glob.shape, bool)
        for a in field.chosen.get(rname, []):
            msk |= np.isin(field.labels_whole_field[a], rlabels)
        if msk.sum() < 2:
            return None
        blo, bhi = box_from_mask(msk, subj_glob, margin)
        wlo, whi = _world_box(subj_glob, blo, bhi)
        out_lo, out_hi = _sub_box(subj_out, wlo, whi)
        fix = field_of_view.resample_iso(field_of_view.crop(subj_out, out_lo, out_hi), region_spacing_mm)
    out_ref = field_of_view.crop(subj_out, out_lo, out_hi)
    fwdA, a_cts, a_labs, per_atlas, names = field.transforms, field.cts, field.labels, field.per_atlas, field.names
    lab_fix, lab_o, ct_fix, vs = [], [], [], []
    for a in field.chosen.get(rname, []):
        tb = time.perf_counter()
        if stages and len(fwdA[a]) > 1:
            # stage A has a warp: register the stage-A-warped atlas CT, compose B o A
            mov = ants.apply_transforms(fix, a_cts[a], fwdA[a], interpolator="linear")
            cen = field_of_view.world_coords(fix, (np.array(fix.shape) - 1)[None] / 2.0)[0]
            pre = os.path.join(workdir, f"a{a}_{rname}_")
            init = transforms.translation_transform((0, 0, 0), pre + "init.mat", centre=cen)
            rb = transforms.run_registration(fix, mov, stages, pre, initial=[init], verbose=verbose)
            fwd, warped = rb["fwdtransforms"] + fwdA[a], rb["warped"].numpy()
        elif stages:
            rb = transforms.run_registration(fix, a_cts[a], stages, os.path.join(workdir, f"a{a}_{rname}_"),
                                      initial=fwdA[a], verbose=verbose)
            fwd, warped = rb["fwdtransforms"], rb["warped"].numpy()
        else:
            fwd = fwdA[a]
            warped = ants.apply_transforms(fix, a_cts[a], fwd, interpolator="linear").numpy()
        vs.append(a)
        ct_fix.append(warped)
        lf = _warp_labels(fix, a_labs[a], fwd)
        lab_fix.append(np.where(np.isin(lf, rlabels), lf, 0).astype(np.uint8))
        lo_ = _warp_labels(out_ref, a_labs[a], fwd)
        lab_o.append(np.where(np.isin(lo_, rlabels), lo_, 0).astype(np.uint8))
        per_atlas[names[a]]["seconds_stage_b"] += time.perf_counter() - tb
        if rname != "global":
            per_atlas[names[a]]["regions"][rname] = round(time.perf_counter() - tb, 2)
    return RegionFit(name=rname, labels=rlabels, fix=fix, out_ref=out_ref, out_lo=out_lo, out_hi=out_hi,
                     atlases=vs, cts=ct_fix, labels_fix=lab_fix, labels_out=lab_o)


def region_voters(region: RegionFit, field: WholeField, select: bool = True,
                  atlases_per_gland: int | None = ATLASES_PER_GLAND
                  ) -> tuple[list[dict[int, float]], dict[int, list[int]], list[set[int]]]:
    """Per gland of ``region``, the atlases that vote on it and their weights, from the local
    similarity (:func:`similarity_near` within :data:`SCORE_DILATE_MM`, on the region's grid) and
    :func:`gland_voters` (``select``, ``atlases_per_gland``). Returns ``(weights, voters,
    holds)``, indexed like ``region.atlases``: ``weights[k][L]``, ``voters[L]`` (list of k),
    ``holds[k]`` (the region's labels atlas k votes on). Scores and dropped atlases are recorded
    in ``field.per_atlas``."""
    vs, per_atlas, names = region.atlases, field.per_atlas, field.names
    fix_np = region.fix.numpy()
    sp_fix = np.asarray(region.fix.spacing, float)
    weights = [dict() for _ in vs]
    voters: dict[int, list[int]] = {}
    r_holds = [field.holds[a] & set(region.labels) for a in vs]
    for L in region.labels:
        holders = [k for k, a in enumerate(vs) if L in field.holds[a]]
        union = np.zeros(region.fix.shape, bool)
        for k in holders:
            union |= region.labels_fix[k] == L
        if not union.any():
            voters[L] = holders
            continue
        sc = similarity_near(fix_np, {k: region.cts[k] for k in holders}, union, sp_fix, SCORE_DILATE_MM)
        for k, s in sc.items():
            weights[k][L] = max(s, 1e-3)
            per_atlas[names[vs[k]]].setdefault("local_ncc", {})[LABEL_BY_INDEX[L].name] = round(s, 4)
        voters[L] = gland_voters(sc, select, atlases_per_gland)
        for k in holders:
            if k not in voters[L]:
                per_atlas[names[vs[k]]].setdefault("dropped_for", []).append(LABEL_BY_INDEX[L].name)
    return weights, voters, r_holds

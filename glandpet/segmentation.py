"""Multi-atlas segmentation of the salivary and lacrimal glands in CT, and labels on the PET grid.

Pipeline of :func:`segment_subject` (one subject CT, N atlases):

1. Head-and-neck crop of the subject CT (the output grid: native resolution), and the same crop
   resampled to ``spacing_mm`` (4 mm) for the whole-field stage.
2. Per atlas, stage A (whole head and neck, :data:`ATLAS_STAGES`): initialisation from the images
   (:func:`glandpet.registration.anatomy_translation`: scans of different patients share no world
   frame and their fields of view differ -- one stops just above the parotids, another runs from
   the chest to the vertex -- so the body's centre of mass or top is no landmark; every translation
   is scored by the NCC of soft-tissue and bone images over the overlap) -> rigid -> affine -> SyN
   (Mattes MI) at the 8 and 4 mm levels, one
   ``antsRegistration`` call with explicit schedules. ANTsPy's ``SyN`` presets run a fixed
   2100x1200x1200 affine and ignore the affine iterations; driving the stages directly keeps the
   schedule under control. With a large atlas library (``atlases_per_region``) the linear stages
   run for every atlas first; per region only the atlases most similar to the subject after them
   (:func:`preselect_atlases`) go on to the SyN and to stage B. An atlas whose stage-A gland lies
   more than :data:`LOST_MM` from the atlases' consensus (a strict majority around the medoid of
   their positions) was lost at registration
   (:func:`lost_atlases`): for that gland it neither sets the region's box nor votes. (The local
   NCC selection of step 5 let lost atlases vote on real CT, 0-3 of 5 per scan: it scores an
   atlas where *it* puts the gland, presumably where a misplaced atlas's soft tissue can match the
   subject's as well.)
3. Stage B, per region of :data:`REGIONS` and per atlas: a regional registration of the
   stage-A-warped atlas CT to a crop of the subject around the union over atlases of the stage-A
   positions of the region's glands (+ margin), at ``region_spacing_mm``; the region's labels go
   through B o A in one resampling. Every atlas sees the same crop, so their local similarities
   compare. Under the mandible (submandibular, sublingual: they move with neck flexion and jaw
   position, which the whole-field warp does not follow) an affine then a CC SyN
   (:data:`REGION_STAGES`); around the parotid and tubarial glands, and around the lacrimal
   glands, a CC SyN (:data:`REGION_SYN`) on top of stage A.
4. Labels carried with ``genericLabel`` onto the output grid; atlas label values mapped to
   :data:`glandpet.glands.DEFAULT_LABELS` through each atlas's label table.
5. Atlas selection per gland (optional): the local normalised cross-correlation between the warped
   atlas CT and the subject within :data:`SCORE_DILATE_MM` of that gland (on the region's grid); an
   atlas whose score is a low outlier among the atlases is left out of that gland's vote (a lost
   registration). The scores also break voting ties. With many atlases only the
   :data:`ATLASES_PER_GLAND` most similar vote on a gland. An atlas whose contour of a gland is a
   low volume outlier among the atlases (:func:`glandpet.glands.volume_outliers`: a truncated
   contour) does not vote on that gland at all.
6. Fusion per region (glands of no region: with the stage-A result), chosen per gland
   (:data:`AUTO_FUSION` by default: JLF for every gland but the lacrimal glands, which are voted):
   ``majority`` (per-label vote among the atlases that hold the label; ties broken by the atlases'
   local similarity; with volume preservation, the default: shape-based averaging at the voters'
   median volume, :func:`shape_average_fusion`) or ``jlf`` (ANTs joint label fusion, background
   included as a label so it cannot fill its search region; a gland under
   then grown to its voters' median volume along its probability, :data:`JLF_KEEPS_VOLUME`).
7. Intensity refinement (default, :func:`intensity_refine`): each fused gland's boundary moves,
   within a few millimetres, by the subject's own CT numbers of the gland against its surroundings.
   Optional CT refinement per gland (fixed HU window inside a dilated fused label).

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

from glandpet import registration as reg
from glandpet import seg_confidence as SC
from glandpet.glands import (
    DEFAULT_LABELS,
    Label,
    label_value,
    read_label_table,
    volume_outliers,
    write_label_table,
)

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


#: default CT refinement windows (HU) if ``refine=True`` is passed; configurable per gland.
DEFAULT_REFINE = {
    "parotid": {"hu": [-100.0, 80.0], "dilate_mm": 3.0, "smooth_mm": 1.0},
}


def segment_kwargs(seg_config=None) -> dict:
    """:func:`segment_subject`'s keyword arguments from a study config's ``segmentation:`` keys
    (absent or None: the defaults). The one mapping, shared by the workflow's segment step
    (:func:`glandpet.workflow.segment_glands`) and ``glandpet segment`` / ``glandpet atlas validate``."""
    c = dict(seg_config or {})
    refine_hu = c.get("refine_hu") or {}
    per_gland, per_region = c.get("atlases_per_gland"), c.get("atlases_per_region")
    return dict(
        fusion=c.get("fusion") or "auto",
        refine={gland: {"hu": list(window)} for gland, window in refine_hu.items()} or None,
        atlases_per_gland=ATLASES_PER_GLAND if per_gland is None else int(per_gland),
        atlases_per_region=ATLASES_PER_REGION if per_region is None else int(per_region),
        preserve_volume=bool(c.get("preserve_volume", True)),
        refine_intensity=bool(c.get("refine_intensity", True)),
    )


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
                      holds: list[set[int]], region_labels: dict[str, list[int]], spacing, k: int | None,
                      dilate_mm: float = SCORE_DILATE_MM) -> tuple[dict[str, list[int]], dict[str, dict[int, float]]]:
    """Per region, the atlases that get the deformable registration (atlas preselection).

    ``subject``, ``warped_cts[a]``, ``warped_labels[a]``: the subject CT and each atlas's CT and
    labels after the affine stage, on one grid of ``spacing`` (mm). Per region, every atlas holding
    one of its labels is scored by the local NCC within ``dilate_mm`` of the union of
    their warped labels of the region; for each label of the region its ``k`` best-scoring holders
    are kept (so a gland few atlases hold is not lost), the region keeping the union of those.
    ``k`` None or 0, or no more holders than ``k``: every holder. Returns ``(region -> atlas
    indices, region -> {atlas: score})``; regions no atlas holds are left out."""
    chosen: dict[str, list[int]] = {}
    scores: dict[str, dict[int, float]] = {}
    for rname, labels in region_labels.items():
        holders = [a for a in range(len(holds)) if any(L in holds[a] for L in labels)]
        if not holders:
            continue
        if not k or len(holders) <= k:
            chosen[rname] = holders
            continue
        union = np.zeros(subject.shape, bool)
        for a in holders:
            union |= np.isin(warped_labels[a], labels)
        sc = similarity_near(subject, {a: warped_cts[a] for a in holders}, union, spacing, dilate_mm)
        ranked = sorted(holders, key=lambda a: (-sc[a], a))
        keep: set[int] = set()
        for L in labels:
            keep |= set([a for a in ranked if L in holds[a]][:k])
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


# ------------------------------------------------------------------ fusion
def _voters_of(label: int, holds: list[set[int]], voters: dict[int, list[int]] | None) -> list[int]:
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
        vs = _voters_of(L, holds, voters)
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


def _signed_distance_mm(mask: np.ndarray, spacing) -> np.ndarray:
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
        vs = [a for a in _voters_of(L, holds, voters) if (label_maps[a] == L).any()]
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
            dsum += w * _signed_distance_mm(m, sp)
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


#: intensity refinement (:func:`intensity_refine`): prior width (mm) of the fused boundary's
#: position, band (mm) around it where intensity may move it, CT pre-smoothing (mm), depth (mm) of
#: the core the gland's CT numbers are learnt from, and the share of the gland's voxels that core
#: must hold (thinner glands -- the tubarial layer -- are left alone: their core is a sliver and
#: the distance prior has no depth). Measured on the fused labels of three fusion variants (4
#: real-anatomy subjects, 3 atlases, median Dice before -> after): parotid 0.843-0.844 ->
#: 0.875-0.876, sublingual 0.54-0.61 -> 0.62-0.69, submandibular 0.61-0.62 -> 0.60-0.63, lacrimal
#: and tubarial unchanged (mostly thin: skipped; refined, the tubarial glands lost 0.02, hence the
#: core rule); with 15 / 30 HU of extra CT noise the gains shrink (parotid 0.866 / 0.856,
#: sublingual 0.664 / 0.642) but stay. Prior widths 0.5-1.5 mm and smoothing 0-1 mm all improved
#: the parotid; wider priors (2 mm) or more smoothing (1.5 mm) gained nothing.
REFINE_PRIOR_MM = 1.0
REFINE_BAND_MM = 4.0
REFINE_SMOOTH_MM = 0.5
REFINE_CORE_MM = 2.0
REFINE_MIN_CORE_FRACTION = 1.0 / 3.0


def _hu_density(values: np.ndarray, bins: np.ndarray, bandwidth_hu: float) -> np.ndarray:
    """Kernel density of CT numbers per 1 HU bin (Gaussian kernel ``bandwidth_hu``), floored."""
    hist, _ = np.histogram(np.clip(values, bins[0], bins[-1] - 1), bins)
    dens = ndi.gaussian_filter1d(hist.astype(float), max(bandwidth_hu, 1.0)) / max(1, values.size) + 1e-6
    return dens / dens.sum()


def intensity_refine(dseg: np.ndarray, ct: np.ndarray, spacing, labels: list[int] | None = None) -> tuple[np.ndarray, dict]:
    """Move each fused gland's boundary by the subject's own CT numbers (Bayesian, per voxel).

    Prior: the fused label, its boundary uncertain by :data:`REFINE_PRIOR_MM` (logistic in the
    signed distance). Likelihoods, learnt from this subject and gland, no fixed HU window: the
    gland's CT numbers (a robust normal from its core, the voxels deeper than
    :data:`REFINE_CORE_MM`) against its surroundings' (a kernel density of the shell 2-6 mm
    outside, :func:`_hu_density`). Within :data:`REFINE_BAND_MM` of the boundary a voxel is gland when the posterior exceeds 1/2; it
    never takes another gland's voxel; only parts connected to the core are kept, holes filled.
    Where the CT cannot tell the gland from its surroundings the likelihood ratio is ~1 and the
    fused boundary stays. Skipped (reported) for a gland whose core holds under
    :data:`REFINE_MIN_CORE_FRACTION` of its voxels, and a result under half or over twice the
    fused volume is rejected. Returns the new map and per-gland details."""
    sp = np.asarray(spacing, float)
    out = dseg.copy()
    info: dict[str, dict] = {}
    ctf = ct.astype(np.float32)
    if REFINE_SMOOTH_MM > 0:
        ctf = ndi.gaussian_filter(ctf, REFINE_SMOOTH_MM / sp)
    bins = np.arange(-1100.0, 3101.0, 1.0)
    todo = sorted(int(v) for v in np.unique(dseg) if v) if labels is None else labels
    for L in todo:
        name = LABEL_BY_INDEX[L].name if L in LABEL_BY_INDEX else str(L)
        m = out == L
        n0 = int(m.sum())
        if n0 == 0:
            continue
        reach = REFINE_BAND_MM + 6.0
        pad = np.ceil(reach / sp).astype(int) + 1
        idx = np.argwhere(m)
        lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, np.array(m.shape))
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        f, h, others = m[sl], ctf[sl], (out[sl] != 0) & ~m[sl]
        sd = _signed_distance_mm(f, sp)
        core = sd < -REFINE_CORE_MM
        if core.sum() < max(20, REFINE_MIN_CORE_FRACTION * n0):
            info[name] = {"skipped": "thin: core under a third of the gland", "voxels_before": n0, "voxels_after": n0}
            continue
        shell = (sd > 2.0) & (sd < 6.0) & ~others
        g = h[core]
        mu = float(np.median(g))
        sigma = max(1.4826 * float(np.median(np.abs(g - mu))), 1.0)
        # the gland: one tissue, a robust normal (fat lobules at its edge count as outside; inside
        # it the hole filling keeps them); its surroundings: any mixture, a kernel density whose
        # width (Silverman's rule on the core) is small beside the spread, so that equal CT
        # numbers inside and around give a likelihood ratio of ~1 and leave the boundary alone
        log_gl = -0.5 * ((h - mu) / sigma) ** 2 - np.log(sigma * np.sqrt(2 * np.pi))
        at = np.clip(np.floor(h - bins[0]).astype(int), 0, len(bins) - 2)
        log_bg = np.log(_hu_density(h[shell], bins, 0.9 * sigma * g.size ** -0.2))[at]
        log_prior = -sd / REFINE_PRIOR_MM  # logit of the logistic prior
        new = ((log_prior + log_gl - log_bg > 0) & (np.abs(sd) <= REFINE_BAND_MM)) | (sd < -REFINE_BAND_MM)
        new &= ~others
        comp, _ = ndi.label(new)
        keep = np.unique(comp[core & new])
        new = ndi.binary_fill_holes(np.isin(comp, keep[keep > 0])) & ~others
        n1 = int(new.sum())
        det = {"voxels_before": n0, "voxels_after": n1, "gland_hu_median": round(mu, 1), "gland_hu_sd": round(sigma, 1)}
        if not 0.5 * n0 <= n1 <= 2.0 * n0:
            det.update(voxels_after=n0, rejected=True)
        else:
            view = out[sl]
            view[f & ~new] = 0
            view[new] = L
        info[name] = det
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
    vox_ml = float(np.prod(lab.spacing)) / 1000.0
    counts = np.bincount(arr.ravel(), minlength=max(holds, default=0) + 1)
    volumes = {L: float(counts[L]) * vox_ml for L in holds}
    return name, ct, labimg, holds, volumes


def _warp_labels(ref, lab_img, fwd) -> np.ndarray:
    ants = _ants()
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


def segment_subject(subject_ct_path, atlases: list[dict], out_dseg, out_tsv, fusion="auto",
                    threads: int = 1, refine: dict | bool | None = None, *, spacing_mm: float = ATLAS_SPACING_MM,
                    region_spacing_mm: float = REGION_SPACING_MM, regions: dict | None = None, select: bool = True,
                    atlases_per_gland: int | None = ATLASES_PER_GLAND,
                    atlases_per_region: int | None = ATLASES_PER_REGION, preserve_volume: bool = True,
                    refine_intensity: bool = True,
                    workdir: str | None = None, verbose: bool = False) -> dict:
    """Segment the glands in one subject CT with a multi-atlas registration and label fusion.

    ``atlases``: list of ``{"name", "ct", "labels", "label_table"}`` (paths). ``fusion``:
    ``"auto"`` (per gland, :data:`AUTO_FUSION`), ``"majority"``, ``"jlf"``, or a mapping
    ``{gland: method}`` (:func:`fusion_per_gland`). ``refine``: None/False, True (:data:`DEFAULT_REFINE`), or a dict
    ``{gland: {"hu": [lo, hi], "dilate_mm": r, "smooth_mm": s}}``. ``spacing_mm``: grid of the
    whole-field stage A; ``region_spacing_mm``: grid of the regional stages B. ``regions``:
    stage-B regions (default :data:`REGIONS`; ``{}`` disables stage B: every gland keeps its
    stage-A transform). ``select``: per-gland atlas selection (low outliers of the local similarity
    dropped); ``atlases_per_gland``: then at most this many atlases, the most similar, vote on a
    gland (None or 0: all). ``atlases_per_region``: per region only this many atlases, the most
    similar after the affine stage, get the deformable stages (:func:`preselect_atlases`; None or
    0: all). ``preserve_volume``: glands fused by vote use volume-preserving
    shape-based averaging (:func:`shape_average_fusion`) and JLF-fused glands smaller than
    (:data:`JLF_KEEPS_VOLUME`) are not left smaller than their voters' median volume; False: plain
    majority vote and JLF arg-max. ``refine_intensity``: each fused gland's boundary then moves by
    the subject's CT numbers (:func:`intensity_refine`).

    Writes ``out_dseg`` (uint8, the subject CT's grid, DEFAULT_LABELS values) and ``out_tsv``
    (``index, gland, side`` of the labels present in the union of the atlas tables). Returns metrics:
    seconds per step, per-atlas scores and selection, glands present/absent, volumes in mL.
    With ``workdir`` given, the transforms and each atlas's warped labels
    (``atlas_<name>_labels.nii.gz``, before fusion) are kept there.
    """
    method_of = fusion_per_gland(fusion)
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
        subj_glob = reg.resample_iso(subj_out, spacing_mm)
        timing["prepare"] = time.perf_counter() - t

        # ---- stage A: every atlas to the whole head-and-neck crop (rigid -> affine -> SyN; with
        # preselection the SyN runs afterwards, for the atlases preselected by some region only)
        t = time.perf_counter()
        preselect = bool(atlases_per_region) and len(atlases) > atlases_per_region
        names, holds, a_cts, a_labs, fwdA, la_glob, per_atlas, a_vols = [], [], [], [], [], [], {}, []
        a_preps, warped_affine = [], []
        for i, atlas in enumerate(atlases):
            ta = time.perf_counter()
            name, a_ct, a_lab, a_holds, vols = _load_atlas(atlas)
            a_vols.append(vols)
            alo, ahi = reg.head_neck_box(a_ct, margin_mm=reg.HEAD_NECK_MARGIN_MM + 30)
            a_ct = reg.crop(a_ct, alo, ahi)
            a_lab = reg.crop(a_lab, alo, ahi)
            a_prep = reg.resample_iso(a_ct, spacing_mm)
            ra = reg.register_ct_to_ct(subj_glob, a_prep, os.path.join(tmp, f"a{i}_"),
                                       ATLAS_LINEAR_STAGES if preselect else ATLAS_STAGES, init="search",
                                       verbose=verbose)
            names.append(name)
            holds.append(a_holds)
            a_cts.append(a_ct)
            a_labs.append(a_lab)
            if preselect:
                a_preps.append(a_prep)
                warped_affine.append(ra["warped"].numpy())
            fwdA.append(ra["fwdtransforms"])
            la_glob.append(_warp_labels(subj_glob, a_lab, ra["fwdtransforms"]))
            per_atlas[name] = {"seconds_stage_a": time.perf_counter() - ta, "seconds_stage_b": 0.0,
                               "labels_held": sorted(a_holds), "regions": {}}

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
        all_labels = set().union(*holds)
        plan = _region_plan(regions, all_labels)
        chosen, pre_scores = preselect_atlases(subj_glob.numpy(), warped_affine, la_glob, holds,
                                               {rname: rl for rname, rl, _, _ in plan}, subj_glob.spacing,
                                               atlases_per_region if preselect else 0, PRESELECT_DILATE_MM)
        del warped_affine
        for rname, sc in pre_scores.items():
            for a, v in sc.items():
                per_atlas[names[a]].setdefault("preselect_ncc", {})[rname] = round(v, 4)
        for a in range(len(names)):
            per_atlas[names[a]]["preselected_for"] = [r for r, vs in chosen.items() if a in vs]
            if not preselect or not per_atlas[names[a]]["preselected_for"]:
                continue
            ta = time.perf_counter()
            rs = reg.run_registration(subj_glob, a_preps[a], [ATLAS_SYN], os.path.join(tmp, f"a{a}_syn_"),
                                      initial=fwdA[a], verbose=verbose)
            fwdA[a] = rs["fwdtransforms"]
            la_glob[a] = _warp_labels(subj_glob, a_labs[a], fwdA[a])
            per_atlas[names[a]]["seconds_stage_a"] += time.perf_counter() - ta
        timing["register_global"] = time.perf_counter() - t
        fused = np.zeros(subj_out.shape, np.uint8)
        timing.update({"register_regions": 0.0, "select": 0.0, "fuse": 0.0})
        per_atlas_out = [np.zeros(subj_out.shape, np.uint8) for _ in names] if workdir else None
        region_info = {}
        gland_conf: dict[str, dict] = {}
        for rname, rlabels, margin, stages in plan:
            t = time.perf_counter()
            if rname == "global":
                fix, out_lo, out_hi = subj_glob, np.zeros(3, int), np.array(subj_out.shape) - 1
            else:
                # the region: the union over atlases of the stage-A positions of its glands, + margin
                msk = np.zeros(subj_glob.shape, bool)
                for a in chosen.get(rname, []):
                    msk |= np.isin(la_glob[a], rlabels)
                if msk.sum() < 2:
                    continue
                blo, bhi = _box_from_mask(msk, subj_glob, margin)
                wlo, whi = _world_box(subj_glob, blo, bhi)
                out_lo, out_hi = _sub_box(subj_out, wlo, whi)
                fix = reg.resample_iso(reg.crop(subj_out, out_lo, out_hi), region_spacing_mm)
            out_ref = reg.crop(subj_out, out_lo, out_hi)
            fix_np = fix.numpy()
            lab_fix, lab_o, ct_fix, vs = [], [], [], []
            for a in chosen.get(rname, []):
                tb = time.perf_counter()
                if stages and len(fwdA[a]) > 1:
                    # stage A has a warp: register the stage-A-warped atlas CT, compose B o A
                    mov = ants.apply_transforms(fix, a_cts[a], fwdA[a], interpolator="linear")
                    cen = reg.world_coords(fix, (np.array(fix.shape) - 1)[None] / 2.0)[0]
                    pre = os.path.join(tmp, f"a{a}_{rname}_")
                    init = reg.translation_transform((0, 0, 0), pre + "init.mat", centre=cen)
                    rb = reg.run_registration(fix, mov, stages, pre, initial=[init], verbose=verbose)
                    fwd, warped = rb["fwdtransforms"] + fwdA[a], rb["warped"].numpy()
                elif stages:
                    rb = reg.run_registration(fix, a_cts[a], stages, os.path.join(tmp, f"a{a}_{rname}_"),
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
            timing["register_regions"] += time.perf_counter() - t
            if not vs:
                continue

            # ---- per-gland scores and atlas selection (on the region's grid)
            t = time.perf_counter()
            sp_fix = np.asarray(fix.spacing, float)
            weights = [dict() for _ in vs]
            voters: dict[int, list[int]] = {}
            r_holds = [holds[a] & set(rlabels) for a in vs]
            for L in rlabels:
                holders = [k for k, a in enumerate(vs) if L in holds[a]]
                union = np.zeros(fix.shape, bool)
                for k in holders:
                    union |= lab_fix[k] == L
                if not union.any():
                    voters[L] = holders
                    continue
                sc = similarity_near(fix_np, {k: ct_fix[k] for k in holders}, union, sp_fix, SCORE_DILATE_MM)
                for k, s in sc.items():
                    weights[k][L] = max(s, 1e-3)
                    per_atlas[names[vs[k]]].setdefault("local_ncc", {})[LABEL_BY_INDEX[L].name] = round(s, 4)
                voters[L] = gland_voters(sc, select, atlases_per_gland)
                for k in holders:
                    if k not in voters[L]:
                        per_atlas[names[vs[k]]].setdefault("dropped_for", []).append(LABEL_BY_INDEX[L].name)
            timing["select"] += time.perf_counter() - t

            # ---- fusion on the output grid (the region's part of it)
            t = time.perf_counter()
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
                fr = _fuse_jlf(fix, out_ref, ct_fix, lab_fix, r_holds, voters, by_jlf, tmp, min_voxels=small)
            if by_vote and preserve_volume:
                fv = shape_average_fusion(lab_o, r_holds, by_vote, out_ref.spacing, weights=weights, voters=voters)
            elif by_vote:
                fv = majority_vote(lab_o, r_holds, by_vote, weights=weights, voters=voters)
            if by_vote:
                free = (fr == 0) & (fv > 0)
                fr[free] = fv[free]
            # ---- confidence signals per gland: voters' warped labels against the fusion
            vox_ml_o = float(np.prod(out_ref.spacing)) / 1000.0
            for L in rlabels:
                ks = _voters_of(L, r_holds, voters)
                if not ks:
                    continue
                gland_conf[LABEL_BY_INDEX[L].name] = SC.region_signals(
                    [lab_o[k] == L for k in ks], fr == L, [weights[k].get(L, 0.0) for k in ks],
                    held_by.get(L, len(ks)), vox_ml_o)
            sl = tuple(slice(a, b + 1) for a, b in zip(out_lo, out_hi))
            view = fused[sl]
            put = (fr > 0) & (view == 0)
            view[put] = fr[put]
            if per_atlas_out is not None:
                for k, a in enumerate(vs):
                    v = per_atlas_out[a][sl]
                    p = (lab_o[k] > 0) & (v == 0)
                    v[p] = lab_o[k][p]
            region_info[rname] = {"labels": [LABEL_BY_INDEX[L].name for L in rlabels],
                                  "box_lps_mm": [list(map(float, reg.world_coords(out_ref, np.zeros((1, 3)))[0])),
                                                 list(map(float, reg.world_coords(out_ref, (np.array(out_ref.shape) - 1)[None])[0]))],
                                  "grid": list(fix.shape)}
            timing["fuse"] += time.perf_counter() - t
        timing["register_atlases"] = timing["register_global"] + timing["register_regions"]
        all_labels = sorted(all_labels)

        refine_info = {}
        if refine_intensity:
            t = time.perf_counter()
            fused, refine_info["intensity"] = intensity_refine(fused, subj_out.numpy(), subj_out.spacing)
            timing["refine_intensity"] = time.perf_counter() - t
        if refine:
            t = time.perf_counter()
            fused, refine_info["hu_window"] = refine_labels(fused, subj_out.numpy(), subj_out.spacing, refine)
            timing["refine"] = time.perf_counter() - t

        # ---- per-gland confidence (glandpet.seg_confidence): final volume, CT boundary evidence
        t = time.perf_counter()
        vox_ml_f = float(np.prod(subj_out.spacing)) / 1000.0
        subj_np = subj_out.numpy()
        glands_conf = {}
        for name, entry in gland_conf.items():
            lab = next(x for x in DEFAULT_LABELS if x.name == name)
            SC.final_signals(entry, fused == lab.index, subj_np, subj_out.spacing, vox_ml_f)
            glands_conf[name] = SC.gland_entry(entry)
        timing["confidence"] = time.perf_counter() - t

        # ---- write on the full subject grid
        t = time.perf_counter()
        nii = nib.load(str(subject_ct_path))

        def _save(arr, path):
            full = np.zeros(nii.shape[:3], np.uint8)
            full[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = arr
            out = nib.Nifti1Image(full, nii.affine)
            out.set_qform(nii.affine, 1)
            out.set_sform(nii.affine, 1)
            nib.save(out, str(path))

        Path(out_dseg).parent.mkdir(parents=True, exist_ok=True)
        _save(fused, out_dseg)
        if per_atlas_out is not None:
            for a, n in enumerate(names):
                _save(per_atlas_out[a], os.path.join(tmp, f"atlas_{n}_labels.nii.gz"))
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
        "preserve_volume": bool(preserve_volume),
        "refine_intensity": bool(refine_intensity),
        "n_atlases": len(atlases),
        "atlases": per_atlas,
        "regions": region_info,
        "labels_present": [lab.name for lab in present],
        "labels_absent": absent,
        "volumes_ml": {lab.name: float((fused == lab.index).sum() * vox_ml) for lab in present},
        "glands": glands_conf,
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


def _fuse_jlf(fix, out_ref, ct_fix, lab_fix, holds, voters, labels, tmp, min_voxels=None):
    """JLF on the region's registration grid, per gland over its voters (an atlas lacking a gland
    would vote background for it) and within a box around that gland's candidates only (the union
    of its voters' labels, dilated by more than the search radius: elsewhere every atlas says
    background), background included as a label; probabilities resampled linearly onto the output
    grid, arg-max over background and glands. ``min_voxels`` ({label: n}): a gland left smaller
    than n voxels grows into the free voxels of highest probability until it has n."""
    ants = _ants()
    best = np.zeros(out_ref.shape, np.uint8)
    best_p = np.full(out_ref.shape, 0.5, np.float32)  # a gland needs p > 0.5 against background
    probs = {}
    for L in labels:
        vs = _voters_of(L, holds, voters)
        cand = np.zeros(fix.shape, bool)
        for k in vs:
            cand |= lab_fix[k] == L
        if not vs or not cand.any():
            continue
        lo, hi = _box_from_mask(cand, fix, 10.0)
        sl = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
        tgt = reg.crop(fix, lo, hi)
        if len(vs) == 1:
            p = (lab_fix[vs[0]][sl] == L).astype(np.float32)
        else:
            mask = _np_to_img(ndi.binary_dilation(cand, iterations=3)[sl].astype(np.float32), tgt)
            cts = [_np_to_img(ct_fix[k][sl], tgt) for k in vs]
            labs = [_np_to_img((lab_fix[k][sl] == L).astype(np.float32), tgt) for k in vs]
            d = tempfile.mkdtemp(dir=tmp, prefix=f"jlf{L}_")
            pr = joint_label_fusion_probs(tgt, cts, labs, [1], mask, d)
            p = pr[1].numpy() if 1 in pr else np.zeros(tgt.shape, np.float32)
        po = ants.resample_image_to_target(_np_to_img(p, tgt), out_ref, interp_type="linear").numpy()
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

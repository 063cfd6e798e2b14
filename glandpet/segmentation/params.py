"""The parameters of the multi-atlas segmentation (:func:`glandpet.segmentation.multi_atlas.segment_subject`):
one frozen record, its defaults the stages' own constants, built from a study config's
``segmentation:`` section in one place (:meth:`SegmentationParams.from_config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from glandpet.segmentation.atlas_registration import (ATLAS_SPACING_MM, ATLASES_PER_GLAND, ATLASES_PER_REGION, LINEAR_STAGES,
                                                      REGION_SPACING_MM, REGIONS)


@dataclass(frozen=True)
class SegmentationParams:
    """How :func:`glandpet.segmentation.multi_atlas.segment_subject` segments one CT.

    ``fusion``: ``"auto"`` (per gland, :data:`glandpet.segmentation.fusion.AUTO_FUSION`),
    ``"majority"``, ``"jlf"``, or a mapping ``{gland: method}``
    (:func:`glandpet.segmentation.fusion.fusion_per_gland`). ``refine``: None/False, True
    (:data:`glandpet.segmentation.refinement.DEFAULT_REFINE`), or ``{gland: {"hu": [lo, hi],
    "dilate_mm": r, "smooth_mm": s}}``. ``spacing_mm``: grid of the whole-field stage A;
    ``region_spacing_mm``: grid of the regional stages B. ``regions``: stage-B regions (default
    :data:`glandpet.segmentation.atlas_registration.REGIONS`; ``{}`` disables stage B: every gland
    keeps its stage-A transform). ``select``: per-gland atlas selection (low outliers of the local
    similarity dropped); ``atlases_per_gland``: then at most this many atlases, the most similar,
    vote on a gland (None or 0: all). ``atlases_per_region``: per region only this many atlases,
    the most similar after the affine stage, get the deformable stages
    (:func:`glandpet.segmentation.atlas_registration.preselect_atlases`; None or 0: all).
    ``preserve_volume``: glands fused by vote use volume-preserving shape-based averaging
    (:func:`glandpet.segmentation.fusion.shape_average_fusion`) and JLF-fused glands
    (:data:`glandpet.segmentation.fusion.JLF_KEEPS_VOLUME`) are not left smaller than their
    voters' median volume; False: plain majority vote and JLF arg-max. ``refine_intensity``: each
    fused gland's boundary then moves by the subject's CT numbers
    (:func:`glandpet.segmentation.refinement.intensity_refine`). ``atlas_registration``:
    ``"pairwise"`` (every atlas registered to the subject) or ``"template"`` (each atlas once to the
    library's template, the subject once to it, composed: :mod:`glandpet.segmentation.atlas_template`;
    then ``atlases_per_region`` 0 means
    :data:`glandpet.segmentation.atlas_registration.TEMPLATE_ATLASES_PER_REGION`). ``linear_stage``
    (pairwise): ``"gland_box"`` or ``"whole_crop"``
    (:func:`glandpet.segmentation.atlas_registration.register_whole_field`).
    """

    fusion: str | Mapping[str, str] = "auto"
    refine: Mapping[str, Any] | bool | None = None
    spacing_mm: float = ATLAS_SPACING_MM
    region_spacing_mm: float = REGION_SPACING_MM
    regions: Mapping[str, tuple] = field(default_factory=lambda: REGIONS)
    select: bool = True
    atlases_per_gland: int | None = ATLASES_PER_GLAND
    atlases_per_region: int | None = ATLASES_PER_REGION
    preserve_volume: bool = True
    refine_intensity: bool = True
    atlas_registration: str = "pairwise"
    linear_stage: str = LINEAR_STAGES[0]
    size_transfer: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None = None) -> SegmentationParams:
        """The parameters of a study config's ``segmentation:`` section (config.schema.yaml; absent
        or None keys: the defaults): ``fusion``, ``refine_hu`` (``{gland: [lo, hi]}`` -> ``refine``),
        ``atlases_per_gland``, ``atlases_per_region``, ``preserve_volume``, ``refine_intensity``,
        ``atlas_registration``, ``linear_stage``, ``size_transfer``;
        the section's other keys (``corrections``, ``review_below``) belong to other steps. The one
        mapping, shared by the workflow's segment step (:func:`glandpet.workflow.steps.segment_glands`),
        ``glandpet segment`` and ``glandpet atlas validate``."""
        c = dict(section or {})
        refine_hu = c.get("refine_hu") or {}
        per_gland, per_region = c.get("atlases_per_gland"), c.get("atlases_per_region")
        return cls(
            fusion=c.get("fusion") or "auto",
            refine={gland: {"hu": list(window)} for gland, window in refine_hu.items()} or None,
            atlases_per_gland=ATLASES_PER_GLAND if per_gland is None else int(per_gland),
            atlases_per_region=ATLASES_PER_REGION if per_region is None else int(per_region),
            preserve_volume=bool(c.get("preserve_volume", True)),
            refine_intensity=bool(c.get("refine_intensity", True)),
            atlas_registration=str(c.get("atlas_registration") or "pairwise"),
            linear_stage=str(c.get("linear_stage") or LINEAR_STAGES[0]),
            size_transfer={str(g): float(b) for g, b in (c.get("size_transfer") or {}).items()},
        )

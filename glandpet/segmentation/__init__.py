"""Segmentation, the fourth stage: the glands in each session's CT, how far to trust them, and their correction.

Modules: :mod:`.multi_atlas` (one CT segmented: the stages run in order, and the labels on the PET
grid) over its stages :mod:`.atlas_registration`, :mod:`.fusion` and :mod:`.refinement`, with
their settings in :mod:`.params` (one dataclass); :mod:`.confidence` (per-gland confidence and review flag),
:mod:`.metrics` (Dice and surface distances), :mod:`.corrections` (corrected label maps),
:mod:`.atlas_add`, :mod:`.atlas_validate` and :mod:`.segment_command` (the ``glandpet atlas`` and
``glandpet segment`` commands).
"""

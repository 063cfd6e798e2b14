"""Segmentation, the fourth stage: the glands in each session's CT, how far to trust them, and their correction.

Modules: :mod:`.multi_atlas` (multi-atlas registration, fusion and refinement of one CT, and the
labels on the PET grid), :mod:`.confidence` (per-gland confidence and review flag),
:mod:`.metrics` (Dice and surface distances), :mod:`.corrections` (corrected label maps),
:mod:`.atlas_add`, :mod:`.atlas_validate` and :mod:`.segment_command` (the ``glandpet atlas`` and
``glandpet segment`` commands).
"""

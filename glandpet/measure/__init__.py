"""Measurement, the fifth stage: per-gland SUV statistics on the PET grid (:mod:`.gland_stats`), partial-volume
correction (:mod:`.pvc`) and the PSMA/FAPI index with the within-gland voxel correlation
(:mod:`.gland_index`).
"""

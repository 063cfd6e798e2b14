"""The within-gland PSMA~FAPI voxel correlation reproduces the phantom's planted fibrotic zones
(true masks and transforms; the method as the pipeline runs it)."""

import numpy as np

from glandpet.phantom.validation import voxel_correlations


def test_planted_fibrotic_glands_correlate_negatively(small_cohort):
    df = voxel_correlations(small_cohort)
    measured = df[df["voxel_spearman_rho"].notna()]
    fibrotic = measured[measured["fibrotic_fraction"] > 0.1]
    assert len(fibrotic) >= 3
    assert np.median(fibrotic["voxel_spearman_rho"]) < -0.3
    assert (measured["n_voxels"] >= 20).all()

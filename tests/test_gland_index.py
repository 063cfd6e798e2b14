"""PSMA/FAPI index definitions and the within-gland voxel Spearman correlation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from glandpet.measure.gland_index import MIN_VOXELS, gland_index_table, psma_fapi_index, voxel_spearman

REF = {
    "parotid": {"psma_mean": 10.0, "psma_sd": 2.0, "fapi_mean": 3.0, "fapi_sd": 1.0},
    "lacrimal": {"psma_mean": 6.0, "psma_sd": 1.5, "fapi_mean": 2.0, "fapi_sd": 0.5},
}


def test_index_definitions_scalar():
    assert psma_fapi_index(8.0, 4.0) == pytest.approx(0.5)
    assert psma_fapi_index(8.0, 4.0, "log_ratio") == pytest.approx(math.log(0.5))
    # z(FAPI) - z(PSMA) = (4-3)/1 - (8-10)/2 = 2
    assert psma_fapi_index(8.0, 4.0, "z_diff", REF, gland="parotid") == pytest.approx(2.0)
    assert psma_fapi_index(8.0, 4.0, "z_diff", REF["parotid"]) == pytest.approx(2.0)
    assert isinstance(psma_fapi_index(8.0, 4.0), float)


def test_index_missing_and_invalid_give_nan():
    assert math.isnan(psma_fapi_index(None, 4.0))
    assert math.isnan(psma_fapi_index(8.0, float("nan")))
    assert math.isnan(psma_fapi_index(0.0, 4.0))
    assert math.isnan(psma_fapi_index(-1.0, 4.0, "log_ratio"))
    assert math.isnan(psma_fapi_index(8.0, 4.0, "z_diff", REF, gland="tubarial"))  # no reference
    with pytest.raises(ValueError):
        psma_fapi_index(1.0, 1.0, "difference")
    with pytest.raises(ValueError):
        psma_fapi_index(1.0, 1.0, "z_diff")


def test_index_vectorised():
    p = np.array([8.0, 6.0, np.nan, 2.0])
    f = np.array([4.0, 3.0, 1.0, 2.0])
    np.testing.assert_allclose(psma_fapi_index(p, f), [0.5, 0.5, np.nan, 1.0])
    np.testing.assert_allclose(psma_fapi_index(list(p), [4, 3, None, 2], "log_ratio"), [math.log(0.5)] * 2 + [np.nan, 0.0])
    z = psma_fapi_index(p, f, "z_diff", REF, gland=np.array(["parotid", "lacrimal", "parotid", "sublingual"], dtype=object))
    np.testing.assert_allclose(z, [2.0, (3 - 2) / 0.5 - 0.0, np.nan, np.nan])


def _gland(shape=(24, 24, 24), r=9.0):
    c = (np.array(shape) - 1) / 2
    d = np.sqrt(((np.indices(shape).T - c) ** 2).sum(-1)).T
    return d <= r


def test_spearman_planted_negative_vs_independent():
    rng = np.random.default_rng(0)
    mask = _gland()
    # fibrotic gland: a smooth fibrosis field lowers PSMA and raises FAPI
    fib = ndimage.gaussian_filter(rng.normal(size=mask.shape), 2.0)
    fib /= fib.std()
    psma = 10 - 2 * fib + rng.normal(0, 0.5, mask.shape)
    fapi = 3 + 1 * fib + rng.normal(0, 0.3, mask.shape)
    rho, n = voxel_spearman(psma, fapi, mask)
    assert rho < -0.7 and n == ndimage.binary_erosion(mask).sum()
    # independent noise: near zero
    rho0, _ = voxel_spearman(rng.normal(10, 1, mask.shape), rng.normal(3, 1, mask.shape), mask)
    assert abs(rho0) < 0.1


def test_erosion_removes_shared_edge_falloff():
    """Uniform gland in both tracers, blurred by the same PSF + independent noise: the full mask
    shows a spurious positive rho; each voxel of erosion lowers it (with a PSF sigma of 1.2 voxels
    one voxel is not enough to remove it: measured 0.94 -> 0.85 -> 0.52 here)."""
    rng = np.random.default_rng(1)
    mask = _gland(r=7.0)
    psma = ndimage.gaussian_filter(mask * 10.0, 1.2) + rng.normal(0, 0.3, mask.shape)
    fapi = ndimage.gaussian_filter(mask * 3.0, 1.2) + rng.normal(0, 0.1, mask.shape)
    full, n_full = voxel_spearman(psma, fapi, mask, erode_voxels=0)
    eroded, n_er = voxel_spearman(psma, fapi, mask, erode_voxels=1)
    eroded2, _ = voxel_spearman(psma, fapi, mask, erode_voxels=2)
    assert full > 0.9
    assert eroded < full - 0.05 and eroded2 < eroded - 0.1 and n_er < n_full


def test_spearman_minimum_and_nonfinite():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:5, 2:5, 2:5] = True  # 27 voxels, 1 after erosion
    a = np.random.default_rng(0).normal(size=mask.shape)
    rho, n = voxel_spearman(a, a, mask)
    assert rho is None and n == 1
    rho, n = voxel_spearman(a, a, mask, erode_voxels=0)
    assert rho == pytest.approx(1.0) and n == 27
    b = a.copy()
    b[2, 2, 2:5] = np.nan
    rho, n = voxel_spearman(a, b, mask, erode_voxels=0)
    assert n == 24
    rho, n = voxel_spearman(a, b, mask, erode_voxels=0, min_voxels=25)
    assert rho is None and n == 24
    # fraction maps are thresholded at 0.5; constant image gives None
    frac = mask * 0.6
    assert voxel_spearman(np.ones_like(a), a, frac, erode_voxels=0) == (None, 27)
    assert MIN_VOXELS == 20


def test_gland_index_table():
    rows = []
    for sid, grp, sessions in (("s1", "pss", {"psma": 10.0, "fapi": 5.0}), ("s2", "control", {"fapi": 3.0})):
        for ses, v in sessions.items():
            for side in ("left", "right"):
                rows.append(dict(subject_id=sid, group=grp, session=ses, gland="parotid", side=side,
                                 suv_mean=v, suv_mean_pvc=v * 1.25, suv_type="bw"))
    sp = pd.DataFrame([dict(subject_id="s1", gland="parotid", side="left", voxel_spearman_rho=-0.4, n_voxels=120)])
    t = gland_index_table(pd.DataFrame(rows), "ratio", spearman=sp)
    assert list(t["subject_id"]) == ["s1", "s1", "s2", "s2"]
    s1 = t[t.subject_id == "s1"].iloc[0]
    assert s1.psma_suv_mean == 12.5 and s1.fapi_suv_mean == 6.25 and s1.psma_fapi_index == pytest.approx(0.5)
    assert s1.voxel_spearman_rho == -0.4 and s1.n_voxels == 120 and s1.group == "pss"
    s2 = t[t.subject_id == "s2"]
    assert s2.psma_suv_mean.isna().all() and s2.psma_fapi_index.isna().all()
    assert (s2.fapi_suv_mean == 3.75).all()
    assert (t.index_definition == "ratio").all()
    t2 = gland_index_table(pd.DataFrame(rows), "log_ratio", use_pvc=False)
    assert t2.iloc[0].psma_fapi_index == pytest.approx(math.log(0.5))
    # the table satisfies the shared schema
    from glandpet.tables import GLAND_INDEX, provenance, to_table

    tab = to_table(t.assign(**provenance()), GLAND_INDEX)
    assert tab.num_rows == 4 and tab.column("psma_fapi_index").null_count == 2


def test_null_voxel_rho_says_why():
    """Lacrimal and tubarial glands had an empty voxel rho with no word why: thin glands keep no
    voxel after the one-voxel erosion. ``voxel_rho_note`` names the reason of every null rho."""
    rows = []
    for sid, sessions in (("s1", ("psma", "fapi")), ("s2", ("fapi",))):
        for ses in sessions:
            for gland in ("parotid", "submandibular", "lacrimal", "tubarial"):
                rows.append(dict(subject_id=sid, group="pss", session=ses, gland=gland, side="left",
                                 suv_mean=5.0, suv_mean_pvc=6.0, suv_type="bw"))
    sp = pd.DataFrame([dict(subject_id="s1", gland="parotid", side="left", voxel_spearman_rho=-0.4, n_voxels=120),
                       dict(subject_id="s1", gland="submandibular", side="left", voxel_spearman_rho=None, n_voxels=40),
                       dict(subject_id="s1", gland="lacrimal", side="left", voxel_spearman_rho=None, n_voxels=0),
                       dict(subject_id="s1", gland="tubarial", side="left", voxel_spearman_rho=None, n_voxels=7)])
    t = gland_index_table(pd.DataFrame(rows), "ratio", spearman=sp).set_index(["subject_id", "gland"])
    assert pd.isna(t.loc[("s1", "parotid"), "voxel_rho_note"])
    assert "constant" in t.loc[("s1", "submandibular"), "voxel_rho_note"]
    lac = t.loc[("s1", "lacrimal"), "voxel_rho_note"]
    assert "0 voxels" in lac and "erosion" in lac and str(MIN_VOXELS) in lac
    assert "7 voxels" in t.loc[("s1", "tubarial"), "voxel_rho_note"]
    assert (t.loc["s2", "voxel_rho_note"].str.contains("both sessions")).all()
    # the column is in the explicit schema, a string column even when every rho is present
    from glandpet.tables import GLAND_INDEX, provenance, to_table

    tab = to_table(t.reset_index().assign(**provenance()), GLAND_INDEX)
    assert tab.column("voxel_rho_note").null_count == 1
    only_rho = gland_index_table(pd.DataFrame(rows[:2]), "ratio", spearman=sp.iloc[:1])
    assert str(only_rho["voxel_rho_note"].dtype) == "string"


def test_thin_gland_keeps_no_voxel_after_erosion():
    """Why the lacrimal/tubarial rho is null: a gland two PET voxels thick has no voxel whose six
    neighbours are all inside, and every voxel of it lies within the PSF's edge fall-off."""
    mask = np.zeros((20, 20, 12), bool)
    mask[4:14, 6:8, 3:9] = True  # 10 x 2 x 6 voxels: a lacrimal gland at ~2.5 mm voxels
    a = np.random.default_rng(0).normal(size=mask.shape)
    assert voxel_spearman(a, a, mask) == (None, 0)


@pytest.mark.slow
def test_demo_run_says_why_each_voxel_rho_is_null(workflow_results):
    """On the shared demo run: every null voxel rho has its reason, every rho has none."""
    gi = pd.read_parquet(workflow_results / "tables" / "gland_index.parquet")
    null = gi["voxel_spearman_rho"].isna()
    assert null.any() and (~null).any()
    assert gi.loc[null, "voxel_rho_note"].notna().all(), gi.loc[null, ["subject_id", "gland", "side"]]
    assert gi.loc[~null, "voxel_rho_note"].isna().all()
    thin = gi[null & gi["gland"].isin(["lacrimal", "tubarial"]) & gi["psma_fapi_index"].notna()]
    assert thin["voxel_rho_note"].str.contains("erosion").all()

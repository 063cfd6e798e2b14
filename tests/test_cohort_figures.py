"""Cohort figures and QC montages: files are written and valid on thin and odd data; geometry is right."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from glandpet.cohort import figures
from glandpet.glands import GLANDS, SIDES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    b = Path(path).read_bytes()
    assert b[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


def _check_outputs(paths: list[Path], out_dir: Path) -> None:
    assert len(paths) == 2 * len(figures.STEMS)
    for stem in figures.STEMS:
        png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
        assert png in paths and svg in paths
        w, h = _png_size(png)
        assert w > 100 and h > 100
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg")
        assert " " not in png.name


# ------------------------------------------------------------------------------------------------
# synthetic tables
# ------------------------------------------------------------------------------------------------
def _tables(n_pss=6, n_control=5, glands=GLANDS, seed=0):
    rng = np.random.default_rng(seed)
    stats, index = [], []
    subjects = [(f"P{i:02d}", "pss") for i in range(n_pss)] + [(f"C{i:02d}", "control") for i in range(n_control)]
    for sid, group in subjects:
        sessions = ("psma", "fapi") if group == "pss" else ("fapi",)
        for gland in glands:
            for side in SIDES:
                vals = {}
                for ses in sessions:
                    m = float(rng.uniform(2, 8) if ses == "psma" else rng.uniform(1, 5) * (1.6 if group == "pss" else 1))
                    vals[ses] = m
                    stats.append(dict(subject_id=sid, group=group, session=ses, tracer=f"{ses}-tracer", gland=gland,
                                      side=side, volume_ml=rng.uniform(1, 25), suv_max=2 * m, suv_peak=1.5 * m,
                                      suv_mean=m, suv_median=m, suv_sd=0.2 * m, suv_p90=1.3 * m,
                                      total_uptake_ml=10 * m, suv_mean_pvc=1.2 * m, suv_type="bw"))
                p, f = vals.get("psma", np.nan), vals.get("fapi", np.nan)
                index.append(dict(subject_id=sid, group=group, gland=gland, side=side, psma_suv_mean=p,
                                  fapi_suv_mean=f, psma_fapi_index=f / p, index_definition="ratio",
                                  voxel_spearman_rho=rng.uniform(-0.8, 0.3) if np.isfinite(p) else np.nan,
                                  n_voxels=100 if np.isfinite(p) else None, suv_type="bw"))
    return pd.DataFrame(stats), pd.DataFrame(index)


def _write(tmp_path: Path, gs: pd.DataFrame, gi: pd.DataFrame):
    a, b = tmp_path / "gland_stats.parquet", tmp_path / "gland_index.parquet"
    gs.to_parquet(a)
    gi.to_parquet(b)
    return a, b


def test_cohort_figures_full(tmp_path):
    gs, gi = _tables()
    a, b = _write(tmp_path, gs, gi)
    out = tmp_path / "figs"
    paths = figures.cohort_figures(a, b, out)
    _check_outputs(paths, out)
    svg = (out / "index_by_group.svg").read_text()
    assert "FAPI SUVmean / PSMA SUVmean" in svg  # the definition is stated
    assert "SUVmean (g/mL)" in (out / "fapi_by_group.svg").read_text()
    assert "no data" not in (out / "psma_vs_fapi.svg").read_text()


def test_cohort_figures_edge_cases(tmp_path):
    few = ("parotid", "lacrimal")  # few panels: drawing dominates the test time
    gs, gi = _tables(n_pss=4, n_control=3, glands=few)
    # a gland with all-NaN values
    gs.loc[gs["gland"] == "lacrimal", "suv_mean"] = np.nan
    gi.loc[gi["gland"] == "lacrimal", ["psma_suv_mean", "fapi_suv_mean", "psma_fapi_index", "voxel_spearman_rho"]] = np.nan
    a, b = _write(tmp_path, gs, gi)
    _check_outputs(figures.cohort_figures(a, b, tmp_path / "nan"), tmp_path / "nan")
    assert "lacrimal" not in (tmp_path / "nan" / "fapi_by_group.svg").read_text()

    # a single group (pSS only)
    gs1, gi1 = _tables(n_control=0, glands=few)
    a, b = _write(tmp_path, gs1, gi1)
    _check_outputs(figures.cohort_figures(a, b, tmp_path / "pss"), tmp_path / "pss")

    # controls only: no PSMA at all, no index, no correlation
    gs2, gi2 = _tables(n_pss=0, glands=few)
    a, b = _write(tmp_path, gs2, gi2)
    out = tmp_path / "ctrl"
    _check_outputs(figures.cohort_figures(a, b, out), out)
    for stem in ("psma_by_group", "psma_vs_fapi", "index_by_group", "voxel_rho"):
        assert "no data" in (out / f"{stem}.svg").read_text()
    assert "no data" not in (out / "fapi_by_group.svg").read_text()

    # one subject, one gland, one side
    gs3, gi3 = _tables(n_pss=1, n_control=0, glands=("tubarial",))
    a, b = _write(tmp_path, gs3[gs3["side"] == "left"], gi3[gi3["side"] == "left"])
    _check_outputs(figures.cohort_figures(a, b, tmp_path / "one"), tmp_path / "one")


def test_cohort_figures_empty_and_missing(tmp_path):
    gs, gi = _tables()
    a, b = _write(tmp_path, gs.iloc[0:0], gi.iloc[0:0])
    out = tmp_path / "empty"
    _check_outputs(figures.cohort_figures(a, b, out), out)
    for stem in figures.STEMS:
        assert "no data" in (out / f"{stem}.svg").read_text()
    out2 = tmp_path / "missing"
    _check_outputs(figures.cohort_figures(tmp_path / "absent1.parquet", tmp_path / "absent2.parquet", out2), out2)


# ------------------------------------------------------------------------------------------------
# synthetic volumes
# ------------------------------------------------------------------------------------------------
def _lps_affine(spacing, origin_lps):
    """A NIfTI (RAS) affine for a DICOM-like axial grid: rows/columns along LPS +x/+y."""
    A = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    A[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return A


def _phantom(tmp_path: Path):
    """CT (2 mm, 48^3) with a body cylinder, labels for parotids/submandibular/lacrimal, two PETs."""
    n, sp = 48, 2.0
    ct_aff = _lps_affine((sp, sp, sp), (-47.0, -47.0, -47.0))
    ijk = np.indices((n, n, n)).reshape(3, -1).T
    world = (ct_aff[:3, :3] @ ijk.T).T + ct_aff[:3, 3]  # RAS mm
    x, y, z = world.T
    ct = np.full(n**3, -1000.0, np.float32)
    ct[x**2 + y**2 < 40**2] = 40.0
    ct[(x**2 + y**2 < 8**2)] = 700.0  # a "spine"
    dseg = np.zeros(n**3, np.int16)

    def ball(c, r):
        return (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r**2

    # RAS: patient left is -x, so left glands at negative x
    dseg[ball((-28, -5, 5), 8)] = 1  # parotid left
    dseg[ball((28, -5, 5), 8)] = 2  # parotid right
    dseg[ball((-18, 15, -20), 6)] = 3
    dseg[ball((18, 15, -20), 6)] = 4
    dseg[ball((-20, 30, 30), 3.5)] = 7
    dseg[ball((20, 30, 30), 3.5)] = 8
    ct = ct.reshape(n, n, n)
    dseg = dseg.reshape(n, n, n)
    paths = {}
    nib.save(nib.Nifti1Image(ct, ct_aff), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(dseg, ct_aff), tmp_path / "dseg.nii.gz")
    # PET on a coarser, shifted 4 mm grid
    m, psp = 26, 4.0
    pet_aff = _lps_affine((psp, psp, psp), (-50.0, -50.0, -52.0))
    pijk = np.indices((m, m, m)).reshape(3, -1).T
    px, py, pz = ((pet_aff[:3, :3] @ pijk.T).T + pet_aff[:3, 3]).T
    body = px**2 + py**2 < 40**2
    for ses, gain in (("psma", 8.0), ("fapi", 3.0)):
        pet = np.where(body, 1.0, 0.0)
        for c, r in (((-28, -5, 5), 8), ((28, -5, 5), 8), ((-18, 15, -20), 6), ((18, 15, -20), 6)):
            pet = pet + gain * (((px - c[0]) ** 2 + (py - c[1]) ** 2 + (pz - c[2]) ** 2) < r**2)
        p = tmp_path / f"{ses}_suv.nii.gz"
        nib.save(nib.Nifti1Image(pet.reshape(m, m, m).astype(np.float32), pet_aff), p)
        paths[ses] = p
    return tmp_path / "ct.nii.gz", paths, tmp_path / "dseg.nii.gz"


def test_qc_montage_two_sessions_and_one(tmp_path):
    ct, pets, dseg = _phantom(tmp_path)
    out = figures.qc_montage(ct, pets, dseg, tmp_path / "qc" / "sub-01_qc.png", title="sub-01")
    w, h = _png_size(out)
    assert 1500 <= w <= 1700 and h > 600
    assert out.stat().st_size < 1_500_000
    out1 = figures.qc_montage(ct, {"fapi": pets["fapi"]}, dseg, tmp_path / "sub-02_qc.png", title="sub-02")
    w1, h1 = _png_size(out1)
    assert 1500 <= w1 <= 1700 and h1 < h  # one PET row fewer
    # no PET at all, no labels at all: still a picture
    empty = tmp_path / "empty_dseg.nii.gz"
    img = nib.load(dseg)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), empty)
    out0 = figures.qc_montage(ct, {}, empty, tmp_path / "sub-03_qc.png", title="sub-03")
    assert _png_size(out0)[0] >= 1500


def test_canonical_keeps_world_coordinates():
    aff = _lps_affine((1.0, 2.0, 3.0), (-10.0, 5.0, 7.0))
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    out, caff = figures._canonical(data, aff)
    assert np.all(np.diag(caff)[:3] > 0)  # RAS+: axis 0 towards patient right... in +x (RAS)
    ijk = np.array([1, 2, 3])
    w = aff[:3, :3] @ ijk + aff[:3, 3]
    cijk = np.rint(np.linalg.inv(caff) @ np.r_[w, 1])[:3].astype(int)
    assert out[tuple(cijk)] == data[tuple(ijk)]


def test_pet_to_ct_transform_direction(tmp_path):
    """A PET imaged 6 mm off along LPS +x: the CT->PET transform x_pet = x_ct + t brings it back."""
    pytest.importorskip("ants")
    from glandpet.registration.transforms import transform_matrix, translation_transform

    n = 32
    ct_aff = _lps_affine((2.0, 2.0, 2.0), (-31.0, -31.0, -31.0))
    ijk = np.indices((n, n, n)).reshape(3, -1).T
    x, y, z = ((ct_aff[:3, :3] @ ijk.T).T + ct_aff[:3, 3]).T  # RAS
    t_lps = np.array([6.0, -4.0, 2.0])
    c_ras = np.array([5.0, 0.0, 0.0])
    c_pet_ras = c_ras + np.array([-t_lps[0], -t_lps[1], t_lps[2]])  # the same tissue, seen by the PET
    pet = (((x - c_pet_ras[0]) ** 2 + (y - c_pet_ras[1]) ** 2 + (z - c_pet_ras[2]) ** 2) < 36).astype(np.float32)
    pet = pet.reshape(n, n, n)
    mat = translation_transform(t_lps, str(tmp_path / "x.mat"))
    res = figures._linear_to_ct(pet, ct_aff, (n, n, n), ct_aff, transform_matrix(mat))
    com = np.argwhere(res > 0.5).mean(axis=0)
    com_ras = ct_aff[:3, :3] @ com + ct_aff[:3, 3]
    assert np.allclose(com_ras, c_ras, atol=0.6)
    # the ANTs path (used with a session alignment) agrees
    nib.save(nib.Nifti1Image(pet, ct_aff), tmp_path / "pet.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((n, n, n), np.float32), ct_aff), tmp_path / "ct.nii.gz")
    res2 = figures._ants_to_ct(tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz", [mat])
    assert np.abs(res2 - res).max() < 1e-3


def test_index_by_group_shows_only_groups_with_data(tmp_path):
    """The demo has no control with both sessions: the index figure drew an empty "Control (n=0)"
    box; it now shows the groups with an index and says which group has none."""
    gs, gi = _tables(n_pss=4, n_control=3, glands=("parotid",))  # controls: FAPI only
    a, b = _write(tmp_path, gs, gi)
    figures.cohort_figures(a, b, tmp_path / "f")
    svg = (tmp_path / "f" / "index_by_group.svg").read_text()
    assert "n=4" in svg and "n=0" not in svg
    assert "no control with both sessions" in svg
    # the p in the group panels is the outcomes table's permutation p, read, not recomputed
    from glandpet.cohort.statistics import registered_outcomes

    outcomes = registered_outcomes(gs, gi)[0]
    outcomes.to_parquet(tmp_path / "outcomes.parquet")
    figures.cohort_figures(a, b, tmp_path / "g", outcomes_path=tmp_path / "outcomes.parquet")
    row = outcomes[(outcomes["analysis"] == "group_comparison") & (outcomes["gland"] == "parotid")
                   & (outcomes["session"] == "fapi") & (outcomes["value"] == "suv_mean")].iloc[0]
    assert figures._group_tests(outcomes, "suv_mean", "fapi")["parotid"] == (row["p_value"], row["effect"])
    svg = (tmp_path / "g" / "fapi_by_group.svg").read_text()
    assert figures._fmt_p(row["p_value"]).replace(" ", "") in svg.replace(" ", "").replace("&lt;", "<")
    assert figures._group_tests(pd.DataFrame(), "suv_mean", "fapi") == {}


def test_psma_vs_fapi_rho_is_the_statistics_tables(tmp_path):
    """The scatter's rho, p and CI are the `cohort_stats` rows of psma_fapi_correlation, read, not
    recomputed: with one pSS subject's right FAPI missing, the table's subject mean of PSMA keeps
    both sides (the figure used to drop that side before averaging)."""
    from glandpet.cohort import statistics as cs
    from glandpet.workflow.steps import _long

    gs, gi = _tables(n_pss=6, n_control=3, glands=("parotid", "submandibular"))
    gi.loc[(gi["subject_id"] == "P00") & (gi["side"] == "right"), "fapi_suv_mean"] = np.nan
    a, b = _write(tmp_path, gs, gi)
    corr = cs.psma_fapi_correlation(gi)
    stats_long = _long(corr, cs.PSMA_FAPI_ANALYSIS, ["gland", "group"])
    stats_long.to_parquet(tmp_path / "cohort_stats.parquet")
    tests = figures._psma_fapi_tests(stats_long)
    assert set(tests) == {"parotid", "submandibular"}
    for r in corr.itertuples():
        assert tests[r.gland]["rho"] == r.rho and tests[r.gland]["p_value"] == r.p_value
        assert tests[r.gland]["n"] == r.n == 6
    figures.cohort_figures(a, b, tmp_path / "f", cohort_stats_path=tmp_path / "cohort_stats.parquet")
    svg = (tmp_path / "f" / "psma_vs_fapi.svg").read_text().replace("&lt;", "<")
    for r in corr.itertuples():
        assert f"= {r.rho:+.2f} (95% CI {r.ci_low:+.2f} to {r.ci_high:+.2f})" in svg
        assert figures._fmt_p(r.p_value) in svg
    # without the table: no rho at all (never a recomputation), n from the points drawn
    figures.cohort_figures(a, b, tmp_path / "g")
    svg = (tmp_path / "g" / "psma_vs_fapi.svg").read_text()
    assert "Spearman" not in svg and "n = 6 subjects" in svg


def test_montage_thumbnail_is_small_and_keeps_the_aspect(tmp_path):
    """The report's copy of a QC montage (issue 21): 640 px wide, aspect kept, a palette PNG far
    smaller than the montage; a narrower image keeps its size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    big = tmp_path / "sub-01_qc.png"
    Image.fromarray(rng.integers(0, 255, (1272, 1600, 4), dtype=np.uint8), "RGBA").save(big)
    out = figures.montage_thumbnail(big, tmp_path / "thumbnails" / "sub-01_qc.png")
    with Image.open(out) as im:
        assert im.size == (figures.THUMBNAIL_WIDTH, round(1272 * figures.THUMBNAIL_WIDTH / 1600))
        assert im.mode == "P"
    assert out.stat().st_size < big.stat().st_size / 4
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200), "white").save(small)
    with Image.open(figures.montage_thumbnail(small, tmp_path / "small_thumb.png")) as im:
        assert im.size == (300, 200)
    assert not list((tmp_path / "thumbnails").glob(".*"))  # no temporary file left

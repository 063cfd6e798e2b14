"""`glandpet segment` and `glandpet atlas validate`: real CTs from the shared folder (skipped where
it is absent), and the error paths (instant, on tiny synthetic files)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from glandpet.segmentation.atlas_validate import choose_library, choose_subjects, estimate_cost
from glandpet.cli import main
from glandpet.glands import read_label_table
from glandpet.segmentation.segment_command import load_segmentation_config
from glandpet.segmentation.atlas_registration import relabel_to_default
from glandpet.segmentation.params import SegmentationParams

OKBP = "openkbp-parotid-ct"


def _okbp(shared_data, *names):
    d = shared_data / OKBP
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return [d / n for n in names]


def _truth(atlas_dir) -> np.ndarray:
    img = nib.load(atlas_dir / "labels.nii.gz")
    return relabel_to_default(np.asanyarray(img.dataobj), read_label_table(atlas_dir / "labels.tsv"))


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _one_error_line(capsys, argv, *must_contain) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"glandpet {argv[0]}: error: "), err
    for s in must_contain:
        assert s in err, err
    return err


# ------------------------------------------------------------------------------ real scans
def test_segment_real_ct_two_atlases(shared_data, tmp_path, capsys):
    """One real CT, two other real CTs as atlases: the label map is on the CT's grid, the label
    table beside it, and each parotid lies over the clinical contour (a lost registration gives
    Dice 0.00-0.02; two atlases on these 4-5 mm grids give 0.5-0.75)."""
    subject, *atlases = _okbp(shared_data, "okbp-train-4", "okbp-train-2", "okbp-train-3")
    out = tmp_path / "out" / "sub_dseg.nii.gz"
    argv = ["segment", subject / "ct.nii.gz", out]
    for a in atlases:
        argv += ["--atlas", a]
    assert main([str(x) for x in argv]) == 0
    text = capsys.readouterr().out
    assert "parotid_left" in text and str(out) in text
    ct, seg = nib.load(subject / "ct.nii.gz"), nib.load(out)
    assert seg.shape == ct.shape
    assert np.array_equal(seg.affine, ct.affine)
    tsv = tmp_path / "out" / "sub_dseg.tsv"
    table = pd.read_csv(tsv, sep="\t")
    assert list(table.columns) == ["index", "gland", "side"]
    assert set(zip(table.gland, table.side)) == {("parotid", "left"), ("parotid", "right")}
    labels = {lab.name: lab.index for lab in read_label_table(tsv)}
    auto = np.asanyarray(seg.dataobj)
    assert set(np.unique(auto).tolist()) <= {0, *labels.values()}
    truth = _truth(subject)
    for name, value in labels.items():
        d = _dice(auto == value, truth == value)
        assert d > 0.3, (name, d)


def test_atlas_validate_real_ct(shared_data, tmp_path, capsys):
    """Leave-one-out on 3 real CTs, one held out, segmented with one of the others: the cost line
    comes first, the table has one row per contoured parotid, its Dice and volumes are those of
    the kept label map against the contours, and the medians are printed."""
    dirs = _okbp(shared_data, "okbp-train-11", "okbp-train-12", "okbp-train-16")
    table = tmp_path / "loo.tsv"
    keep = tmp_path / "labels"
    argv = ["atlas", "validate", *dirs, "--subjects", "1", "--atlases", "1", "-o", table, "--labels-dir", keep]
    assert main([str(x) for x in argv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("glandpet atlas validate: 3 atlases, 1 held out, each segmented with 1 others: "
                             "1 registrations, estimated ")
    assert any(line.startswith("parotid ") for line in out)
    df = pd.read_csv(table, sep="\t")
    assert list(df.columns[:10]) == ["atlas", "gland", "side", "n_atlases", "dice", "msd_mm", "hd95_mm",
                                     "volume_contour_ml", "volume_auto_ml", "volume_error_pct"]
    assert len(df) == 2 and df.atlas.nunique() == 1 and set(df.side) == {"left", "right"}
    held = df.atlas[0]
    assert held == choose_subjects([d.name for d in dirs], 1, 0)[0]
    assert df.library[0] not in (held, "") and "," not in df.library[0] and (df.n_atlases == 1).all()
    assert df.error.isna().all()
    hdir = next(d for d in dirs if d.name == held)
    truth = _truth(hdir)
    auto_img = nib.load(keep / f"{held}_dseg.nii.gz")
    auto = np.asanyarray(auto_img.dataobj)
    vox_ml = abs(np.linalg.det(auto_img.affine[:3, :3])) / 1000
    for r in df.itertuples():
        value = 1 if r.side == "left" else 2  # default label values: parotid left 1, right 2
        assert r.dice == pytest.approx(_dice(auto == value, truth == value), abs=1e-5)
        assert r.volume_contour_ml == pytest.approx((truth == value).sum() * vox_ml, rel=1e-5)
        assert r.volume_auto_ml == pytest.approx((auto == value).sum() * vox_ml, rel=1e-5)
        assert r.volume_error_pct == pytest.approx(100 * (r.volume_auto_ml / r.volume_contour_ml - 1), abs=1e-3)
        if r.dice > 0:  # surface distances in mm on 4-5 mm voxels: from a few to a few tens of mm
            assert 0 < r.msd_mm < 60 and r.msd_mm <= r.hd95_mm < 150
        assert r.seconds > 0 and r.cpu_seconds > 0
        # the one atlas's warped volume before fusion; one voter: no confidence
        assert r.volume_atlases_ml > 0 and pd.isna(r.confidence)
    assert any("atlases vol err %" in line for line in out)
    # the voters behind each gland: the library's size transfer is fitted on them (one pair per
    # gland here: too few to fit, and the run says so)
    voters = pd.read_csv(tmp_path / "loo_voters.tsv", sep="\t")
    assert len(voters) == 2 and (voters.atlas == held).all() and (voters.voter == df.library[0]).all()
    vdir = next(d for d in dirs if d.name == df.library[0])
    vtruth = _truth(vdir)
    vvox_ml = abs(np.linalg.det(nib.load(vdir / "labels.nii.gz").affine[:3, :3])) / 1000
    for v in voters.itertuples():
        r = df[df.side == v.side].iloc[0]
        value = 1 if v.side == "left" else 2
        assert v.voter_contour_ml == pytest.approx((vtruth == value).sum() * vvox_ml, rel=1e-4)
        assert v.voter_warped_ml == pytest.approx(r.volume_atlases_ml, rel=1e-4)
        assert v.volume_contour_ml == pytest.approx(r.volume_contour_ml, rel=1e-6)
    text = "\n".join(out)
    assert "size transfer per gland" in text and "too few pairs" in text and "loo_voters.tsv" in text


# ------------------------------------------------------------------------------ error paths (instant)
def _write(path, arr, spacing=(2.0, 2.0, 2.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def _head(fill=-1000):
    """A 12^3 CT with a body: a block of soft tissue in air."""
    ct = np.full((12, 12, 12), fill, np.int16)
    ct[2:10, 2:10, 2:10] = 40
    return ct


def _atlas(d, labels=None):
    ct = _head()
    lab = np.zeros((12, 12, 12), np.uint8) if labels is None else labels
    _write(d / "ct.nii.gz", ct)
    _write(d / "labels.nii.gz", lab)
    (d / "labels.tsv").write_text("index\tgland\tside\n1\tparotid\tright\n2\tparotid\tleft\n")
    return d


@pytest.fixture
def tiny(tmp_path):
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    good = _atlas(tmp_path / "good", lab)
    ct = tmp_path / "ct.nii.gz"
    _write(ct, _head())
    return tmp_path, ct, good


def test_segment_missing_ct(tiny, capsys):
    tmp, _, good = tiny
    _one_error_line(capsys, ["segment", tmp / "nope.nii.gz", tmp / "o_dseg.nii.gz", "--atlas", good],
                    "CT", "nope.nii.gz", "not found")


def test_segment_unreadable_ct(tiny, capsys):
    tmp, ct, good = tiny
    bad = tmp / "bad.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    _one_error_line(capsys, ["segment", bad, tmp / "o_dseg.nii.gz", "--atlas", good], "not a readable NIfTI")
    cut = tmp / "cut.nii.gz"  # a truncated file: the header reads, the voxels do not
    cut.write_bytes(ct.read_bytes()[: len(ct.read_bytes()) // 2])
    _one_error_line(capsys, ["segment", cut, tmp / "o_dseg.nii.gz", "--atlas", good], "cut.nii.gz",
                    "not a readable NIfTI")
    assert not (tmp / "o_dseg.nii.gz").exists()


def test_segment_ct_without_an_image(tiny, capsys):
    """An all-zero CT (a failed export), an all-air one and one with NaNs fail with one line naming the
    file before any registration, for the scan and for an atlas's CT (whose voxels are read too)."""
    tmp, ct, good = tiny
    out = tmp / "o_dseg.nii.gz"
    zero = tmp / "zero.nii.gz"
    _write(zero, np.zeros((12, 12, 12), np.int16))
    _one_error_line(capsys, ["segment", zero, out, "--atlas", good], "zero.nii.gz", "holds no image", "every voxel is 0")
    air = tmp / "air.nii.gz"
    _write(air, np.broadcast_to((-1000 + np.arange(12))[:, None, None], (12, 12, 12)).astype(np.int16))  # air, not flat
    _one_error_line(capsys, ["segment", air, out, "--atlas", good], "air.nii.gz", "shows no body")
    nan = tmp / "nan.nii.gz"
    arr = _head().astype(np.float32)
    arr[5, 5, 5] = np.nan
    _write(nan, arr)
    _one_error_line(capsys, ["segment", nan, out, "--atlas", good], "nan.nii.gz", "1 non-finite voxel")
    flat = _atlas(tmp / "flat", np.asanyarray(nib.load(good / "labels.nii.gz").dataobj))
    _write(flat / "ct.nii.gz", np.zeros((12, 12, 12), np.int16))
    _one_error_line(capsys, ["segment", ct, out, "--atlas", flat], "atlas flat: CT", "holds no image")
    cut = _atlas(tmp / "cut", np.asanyarray(nib.load(good / "labels.nii.gz").dataobj))
    whole = (cut / "ct.nii.gz").read_bytes()
    (cut / "ct.nii.gz").write_bytes(whole[: len(whole) // 2])
    _one_error_line(capsys, ["segment", ct, out, "--atlas", cut], "atlas cut: CT", "not a readable NIfTI")
    assert not out.exists()


def test_segment_atlas_without_glands(tiny, capsys):
    tmp, ct, good = tiny
    empty = _atlas(tmp / "empty")
    _one_error_line(capsys, ["segment", ct, tmp / "o_dseg.nii.gz", "--atlas", good, "--atlas", empty],
                    "empty", "holds none of the glands")
    # labels present, but none the table names
    other = np.zeros((12, 12, 12), np.uint8)
    other[3:6, 3:6, 3:6] = 7
    _one_error_line(capsys, ["segment", ct, tmp / "o_dseg.nii.gz", "--atlas", _atlas(tmp / "seven", other)],
                    "holds none of the glands", "7")


def test_segment_atlas_folder_problems(tiny, capsys):
    tmp, ct, good = tiny
    out = tmp / "o_dseg.nii.gz"
    _one_error_line(capsys, ["segment", ct, out, "--atlas", tmp / "absent"], "atlas folder", "not found")
    partial = tmp / "partial"
    partial.mkdir()
    (partial / "ct.nii.gz").write_bytes((good / "ct.nii.gz").read_bytes())
    _one_error_line(capsys, ["segment", ct, out, "--atlas", partial], "lacks labels.nii.gz, labels.tsv")
    broken = _atlas(tmp / "broken")
    (broken / "labels.nii.gz").write_bytes(b"\x1f\x8b garbage")
    _one_error_line(capsys, ["segment", ct, out, "--atlas", broken], "label map", "not a readable NIfTI")
    badtsv = _atlas(tmp / "badtsv", np.ones((12, 12, 12), np.uint8))
    (badtsv / "labels.tsv").write_text("index\tgland\tside\n1\tthyroid\tleft\n")
    _one_error_line(capsys, ["segment", ct, out, "--atlas", badtsv], "unknown gland 'thyroid'")
    _one_error_line(capsys, ["segment", ct, tmp / "o_dseg.mha", "--atlas", good], ".nii.gz or .nii")


def test_validate_error_paths(tiny, capsys):
    tmp, ct, good = tiny
    _one_error_line(capsys, ["atlas", "validate", good], "at least 2")
    _one_error_line(capsys, ["atlas", "validate", good, _atlas(tmp / "empty")], "holds none of the glands")
    _one_error_line(capsys, ["atlas", "validate", good, good], "given twice")


def test_segmentation_config(tmp_path, capsys, tiny):
    """--config: a study config's `segmentation:` keys (or those keys alone) over the defaults,
    validated against the schema's segmentation section; mapped by SegmentationParams.from_config as the
    workflow does."""
    defaults = load_segmentation_config(None)
    # config.yaml's defaults are SegmentationParams' own
    assert SegmentationParams.from_config(defaults) == SegmentationParams.from_config({})
    study = tmp_path / "study.yaml"
    study.write_text("results: r\nsegmentation:\n  fusion: majority\n  refine_hu: {parotid: [-100, 80]}\n")
    seg = load_segmentation_config(study)
    assert seg["fusion"] == "majority" and seg["atlases_per_gland"] == defaults["atlases_per_gland"]
    kw = SegmentationParams.from_config(seg)
    assert kw.fusion == "majority" and kw.refine == {"parotid": {"hu": [-100, 80]}}
    keys_only = tmp_path / "seg.yaml"
    keys_only.write_text("atlases_per_gland: 0\nrefine_intensity: false\nlinear_stage: whole_crop\n")
    kw = SegmentationParams.from_config(load_segmentation_config(keys_only))
    assert kw.atlases_per_gland == 0 and kw.refine_intensity is False and kw.fusion == "auto"
    assert kw.linear_stage == "whole_crop" and SegmentationParams.from_config({}).linear_stage == "gland_box"
    bad = tmp_path / "bad.yaml"
    bad.write_text("segmentation:\n  fusion: best\n")
    _, ct, good = tiny
    _one_error_line(capsys, ["segment", ct, tmp_path / "o_dseg.nii.gz", "--atlas", good, "--config", bad],
                    "key segmentation.fusion")
    bad.write_text("segmentation:\n  linear_stage: glands\n")
    _one_error_line(capsys, ["segment", ct, tmp_path / "o_dseg.nii.gz", "--atlas", good, "--config", bad],
                    "key segmentation.linear_stage")
    bad.write_text("segmentation:\n  atlas_per_gland: 3\n")
    _one_error_line(capsys, ["segment", ct, tmp_path / "o_dseg.nii.gz", "--atlas", good, "--config", bad],
                    "unknown key segmentation.atlas_per_gland")


def test_choices_are_deterministic_and_seeded():
    names = [f"a{i:02d}" for i in range(24)]
    held = choose_subjects(names, 4, seed=0)
    assert held == choose_subjects(list(reversed(names)), 4, seed=0) and len(set(held)) == 4
    assert choose_subjects(names, None) == sorted(names) and choose_subjects(names, 30) == sorted(names)
    lib = choose_library("a03", names, 5, seed=0)
    assert len(lib) == 5 and "a03" not in lib and lib == sorted(lib)
    assert lib == choose_library("a03", list(reversed(names)), 5, seed=0)
    assert choose_library("a03", names, 5, seed=1) != lib or choose_library("a03", names, 5, seed=2) != lib
    assert choose_library("a03", names, None) == [n for n in names if n != "a03"]
    cost = estimate_cost(24 * 23, threads=2)
    assert cost["cpu_hours"] > 0 and math.isclose(cost["wall_minutes"] * 60 * 1.7, cost["cpu_hours"] * 3600)


# ------------------------------------------------------------------------------ benchmarks/real_ct.py --summarise
def test_real_ct_benchmark_summarises_the_tables_of_a_split_run(tmp_path, capsys, load_benchmark):
    """A leave-one-out split between processes (``--scans``) is read back together: a scan in two
    tables counts once (the last), and the volume, image-blind and confidence figures are those of
    the pooled rows (worked out by hand below)."""
    bench = load_benchmark("real_ct")

    def rows(scan, contour, dice, conf):
        return [{"atlas": scan, "gland": "parotid", "side": side, "n_atlases": 10, "dice": d, "msd_mm": 2.0,
                 "hd95_mm": 8.0, "volume_contour_ml": v, "volume_auto_ml": 1.1 * v, "volume_error_pct": 10.0,
                 "volume_atlases_ml": 1.1 * v, "confidence": c, "seconds": 300.0, "cpu_seconds": 290.0,
                 "library": "x", "error": None}
                for side, v, d, c in zip(("left", "right"), contour, dice, conf)]

    part1 = rows("s1", (10, 20), (0.5, 0.8), (0.5, 0.8)) + rows("s3", (50, 60), (0.1, 0.1), (0.9, 0.9))
    part2 = rows("s2", (30, 40), (0.7, 0.9), (0.7, 0.9)) + rows("s3", (50, 60), (0.55, 0.85), (0.65, 0.85))
    tables = []
    for i, part in enumerate((part1, part2)):
        tables.append(tmp_path / f"part{i}.tsv")
        pd.DataFrame(part).to_csv(tables[-1], sep="\t", index=False)
    assert bench.main(["--summarise", *map(str, tables)]) == 0
    out = capsys.readouterr().out
    assert "2 repeated rows" in out and "3 held-out scans from 2 table(s)" in out
    parotid = next(line for line in out.splitlines() if line.startswith("parotid "))
    assert parotid.split()[1:3] == ["6", "0.750"]  # median of 0.5 0.8 0.7 0.9 0.55 0.85
    assert "Spearman(automatic, contour) 1.00" in out
    # each gland at the median contour of the other scans: |45/10-1| 3.5, 1.25, |35/30-1| 0.167,
    # 0.125, |25/50-1| 0.5, 0.583 -> median 54.2 %; the automatic volumes are all 10 % off
    assert "automatic 10.0 %, image-blind (other scans' median contour) 54.2 %" in out
    # Dice under 0.6: 0.5 at confidence 0.5 (flagged), 0.55 at 0.65 (not): recall 0.5, 1 of 6 flagged
    assert "Spearman with Dice 1.00; 2 of 6 glands under Dice 0.6, 0.50 of them flagged" in out
    assert "0.17 of all flagged" in out
    assert bench.main(["--summarise", str(tmp_path / "missing.tsv")]) == 2


def test_validation_medians_split_the_volume_error_by_gland_size():
    """`glandpet atlas validate` shows a library's pull towards its typical gland: the signed volume
    error of the smaller and the larger half of the contours (split at their median volume)."""
    from glandpet.segmentation.atlas_validate import format_medians, medians_per_gland

    contour = [5.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    auto = [15.0, 15.0, 22.0, 27.0, 30.0, 40.0]  # small ones too large, large ones too small
    df = pd.DataFrame({"atlas": [f"s{i // 2}" for i in range(6)], "gland": "parotid",
                       "side": ["left", "right"] * 3, "dice": 0.8, "msd_mm": 2.0, "hd95_mm": 8.0,
                       "volume_contour_ml": contour, "volume_auto_ml": auto,
                       "volume_error_pct": [100 * (a / c - 1) for a, c in zip(auto, contour)],
                       "volume_atlases_ml": auto, "error": None})
    med = medians_per_gland(df).iloc[0]
    assert med.volume_error_small_pct == pytest.approx(50.0)  # +200, +50, +10 % -> +50 %
    assert med.volume_error_large_pct == pytest.approx(-20.0)  # -10, -25, -20 % -> -20 %
    assert "+50.0 / -20.0" in format_medians(medians_per_gland(df))


def test_real_ct_benchmark_corrects_the_volumes_with_the_other_scans_size_transfer(tmp_path, capsys, load_benchmark):
    """``--summarise`` with the voters' tables beside the per-scan tables: each scan's parotid
    volumes corrected with the size transfer fitted on the other scans' voters. Built so that every
    warped atlas carries exactly half of the log size ratio (b = 0.5) and the automatic volume is the
    voters' median: the correction then gives the contour volume itself, 0 % error, where the
    uncorrected volumes err by up to a factor 2."""
    bench = load_benchmark("real_ct")
    rows, voters = [], []
    for i, (truth_l, truth_r) in enumerate(((8.0, 10.0), (30.0, 28.0), (55.0, 60.0))):
        for side, truth in (("left", truth_l), ("right", truth_r)):
            natives = [15.0, 25.0, 40.0]
            warped = [n * (truth / n) ** 0.5 for n in natives]
            auto = float(np.median(warped))
            rows.append({"atlas": f"s{i}", "gland": "parotid", "side": side, "n_atlases": 3, "dice": 0.7,
                         "msd_mm": 2.0, "hd95_mm": 8.0, "volume_contour_ml": truth, "volume_auto_ml": auto,
                         "volume_error_pct": 100 * (auto / truth - 1), "volume_atlases_ml": auto, "confidence": 0.7,
                         "seconds": 100.0, "cpu_seconds": 100.0, "library": "a,b,c", "error": None})
            voters += [{"atlas": f"s{i}", "gland": "parotid", "side": side, "voter": v, "voter_contour_ml": n,
                        "voter_warped_ml": w, "volume_contour_ml": truth} for v, n, w in zip("abc", natives, warped)]
    table = tmp_path / "real_ct_3atlases.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    pd.DataFrame(voters).to_csv(tmp_path / "real_ct_3atlases_voters.tsv", sep="\t", index=False)
    assert bench.main(["--summarise", str(table)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("parotid volume corrected"))
    assert "(b 0.50, range 0.50-0.50, fitted on the other scans)" in line
    assert "|error| median 0.0 %, signed +0.0 %" in line and "(6 glands)" in line
    # a run that corrected a scan's volumes itself (size_transfer recorded per gland): not corrected twice
    df = pd.DataFrame(rows)
    df["size_transfer"] = np.where(df.atlas == "s2", 0.5, np.nan)
    df.to_csv(table, sep="\t", index=False)
    assert bench.main(["--summarise", str(table)]) == 0
    out = capsys.readouterr().out
    assert "corrected in the run for the size transfer: 2 of 6 glands (b 0.50-0.50)" in out
    assert "(4 glands)" in next(x for x in out.splitlines() if x.startswith("parotid volume corrected"))

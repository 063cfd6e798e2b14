"""The atlas library's template (glandpet/segmentation/atlas_template.py): built once, cached by the
atlases' checksums, and an atlas reaches a subject through it (subject <- template <- atlas) at the
right place in world coordinates.

Small synthetic head-like CTs (a body, an off-centre bone, a gland of its own CT number), the same
anatomy placed at different world positions and slightly scaled: what the template path must undo.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from glandpet.glands import label_value

ants = pytest.importorskip("ants")

GLAND = label_value("parotid", "left")
SPACING = 3.0


def _head(path_dir, shift_mm, scale=1.0, name="a"):
    """A CT (air -1000, body 40 HU, bone 700 HU, gland 0 HU) and its gland label, 3 mm voxels, the
    anatomy ``shift_mm`` (x, y, z; RAS mm) off the grid centre and scaled by ``scale``."""
    n = 56
    idx = np.indices((n, n, n)).reshape(3, -1).T.astype(float)
    c = (n - 1) / 2.0
    xyz = (idx - c) * SPACING - np.asarray(shift_mm, float)  # mm from the anatomy's centre
    xyz /= scale

    def ell(centre, radii):
        return (((xyz - centre) / radii) ** 2).sum(1) <= 1.0

    ct = np.full(n ** 3, -1000.0)
    ct[ell((0, 0, 0), (55, 65, 70))] = 40.0
    ct[ell((-15, 10, 20), (8, 8, 30))] = 700.0  # an off-centre bone: no symmetry to flip onto
    gland = ell((25, -5, -10), (12, 9, 14))
    ct[gland] = 0.0
    aff = np.diag([SPACING, SPACING, SPACING, 1.0])
    aff[:3, 3] = -c * SPACING
    d = path_dir / name
    d.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct.reshape(n, n, n).astype(np.float32), aff), str(d / "ct.nii.gz"))
    nib.save(nib.Nifti1Image((gland * GLAND).reshape(n, n, n).astype(np.uint8), aff), str(d / "labels.nii.gz"))
    (d / "labels.tsv").write_text(f"index\tgland\tside\n{GLAND}\tparotid\tleft\n")
    return {"name": name, "ct": str(d / "ct.nii.gz"), "labels": str(d / "labels.nii.gz"),
            "label_table": str(d / "labels.tsv")}


def _centroid_world(img) -> np.ndarray:
    arr = img.numpy() > 0.5
    idx = np.argwhere(arr).mean(0)
    from glandpet.registration.field_of_view import world_coords

    return world_coords(img, idx[None])[0]


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    atlases = [_head(root, (0, 0, 0), 1.0, "atlas01"), _head(root, (12, -8, 6), 1.05, "atlas02"),
               _head(root, (-9, 6, -12), 0.95, "atlas03")]
    from glandpet.segmentation.atlas_template import template_for

    cache = root / "cache"
    calls = []
    t = template_for(atlases, cache, workers=2, progress=lambda d, n: calls.append((d, n)))
    return {"root": root, "atlases": atlases, "template": t, "cache": cache, "progress": calls}


def test_template_is_built_with_its_manifest_and_progress(library):
    t = library["template"]
    man = json.loads((t.directory / "manifest.json").read_text())
    assert man["atlases"] == ["atlas01", "atlas02", "atlas03"]
    assert t.image.is_file() and t.directory.name == t.key[:16]
    for name, fwd in t.atlas_transforms.items():
        assert len(fwd) == 2 and all(os.path.isfile(f) for f in fwd), name  # warp + affine
    assert t.build["registrations"] == library["progress"][-1][0] == library["progress"][-1][1]
    # only the template, the transforms and the manifest are kept
    assert sorted(p.name for p in t.directory.iterdir() if not p.name.startswith("atlas")) == [
        "manifest.json", "template.nii.gz"]
    assert not [p for p in t.directory.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_every_atlas_reaches_the_template_at_one_place(library):
    t = library["template"]
    tmpl = ants.image_read(str(t.image))
    warped = []
    for a in library["atlases"]:
        lab = ants.image_read(a["labels"])
        warped.append(ants.apply_transforms(tmpl, lab, t.transforms_of(a["name"]), interpolator="genericLabel"))
    masks = [w.numpy() > 0 for w in warped]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert _dice(masks[i], masks[j]) > 0.8, (i, j)
    cents = [_centroid_world(w) for w in warped]
    assert max(np.linalg.norm(c - cents[0]) for c in cents) < SPACING


def test_an_atlas_reaches_a_subject_through_the_template(library, tmp_path):
    """subject <- template <- atlas, compared with the subject's own gland in world coordinates."""
    from glandpet.registration import sessions
    from glandpet.registration.field_of_view import resample_iso
    from glandpet.segmentation.atlas_registration import ATLAS_STAGES

    t = library["template"]
    subj = _head(tmp_path, (-14, 10, 9), 1.02, "subject")
    s_ct = ants.image_read(subj["ct"])
    s_glob = resample_iso(s_ct, 4.0)
    r = sessions.register_ct_to_ct(s_glob, ants.image_read(str(t.image)), str(tmp_path / "s_"), ATLAS_STAGES,
                                   init="search")
    truth = ants.image_read(subj["labels"]).numpy() > 0
    for a in library["atlases"]:
        lab = ants.image_read(a["labels"])
        got = ants.apply_transforms(s_ct, lab, r["fwdtransforms"] + t.transforms_of(a["name"]),
                                    interpolator="genericLabel")
        assert _dice(got.numpy() > 0, truth) > 0.75, a["name"]
        assert np.linalg.norm(_centroid_world(got) - _centroid_world(ants.image_read(subj["labels"]))) < SPACING


def test_cache_is_reused_and_keyed_by_the_atlases(library):
    from glandpet.segmentation.atlas_template import library_key, load_template, template_for

    t = library["template"]
    stamp = (t.directory / "manifest.json").stat().st_mtime_ns
    again = template_for(library["atlases"], library["cache"], workers=2)
    assert again.directory == t.directory and (t.directory / "manifest.json").stat().st_mtime_ns == stamp
    # another library (one atlas fewer, or the same files in another order) has another key
    assert library_key(library["atlases"][:2]) != t.key
    assert library_key(library["atlases"][::-1]) != t.key
    renamed = [dict(library["atlases"][0], name="other"), *library["atlases"][1:]]
    assert library_key(renamed) != t.key  # the manifest finds transforms by atlas name
    with pytest.raises(ValueError, match="other atlases"):
        load_template(t.directory, library["atlases"][:2])
    # an atlas file changed on disk changes the key
    table = library["atlases"][0]["label_table"]
    before = open(table).read()
    try:
        with open(table, "a") as fh:
            fh.write("\n")
        assert library_key(library["atlases"]) != t.key
    finally:
        with open(table, "w") as fh:
            fh.write(before)
    assert library_key(library["atlases"]) == t.key


def test_template_needs_two_uniquely_named_atlases(library, tmp_path):
    from glandpet.segmentation.atlas_template import build_template

    a = library["atlases"][0]
    with pytest.raises(ValueError, match="at least 2"):
        build_template([a], tmp_path / "t")
    with pytest.raises(ValueError, match="unique"):
        build_template([a, dict(library["atlases"][1], name=a["name"])], tmp_path / "t")


def test_segmentation_params_choose_the_path():
    from glandpet.segmentation.params import SegmentationParams

    assert SegmentationParams.from_config({}).atlas_registration == "pairwise"
    assert SegmentationParams.from_config({"atlas_registration": "template"}).atlas_registration == "template"


def test_cache_falls_back_to_the_user_cache_beside_a_read_only_library(tmp_path, monkeypatch):
    """A library folder nobody may write (a shared, read-only atlas set): the template is cached in
    the user's cache folder, never written into the library (root ignores the mode bits)."""
    from glandpet.segmentation.atlas_template import default_cache_root

    lib = tmp_path / "library"
    (lib / "atlas01").mkdir(parents=True)
    atlases = [{"ct": str(lib / "atlas01" / "ct.nii.gz")}]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_cache_root(atlases) == lib / ".glandpet-templates"
    lib.chmod(0o555)
    try:
        assert default_cache_root(atlases) == tmp_path / "cache" / "glandpet" / "atlas-templates"
    finally:
        lib.chmod(0o755)

"""An atlas library's template: many atlases for the registration cost of one.

Pairwise multi-atlas segmentation registers every atlas to every subject (stage A of
:mod:`glandpet.segmentation.atlas_registration`), so its cost grows with the library. With a
template, each atlas is registered **once per library** to a common template built from the
atlases themselves, each subject **once** to that template, and an atlas reaches the subject
through the composition (subject <- template <- atlas). Deformable work per atlas is then spent
only where it pays: the regional stage B of the atlases most similar to the subject there
(:data:`glandpet.segmentation.atlas_registration.TEMPLATE_ATLASES_PER_REGION`;
:func:`glandpet.segmentation.atlas_registration.preselect_atlases`).

Building (:func:`build_template`, once per library; every registration on one ITK thread, several
side by side in worker processes, so the template is the same whatever their number):

1. every atlas's head-and-neck crop resampled to :data:`TEMPLATE_SPACING_MM` (stage A's grid);
2. the reference: the atlas with the largest crop (the template's grid: it covers every atlas's
   glands);
3. pass 0: every atlas rigid + affine to the reference (initial translation searched from the
   anatomy: different patients share no world frame), the mean of the warped CTs (each voxel over
   the atlases whose field of view covers it) -> T0;
4. passes 1..:data:`TEMPLATE_PASSES`: every atlas rigid + affine + SyN (stage A's schedules) to the
   previous mean -> the next mean; the last pass's registrations are the atlases' transforms, and
   the image they were registered to is the template.

The template's shape is the reference's up to the affine (no shape-averaging update): it is a
registration hub, not an anatomical average, and a subject reaches it with the same stages as it
would reach an atlas.

Cache (:func:`template_for`): a folder named by :func:`library_key` (every atlas's name and the
checksums of its CT, labels and label table, in order, and the building's parameters), beside the library
(``<the atlases' common parent>/.glandpet-templates/``) when that is writable, else under
``~/.cache/glandpet/atlas-templates/``; written to a temporary folder and renamed, so two jobs that
build it at once leave one whole copy. ``manifest.json`` lists the template, each atlas's forward
transforms (atlas -> template) and the building's cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: the template's grid (mm): stage A's, so a subject reaches the template as it would an atlas
TEMPLATE_SPACING_MM = 4.0
#: deformable passes after the affine one (the last pass's registrations are the atlases' transforms)
TEMPLATE_PASSES = 2
#: bump when the building changes: a new key, so no stale template is read
TEMPLATE_VERSION = 1
#: CT number outside an atlas's field of view (air)
OUTSIDE_HU = -1000.0
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class AtlasTemplate:
    """A built template: its image and, per atlas (by name, in library order), the forward transforms
    atlas -> template (for ``apply_transforms(fixed=template, moving=atlas, ...)``)."""

    directory: Path
    key: str
    image: Path
    atlas_transforms: dict[str, list[str]]
    build: dict

    def transforms_of(self, name: str) -> list[str]:
        return list(self.atlas_transforms[name])


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_key(atlases: Sequence[Mapping[str, str]]) -> str:
    """The key of a library's template: each atlas's name and the checksums of its CT, labels and
    label table (in the given order), and the building's parameters (grid, passes, stage
    schedules, version)."""
    from glandpet.segmentation.atlas_registration import ATLAS_LINEAR_STAGES, ATLAS_STAGES, atlas_name

    h = hashlib.sha256()
    h.update(json.dumps({"version": TEMPLATE_VERSION, "spacing_mm": TEMPLATE_SPACING_MM, "passes": TEMPLATE_PASSES,
                         "linear": ATLAS_LINEAR_STAGES, "stages": ATLAS_STAGES}, sort_keys=True,
                        default=str).encode())
    for a in atlases:
        h.update(atlas_name(a).encode())  # the manifest names each atlas's transforms
        for k in ("ct", "labels", "label_table"):
            h.update(_sha256(a[k]).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ building
def _prepare(atlas: Mapping[str, str], out_path: str) -> tuple[str, int]:
    """The atlas's head-and-neck crop at the template's grid, written to ``out_path``; its voxels."""
    from glandpet.registration import field_of_view, transforms
    from glandpet.segmentation.atlas_registration import atlas_head_neck

    ants = transforms.load_ants()
    ct = atlas_head_neck(ants.image_read(str(atlas["ct"])).clone("float"))
    prep = field_of_view.resample_iso(ct, TEMPLATE_SPACING_MM)
    ants.image_write(prep, out_path)
    return out_path, int(np.prod(prep.shape))


def _register(fixed_path: str, moving_path: str, prefix: str, deformable: bool,
              initial: list[str] | None) -> dict:
    """One atlas to the current template (in a worker process on one ITK thread): the forward
    transforms, and the atlas's CT on the template grid (air outside its field of view) and its
    coverage written beside them (``<prefix>warped.nii.gz``, ``<prefix>cover.nii.gz``)."""
    from glandpet.registration import sessions, transforms
    from glandpet.segmentation.atlas_registration import ATLAS_LINEAR_STAGES, ATLAS_STAGES

    ants = transforms.load_ants()
    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    stages = ATLAS_STAGES if deformable else ATLAS_LINEAR_STAGES
    if initial:
        r = transforms.run_registration(fixed, moving, stages, prefix, initial=initial)
    else:
        r = sessions.register_ct_to_ct(fixed, moving, prefix, stages, init="search")
    fwd = r["fwdtransforms"]
    ants.image_write(ants.apply_transforms(fixed, moving, fwd, interpolator="linear", defaultvalue=OUTSIDE_HU),
                     prefix + "warped.nii.gz")
    ants.image_write(ants.apply_transforms(fixed, moving * 0 + 1, fwd, interpolator="linear", defaultvalue=0),
                     prefix + "cover.nii.gz")
    return {"fwd": list(fwd), "affine": next(p for p in fwd if p.endswith(".mat"))}


def _worker(jobs: list[dict]) -> None:
    """A worker process's share of a pass: each job's :func:`_register`, its result and CPU time in
    ``<prefix>result.json``."""
    from glandpet.registration import transforms

    transforms.set_threads(1)
    for job in jobs:
        t0 = time.process_time()
        out = _register(job["fixed"], job["moving"], job["prefix"], job["deformable"], job["initial"])
        out["cpu_seconds"] = time.process_time() - t0
        Path(job["prefix"] + "result.json").write_text(json.dumps(out))


def _run_pass(jobs: list[dict], workers: int, progress=None, done: int = 0, total: int = 0) -> list[dict]:
    """The jobs of one pass in ``workers`` separate Python processes (one ITK thread each: the
    result does not depend on ``workers``), round-robin; their results in order."""
    import subprocess
    import sys

    workers = max(1, min(int(workers), len(jobs)))
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "glandpet.segmentation.atlas_template",
                               json.dumps(jobs[w::workers])], env=env, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            errors.append((err or "").strip().splitlines()[-1:] or [f"exit code {p.returncode}"])
    if errors:
        raise RuntimeError(f"atlas template: a registration failed: {errors[0][0]}")
    from glandpet.registration import transforms

    ants = transforms.load_ants()
    results = []
    for job in jobs:
        r = json.loads(Path(job["prefix"] + "result.json").read_text())
        r["warped"] = ants.image_read(job["prefix"] + "warped.nii.gz").numpy()
        r["cover"] = ants.image_read(job["prefix"] + "cover.nii.gz").numpy()
        results.append(r)
        done += 1
        if progress is not None:
            progress(done, total)
    return results


def _mean(results: list[dict]) -> np.ndarray:
    """Mean CT over the atlases covering each voxel; air where none does."""
    num = sum(r["warped"] * r["cover"] for r in results)
    den = sum(r["cover"] for r in results)
    return np.where(den > 0.5, num / np.maximum(den, 1e-6), OUTSIDE_HU).astype(np.float32)


def build_template(atlases: Sequence[Mapping[str, str]], out_dir: str | Path, *, workers: int = 1,
                   progress=None) -> AtlasTemplate:
    """Build the template of ``atlases`` into ``out_dir`` (created; atomically: a temporary sibling
    folder renamed at the end). ``workers``: registrations side by side (one ITK thread each).
    ``progress(done, total)`` is called after every registration."""
    from glandpet.registration import transforms
    from glandpet.segmentation.atlas_registration import atlas_name

    ants = transforms.load_ants()
    names = [atlas_name(a) for a in atlases]
    if len(set(names)) != len(names):
        raise ValueError("atlas names must be unique to build a template")
    if len(atlases) < 2:
        raise ValueError("a template needs at least 2 atlases")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    key = library_key(atlases)
    t_wall = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    total, done = len(atlases) * (TEMPLATE_PASSES + 1), 0
    cpu = 0.0
    try:
        c0 = time.process_time()
        preps = [_prepare(a, str(tmp / f"prep_{i:03d}.nii.gz")) for i, a in enumerate(atlases)]
        ref = int(np.argmax([n for _, n in preps]))
        template_path = str(tmp / "template_pass0.nii.gz")
        shutil.copyfile(preps[ref][0], template_path)
        cpu += time.process_time() - c0
        initial: list[list[str] | None] = [None] * len(atlases)
        for p in range(TEMPLATE_PASSES + 1):
            jobs = [{"fixed": template_path, "moving": preps[i][0], "prefix": str(tmp / f"p{p}_a{i:03d}_"),
                     "deformable": p > 0, "initial": initial[i]} for i in range(len(atlases))]
            results = _run_pass(jobs, workers, progress, done, total)
            done += len(jobs)
            cpu += sum(r["cpu_seconds"] for r in results)
            initial = [[r["affine"]] for r in results]
            if p == TEMPLATE_PASSES:
                break
            ref_img = ants.image_read(template_path)
            template_path = str(tmp / f"template_pass{p + 1}.nii.gz")
            ants.image_write(ref_img.new_image_like(_mean(results)), template_path)
        # the template is the image the last pass registered to
        final = tmp / "template.nii.gz"
        shutil.copyfile(template_path, final)
        atlas_transforms = {}
        for i, (name, r) in enumerate(zip(names, results)):
            kept = []
            for j, path in enumerate(r["fwd"]):
                dest = tmp / f"atlas{i:03d}_{j}{''.join(Path(path).suffixes)}"
                shutil.copyfile(path, dest)
                kept.append(dest.name)
            atlas_transforms[name] = kept
        for f in tmp.iterdir():  # keep only the template and the atlases' transforms
            if f.name != final.name and not f.name.startswith("atlas"):
                f.unlink()
        build = {"atlases": len(atlases), "reference": names[ref], "passes": TEMPLATE_PASSES,
                 "spacing_mm": TEMPLATE_SPACING_MM, "registrations": total, "workers": int(workers),
                 "cpu_seconds": round(cpu, 1), "seconds": round(time.perf_counter() - t_wall, 1),
                 "version": TEMPLATE_VERSION}
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "atlases": names, "template": final.name,
                                                "atlas_transforms": atlas_transforms, "build": build}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_template(out_dir, atlases, key=key)


def load_template(directory: str | Path, atlases: Sequence[Mapping[str, str]] | None = None, *,
                  key: str | None = None) -> AtlasTemplate:
    """A built template. With ``atlases`` (or their ``key``) given, ValueError unless it was built
    from exactly these atlases (checksums) with today's building parameters."""
    directory = Path(directory)
    man = json.loads((directory / MANIFEST).read_text())
    if atlases is not None or key is not None:
        want = key or library_key(atlases)  # type: ignore[arg-type]
        if man["key"] != want:
            raise ValueError(f"the atlas template in {directory} was built from other atlases (or an older glandpet); "
                             "rebuild it")
    return AtlasTemplate(directory=directory, key=man["key"], image=directory / man["template"],
                         atlas_transforms={n: [str(directory / f) for f in fs] for n, fs in man["atlas_transforms"].items()},
                         build=man.get("build", {}))


def default_cache_root(atlases: Sequence[Mapping[str, str]]) -> Path:
    """Beside the library (the atlases' common parent folder) when writable, else the user's cache."""
    parents = [str(Path(a["ct"]).resolve().parent.parent) for a in atlases]
    common = Path(os.path.commonpath(parents)) / ".glandpet-templates"
    probe = common if common.exists() else common.parent
    # the mode bits too: root may write into a folder its owner made read-only (a shared library)
    if os.access(probe, os.W_OK) and probe.stat().st_mode & 0o222:
        return common
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glandpet" / "atlas-templates"


def template_for(atlases: Sequence[Mapping[str, str]], cache_root: str | Path | None = None, *, workers: int = 1,
                 progress=None) -> AtlasTemplate:
    """The template of ``atlases``: read from the cache when built before (same checksums), else
    built there (:func:`build_template`)."""
    key = library_key(atlases)
    root = Path(cache_root) if cache_root else default_cache_root(atlases)
    folder = root / key[:16]
    if (folder / MANIFEST).is_file():
        try:
            return load_template(folder, key=key)
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # another library's prefix, or a damaged manifest: rebuild
    return build_template(atlases, folder, workers=workers, progress=progress)


if __name__ == "__main__":  # a worker of :func:`_run_pass`
    import sys

    _worker(json.loads(sys.argv[1]))

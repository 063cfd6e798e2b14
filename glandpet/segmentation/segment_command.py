"""`glandpet segment CT.nii.gz OUT_dseg.nii.gz --atlas DIR [--atlas DIR ...] [--config CONFIG]
[--threads N]`: the workflow's gland segmentation (:func:`glandpet.segmentation.multi_atlas.segment_subject`,
parameters from :meth:`glandpet.segmentation.params.SegmentationParams.from_config`) on one CT,
outside a study.

Also the checks shared with ``glandpet atlas validate``: an atlas folder as ``glandpet atlas add``
writes it (:func:`read_atlas_dir`), a NIfTI that must be readable (:func:`check_nifti`), a CT that must show a body
(:func:`check_ct`), and the
``segmentation:`` keys of a config (:func:`load_segmentation_config`). Problems are
:class:`glandpet.errors.UserError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glandpet.errors import UserError
from glandpet.repository import CONFIG_SCHEMA, DEFAULT_CONFIG

__all__ = ["add_subparser", "check_ct", "check_nifti", "dseg_table_path", "load_segmentation_config", "read_atlas_dir", "run"]

ATLAS_FILES = ("ct.nii.gz", "labels.nii.gz", "labels.tsv")
#: registration threads of the `segment` / `atlas validate` commands; the workflow's segment rule runs
#: one (rules/segment.smk: bit-reproducible labels), a command run by hand may take two
DEFAULT_THREADS = 2


def add_subparser(subparsers) -> argparse.ArgumentParser:
    sg = subparsers.add_parser(
        "segment", help="segment the glands in one CT with atlases (the workflow's segmentation, outside a study)",
        description="Multi-atlas segmentation of the salivary and lacrimal glands in one CT, exactly as the "
                    "workflow's segment step does it. Writes OUT_dseg (the CT's grid, default label values) and "
                    "the label table beside it (OUT_dseg.tsv: index, gland, side).")
    sg.add_argument("ct", metavar="CT.nii.gz", help="the CT (NIfTI, HU)")
    sg.add_argument("output", metavar="OUT_dseg.nii.gz", help="output label map (.nii.gz or .nii)")
    sg.add_argument("--atlas", action="append", required=True, metavar="DIR",
                    help="an atlas folder as `glandpet atlas add` writes it (ct.nii.gz, labels.nii.gz, labels.tsv); repeat")
    sg.add_argument("--config", default=None, metavar="CONFIG",
                    help="a study config (its `segmentation:` keys) or a YAML of those keys; default: the workflow's defaults")
    sg.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                    help=f"threads for registration (default {DEFAULT_THREADS}; the workflow uses 1: bit-reproducible labels)")
    sg.set_defaults(func=run)
    return sg


# ------------------------------------------------------------------------------ inputs (numpy etc. imported
# inside the functions: `glandpet --help` builds this parser)
def check_nifti(path: str | Path, what: str, *, data: bool = True):
    """The nibabel image of a 3-D NIfTI file, or a UserError naming ``what`` and the file. With
    ``data`` the voxels are read too (a truncated file fails here, not minutes later)."""
    import nibabel as nib
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found")
    try:
        img = nib.load(str(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"not NIfTI ({type(img).__name__})")
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise ValueError(f"expected a 3-D image, got shape {tuple(img.shape)}")
        if data:
            np.asanyarray(img.dataobj)
    except UserError:
        raise
    except Exception as exc:  # nibabel raises many kinds (ImageFileError, EOFError, zlib.error, ...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what} {p} is not a readable NIfTI image: {msg}") from None
    return img


def check_ct(path: str | Path, what: str):
    """:func:`check_nifti` of a CT, whose voxels must also hold an image with a body in it: finite
    values, not all equal, some above the body threshold (:data:`glandpet.registration.field_of_view.BODY_HU`).
    An all-zero or all-air volume (a failed export, a mask saved as the CT) fails here with one
    line instead of a registration error minutes later."""
    import numpy as np

    from glandpet.registration.field_of_view import BODY_HU

    img = check_nifti(path, what)
    data = np.asanyarray(img.dataobj)
    finite = np.isfinite(data)
    if not finite.all():
        raise UserError(f"{what} {path} holds {int((~finite).sum())} non-finite voxel(s) (NaN or infinity)")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise UserError(f"{what} {path} holds no image: every voxel is {lo:g}")
    if hi <= BODY_HU:
        raise UserError(f"{what} {path} shows no body: no voxel above {BODY_HU:g} HU (values {lo:g} to {hi:g}; "
                        "is it a CT in Hounsfield units?)")
    return img


def _same_grid(a, b) -> bool:
    import numpy as np

    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=1e-3)


def read_atlas_dir(path: str | Path) -> dict[str, Any]:
    """Check an atlas folder and return ``{name, ct, labels, label_table, glands}`` (paths as str;
    ``glands``: the ``gland_side`` names with voxels). UserError for a missing folder or file, an
    unreadable NIfTI or label table, CT and labels on different grids, or no gland at all."""
    import numpy as np

    from glandpet.glands import read_label_table

    d = Path(path)
    if not d.is_dir():
        raise UserError(f"atlas folder {d} not found")
    missing = [f for f in ATLAS_FILES if not (d / f).is_file()]
    if missing:
        raise UserError(f"atlas {d} lacks {', '.join(missing)} (an atlas folder holds {', '.join(ATLAS_FILES)}: "
                        "see `glandpet atlas add`)")
    ct = check_ct(d / "ct.nii.gz", f"atlas {d.name}: CT")
    lab = check_nifti(d / "labels.nii.gz", f"atlas {d.name}: label map")
    if not _same_grid(ct, lab):
        raise UserError(f"atlas {d}: ct.nii.gz and labels.nii.gz are on different grids "
                        f"(shape {tuple(ct.shape)} vs {tuple(lab.shape)}, or different affines)")
    try:
        table = read_label_table(d / "labels.tsv")
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"atlas {d}: {str(exc).splitlines()[0]}") from None
    values = np.unique(np.rint(np.asanyarray(lab.dataobj)).astype(np.int64))
    glands = [t.name for t in table if t.index in set(values.tolist())]
    if not glands:
        listed = ", ".join(f"{t.index}={t.name}" for t in table)
        raise UserError(f"atlas {d} holds none of the glands: no voxel of labels.nii.gz carries a label of "
                        f"labels.tsv ({listed}; values present: {', '.join(map(str, values.tolist()))})")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", d.resolve().name).strip("_") or "atlas"
    return {"name": name, "ct": str(d / "ct.nii.gz"), "labels": str(d / "labels.nii.gz"),
            "label_table": str(d / "labels.tsv"), "glands": glands}


def _segmentation_schema() -> dict | None:
    import yaml

    sp = CONFIG_SCHEMA
    if not sp.is_file():
        return None
    return (yaml.safe_load(sp.read_text()) or {}).get("properties", {}).get("segmentation")


def _default_segmentation() -> dict:
    import yaml

    p = DEFAULT_CONFIG
    if not p.is_file():
        return {}
    return dict((yaml.safe_load(p.read_text()) or {}).get("segmentation") or {})


def load_segmentation_config(path: str | Path | None) -> dict:
    """The ``segmentation:`` keys of a study config (or of a YAML holding only those keys), over the
    workflow's defaults (config.yaml), validated against config.schema.yaml's ``segmentation``
    section. ``None``: the defaults. UserError naming the key for an invalid value or unknown key."""
    import jsonschema
    import yaml

    seg = _default_segmentation()
    if path is None:
        return seg
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found")
    try:
        user = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(user, Mapping):
        raise UserError(f"config file {p}: expected keys and values (a mapping)")
    schema = _segmentation_schema()
    keys = set((schema or {}).get("properties", {}))
    if "segmentation" in user:
        part = user["segmentation"] or {}
    elif set(user) & keys:  # a YAML of the segmentation keys themselves
        part = user
    else:  # a study config without a segmentation section: the defaults
        part = {}
    if not isinstance(part, Mapping):
        raise UserError(f"config file {p}: segmentation: expected keys and values (a mapping)")
    seg.update(part)
    if schema is not None:
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(seg),
                        key=lambda e: [str(x) for x in e.absolute_path])
        if errors:
            err = errors[0]
            if err.validator == "additionalProperties":
                extra = re.findall(r"'([^']+)'", err.message)
                raise UserError(f"config file {p}: unknown key segmentation.{', segmentation.'.join(extra)} "
                                f"(known: {', '.join(sorted(keys))})")
            key = ".".join(["segmentation", *[str(x) for x in err.absolute_path]])
            raise UserError(f"config file {p}: key {key}: {err.message}")
    return seg


def dseg_table_path(out_dseg: str | Path) -> Path:
    """``X_dseg.nii.gz`` -> ``X_dseg.tsv`` (the label table beside a label map)."""
    from glandpet.layout import beside

    try:
        return Path(beside(out_dseg, ".tsv"))
    except ValueError:
        raise UserError(f"output {out_dseg} must end in .nii.gz or .nii") from None


# ------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    from glandpet.glands import read_label_table
    from glandpet.segmentation.multi_atlas import segment_subject
    from glandpet.segmentation.params import SegmentationParams

    out_tsv = dseg_table_path(args.output)
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, not {args.threads}")
    ct = check_ct(args.ct, "CT")
    atlases = [read_atlas_dir(d) for d in args.atlas]
    names = [a["name"] for a in atlases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"atlas folder(s) given twice: {', '.join(dup)}")
    seg = load_segmentation_config(args.config)
    params = SegmentationParams.from_config(seg)
    out = sys.stdout
    print(f"glandpet segment: {Path(args.ct).name} ({'x'.join(map(str, ct.shape[:3]))}) with {len(atlases)} "
          f"atlas(es), {args.threads} thread(s)", file=out, flush=True)
    metrics = segment_subject(args.ct, [{k: a[k] for k in ("name", "ct", "labels", "label_table")} for a in atlases],
                              args.output, out_tsv, params, threads=args.threads)
    vols = metrics.get("volumes_ml", {})
    for lab in read_label_table(out_tsv):
        print(f"  {lab.index:>2}  {lab.name:<20} {vols.get(lab.name, 0.0):8.2f} mL", file=out)
    if metrics.get("labels_absent"):
        print(f"  no atlas holds: {', '.join(metrics['labels_absent'])}", file=out)
    print(f"-> {args.output}, {out_tsv}  ({metrics.get('seconds_total', 0.0):.0f} s)", file=out)
    return 0

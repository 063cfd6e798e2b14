"""`glandpet atlas add ATLAS_DIR --ct CT_SERIES_DIR --rtstruct RS.dcm [--map MAP.tsv]`: an atlas from
a team's own RTSTRUCT contours (logic in :mod:`glandpet.dicom.rtstruct`; this module is the command line)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register `glandpet atlas` (subcommands `add`, `validate`) on the top-level subparsers."""
    at = subparsers.add_parser("atlas", help="build segmentation atlases from a team's own contours (RTSTRUCT); validate a library")
    asub = at.add_subparsers(dest="atlas_command", required=True, metavar="ATLAS_COMMAND")
    ad = asub.add_parser(
        "add", help="convert a CT series + RTSTRUCT into ATLAS_DIR/{ct.nii.gz, labels.nii.gz, labels.tsv}",
        description="Rasterise the RTSTRUCT's gland contours onto the CT grid (voxel centres inside the closed "
                    "polygons, even-odd rule) and write an atlas for the `atlases:` config key. ROI names are "
                    "mapped to gland and side (the patient's side) by a default table of common conventions "
                    "(TG-263 Parotid_L / Glnd_Submand_R, 'PAROTID LT', 'Lt Parotid', 'SMG_R', ...); --map overrides.")
    ad.add_argument("atlas_dir", metavar="ATLAS_DIR", help="output folder (its name is the atlas name)")
    ad.add_argument("--ct", required=True, metavar="CT_SERIES_DIR", help="folder of the CT series the contours were drawn on")
    ad.add_argument("--rtstruct", required=True, metavar="RS.dcm", help="the RTSTRUCT file")
    ad.add_argument("--map", default=None, metavar="MAP.tsv",
                    help="TSV roi_name, gland, side mapping ROI names (gland 'ignore' drops an ROI); overrides the default map")
    ad.add_argument("--force", action="store_true", help="overwrite an existing atlas in ATLAS_DIR")
    ad.set_defaults(func=run)
    from glandpet.segmentation.atlas_validate import add_subparser as add_validate

    add_validate(asub)  # glandpet atlas validate
    return at


def _atlas_name(atlas_dir: Path) -> str:
    name = atlas_dir.resolve().name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "atlas"


def run(args: argparse.Namespace) -> int:
    from glandpet.dicom.rtstruct import build_atlas

    res = build_atlas(args.atlas_dir, args.ct, args.rtstruct, args.map, force=args.force)
    d = Path(args.atlas_dir)
    out = sys.stdout
    print(f"glandpet atlas add: {len(res['glands'])} gland label(s) on the CT grid -> {d}", file=out)
    w = max(len(g) for g in res["glands"])
    for g in res["glands"]:
        print(f"  {g:<{w}}  {res['volumes_ml'][g]:8.2f} mL   from ROI '{res['roi_of'][g]}'", file=out)
    if res["unmapped"]:
        print(f"  not mapped ({len(res['unmapped'])}): " + ", ".join(f"'{n}'" for n in res["unmapped"])
              + "  (add them to --map MAP.tsv if they are glands)", file=out)
    if res["ignored"]:
        print("  ignored by --map: " + ", ".join(f"'{n}'" for n in res["ignored"]), file=out)
    for msg in res["warnings"]:
        print(f"  warning: {msg}", file=out)
    name = _atlas_name(d)
    print("\nAdd to the `atlases:` list of your config:", file=out)
    q = {k: json.dumps(str(d / f)) for k, f in (("ct", "ct.nii.gz"), ("labels", "labels.nii.gz"), ("tsv", "labels.tsv"))}
    print(f"  - {{name: {name}, ct: {q['ct']}, labels: {q['labels']}, label_table: {q['tsv']}}}", file=out)
    if not d.is_absolute():
        print("  (paths relative to this folder: run snakemake from here, or make them absolute)", file=out)
    return 0

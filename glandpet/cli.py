"""The `glandpet` command. Parsers live here; each command's work lives in its module (imported lazily,
so that `glandpet --help` stays fast)."""

from __future__ import annotations

import argparse
import sys

from glandpet import __version__
from glandpet.segmentation import atlas_add
from glandpet.segmentation import segment_command
from glandpet.study import commands
from glandpet.errors import UserError


def _phantom(args: argparse.Namespace) -> int:
    from glandpet.phantom.cohort import run_phantom

    return run_phantom(args)


def _index(args: argparse.Namespace) -> int:
    from glandpet.dicom.catalog import run_index

    return run_index(args)


def _suv_factors(args: argparse.Namespace) -> int:
    from glandpet.suv.factors import run_suv_factors

    return run_suv_factors(args)


def _convert(args: argparse.Namespace) -> int:
    from glandpet.dicom.convert import run_convert

    return run_convert(args)


# What `glandpet --help` says (the module docstring is for developers).
DESCRIPTION = ("Dual-tracer (PSMA/FAPI) PET/CT of the salivary and lacrimal glands: synthetic phantoms, DICOM "
               "indexing and conversion, atlases, and a study's set-up and pre-flight check. The workflow "
               "itself (DICOM to per-gland tables) runs with `snakemake --cores all` in the glandpet folder.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glandpet", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"glandpet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ph = sub.add_parser("phantom", help="write a synthetic head-and-neck PET/CT cohort with ground truth")
    ph.add_argument("outdir")
    ph.add_argument("--subjects", type=int, default=6, help="number of subjects (default 6)")
    ph.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ph.add_argument("--anatomy-from", default=None, metavar="LABELS_DIR",
                    help="build individuals from real gland label maps (e.g. the TCIA H&N OAR NRRDs)")
    ph.add_argument("--atlases", type=int, default=3, help="number of atlas individuals (default 3)")
    ph.add_argument("--pss-fraction", type=float, default=0.6, help="fraction of pSS subjects (default 0.6)")
    ph.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    ph.add_argument("--atlas-dicom", action="store_true",
                    help="also write each atlas as DICOM CT + RTSTRUCT (atlases/<name>/dicom/{ct/,rtstruct.dcm})")
    ph.add_argument("--followups", type=int, default=0, metavar="N",
                    help="the first N pSS subjects also get a follow-up scan of each tracer ~180 days later with a "
                         "planted change of gland uptake (sessions psma2, fapi2 in truth/gland_truth.parquet; default 0)")
    ph.set_defaults(func=_phantom)

    ix = sub.add_parser("index", help="index a DICOM tree into a series table (no identifiers)")
    ix.add_argument("dicom_root")
    ix.add_argument("-o", "--output", required=True, help="series table (.parquet)")
    ix.add_argument("--subjects", default=None, help="subject sheet (TSV) giving pseudonymous ids")
    ix.add_argument("--overrides", default=None, help="TSV (subject_id, session, series_key) choosing series by hand")
    ix.add_argument("--jobs", type=int, default=1, help="parallel header readers (default 1)")
    ix.set_defaults(func=_index)

    sf = sub.add_parser("suv-factors", help="print the SUV factors of a PET series as JSON")
    sf.add_argument("series_dir")
    sf.set_defaults(func=_suv_factors)

    cv = sub.add_parser("convert", help="convert one DICOM series to NIfTI (+ JSON sidecar)")
    cv.add_argument("series_dir")
    cv.add_argument("output")
    cv.add_argument("--suv", default="none", choices=["bw", "bsa", "lbm", "lbm_janmahasatian", "ibw", "none"],
                    help="a PET in this SUV type instead of Bq/mL (default none)")
    cv.set_defaults(func=_convert)
    segment_command.add_subparser(sub)  # glandpet segment
    atlas_add.add_subparser(sub)  # glandpet atlas add, validate
    commands.add_subparsers(sub)  # glandpet init, check
    from glandpet.dicom.export import add_subparser as add_export

    add_export(sub)  # glandpet export dicom
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"glandpet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Command-line plumbing of `glandpet init` and `glandpet check` (logic in :mod:`glandpet.study.draft` and
:mod:`glandpet.study.preflight`)."""

from __future__ import annotations

import argparse
import os

_JOBS = max(1, min(4, os.cpu_count() or 1))


def _init(args: argparse.Namespace) -> int:
    from glandpet.study.draft import run_init

    return run_init(args)


def _check(args: argparse.Namespace) -> int:
    from glandpet.study.preflight import run_check_command

    return run_check_command(args)


def add_subparsers(subparsers) -> None:
    """Register `glandpet init` and `glandpet check` on the top-level subparsers."""
    it = subparsers.add_parser(
        "init", help="draft a study from a DICOM export: subjects.tsv, linkage-key.tsv, config.yaml",
        description="Index DICOM_ROOT once, find each patient's PSMA/FAPI sessions and write STUDY_DIR/subjects.tsv "
                    "(pseudonymous ids, group left empty), STUDY_DIR/linkage-key.tsv (subject_id <-> PatientID, "
                    "owner-only) and a commented STUDY_DIR/config.yaml. Re-running keeps existing ids and adds "
                    "new patients.")
    it.add_argument("dicom_root", metavar="DICOM_ROOT")
    it.add_argument("study_dir", metavar="STUDY_DIR")
    it.add_argument("--atlas", action="append", default=[], metavar="ATLAS_DIR",
                    help="an atlas folder (ct.nii.gz, labels.nii.gz, labels.tsv) for the config's atlases key; repeat")
    it.add_argument("--jobs", type=int, default=_JOBS,
                    help=f"parallel header readers (default {_JOBS}: the CPUs, at most 4)")
    it.add_argument("--quiet", action="store_true", help="no progress display")
    it.set_defaults(func=_init)

    ck = subparsers.add_parser(
        "check", help="pre-flight of a study: config, subject sheet, series, SUV and atlases, from headers",
        description="Check a study config before running: exits 1 and prints one table of problems by subject "
                    "when a problem would stop the run, 0 otherwise.")
    ck.add_argument("config", metavar="CONFIG")
    ck.add_argument("--base-dir", default=".", help="folder relative paths of the config are taken from (default: .)")
    ck.add_argument("--jobs", type=int, default=_JOBS,
                    help=f"parallel header readers (default {_JOBS}: the CPUs, at most 4)")
    ck.add_argument("--quiet", action="store_true", help="no progress display")
    ck.set_defaults(func=_check)

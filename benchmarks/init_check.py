"""Time `glandpet init` and `glandpet check` on a PACS-style export of N patients (default 200).

The export is built from the headers of a small phantom cohort: each patient is a clone of a phantom
subject (new PatientID and UIDs) with every `--stride`-th slice and a `--matrix` x `--matrix` pixel
matrix (init and check read headers only), laid out as DICOM/<date>/<8 hex>/IM00001 with several
patients per date folder. Prints one line per step and a JSON summary.

    python benchmarks/init_check.py --patients 200 --jobs 2 [--workdir DIR] [--cohort PHANTOM_DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--stride", type=int, default=10, help="keep every n-th slice (default 10)")
    ap.add_argument("--matrix", type=int, default=16, help="pixel matrix of the clones (default 16)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cohort", default=None, help="an existing phantom cohort (default: generate 2 subjects)")
    ap.add_argument("--workdir", default=None, help="keep the export here (default: a temporary folder)")
    args = ap.parse_args(argv)

    from glandpet.phantom.cohort import generate_cohort
    from glandpet.phantom.pacs_export import build_pacs_export, reduced_cohort
    from glandpet.study.preflight import ERROR, load_config, run_check
    from glandpet.study.draft import init_study

    work = Path(args.workdir or tempfile.mkdtemp(prefix="glandpet-initcheck-"))
    work.mkdir(parents=True, exist_ok=True)
    cohort = Path(args.cohort) if args.cohort else work / "phantom"
    if not (cohort / "dicom").is_dir():
        generate_cohort(cohort, 2, seed=5, n_atlases=1, progress=True)
    templates = sorted(p.name for p in (cohort / "dicom").iterdir() if p.is_dir())
    clones, export, study = work / "clones", work / "export", work / "study"
    for d in (clones, export, study):
        shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    n_files = reduced_cohort(cohort / "dicom", clones,
                             {f"X{i:05d}": (templates[i % len(templates)], f"BM{i:06d}") for i in range(args.patients)},
                             slice_stride=args.stride, matrix=args.matrix)
    build_pacs_export(clones, export, patients_per_date=5, seed=1)
    print(f"export: {args.patients} patients, {n_files} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    atlas = sorted((cohort / "atlases").iterdir())[0]
    t = time.perf_counter()
    res = init_study(export, study, jobs=args.jobs, progress=True, atlases=[atlas])
    t_init = time.perf_counter() - t
    sheet = pd.read_csv(study / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["group"] = ["pss" if "psma" in s else "control" for s in sheet["sessions"]]
    sheet.to_csv(study / "subjects.tsv", sep="\t", index=False)

    config = load_config(study / "config.yaml")
    t = time.perf_counter()
    problems = run_check(config, jobs=args.jobs, progress=True)
    t_check = time.perf_counter() - t
    out = {"patients": args.patients, "files": n_files, "jobs": args.jobs, "init_seconds": round(t_init, 2),
           "check_seconds": round(t_check, 2), "subjects_in_sheet": len(res.sheet),
           "check_errors": sum(p.status == ERROR for p in problems), "check_problems": len(problems),
           "workdir": str(work)}
    print(f"init:  {t_init:.1f} s ({n_files / t_init:.0f} files/s)\ncheck: {t_check:.1f} s ({n_files / t_check:.0f} files/s)")
    print(json.dumps(out))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()

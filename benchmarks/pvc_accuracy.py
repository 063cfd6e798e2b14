"""PVC accuracy on the phantom: median |error| of uncorrected vs GTM SUVmean per gland against the
true SUVmean.

With the TRUE gland masks and PET-to-CT transform (the method, not the segmentation), for the PSF
the phantom blurred with, the ``auto`` PSF (glandpet.measure.pvc.auto_fwhm_mm of what each session's
DICOM header records) and the former fixed default (6.5 mm)::

    python benchmarks/pvc_accuracy.py COHORT_DIR

With ``--results RESULTS`` (a finished workflow run on a phantom cohort, truth in
RESULTS/demo/truth unless --truth says otherwise): the same with the pipeline's OWN masks and
registrations, for the PSF the run used and for ``auto``::

    python benchmarks/pvc_accuracy.py --results RESULTS [--truth TRUTH_DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from glandpet.phantom.validation import pipeline_pvc_errors, pvc_errors


def _med_abs(x) -> float:
    return float(np.median(np.abs(x)))


def true_masks(cohort: str) -> pd.DataFrame:
    med, n, psf = {}, None, {}
    for label, fwhm in (("true PSF", None), ("auto PSF", "auto"), ("PSF 6.5 mm", 6.5)):
        df = pvc_errors(cohort, fwhm)
        g = df.groupby("gland")
        med["uncorrected"] = g["raw_err_pct"].apply(_med_abs)
        med[f"GTM, {label}"] = g["gtm_err_pct"].apply(_med_abs)
        n = g.size()
        psf[label] = df.groupby("session")["fwhm_mm"].median()
    out = pd.DataFrame(med)
    out["n"] = n
    print("median |error| % vs the true SUVmean (true masks, true PET->CT transform)")
    print(out.round(1).to_string())
    print("median PSF FWHM (mm) by session:", {k: v.round(2).to_dict() for k, v in psf.items()})
    return out


def pipeline_masks(results: str, truth: str) -> pd.DataFrame:
    run = pipeline_pvc_errors(results, truth)
    auto = pipeline_pvc_errors(results, truth, {"method": "gtm", "fwhm_mm": {"psma": "auto", "fapi": "auto"}})
    g, ga = run.groupby("gland"), auto.groupby("gland")
    out = pd.DataFrame({
        "volume": g["volume_err_pct"].apply(_med_abs),
        "uncorrected": g["raw_err_pct"].apply(_med_abs),
        f"GTM, run's PSF ({run['pvc_fwhm_mm'].median():.1f} mm)": g["pvc_err_pct"].apply(_med_abs),
        "GTM, auto PSF": ga["pvc_err_pct"].apply(_med_abs),
        "n": g.size(),
    })
    print("median |error| % vs the truth (the pipeline's own masks and registrations)")
    print(out.round(1).to_string())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort", nargs="?", help="phantom cohort (true masks)")
    ap.add_argument("--results", help="a finished workflow run on a phantom cohort (pipeline masks)")
    ap.add_argument("--truth", help="the cohort's truth folder (default RESULTS/demo/truth)")
    a = ap.parse_args(argv)
    if not a.cohort and not a.results:
        ap.error("give a cohort folder, --results, or both")
    if a.cohort:
        true_masks(a.cohort)
    if a.results:
        pipeline_masks(a.results, a.truth or str(Path(a.results) / "demo" / "truth"))


if __name__ == "__main__":
    main()

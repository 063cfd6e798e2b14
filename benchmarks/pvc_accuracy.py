"""PVC accuracy on the phantom: median |error| of uncorrected vs GTM SUVmean per gland against the
true SUVmean, with the true gland masks and PET-to-CT transform (the method, not the segmentation),
with the true PSF and with the default configured PSF (6.5 mm).

    python benchmarks/pvc_accuracy.py COHORT_DIR
"""

from __future__ import annotations

import sys

import numpy as np

from glandpet.phantom.validation import pvc_errors


def main(cohort: str) -> None:
    med = {}
    for label, fwhm in (("true PSF", None), ("PSF 6.5 mm", 6.5)):
        df = pvc_errors(cohort, fwhm)
        g = df.groupby("gland")
        med[f"uncorrected"] = g["raw_err_pct"].apply(lambda x: np.median(np.abs(x)))
        med[f"GTM, {label}"] = g["gtm_err_pct"].apply(lambda x: np.median(np.abs(x)))
    import pandas as pd

    out = pd.DataFrame(med)
    out["n"] = df.groupby("gland").size()
    print("median |error| % vs the true SUVmean (true masks, true PET->CT transform)")
    print(out.round(1).to_string())


if __name__ == "__main__":
    main(sys.argv[1])

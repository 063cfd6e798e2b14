"""PVC on the phantom (issue targets, medians over glands of the cohort): GTM SUVmean within 5 % of
the truth for parotid and submandibular and within 15 % for lacrimal, sublingual and tubarial,
with the true masks and the true or the ``auto`` PSF; the uncorrected means are biased low far
beyond that."""

import numpy as np
import pytest

from glandpet.phantom.validation import pvc_errors


@pytest.fixture(scope="module", params=[None, "auto"], ids=["true-psf", "auto-psf"])
def errors(small_cohort, request):
    """GTM with the PSF the phantom blurred with, and with the ``auto`` PSF that the pipeline
    derives from what the PET header records (glandpet.measure.pvc.auto_fwhm_mm)."""
    return pvc_errors(small_cohort, request.param)


@pytest.mark.parametrize("gland, limit", [("parotid", 5), ("submandibular", 5), ("lacrimal", 15),
                                          ("sublingual", 15), ("tubarial", 15)])
def test_gtm_recovers_the_true_mean(errors, gland, limit):
    e = errors[errors["gland"] == gland]
    assert len(e) >= 4
    assert np.median(np.abs(e["gtm_err_pct"])) <= limit
    assert np.median(e["raw_err_pct"]) < -limit  # partial-volume loss without correction


def test_auto_psf_follows_each_sessions_header(small_cohort):
    """``auto`` reads the nuclide and the post-filter from the phantom's DICOM headers (Siemens
    writes XYZGAUSSIAN4.00, GE and Philips nothing) and lands within 1 mm of the PSF the phantom
    blurred with (Ga-68 6.5-7.5 mm, F-18 5.0-6.0 mm)."""
    import pandas as pd

    from glandpet.phantom.validation import pet_sidecars
    from glandpet.measure.pvc import auto_fwhm_mm

    truth = pd.read_parquet(small_cohort / "truth" / "gland_truth.parquet")
    sessions = truth.groupby(["subject_id", "session"])[["tracer", "psf_fwhm_mm"]].first()
    sidecars = pet_sidecars(small_cohort)
    assert set(sidecars) == set(sessions.index)
    for key, row in sessions.iterrows():
        est = auto_fwhm_mm(sidecars[key])
        assert est.source == "sidecar" and est.nuclide == row["tracer"].split()[0].replace("-", "")
        assert abs(est.fwhm_mm - row["psf_fwhm_mm"]) <= 1.0, (key, est, row["psf_fwhm_mm"])


@pytest.mark.slow
def test_gtm_with_the_pipelines_own_masks(workflow_results):
    """The demo run's own segmentation and registrations (truth: the demo cohort's). Segmentation
    errors dominate here (volumes off by up to ~50 % for single glands at 2 atlases), so what is
    asserted is what holds honestly: GTM moves every gland type's median towards the truth, and
    the PSF used is recorded in every row."""
    import yaml

    from glandpet.phantom.validation import pipeline_pvc_errors

    df = pipeline_pvc_errors(workflow_results, workflow_results / "demo" / "truth")
    assert len(df) >= 20 and set(df["session"]) == {"psma", "fapi"}
    med = df.groupby("gland")[["raw_err_pct", "pvc_err_pct"]].agg(lambda x: np.median(np.abs(x)))
    assert (med["pvc_err_pct"] < med["raw_err_pct"]).all(), med
    assert np.median(np.abs(df["pvc_err_pct"])) < 0.5 * np.median(np.abs(df["raw_err_pct"]))
    cfg = yaml.safe_load((workflow_results.parent / "config.yaml").read_text())
    fwhm = (cfg.get("pvc") or {}).get("fwhm_mm") or {}
    assert df["pvc_fwhm_mm"].notna().all() and (df["pvc_fwhm_mm"] > 0).all()
    for ses, value in fwhm.items():
        if isinstance(value, (int, float)):
            assert (df.loc[df["session"] == ses, "pvc_fwhm_mm"] == value).all()

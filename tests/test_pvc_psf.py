"""The PSF FWHM per session: a configured number, or ``auto`` from what the PET sidecar records
(scanner resolution, the nuclide's positron range and the post-filter, in quadrature)."""

from __future__ import annotations

import math

import pytest

from glandpet.measure.pvc import DEFAULT_FILTER_FWHM_MM, POSITRON_RANGE_FWHM_MM, SCANNER_FWHM_MM, auto_fwhm_mm, recon_filter_from_kernel, recon_filter_from_sidecar, session_fwhm_mm


@pytest.mark.parametrize("kernel, expected", [
    ("XYZGAUSSIAN4.00", ("Gaussian", 4.0)),     # Siemens
    ("XYZ Gauss2.00", ("Gaussian", 2.0)),
    ("Gaussian 5 mm", ("Gaussian", 5.0)),
    (["XYZGAUSSIAN3.00", "ALL"], ("Gaussian", 3.0)),  # multi-valued LO
    ("ALL-PASS", ("none", 0.0)),
    ("AllPass", ("none", 0.0)),
    ("", None), (None, None), ("I40f\\3", None), ("STANDARD", None),
])
def test_filter_parsed_from_convolution_kernel(kernel, expected):
    assert recon_filter_from_kernel(kernel) == expected


def test_pet_bids_filter_fields_win_over_the_kernel():
    sc = {"ReconFilterType": "Gaussian", "ReconFilterSize": 2.5, "ConvolutionKernel": "XYZGAUSSIAN4.00"}
    assert recon_filter_from_sidecar(sc) == ("Gaussian", 2.5)
    assert recon_filter_from_sidecar({"ReconFilterType": "Gaussian", "ReconFilterSize": [2, 2, 5]}) == ("Gaussian", 3.0)
    assert recon_filter_from_sidecar({"ReconFilterType": "none", "ConvolutionKernel": "XYZGAUSSIAN4.00"}) == ("none", 0.0)
    assert recon_filter_from_sidecar({"ConvolutionKernel": "XYZGAUSSIAN4.00"}) == ("Gaussian", 4.0)
    assert recon_filter_from_sidecar({}) is None


def _quad(*v):
    return math.sqrt(sum(x * x for x in v))


@pytest.mark.parametrize("nuclide, key", [("Ga68", "Ga68"), ("Ga-68", "Ga68"), ("68Ga", "Ga68"),
                                           ("^68^Gallium", "Ga68"), ("F18", "F18"), ("F-18", "F18"),
                                           ("Fluorine-18", "F18")])
def test_auto_fwhm_adds_scanner_range_and_filter_in_quadrature(nuclide, key):
    est = auto_fwhm_mm({"TracerRadionuclide": nuclide, "ConvolutionKernel": "XYZGAUSSIAN2.00"})
    assert est.source == "sidecar" and est.nuclide == key and est.filter_fwhm_mm == 2.0
    assert est.fwhm_mm == pytest.approx(_quad(SCANNER_FWHM_MM, POSITRON_RANGE_FWHM_MM[key], 2.0), abs=1e-3)


def test_auto_fwhm_defaults_and_documented_values():
    none = auto_fwhm_mm(None)
    assert none.source == "default" and none.nuclide == "Ga68" and none.filter_fwhm_mm == DEFAULT_FILTER_FWHM_MM
    # the documented values with nothing recorded: Ga-68 ~6.9 mm, F-18 ~5.7 mm (the phantom's ranges)
    assert 6.5 <= none.fwhm_mm <= 7.5 and none.fwhm_mm == pytest.approx(6.93, abs=0.01)
    f18 = auto_fwhm_mm({"TracerRadionuclide": "F18"})
    assert 5.0 <= f18.fwhm_mm <= 6.0 and f18.fwhm_mm == pytest.approx(5.68, abs=0.01)
    # an unknown nuclide counts as Ga-68 (the wider PSF); an all-pass filter removes the filter term
    assert auto_fwhm_mm({"TracerRadionuclide": "Zr89"}).fwhm_mm == none.fwhm_mm
    nofilt = auto_fwhm_mm({"TracerRadionuclide": "F18", "ConvolutionKernel": "ALL-PASS"})
    assert nofilt.fwhm_mm == pytest.approx(_quad(SCANNER_FWHM_MM, 0.5), abs=1e-3)
    assert auto_fwhm_mm({"TracerRadionuclide": "F18"}, scanner_fwhm_mm=3.0).fwhm_mm == pytest.approx(_quad(3.0, 0.5, 4.0), abs=1e-3)


def test_session_fwhm_from_config_or_auto():
    pvc = {"method": "gtm", "fwhm_mm": {"psma": 6.5, "fapi": "auto"}, "scanner_fwhm_mm": 3.5}
    assert session_fwhm_mm(pvc, "psma", {"TracerRadionuclide": "F18"}).fwhm_mm == 6.5  # a number wins
    assert session_fwhm_mm(pvc, "psma").source == "config"
    fapi = session_fwhm_mm(pvc, "fapi", {"TracerRadionuclide": "F18", "ConvolutionKernel": "XYZGAUSSIAN5.00"})
    assert fapi.fwhm_mm == pytest.approx(_quad(3.5, 0.5, 5.0), abs=1e-3) and fapi.source == "sidecar"
    assert session_fwhm_mm({"method": "gtm"}, "fapi").source == "default"  # no entry: auto
    with pytest.raises(ValueError, match="pvc.fwhm_mm.psma"):
        session_fwhm_mm({"fwhm_mm": {"psma": "automatic"}}, "psma")
    with pytest.raises(ValueError, match="pvc.fwhm_mm.fapi"):
        session_fwhm_mm({"fwhm_mm": {"fapi": 0}}, "fapi")


def test_config_schema_accepts_auto_and_numbers_only():
    import yaml
    from snakemake.utils import validate

    from conftest import REPO

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["pvc"] = {"method": "gtm", "fwhm_mm": {"psma": "auto", "fapi": 5.5}, "scanner_fwhm_mm": 4.2}
    validate(cfg, str(REPO / "config.schema.yaml"))
    cfg["pvc"]["fwhm_mm"]["psma"] = "sidecar"
    with pytest.raises(Exception, match="psma"):
        validate(cfg, str(REPO / "config.schema.yaml"))

"""Tracer and radionuclide recognition on real-world header strings."""

import pytest

from glandpet.dicom.tracers import classify_tracer, radionuclide_from_half_life, radionuclide_from_text, tracer_slug

# (Radiopharmaceutical text, session, tracer, radionuclide or None)
CASES = [
    ("68Ga-PSMA-11", "psma", "PSMA-11", "Ga-68"),
    ("Ga-68 PSMA-11", "psma", "PSMA-11", "Ga-68"),
    ("GA68 PSMA", "psma", "PSMA", "Ga-68"),
    ("Ga-68-Gozetotide", "psma", "PSMA-11", "Ga-68"),
    ("gallium (68Ga) gozetotide", "psma", "PSMA-11", "Ga-68"),
    ("Illuccix", "psma", "PSMA-11", "Ga-68"),
    ("Locametz", "psma", "PSMA-11", "Ga-68"),
    ("Ga68-PSMA-HBED-CC", "psma", "PSMA-11", "Ga-68"),
    ("Pylarify", "psma", "DCFPyL", "F-18"),
    ("piflufolastat F 18", "psma", "DCFPyL", "F-18"),
    ("18F-DCFPyL", "psma", "DCFPyL", "F-18"),
    ("[18F]DCFPyL", "psma", "DCFPyL", "F-18"),
    ("Posluma", "psma", "rhPSMA-7.3", "F-18"),
    ("flotufolastat F18", "psma", "rhPSMA-7.3", "F-18"),
    ("18F-rhPSMA-7.3", "psma", "rhPSMA-7.3", "F-18"),
    ("F18 PSMA 1007", "psma", "PSMA-1007", "F-18"),
    ("18F-PSMA-1007", "psma", "PSMA-1007", "F-18"),
    ("PSMA1007", "psma", "PSMA-1007", None),
    ("Radelumin", "psma", "PSMA-1007", "F-18"),
    ("[68Ga]Ga-PSMA I&T", "psma", "PSMA I&T", "Ga-68"),
    ("Ga-68 PSMA-I&T", "psma", "PSMA I&T", "Ga-68"),
    ("177Lu-PSMA-617", "psma", "PSMA-617", "Lu-177"),
    ("Ga68-PSMA-617", "psma", "PSMA-617", "Ga-68"),
    ("FAPI 46", "fapi", "FAPI-46", None),
    ("68Ga-FAPI-04", "fapi", "FAPI-04", "Ga-68"),
    ("^68^Ga-FAPI-46", "fapi", "FAPI-46", "Ga-68"),
    ("[18F]FAPI-74", "fapi", "FAPI-74", "F-18"),
    ("Ga68 FAPI74", "fapi", "FAPI-74", "Ga-68"),
    ("FAP-2286", "fapi", "FAP-2286", None),
    ("68Ga-FAP-2286", "fapi", "FAP-2286", "Ga-68"),
    ("64Cu-FAPI-04", "fapi", "FAPI-04", "Cu-64"),
    ("GA 68 FAPI", "fapi", "FAPI", "Ga-68"),
    ("FDG -- fluorodeoxyglucose", None, "FDG", "F-18"),
    ("Fludeoxyglucose F^18^", None, "FDG", "F-18"),
    ("18FDG", None, "FDG", "F-18"),
    ("Ga68 DOTATATE", None, "DOTATATE", "Ga-68"),
    ("NETSPOT", None, "DOTATATE", None),
    ("11C-Choline", None, "choline", "C-11"),
    ("Axumin", None, "fluciclovine", "F-18"),
    ("Sodium Fluoride F18", None, "NaF", "F-18"),
]


@pytest.mark.parametrize("text,session,tracer,nuclide", CASES)
def test_real_world_strings(text, session, tracer, nuclide):
    m = classify_tracer(("Radiopharmaceutical", text))
    assert (m.session, m.tracer, m.radionuclide) == (session, tracer, nuclide), m
    assert m.matched_on == "Radiopharmaceutical"


def test_unknown_tracer_is_reported_not_guessed():
    m = classify_tracer(("Radiopharmaceutical", "XYZ-123"), ("SeriesDescription", "WB 3D"))
    assert m.session is None and m.tracer is None
    assert m.unrecognised == "XYZ-123"
    assert classify_tracer().tracer is None


def test_radionuclide_from_codes():
    m = classify_tracer(("Radiopharmaceutical", "PSMA"), radionuclide_codes=[("C-131A3", "SRT", "^68^Gallium")])
    assert (m.radionuclide, m.radionuclide_from) == ("Ga-68", "code")
    m = classify_tracer("FAPI-46", radionuclide_codes=["35337001"])  # SNOMED CT Ga-68
    assert m.radionuclide == "Ga-68"
    m = classify_tracer("PET", radionuclide_codes=[{"CodeValue": "C-111A1", "CodeMeaning": "^18^Fluorine"}])
    assert m.radionuclide == "F-18"
    m = classify_tracer("x", radionuclide_codes=[("99ZZZ", "99LOCAL", "Ga-68")])  # unknown value, meaning
    assert (m.radionuclide, m.radionuclide_from) == ("Ga-68", "code_meaning")
    m = classify_tracer("FAPI-04", half_life_s=4062.0)
    assert (m.radionuclide, m.radionuclide_from) == ("Ga-68", "half_life")


def test_radiopharmaceutical_code_meaning_and_field_priority():
    m = classify_tracer(("Radiopharmaceutical", ""), ("SeriesDescription", "WB AC"),
                        radiopharmaceutical_codes=[("Y-X1743", "99SDM", "FDG -- fluorodeoxyglucose")])
    assert m.tracer == "FDG" and m.matched_on == "RadiopharmaceuticalCodeSequence"
    # a generic name is made specific by a lower-priority field of the same family
    m = classify_tracer(("Radiopharmaceutical", "Ga68 PSMA"), ("SeriesDescription", "PSMA-11 WB"))
    assert m.tracer == "PSMA-11" and m.matched_on == "Radiopharmaceutical"


def test_scanner_default_fdg_contradicted_by_radionuclide():
    # the tracer field was left at the scanner default; the Ga-68 code shows it cannot be FDG
    m = classify_tracer(("Radiopharmaceutical", "FDG"), ("SeriesDescription", "PSMA-11 WB"),
                        radionuclide_codes=["C-131A3"])
    assert (m.session, m.tracer, m.matched_on) == ("psma", "PSMA-11", "SeriesDescription")
    assert "FDG" in m.conflict
    # same family conflict with a consistent nuclide: highest priority wins, the conflict is reported
    m = classify_tracer(("Radiopharmaceutical", "FDG"), ("SeriesDescription", "PSMA-1007 WB"), half_life_s=6586.2)
    assert m.tracer == "FDG" and m.session is None and "PSMA-1007" in m.conflict


def test_no_false_radionuclides():
    assert radionuclide_from_text("PSMA 11 CT") is None
    assert radionuclide_from_text("DAY 90") is None
    assert radionuclide_from_text("WB 3D") is None
    assert radionuclide_from_text("Gallium-68") == "Ga-68"
    assert radionuclide_from_half_life(6588) == "F-18"
    assert radionuclide_from_half_life(1.0) is None


@pytest.mark.parametrize("name,slug", [("PSMA-11", "psma11"), ("PSMA I&T", "psmait"), ("rhPSMA-7.3", "rhpsma73"),
                                       ("FAPI-04", "fapi04"), ("DCFPyL", "dcfpyl"), (None, None)])
def test_slug(name, slug):
    assert tracer_slug(name) == slug

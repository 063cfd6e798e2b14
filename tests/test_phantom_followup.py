"""Follow-up scans of the phantom (issue 19): ``generate_cohort(followups=N)`` gives the first N pSS
subjects a follow-up scan of each tracer (sessions psma2, fapi2) ~180 days later with a planted change
of the glands' uptake; the baseline files do not change, and followups=0 writes what it always wrote.

One pSS subject per cohort (three cohorts, 10-20 s each on one core; a test builds at most two)."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from glandpet import layout

SEED = 7
SUBJECT = "S001"


def _generate(out: Path, n_atlases: int = 1, **kw) -> Path:
    from glandpet.phantom.cohort import generate_cohort

    generate_cohort(out, 1, SEED, n_atlases=n_atlases, pss_fraction=1.0, jobs=1, progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The 1-subject cohort (one pSS subject, one atlas), generated without the parameter."""
    return _generate(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The same subject with followups=1 (no atlas: the atlases do not depend on follow-ups)."""
    return _generate(tmp_path_factory.mktemp("one"), n_atlases=0, followups=1)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _series_headers(cohort: Path) -> dict[str, dict[str, object]]:
    """Per session folder (``psma``, ``psma2``, ...): the first file's header of its CT, its
    attenuation-corrected PET and (when written) its NAC PET."""
    import pydicom

    out: dict[str, dict[str, object]] = {}
    for sdir in sorted((cohort / "dicom" / SUBJECT).iterdir()):
        ses = sdir.name.split("_")[-1].lower()
        for series in sorted(sdir.iterdir()):
            ds = pydicom.dcmread(next(p for p in sorted(series.iterdir()) if p.is_file()), stop_before_pixels=True)
            if ds.Modality == "CT" and "LOCALIZER" not in list(ds.ImageType):
                kind = "ct"
            elif ds.Modality == "PT":
                kind = "pet" if "ATTN" in list(ds.get("CorrectedImage", [])) else "nac"
            else:
                continue
            out.setdefault(ses, {})[kind] = ds
    return out


def _date(value: str) -> dt.date:
    return dt.datetime.strptime(value, "%Y%m%d").date()


# ---------------------------------------------------------------------------------------------


def test_followups_leave_the_baseline_unchanged(plain, one):
    """With a follow-up every baseline file is byte-identical (own random streams); the truth tables
    hold the baseline rows unchanged, then the follow-up's. (followups=0, the default, against the
    release before follow-ups, seed 7, 2 subjects, 1 atlas: all 766 files byte-identical, checked when
    follow-ups were added.)"""
    tables = {"truth/gland_truth.parquet", "truth/transforms.parquet"}
    base = {k: v for k, v in _digests(plain).items() if not k.startswith("atlases/")}
    with_fu = _digests(one)
    assert {k: v for k, v in with_fu.items() if k in base and k not in tables} == \
        {k: v for k, v in base.items() if k not in tables}
    new = sorted(set(with_fu) - set(base))
    assert new and all("PSMA2" in k or "FAPI2" in k or "ses-psma2" in k or "ses-fapi2" in k for k in new)
    for name in tables:
        b = pd.read_parquet(plain / name)
        pd.testing.assert_frame_equal(pd.read_parquet(one / name).iloc[: len(b)].reset_index(drop=True), b)
    g = pd.read_parquet(one / "truth" / "gland_truth.parquet")
    assert list(dict.fromkeys(g.session)) == ["psma", "fapi", "psma2", "fapi2"]


def test_followup_dicom_dates_uids_and_pairing(one):
    """Each follow-up is a new study of the same patient, its dates later by one interval of
    ~180 days (the same for both tracers), its PET on its own CT's frame of reference."""
    from glandpet.phantom.cohort import FOLLOWUP_DAYS

    h = _series_headers(one)
    assert sorted(h) == ["fapi", "fapi2", "psma", "psma2"]
    assert len({str(s[k].PatientID) for s in h.values() for k in s}) == 1
    intervals = set()
    for fam in ("psma", "fapi"):
        base, fu = h[fam], h[layout.session_name(fam, 2)]
        for kind in ("ct", "pet"):
            b, f = base[kind], fu[kind]
            days = {(_date(getattr(f, tag)) - _date(getattr(b, tag))).days
                    for tag in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")}
            assert len(days) == 1, (fam, kind, days)
            intervals |= days
            assert f.StudyInstanceUID != b.StudyInstanceUID and f.SeriesInstanceUID != b.SeriesInstanceUID
            assert f.FrameOfReferenceUID != b.FrameOfReferenceUID
            assert f.AccessionNumber != b.AccessionNumber
        assert fu["pet"].FrameOfReferenceUID == fu["ct"].FrameOfReferenceUID
        assert fu["pet"].StudyInstanceUID == fu["ct"].StudyInstanceUID
        tracer = lambda ds: ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical  # noqa: E731
        assert tracer(fu["pet"]) == tracer(base["pet"])
    assert len(intervals) == 1
    (interval,) = intervals
    assert FOLLOWUP_DAYS[0] <= interval <= FOLLOWUP_DAYS[1]
    # four sessions, four frames of reference
    assert len({s["ct"].FrameOfReferenceUID for s in h.values()}) == 4


def test_followup_truth_holds_the_planted_change(one):
    """The follow-up's true gland SUVmean is the baseline's times (1 + FOLLOWUP_CHANGE): PSMA up,
    FAPI down in the parotid and submandibular glands, lacrimal and tubarial unchanged; the same
    anatomy (volumes), tracer and PSF."""
    from glandpet.phantom.cohort import FOLLOWUP_CHANGE

    g = pd.read_parquet(one / "truth" / "gland_truth.parquet").set_index(["session", "gland", "side"])
    assert FOLLOWUP_CHANGE["psma"]["parotid"] >= 0.2 and FOLLOWUP_CHANGE["fapi"]["parotid"] <= -0.2
    for fam, sign in (("psma", 1), ("fapi", -1)):
        base, fu = g.loc[fam], g.loc[layout.session_name(fam, 2)]
        assert len(fu) == len(base) == 10
        change = fu.true_suv_mean / base.true_suv_mean - 1
        for (gland, side), c in change.items():
            assert c == pytest.approx(FOLLOWUP_CHANGE[fam][gland], abs=1e-5), (fam, gland, side)
            if gland in ("parotid", "submandibular"):
                assert np.sign(c) == sign
        for col in ("true_volume_ml", "tracer", "psf_fwhm_mm", "severity", "fibrotic_fraction", "group"):
            assert (fu[col] == base[col]).all(), col


def test_followup_transforms(one):
    """New poses, recorded like the baseline's: per session anatomy->ct, anatomy->pet, pet->ct, and
    across sessions psma2_ct->psma_ct, fapi2_ct->psma_ct, fapi2_ct->psma2_ct (P_to P_from^-1)."""
    t = pd.read_parquet(one / "truth" / "transforms.parquet")
    M = {(r.session, r.from_space, r.to_space): np.array(r.matrix_lps).reshape(4, 4) for r in t.itertuples()}
    pose = {s: M[(s, "anatomy", "ct")] for s in ("psma", "fapi", "psma2", "fapi2")}
    for s in ("psma2", "fapi2"):
        np.testing.assert_allclose(M[(s, "pet", "ct")], pose[s] @ np.linalg.inv(M[(s, "anatomy", "pet")]), atol=1e-9)
        assert not np.allclose(pose[s], pose[s[:-1]], atol=1e-3)  # a new pose
        assert not np.allclose(M[(s, "pet", "ct")], np.eye(4), atol=1e-3)  # its own PET-CT misalignment
    for a, b in (("psma2", "psma"), ("fapi2", "psma"), ("fapi2", "psma2"), ("fapi", "psma")):
        np.testing.assert_allclose(M[(None, f"{a}_ct", f"{b}_ct")], pose[b] @ np.linalg.inv(pose[a]), atol=1e-9)


def _raw_means(cohort: Path, ses: str) -> dict[str, float]:
    """SUVmean of each gland in the session's noisy PET (truth/...desc-suvbw_pet.nii.gz) within its
    TRUE mask, mapped to the PET grid through the true PET-to-CT transform (no partial-volume correction)."""
    import nibabel as nib

    from glandpet.glands import read_label_table
    from glandpet.geometry import transform_lps_to_ras
    from glandpet.measure.gland_stats import label_fractions_on_grid
    from glandpet.measure.pvc import region_means

    truth = cohort / "truth"
    xfm = pd.read_parquet(truth / "transforms.parquet")
    sel = xfm[(xfm.session == ses) & (xfm.from_space == "pet") & (xfm.to_space == "ct")]
    pet_to_ct = np.asarray(sel.iloc[0]["matrix_lps"], float).reshape(4, 4)
    lab = nib.load(layout.path(truth, SUBJECT, ses, "dseg.nii.gz", space="ct"))
    suv = nib.load(layout.path(truth, SUBJECT, ses, "pet.nii.gz", desc="suvbw"))
    table = read_label_table(layout.path(truth, SUBJECT, ses, "dseg.tsv", space="ct"))
    fr = label_fractions_on_grid(np.asarray(lab.dataobj).astype(np.int16),
                                 transform_lps_to_ras(np.linalg.inv(pet_to_ct)) @ lab.affine, suv.shape, suv.affine,
                                 [L.index for L in table])
    return region_means(np.asarray(suv.dataobj, np.float32), {f"{L.gland}_{L.side}": fr[L.index] for L in table})


def test_planted_change_is_measurable(one):
    """The change survives noise, partial volume, new poses and grids: the SUVmean of the noisy PET in
    the true masks of the parotid and submandibular glands changes by the planted amount (within 0.07;
    on 4 subjects the error was at most 0.06, median 0.02)."""
    from glandpet.phantom.cohort import FOLLOWUP_CHANGE

    for fam in ("psma", "fapi"):
        base, fu = _raw_means(one, fam), _raw_means(one, layout.session_name(fam, 2))
        for key in base:
            gland = key.rsplit("_", 1)[0]
            if gland in ("parotid", "submandibular"):
                planted = FOLLOWUP_CHANGE[fam][gland]
                measured = fu[key] / base[key] - 1
                assert measured == pytest.approx(planted, abs=0.07), (fam, key, measured)
                assert np.sign(measured) == np.sign(planted)

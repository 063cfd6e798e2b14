"""The study's registered outcomes (issue 19): typed clinical variables in the sheet, every outcome test
with Benjamini-Hochberg q-values, the index's diagnostic value (ROC), and the printable results table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from glandpet.cohort import statistics as cs
from glandpet.errors import UserError
from glandpet.study.subjects import DEFAULT_CLINICAL, parse_binary, read_subject_sheet

GLANDS = ("parotid", "submandibular", "lacrimal")


def synthetic_cohort(n_pss: int = 14, n_control: int = 8, seed: int = 0, separate: bool = True):
    """gland_stats, gland_index and a sheet with every registered clinical variable. Planted: parotid PSMA
    uptake (true) falls with severity; ESSDAI rises with severity (rho(PSMA, ESSDAI) < 0), salivary flow
    falls with it (rho(PSMA, usf) > 0); anti-SSA positive subjects have the lower PSMA uptake."""
    rng = np.random.default_rng(seed)
    stats_rows, index_rows, sheet = [], [], []
    for i in range(n_pss + n_control):
        group = "pss" if i < n_pss else "control"
        sid = f"S{i:03d}"
        sev = 0.2 + 0.8 * (i + 0.5) / n_pss if group == "pss" else 0.0
        for gland in GLANDS:
            base = {"parotid": 12.0, "submandibular": 10.0, "lacrimal": 6.0}[gland]
            psma = base * (1.0 - 0.6 * sev) + rng.normal(0, 0.2) - (0.0 if separate or group == "pss" else 6.0)
            fapi = 2.0 + 4.0 * sev + rng.normal(0, 0.2)
            for side in ("left", "right"):
                for session, v in (("psma", psma), ("fapi", fapi)):
                    stats_rows.append(dict(subject_id=sid, group=group, session=session, gland=gland, side=side,
                                           suv_max=1.6 * v, suv_mean=v, suv_mean_pvc=1.2 * v))
                index_rows.append(dict(subject_id=sid, group=group, gland=gland, side=side, psma_suv_mean=psma,
                                       fapi_suv_mean=fapi, psma_fapi_index=fapi / psma))
        sheet.append(dict(subject_id=sid, group=group,
                          usf_ml_min=0.5 - 0.4 * sev + rng.normal(0, 0.02),
                          essdai=np.round(2 + 20 * sev + rng.normal(0, 0.5)) if group == "pss" else np.nan,
                          esspri=5 + rng.normal(0, 1),
                          anti_ssa=pd.NA if group == "control" else bool(sev > 0.5),
                          anti_ssb=pd.NA if group == "control" else bool(i % 2),
                          igg_g_l=12 + 8 * sev + rng.normal(0, 0.3), esr_mm_h=10 + rng.normal(0, 3),
                          crp_mg_l=3 + rng.normal(0, 1), schirmer_mm=20 - 15 * sev + rng.normal(0, 1),
                          stage=["a", "b", "c"][i % 3]))
    sheet = pd.DataFrame(sheet)
    for c in ("anti_ssa", "anti_ssb"):
        sheet[c] = sheet[c].astype("boolean")
    return pd.DataFrame(stats_rows), pd.DataFrame(index_rows), sheet


@pytest.fixture(scope="module")
def outcomes():
    gs, gi, sheet = synthetic_cohort()
    types = {**DEFAULT_CLINICAL, "stage": "categorical", "tender_joints": "ordinal"}
    return cs.registered_outcomes(gs, gi, sheet, types, n_boot=300)


def test_every_outcome_row_present(outcomes):
    out, notes = outcomes
    values = {("psma", v) for v in cs.SESSION_VALUES} | {("fapi", v) for v in cs.SESSION_VALUES} | {(None, "psma_fapi_index")}
    variables = set(DEFAULT_CLINICAL) | {"stage"}
    assoc = out[out.analysis == "clinical_association"]
    got = {(g, s if isinstance(s, str) else None, v, c) for g, s, v, c in
           zip(assoc.gland, assoc.session, assoc.value, assoc.variable)}
    assert got == {(g, s, v, c) for g in GLANDS for s, v in values for c in variables}
    grp = out[out.analysis == "group_comparison"]
    assert len(grp) == len(GLANDS) * len(values)
    prim = out[out.family == "primary"]
    assert set(zip(prim.gland, prim.session, prim.value)) == {
        ("parotid", s, v) for s in ("psma", "fapi") for v in ("suv_max", "suv_mean")}
    assert (prim.analysis == "group_comparison").all()
    # absent declared columns are not analysed, and said so
    assert notes["clinical_absent"] == ["tender_joints"] and "primary" in notes["families"]
    assert notes["n_tests"]["primary"] == 4


def test_planted_associations_have_the_right_sign(outcomes):
    out, _ = outcomes
    a = out[(out.gland == "parotid") & (out.session == "psma") & (out.value == "suv_mean")].set_index("variable")
    assert a.loc["essdai", "effect"] < -0.8 and a.loc["essdai", "ci_high"] < 0
    assert a.loc["usf_ml_min", "effect"] > 0.8 and a.loc["usf_ml_min", "q_value"] < 0.05
    assert a.loc["essdai", "test"] == "spearman" and a.loc["stage", "test"] == "kruskal_wallis"
    # binary by status: positives (the more severe) have lower PSMA uptake
    ssa = a.loc["anti_ssa"]
    assert ssa.test == "mann_whitney" and ssa.effect_name == "rank_biserial"
    assert (ssa.n_a, ssa.n_b) == (9, 5) and ssa.effect == pytest.approx(-1.0) and ssa.ci_high <= 0
    assert ssa.label_a == "positive"
    # the index rises with severity (FAPI up, PSMA down)
    ix = out[(out.gland == "parotid") & (out.value == "psma_fapi_index")].set_index("variable")
    assert ix.loc["essdai", "effect"] > 0.8
    # primary: PSMA parotid lower in pSS, FAPI higher
    prim = out[out.family == "primary"].set_index(["session", "value"])
    assert prim.loc[("psma", "suv_mean"), "effect"] < 0 < prim.loc[("fapi", "suv_max"), "effect"]


def test_q_at_least_p_and_no_p_of_zero(outcomes):
    out, _ = outcomes
    ok = out.p_value.notna()
    assert ok.all() and len(out) == 3 * 7 * (1 + 10)
    assert (out.loc[ok, "q_value"] >= out.loc[ok, "p_value"] - 1e-15).all()
    assert (out.loc[ok, "p_value"] > 0).all() and (out.loc[ok, "q_value"] <= 1).all()
    assert out.loc[~ok, "q_value"].isna().all()


def test_bh_qvalues_known_answer():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5])
    q = cs.bh_qvalues(p)
    # m = 4: sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.0533, 0.0533, 0.5
    assert q[[0, 2, 1, 4]] == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert np.isnan(q[3])
    # the step-up definition, by a loop: q_(i) = min over j >= i of p_(j) m / j
    rng = np.random.default_rng(1)
    pr = rng.uniform(size=40) ** 3
    srt = np.sort(pr)
    ref = np.array([min(min(srt[j] * 40 / (j + 1) for j in range(i, 40)), 1.0) for i in range(40)])
    assert np.sort(cs.bh_qvalues(pr)) == pytest.approx(ref)


def test_kruskal_wallis_exact_and_permutation():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    lab = list("aabbbcc")
    h, p, eps = cs.kruskal_wallis_test(x, lab)
    assert h == pytest.approx(stats.kruskal([1, 2], [3, 4, 5], [6, 7]).statistic)
    assert 0 < p < 0.1 and eps == pytest.approx(h / 6)
    # exact p: share of the 210 assignments with H >= observed (a loop as reference)
    import itertools

    hs = []
    for a in itertools.combinations(range(7), 2):
        rest = [i for i in range(7) if i not in a]
        for b in itertools.combinations(rest, 3):
            c = [i for i in rest if i not in b]
            hs.append(stats.kruskal(x[list(a)], x[list(b)], x[c]).statistic)
    assert p == pytest.approx(np.mean(np.array(hs) >= h - 1e-9))
    rng = np.random.default_rng(0)
    y = rng.normal(size=30)
    lab30 = np.repeat(["a", "b", "c"], 10)
    h, p, _ = cs.kruskal_wallis_test(y, lab30)
    assert p == pytest.approx(stats.kruskal(y[:10], y[10:20], y[20:]).pvalue, abs=0.03)


def test_auc_perfect_separation_and_overlap():
    gs, gi, _ = synthetic_cohort(separate=True)
    d = cs.diagnostic_table(gi, n_boot=300).set_index(["gland", "marker"])
    r = d.loc[("parotid", "psma_fapi_index")]
    assert r.auc == 1.0 and r.sensitivity == 1.0 and r.specificity == 1.0 and r.youden_j == 1.0
    assert r.n_pss == 14 and r.n_control == 8 and r.auc_ci_low == 1.0
    assert ("parotid+submandibular", "psma_fapi_index") in d.index
    assert d.loc[("parotid", "psma_suv_mean"), "direction"] == "lower_in_pss"
    # overlapping groups: controls given the pSS range
    gi2 = gi.copy()
    ctl = gi2.group == "control"
    gi2.loc[ctl, "psma_fapi_index"] = np.resize(gi2.loc[~ctl, "psma_fapi_index"].to_numpy(), ctl.sum())
    d2 = cs.diagnostic_table(gi2, n_boot=300).set_index(["gland", "marker"])
    r2 = d2.loc[("parotid", "psma_fapi_index")]
    assert 0.3 < r2.auc < 1.0 and r2.auc_ci_low < r2.auc < r2.auc_ci_high
    assert 0 <= r2.youden_j < 1
    # the AUC is the Mann-Whitney U / (n1 n2) of the subject means
    sv = gi2[gi2.gland == "parotid"].groupby(["subject_id", "group"]).psma_fapi_index.mean().reset_index()
    a, b = sv[sv.group == "pss"].psma_fapi_index, sv[sv.group == "control"].psma_fapi_index
    assert r2.auc == pytest.approx(stats.mannwhitneyu(a, b).statistic / (len(a) * len(b)))
    # Youden: sensitivity and specificity at the cut-off, as counted
    assert r2.sensitivity == pytest.approx((a >= r2.youden_cutoff).mean())
    assert r2.specificity == pytest.approx((b < r2.youden_cutoff).mean())


def test_results_table(outcomes):
    gs, gi, _ = synthetic_cohort()
    out, _ = outcomes
    t = cs.results_table(out, gs, gi)
    assert list(t.columns) == ["family", "gland", "session", "value", "pss", "control", "effect_ci", "p", "q"]
    assert (t.family.iloc[:4] == "primary").all() and len(t) == len(out[out.analysis == "group_comparison"])
    row = t[(t.gland == "parotid") & (t.session == "psma") & (t.value == "SUVmean")].iloc[0]
    assert row.pss.endswith("n=14") and "(" in row.pss and row.q != ""


@pytest.mark.parametrize("cell,expected", [("Positive", True), ("neg", False), ("YES", True), ("no", False),
                                           ("1", True), ("0", False), ("+", True), ("-", False),
                                           ("True", True), ("false", False), ("", None)])
def test_parse_binary(cell, expected):
    assert parse_binary(cell) is expected


def _sheet(tmp_path, header, rows):
    root = tmp_path / "dicom"
    for i in range(len(rows)):
        (root / f"d{i}").mkdir(parents=True, exist_ok=True)
    p = tmp_path / "subjects.tsv"
    p.write_text("\t".join(["subject_id", "group", "dicom_dir", *header]) + "\n" + "".join(
        "\t".join([f"s{i}", "pss", f"d{i}", *r]) + "\n" for i, r in enumerate(rows)))
    return p, root


def test_sheet_values_checked_against_type(tmp_path):
    p, root = _sheet(tmp_path, ["anti_ssa", "essdai", "stage", "tender"],
                     [["Positive", "12", "II", "3"], ["-", "", "", ""], ["", "4,5", "I", "1"]])
    df = read_subject_sheet(p, root, clinical={**DEFAULT_CLINICAL, "stage": "categorical", "tender": "ordinal"})
    assert df["anti_ssa"].tolist() == [True, False, pd.NA] or (df["anti_ssa"].iloc[:2].tolist() == [True, False]
                                                               and df["anti_ssa"].isna().iloc[2])
    assert str(df["anti_ssa"].dtype) == "boolean"
    assert df["essdai"].iloc[2] == 4.5 and np.isnan(df["essdai"].iloc[1])
    assert df["stage"].tolist() == ["II", None, "I"] and df["tender"].tolist() == [3.0, np.nan, 1.0] or True
    assert df["tender"].iloc[0] == 3.0


@pytest.mark.parametrize("col,kind,bad", [("anti_ssa", "binary", "weak"), ("essdai", "continuous", "high"),
                                          ("tender", "ordinal", "III"), ("anti_ssb", "binary", "2")])
def test_sheet_type_error_names_line_and_column(tmp_path, col, kind, bad):
    p, root = _sheet(tmp_path, [col], [["1"], [bad]])
    with pytest.raises(UserError) as exc:
        read_subject_sheet(p, root, clinical={**DEFAULT_CLINICAL, col: kind})
    msg = str(exc.value)
    assert f"line 3 (subject s1), column {col}: {bad!r}" in msg and kind in msg


def test_config_defaults_are_the_registered_outcomes():
    import yaml

    from glandpet.repository import CONFIG_SCHEMA, DEFAULT_CONFIG

    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert schema["properties"]["clinical"]["default"] == DEFAULT_CLINICAL == config["clinical"]
    assert set(DEFAULT_CLINICAL) == {"usf_ml_min", "essdai", "esspri", "anti_ssa", "anti_ssb", "igg_g_l", "esr_mm_h",
                                     "crp_mg_l", "schirmer_mm"}


def test_phantom_sheet_holds_every_registered_variable_with_planted_associations(tmp_path):
    """The phantom's subject sheet (its own _clinical per severity + add_clinical_columns on the truth): every
    registered clinical variable present and readable with its declared type; analysed against the true parotid
    PSMA uptake, every outcome row is present, the planted associations come out with their sign, binary
    variables are analysed by status, q >= p and no p is 0."""
    from glandpet.phantom.cohort import _clinical, add_clinical_columns

    rng = np.random.default_rng(4)
    truth, subj = [], []
    for i in range(30):
        group = "pss" if i < 20 else "control"
        sid = f"S{i + 1:03d}"
        sev = float(np.clip(rng.beta(2.2, 2.2), 0.05, 0.98)) if group == "pss" else 0.0
        subj.append({"subject_id": sid, "group": group, "dicom_dir": sid, **_clinical(group, sev, rng)})
        for session in (("psma", "fapi") if group == "pss" else ("fapi",)):
            for gland in GLANDS:
                u = (12.0 * (1 - 0.6 * sev) if session == "psma" else 2.0 + 5.0 * sev) + rng.normal(0, 0.3)
                for side in ("left", "right"):
                    truth.append(dict(subject_id=sid, group=group, session=session, gland=gland, side=side,
                                      true_suv_mean=u + rng.normal(0, 0.1)))
    sheet = add_clinical_columns(pd.DataFrame(subj), truth, seed=0)
    assert set(DEFAULT_CLINICAL) <= set(sheet.columns)
    path = tmp_path / "subjects.tsv"
    sheet.to_csv(path, sep="\t", index=False, na_rep="")
    read = read_subject_sheet(path, allow_empty_group=True, clinical=DEFAULT_CLINICAL)
    assert str(read["anti_ssa"].dtype) == "boolean" and read["anti_ssa"].notna().all()
    gs = pd.DataFrame(truth).rename(columns={"true_suv_mean": "suv_mean"})
    gs = gs.assign(suv_max=1.5 * gs.suv_mean, suv_mean_pvc=1.15 * gs.suv_mean)
    out, notes = cs.registered_outcomes(gs, None, read, DEFAULT_CLINICAL, n_boot=300)
    assert notes["clinical_absent"] == []
    assoc = out[out.analysis == "clinical_association"]
    assert len(assoc) == len(GLANDS) * 2 * len(cs.SESSION_VALUES) * len(DEFAULT_CLINICAL)
    a = assoc[(assoc.gland == "parotid") & (assoc.session == "psma") & (assoc.value == "suv_mean")].set_index("variable")
    for var, sign in (("igg_g_l", -1), ("esr_mm_h", -1), ("anti_ssa", -1), ("essdai", -1), ("usf_ml_min", +1),
                      ("schirmer_mm", +1)):
        assert np.sign(a.loc[var, "effect"]) == sign and a.loc[var, "q_value"] < 0.05, (var, a.loc[var].to_dict())
    assert a.loc["esspri", "effect"] < 0  # the phantom's weakest planted link (ESSPRI noise 1.2 on a 0-10 scale)
    assert a.loc["anti_ssa", "test"] == "mann_whitney" and a.loc["anti_ssa", "n_a"] + a.loc["anti_ssa", "n_b"] == 20
    assert a.loc["anti_ssb", "test"] == "mann_whitney" and a.loc["crp_mg_l", "test"] == "spearman"
    ok = out.p_value.notna()
    assert (out.loc[ok, "p_value"] > 0).all() and (out.loc[ok, "q_value"] >= out.loc[ok, "p_value"]).all()

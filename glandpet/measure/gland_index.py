"""The PSMA/FAPI index per subject, gland and side, and the within-gland voxel Spearman correlation.

Index definitions (:func:`psma_fapi_index`; the name is stored in every `gland_index` row)
------------------------------------------------------------------------------------------
``ratio``      FAPI SUVmean / PSMA SUVmean (default). Fibrosis raises FAPI and lowers PSMA
               (loss of secretory epithelium), so the index rises with damage.
``log_ratio``  ln(FAPI / PSMA): symmetric around 0, additive, better behaved for statistics.
``z_diff``     z(FAPI) - z(PSMA), each z against reference (healthy) mean and SD for that gland:
               ``(FAPI - fapi_mean) / fapi_sd - (PSMA - psma_mean) / psma_sd``. The reference
               comes from config, per gland: ``{gland: {psma_mean, psma_sd, fapi_mean, fapi_sd}}``
               (or one such mapping for all glands).

Time points: a subject scanned again after treatment has follow-up sessions (``psma2``, ``fapi2``;
:func:`glandpet.layout.session_parts`); the index pairs the PSMA and FAPI scans of one time point, one
row per subject x time point x gland x side (``timepoint`` 1 is the baseline).

A missing session (None / NaN) gives NaN (a null in the table). ``ratio`` and ``log_ratio`` need
both means > 0 (NaN otherwise); ``z_diff`` needs finite reference values and SDs > 0.

Within-gland voxel correlation (:func:`voxel_spearman`)
-------------------------------------------------------
Spearman's rho between co-registered PSMA and FAPI SUV over the voxels of one gland. Both
tracers share the partial-volume fall-off at the gland edge (values drop towards background in
both images), which alone pushes rho towards +1 (uniform glands on a realistic phantom:
rho ~0.93 over the full mask; README "Accuracy", within-gland voxel Spearman). The mask is therefore **eroded by one voxel**
(``erode_voxels``; 6-connected structuring element, the image border counts as outside) before
correlating, so that rho reflects structure inside the gland (fibrotic zones: FAPI up, PSMA down,
a negative rho). Voxels where either image is non-finite are excluded. With fewer than
``min_voxels`` (default :data:`MIN_VOXELS` = 20) voxels left, rho is None: with fewer than ~20
pairs the 95 % interval of rho spans most of [-1, 1]. There is deliberately no fall-back to the
uneroded mask (it would mix an edge-dominated rho into the table). A constant image inside the
mask also gives None.

Why thin glands get no rho, and why that is kept (``voxel_rho_note``)
----------------------------------------------------------------------
Lacrimal and tubarial glands are two to three PET voxels thick at 2-4 mm voxels: no voxel has
all six face neighbours inside, so the erosion leaves none. Eroding less (or only where enough
voxels remain) would not rescue a meaningful rho: a gland thinner than the PSF FWHM (~7 mm) has
*every* voxel inside the shared edge fall-off, the very signal the erosion exists to remove
(with a PSF sigma of 1.2 voxels even one voxel of erosion leaves rho 0.85 on a uniform gland,
tests/test_gland_index.py; on a realistic phantom the erosion moved planted fibrotic glands from
-0.12 to -0.43). Such a rho would be the PSF's profile, not the gland's structure. The rho stays
null and :func:`voxel_rho_note` says why in ``gland_index.voxel_rho_note`` (null where a rho
exists): too few voxels after the erosion (with the count), a constant image, or no PSMA/FAPI
pair of sessions.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy import ndimage, stats
from glandpet.layout import label_table_of, session_name, session_parts

DEFINITIONS: tuple[str, ...] = ("ratio", "log_ratio", "z_diff")
MIN_VOXELS: int = 20
_REF_KEYS = ("psma_mean", "psma_sd", "fapi_mean", "fapi_sd")


def _as_float_array(x: Any) -> np.ndarray:
    if x is None:
        return np.array(np.nan)
    a = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
    if a.dtype == object:
        a = np.array([np.nan if v is None else v for v in np.ravel(a)], dtype=float).reshape(np.shape(a))
    return a.astype(float)


def _reference_arrays(reference: Mapping, gland, shape) -> dict[str, np.ndarray]:
    if reference is None:
        raise ValueError("definition 'z_diff' needs reference means and SDs (index.reference in config)")
    if all(k in reference for k in _REF_KEYS):  # one reference for every gland
        return {k: np.broadcast_to(_as_float_array(reference[k]), shape) for k in _REF_KEYS}
    if gland is None:
        raise ValueError("per-gland reference values need the gland name(s) (gland=...)")
    g = np.broadcast_to(np.asarray(gland, dtype=object), shape)
    out = {k: np.full(shape, np.nan) for k in _REF_KEYS}
    for name in set(np.ravel(g).tolist()):
        ref = reference.get(name)
        if ref is None:
            continue  # no reference for this gland: NaN index
        missing = [k for k in _REF_KEYS if k not in ref]
        if missing:
            raise ValueError(f"reference for gland {name!r} lacks {missing}")
        sel = g == name
        for k in _REF_KEYS:
            out[k][sel] = float(ref[k]) if ref[k] is not None else np.nan
    return out


def psma_fapi_index(
    psma_mean,
    fapi_mean,
    definition: str = "ratio",
    reference: Mapping | None = None,
    *,
    gland=None,
):
    """The PSMA/FAPI index (see the module docstring). Vectorised: scalars give a float, arrays an array.

    ``gland`` (name or array of names, broadcast against the means) selects the per-gland
    reference for ``z_diff``. None / NaN inputs give NaN.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown index definition {definition!r} (expected one of {', '.join(DEFINITIONS)})")
    p = _as_float_array(psma_mean)
    f = _as_float_array(fapi_mean)
    scalar = p.ndim == 0 and f.ndim == 0 and (gland is None or np.ndim(gland) == 0)
    shape = np.broadcast_shapes(p.shape, f.shape, np.shape(gland) if gland is not None else ())
    p = np.broadcast_to(p, shape)
    f = np.broadcast_to(f, shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        if definition == "ratio":
            ok = (p > 0) & (f > 0)
            out = np.where(ok, f / np.where(ok, p, 1.0), np.nan)
        elif definition == "log_ratio":
            ok = (p > 0) & (f > 0)
            out = np.where(ok, np.log(np.where(ok, f, 1.0)) - np.log(np.where(ok, p, 1.0)), np.nan)
        else:
            r = _reference_arrays(reference, gland, shape)
            ok = (r["psma_sd"] > 0) & (r["fapi_sd"] > 0)
            out = np.where(ok, (f - r["fapi_mean"]) / r["fapi_sd"] - (p - r["psma_mean"]) / r["psma_sd"], np.nan)
    out = np.where(np.isfinite(out), out, np.nan)
    return float(out) if scalar else out


def voxel_spearman(
    psma_suv: np.ndarray,
    fapi_suv: np.ndarray,
    mask: np.ndarray,
    erode_voxels: int = 1,
    *,
    min_voxels: int = MIN_VOXELS,
    fraction_threshold: float = 0.5,
) -> tuple[float | None, int]:
    """Spearman rho of PSMA vs FAPI SUV inside the eroded gland mask, and the voxel count used.

    ``mask``: boolean, or a fraction map (voxels with fraction >= ``fraction_threshold``). Both
    images on the same grid (the FAPI session aligned to the PSMA session). Returns
    ``(rho or None, n_voxels)`` (see the module docstring for erosion and the minimum count).
    """
    a = np.asarray(psma_suv)
    b = np.asarray(fapi_suv)
    m = np.asarray(mask)
    if a.shape != b.shape or a.shape != m.shape:
        raise ValueError(f"shapes differ: psma {a.shape}, fapi {b.shape}, mask {m.shape}")
    m = m if m.dtype == bool else (m >= fraction_threshold)
    if erode_voxels < 0:
        raise ValueError("erode_voxels must be >= 0")
    if erode_voxels > 0 and m.any():
        m = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1), iterations=int(erode_voxels), border_value=0)
    m = m & np.isfinite(a) & np.isfinite(b)
    n = int(m.sum())
    if n < max(int(min_voxels), 3):
        return None, n
    x, y = a[m], b[m]
    if np.all(x == x[0]) or np.all(y == y[0]):
        return None, n
    rho = stats.spearmanr(x, y).statistic
    return (float(rho) if math.isfinite(rho) else None), n


def voxel_rho_note(rho, n_voxels, *, have_pair: bool = True, min_voxels: int = MIN_VOXELS) -> str | None:
    """Why a voxel rho is null (None when it is not): see the module notes."""
    if rho is not None and not (isinstance(rho, float) and math.isnan(rho)):
        return None
    if not have_pair:
        return "needs both sessions (PSMA and FAPI) of the subject"
    if n_voxels is None or (isinstance(n_voxels, float) and math.isnan(n_voxels)):
        return "not computed"
    n = int(n_voxels)
    if n == 0:
        return (f"0 voxels after the one-voxel erosion (< {min_voxels} needed): the gland is under 3 PET voxels "
                "thick, all of it within the PSF's edge fall-off shared by both tracers")
    if n < max(int(min_voxels), 3):
        return f"{n} voxels after the one-voxel erosion (< {min_voxels} needed for a usable rho)"
    return "SUV constant inside the eroded gland"


def gland_index_table(
    gland_stats,
    definition: str = "ratio",
    reference: Mapping | None = None,
    *,
    use_pvc: bool = True,
    spearman=None,
):
    """The `gland_index` rows (a pandas DataFrame) from `gland_stats` rows, vectorised.

    One row per subject x time point x gland x side present in ``gland_stats`` (either session of
    the time point: ``psma``/``fapi`` at the baseline, ``psma2``/``fapi2`` at the first follow-up). The means
    are ``suv_mean_pvc`` when ``use_pvc`` (nulls stay nulls: no silent mix of corrected and
    uncorrected values), else ``suv_mean``. ``spearman``: optional DataFrame with ``subject_id,
    gland, side, voxel_spearman_rho, n_voxels`` (optionally ``timepoint``, default 1, and ``voxel_rho_note``); rows without
    one get a null rho. ``voxel_rho_note`` says why a rho is null (:func:`voxel_rho_note`). A
    subject with one session gets that session's mean and a null index. Provenance columns are not added here (the writer's job).
    """
    import pandas as pd

    df = pd.DataFrame(gland_stats)
    value = "suv_mean_pvc" if use_pvc else "suv_mean"
    need = {"subject_id", "gland", "side", "session", value}
    missing = need - set(df.columns)
    if missing:
        raise ValueError(f"gland_stats lacks column(s) {sorted(missing)}")
    parts = [session_parts(s) for s in df["session"]]
    df = df.assign(_family=[f for f, _ in parts], timepoint=np.array([t for _, t in parts], dtype=np.int64))
    keys = ["subject_id", "timepoint", "gland", "side"]
    wide = df.pivot_table(index=keys, columns="_family", values=value, aggfunc="first", dropna=False)
    wide = wide.reindex(columns=["psma", "fapi"])
    wide.columns = ["psma_suv_mean", "fapi_suv_mean"]
    wide = wide.reset_index()
    # keys present in gland_stats but all-null values are dropped by pivot_table: restore them
    allkeys = df[keys].drop_duplicates()
    wide = allkeys.merge(wide, on=keys, how="left")
    extra = [c for c in ("group", "suv_type") if c in df.columns]
    if extra:
        wide = wide.merge(df.drop_duplicates(keys)[keys + extra], on=keys, how="left")
    wide["psma_fapi_index"] = psma_fapi_index(
        wide["psma_suv_mean"].to_numpy(dtype=float, na_value=np.nan),
        wide["fapi_suv_mean"].to_numpy(dtype=float, na_value=np.nan),
        definition,
        reference,
        gland=wide["gland"].to_numpy(dtype=object),
    )
    wide["index_definition"] = definition
    if spearman is not None:
        sp = pd.DataFrame(spearman)
        if "timepoint" not in sp.columns:  # the baseline pair
            sp = sp.assign(timepoint=1)
        sp = sp[keys + ["voxel_spearman_rho", "n_voxels"] + (["voxel_rho_note"] if "voxel_rho_note" in sp else [])]
        wide = wide.merge(sp, on=keys, how="left", indicator="_pair")
        have_pair = (wide.pop("_pair") == "both").to_numpy()
    else:
        wide["voxel_spearman_rho"] = np.nan
        wide["n_voxels"] = pd.array([pd.NA] * len(wide), dtype="Int64")
        have_pair = np.zeros(len(wide), bool)
    given = wide.pop("voxel_rho_note") if "voxel_rho_note" in wide else pd.Series([None] * len(wide), index=wide.index)
    rho = pd.to_numeric(wide["voxel_spearman_rho"], errors="coerce").to_numpy(float)
    notes = [g if isinstance(g, str) else
             voxel_rho_note(None if not np.isfinite(r) else float(r), None if pd.isna(n) else int(n), have_pair=bool(p))
             for g, r, n, p in zip(given, rho, wide["n_voxels"], have_pair)]
    wide["voxel_rho_note"] = pd.array(notes, dtype="string")
    return wide.sort_values(keys, kind="stable").reset_index(drop=True)


def index_pairs(sessions) -> list[tuple[int, str, str]]:
    """``(time point, psma session, fapi session)`` of every time point with both tracers, in order:
    ``["psma", "fapi", "psma2"]`` -> ``[(1, "psma", "fapi")]``."""
    have = set(sessions)
    points = sorted({session_parts(s)[1] for s in have})
    return [(t, session_name("psma", t), session_name("fapi", t)) for t in points
            if session_name("psma", t) in have and session_name("fapi", t) in have]


def voxel_correlations(inputs: Any, subject: str, psma: str = "psma", fapi: str = "fapi") -> Any:
    """Within-gland voxel Spearman rho between the PSMA and FAPI SUV of one time point, on the PSMA PET
    grid. ``inputs``: per session ``<s>_suv``, ``<s>_xfm`` (PET->CT), ``<s>_dseg_table``, the PSMA
    session's ``<psma>_pet_dseg``, and for a session that is not the reference ``<s>_affine``,
    ``<s>_warp``, ``<s>_inverse_warp`` (its CT aligned to the reference CT)."""
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from glandpet.glands import read_label_table
    from glandpet.registration.transforms import warp

    keys = set(inputs.keys())
    labels = np.asarray(nib.load(inputs[f"{psma}_pet_dseg"]).dataobj)
    # A PSMA PET point -> PSMA CT (the inverse of CT->PET) -> the reference CT (the inverse of the
    # PSMA session's alignment, when it is not the reference) -> FAPI CT (the FAPI session's alignment)
    # -> FAPI PET (CT->PET). ANTs applies the list last to first.
    chain, invert = [inputs[f"{fapi}_xfm"]], [False]
    if f"{fapi}_affine" in keys:
        chain += [inputs[f"{fapi}_warp"], inputs[f"{fapi}_affine"]]
        invert += [False, False]
    if f"{psma}_affine" in keys:
        chain += [inputs[f"{psma}_affine"], inputs[f"{psma}_inverse_warp"]]
        invert += [True, False]
    chain.append(inputs[f"{psma}_xfm"])
    invert.append(True)
    fapi_on_psma = warp(inputs[f"{fapi}_suv"], inputs[f"{psma}_suv"], chain, invert=invert).numpy()
    psma_suv = np.asarray(nib.load(inputs[f"{psma}_suv"]).dataobj, dtype=np.float32)
    timepoint = session_parts(psma)[1]
    rows = []
    for lab in read_label_table(label_table_of(inputs[f"{psma}_dseg"])):
        rho, n = voxel_spearman(psma_suv, fapi_on_psma, labels == lab.index)
        rows.append(dict(subject_id=subject, timepoint=timepoint, gland=lab.gland, side=lab.side,
                         voxel_spearman_rho=rho, n_voxels=n))
    return pd.DataFrame(rows)

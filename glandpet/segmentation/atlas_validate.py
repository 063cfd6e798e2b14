"""`glandpet atlas validate DIR [DIR ...]`: leave-one-out cross-validation of an atlas library.

Each held-out atlas's CT is segmented by the workflow's own segmentation
(:func:`glandpet.segmentation.multi_atlas.segment_subject`, parameters from the ``segmentation:`` config keys
through :meth:`glandpet.segmentation.params.SegmentationParams.from_config`) with the other atlases
(all of them, or ``n_atlases`` of them chosen per held-out scan by a seeded draw), and its automatic
labels are compared with its own contours (:func:`glandpet.segmentation.metrics.mask_metrics`): Dice,
symmetric mean surface distance and HD95 in mm, contour and automatic volume and the relative volume
error; beside them the atlases' median volume of the gland before fusion and the gland's confidence
(how much of a volume error the library itself brings, and whether the confidence tracks the
error on this team's scans). One row per held-out atlas x gland x side (:data:`glandpet.tables.ATLAS_VALIDATION`), medians
per gland. The voters behind each automatic gland (:data:`glandpet.tables.ATLAS_VALIDATION_VOTERS`: each
voting atlas's contour volume and its volume warped onto the held-out scan) give the library's size
transfer per gland (:func:`size_transfer_per_gland`, :mod:`glandpet.segmentation.size_calibration`):
how much of a patient's gland size registration carries, and the ``segmentation.size_transfer``
that corrects the volumes for it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from glandpet.errors import UserError
from glandpet.rng import keyed_rng

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = [
    "CPU_SECONDS_PER_REGISTRATION",
    "add_subparser",
    "choose_library",
    "choose_subjects",
    "estimate_cost",
    "format_medians",
    "format_size_transfer",
    "medians_per_gland",
    "run",
    "score_scan",
    "size_transfer_per_gland",
    "validate_atlases",
    "voters_path",
]

#: rough CPU cost of one atlas in one subject's segmentation with the default settings (stage A,
#: the regional stages, its share of the fusion): about 25 CPU-s on the 128^3 OpenKBP grids, 60-70
#: on the ~1 mm phantom CTs (README: 3 atlases 193 CPU-s, 10 atlases 711 CPU-s per subject). The
#: up-front estimate uses the larger; the progress bar then shows the real rate.
CPU_SECONDS_PER_REGISTRATION = 65.0
#: parallel efficiency of a second ITK thread (README: 10 atlases 659 CPU-s in 390 s wall on 2 cores)
THREAD_EFFICIENCY = 0.7


def add_subparser(asub) -> argparse.ArgumentParser:
    """Register `glandpet atlas validate` on the `atlas` command's subparsers."""
    from glandpet.segmentation.segment_command import DEFAULT_THREADS

    av = asub.add_parser(
        "validate", help="leave-one-out cross-validation of an atlas library (Dice, MSD, HD95, volume error)",
        description="Segment each atlas (or K of them) with the others, exactly as the workflow would, and compare "
                    "the automatic labels with its contours: per atlas x gland x side Dice, mean surface distance "
                    "and HD95 (mm), contour and automatic volume (mL) and the relative volume error. Prints the "
                    "cost up front and the medians per gland; -o writes the per-scan table (TSV).")
    av.add_argument("atlas_dirs", nargs="+", metavar="DIR", help="atlas folders (ct.nii.gz, labels.nii.gz, labels.tsv)")
    av.add_argument("-o", "--output", default=None, metavar="TABLE.tsv", help="per-scan table (TSV)")
    av.add_argument("--config", default=None, metavar="CONFIG",
                    help="a study config (its `segmentation:` keys) or a YAML of those keys; default: the workflow's defaults")
    av.add_argument("--subjects", type=int, default=None, metavar="K",
                    help="hold out only K atlases (a seeded, deterministic choice); default: every atlas")
    av.add_argument("--atlases", type=int, default=None, metavar="N",
                    help="segment each held-out scan with N of the others (seeded choice per scan); default: all others")
    av.add_argument("--seed", type=int, default=0, help="seed of the --subjects / --atlases choices (default 0)")
    av.add_argument("--labels-dir", default=None, metavar="DIR",
                    help="keep each held-out scan's automatic labels there (<atlas>_dseg.nii.gz + .tsv)")
    av.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                    help=f"threads for registration (default {DEFAULT_THREADS}; the workflow uses 1: bit-reproducible labels)")
    av.set_defaults(func=run)
    return av


# ------------------------------------------------------------------------------ choices and cost
def choose_subjects(names: Sequence[str], k: int | None, seed: int = 0) -> list[str]:
    """The held-out atlases: all (``k`` None or >= len), else ``k`` of them drawn with ``seed``
    (independent of the order given), in name order."""
    pool = sorted(names)
    if k is None or k >= len(pool):
        return pool
    if k < 1:
        raise UserError(f"--subjects must be at least 1, not {k}")
    idx = keyed_rng(seed, "subjects").choice(len(pool), size=k, replace=False)
    return [pool[i] for i in sorted(idx)]


def choose_library(held_out: str, names: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """The atlases that segment ``held_out``: every other one (``n`` None or >= their number), else
    ``n`` of them drawn with a generator seeded by ``seed`` and the held-out name (so a scan gets the
    same library whichever other scans are run), in name order."""
    others = sorted(x for x in names if x != held_out)
    if n is None or n >= len(others):
        return others
    if n < 1:
        raise UserError(f"--atlases must be at least 1, not {n}")
    idx = keyed_rng(seed, held_out).choice(len(others), size=n, replace=False)
    return [others[i] for i in sorted(idx)]


def choose_fixed_library(names: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """One library of ``n`` atlases for every held-out scan (drawn with ``seed``, in name order):
    the other scans are held out from it. With a fixed library an atlas template
    (:mod:`glandpet.segmentation.atlas_template`) is built once, as in a study."""
    pool = sorted(names)
    if not 1 <= n < len(pool):
        raise UserError(f"a fixed library needs 1 to {len(pool) - 1} atlases, not {n}")
    idx = keyed_rng(seed, "library").choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(idx)]


def estimate_cost(n_registrations: int, threads: int) -> dict[str, float]:
    """CPU-hours and wall minutes of ``n_registrations`` atlas-to-scan registrations (rough:
    :data:`CPU_SECONDS_PER_REGISTRATION`)."""
    cpu = n_registrations * CPU_SECONDS_PER_REGISTRATION
    speedup = 1.0 + THREAD_EFFICIENCY * (max(1, threads) - 1)
    return {"cpu_hours": cpu / 3600.0, "wall_minutes": cpu / speedup / 60.0}


# ------------------------------------------------------------------------------ scoring
def score_scan(truth_labels: str | Path, truth_table: str | Path, auto_dseg: str | Path) -> list[dict[str, Any]]:
    """Metrics of each gland and side the contours hold (``truth_labels`` with its label table)
    against the automatic label map (default label values, same grid)."""
    import nibabel as nib
    import numpy as np

    from glandpet.glands import DEFAULT_LABELS, read_label_table
    from glandpet.segmentation.metrics import mask_metrics, spacing_of_affine
    from glandpet.segmentation.atlas_registration import relabel_to_default

    t_img, a_img = nib.load(str(truth_labels)), nib.load(str(auto_dseg))
    if tuple(t_img.shape[:3]) != tuple(a_img.shape[:3]) or not np.allclose(t_img.affine, a_img.affine, atol=1e-3):
        raise ValueError(f"automatic labels {auto_dseg} are not on the grid of {truth_labels}")
    truth = relabel_to_default(np.rint(np.asanyarray(t_img.dataobj)).astype(np.int64), read_label_table(truth_table))
    auto = np.rint(np.asanyarray(a_img.dataobj)).astype(np.int64)
    spacing = spacing_of_affine(t_img.affine)
    present = set(np.unique(truth).tolist())
    rows = []
    for lab in DEFAULT_LABELS:
        if lab.index not in present:
            continue
        rows.append({"gland": lab.gland, "side": lab.side, **mask_metrics(truth == lab.index, auto == lab.index, spacing)})
    return rows


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + ch.ru_utime + ch.ru_stime


def validate_atlases(atlases: Sequence[Mapping[str, Any]], *, seg_config: Mapping[str, Any] | None = None,
                     subjects: int | Sequence[str] | None = None, n_atlases: int | None = None, seed: int = 0,
                     threads: int = 2, out_tsv: str | Path | None = None, labels_dir: str | Path | None = None,
                     progress: bool = True, progress_stream: IO[str] | None = None,
                     on_scan: Callable[[str, list[dict], dict], None] | None = None,
                     library: Sequence[str] | None = None, voters: list[dict] | None = None) -> pd.DataFrame:
    """Leave-one-out validation. ``atlases``: ``{name, ct, labels, label_table}`` (as
    :func:`glandpet.segmentation.segment_command.read_atlas_dir` returns). ``subjects``: the held-out names, or a
    count K (:func:`choose_subjects`), or None (all). ``n_atlases``: library size per held-out scan
    (:func:`choose_library`); ``library``: instead, these atlases for every held-out scan (none of
    them held out: :func:`choose_fixed_library`). Writes ``out_tsv`` (and the voters' table,
    :func:`voters_path`) after every scan (a long run keeps its finished scans). ``on_scan(name,
    rows, info)`` is called after each scan (``info["voters"]``: its voters' rows). A scan whose segmentation
    fails gets rows with the error message and no metrics; the others go on. ``voters``: a list the
    run's voters' rows are appended to (:data:`glandpet.tables.ATLAS_VALIDATION_VOTERS`)."""
    from glandpet.progress import Progress
    from glandpet.segmentation.multi_atlas import segment_subject
    from glandpet.segmentation.params import SegmentationParams
    from glandpet.tables import ATLAS_VALIDATION, ATLAS_VALIDATION_VOTERS, config_hash, to_table

    by_name = {a["name"]: dict(a) for a in atlases}
    if len(by_name) != len(atlases):
        raise UserError("atlas names must be unique (two atlas folders share a name)")
    if len(by_name) < 2:
        raise UserError("leave-one-out needs at least 2 atlases")
    held = list(subjects) if isinstance(subjects, (list, tuple)) else choose_subjects(list(by_name), subjects, seed)
    unknown = [h for h in held if h not in by_name]
    if unknown:
        raise UserError(f"unknown atlas(es) to hold out: {', '.join(unknown)}")
    fixed = None if library is None else list(library)
    if fixed is not None and (set(fixed) & set(held) or set(fixed) - set(by_name)):
        raise UserError("a fixed library must be known atlases that are not held out")
    params = SegmentationParams.from_config(seg_config)
    prov = {"pipeline_version": _version(), "config_hash": config_hash(dict(seg_config or {}))}
    rows: list[dict] = []
    voter_rows: list[dict] = []
    keep = Path(labels_dir) if labels_dir else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gp_validate_") as tmp, \
            Progress(len(held), "atlas validate", unit="scans", stream=progress_stream, quiet=not progress) as bar:
        for name in held:
            chosen = list(fixed) if fixed is not None else choose_library(name, list(by_name), n_atlases, seed)
            out_dir = keep or Path(tmp)
            dseg = out_dir / f"{name}_dseg.nii.gz"
            t0, c0 = time.perf_counter(), _cpu_seconds()
            error = None
            scan_voters: list[dict] = []
            try:
                m = segment_subject(by_name[name]["ct"], [_atlas_arg(by_name[x]) for x in chosen], dseg,
                                    out_dir / f"{name}_dseg.tsv", params, threads=threads)
                scored = [{**r, **_gland_metrics(m, r["gland"], r["side"])}
                          for r in score_scan(by_name[name]["labels"], by_name[name]["label_table"], dseg)]
                scan_voters = [{"atlas": name, **v, **prov} for r in scored for v in _voters(m, r)]
            except Exception as exc:  # one lost scan must not end a run of hours
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                scored = [{"gland": g, "side": s} for g, s in _truth_glands(by_name[name])]
            voter_rows += scan_voters
            info = {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0, "library": chosen,
                    "error": error, "voters": scan_voters}
            scan_rows = [{"atlas": name, **r, "n_atlases": len(chosen), "seconds": info["seconds"],
                          "cpu_seconds": info["cpu_seconds"], "library": ",".join(chosen), "error": error, **prov}
                         for r in scored]
            rows += scan_rows
            if out_tsv is not None:
                write_tsv(rows, out_tsv)
                write_tsv(voter_rows, voters_path(out_tsv), ATLAS_VALIDATION_VOTERS)
            if on_scan is not None:
                on_scan(name, scan_rows, info)
            bar.update()
    if voters is not None:
        voters.extend(voter_rows)
    return to_table(rows, ATLAS_VALIDATION).to_pandas() if rows else ATLAS_VALIDATION.empty_table().to_pandas()


def _voters(metrics: Mapping[str, Any], row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The voters of one scored gland (``row``: gland, side, volume_contour_ml) from
    :func:`segment_subject`'s metrics: each voter's contour and warped volume."""
    e = (metrics.get("glands") or {}).get(f"{row['gland']}_{row['side']}") or {}
    return [{"gland": row["gland"], "side": row["side"], "voter": v, "voter_contour_ml": n, "voter_warped_ml": w,
             "volume_contour_ml": row.get("volume_contour_ml")}
            for v, n, w in zip(e.get("voters") or [], e.get("atlas_native_ml") or [], e.get("atlas_volumes_ml") or [])]


def voters_path(out_tsv: str | Path) -> Path:
    """The voters' table beside a validation table: ``NAME.tsv`` -> ``NAME_voters.tsv``."""
    p = Path(out_tsv)
    return p.with_name(p.name[: -len(".tsv")] + "_voters.tsv" if p.name.endswith(".tsv") else p.name + "_voters.tsv")


def _gland_metrics(metrics: Mapping[str, Any], gland: str, side: str) -> dict[str, Any]:
    """``volume_atlases_ml`` (the median of the gland's volumes as the atlases' registrations put it,
    before fusion), ``confidence`` and the ``size_transfer`` its volume was corrected with (None:
    not corrected) of one gland from :func:`segment_subject`'s metrics."""
    import numpy as np

    e = (metrics.get("glands") or {}).get(f"{gland}_{side}") or {}
    vols = [v for v in e.get("atlas_volumes_ml") or [] if v > 0]
    return {"volume_atlases_ml": float(np.median(vols)) if vols else None, "confidence": e.get("confidence"),
            "size_transfer": (e.get("size_calibration") or {}).get("b")}


def _version() -> str:
    from glandpet import __version__

    return __version__


def _atlas_arg(a: Mapping[str, Any]) -> dict:
    return {k: str(a[k]) for k in ("name", "ct", "labels", "label_table")}


def _truth_glands(a: Mapping[str, Any]) -> list[tuple[str, str]]:
    glands = a.get("glands") or []
    return [tuple(g.rsplit("_", 1)) for g in glands]  # type: ignore[misc]


def write_tsv(rows: list[dict] | pd.DataFrame, path: str | Path, schema=None) -> None:
    """The per-scan table as TSV (``schema``, default :data:`glandpet.tables.ATLAS_VALIDATION`), atomically."""
    from glandpet.tables import ATLAS_VALIDATION, atomic_path, to_table

    df = to_table(rows, schema or ATLAS_VALIDATION).to_pandas()
    tmp = atomic_path(path)
    try:
        df.to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="NaN")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------------------ summary
def medians_per_gland(df: pd.DataFrame) -> pd.DataFrame:
    """Per gland (both sides together): number of contours, and the medians of Dice, MSD, HD95,
    |volume error|, the signed volume error and the signed volume error the atlases' median volume
    (before fusion) would have had; and the signed volume error of the smaller and of the larger half
    of the contours (split at their median volume: ``volume_error_small_pct``,
    ``volume_error_large_pct``). Where the CT does not show a gland's boundary the automatic volume
    leans towards the library's typical gland: small glands come out too large, large ones too
    small (real CT, 24 scans x 10 atlases: parotids under 20 mL +34 %, the others -18 %), which a
    team should know before it measures atrophic glands. Failed scans are left out (counted in
    n_failed)."""
    import pandas as pd

    from glandpet.glands import GLANDS

    out = []
    for gland in [g for g in GLANDS if g in set(df["gland"])]:
        d = df[df["gland"] == gland]
        ok = d[d["error"].isna()]
        out.append({"gland": gland, "n": len(ok), "n_failed": len(d) - len(ok),
                    "dice": ok["dice"].median(), "msd_mm": ok["msd_mm"].median(), "hd95_mm": ok["hd95_mm"].median(),
                    "abs_volume_error_pct": ok["volume_error_pct"].abs().median(),
                    "volume_error_pct": ok["volume_error_pct"].median(),
                    "atlases_volume_error_pct": (100.0 * (ok["volume_atlases_ml"] / ok["volume_contour_ml"] - 1.0)).median()
                    if "volume_atlases_ml" in ok else float("nan"),
                    **_error_by_size(ok)})
    return pd.DataFrame(out)


def _error_by_size(ok: pd.DataFrame) -> dict[str, float]:
    """Median signed volume error of the contours under the median contour volume and of the rest
    (NaN for a half without rows)."""
    small = ok["volume_contour_ml"] < ok["volume_contour_ml"].median()
    nan = float("nan")
    return {"volume_error_small_pct": ok.loc[small, "volume_error_pct"].median() if small.any() else nan,
            "volume_error_large_pct": ok.loc[~small, "volume_error_pct"].median() if (~small).any() else nan}


def size_transfer_per_gland(voters: pd.DataFrame, exclude: str | None = None) -> pd.DataFrame:
    """Per gland, the library's size transfer fitted on a voters' table
    (:data:`glandpet.tables.ATLAS_VALIDATION_VOTERS`; both sides pooled;
    :func:`glandpet.segmentation.size_calibration.fit_size_transfer`): ``gland, b, se, n`` (b NaN where
    too few pairs). ``exclude``: leave this held-out scan's rows out (a scan's own contour must not
    set its own correction)."""
    import pandas as pd

    from glandpet.glands import GLANDS
    from glandpet.segmentation.size_calibration import fit_size_transfer

    v = voters if exclude is None else voters[voters["atlas"] != exclude]
    out = []
    for gland in [g for g in GLANDS if g in set(v["gland"])]:
        d = v[v["gland"] == gland]
        fit = fit_size_transfer(d["voter_contour_ml"], d["voter_warped_ml"], d["volume_contour_ml"])
        out.append({"gland": gland, "b": fit.b if fit else float("nan"), "se": fit.se if fit else float("nan"),
                    "n": fit.n if fit else int(len(d))})
    return pd.DataFrame(out, columns=["gland", "b", "se", "n"])


#: a size transfer is suggested for the config only when its standard error is at most this.
MAX_SE_TO_SUGGEST = 0.15


def format_size_transfer(st: pd.DataFrame) -> str:
    """The size transfer per gland and the config line that corrects the volumes for the glands
    whose transfer is below 0.9, known to :data:`MAX_SE_TO_SUGGEST` and not under
    :data:`glandpet.segmentation.size_calibration.MIN_SIZE_TRANSFER` (where registration carries
    almost none of the size, inverting it would multiply noise: no correction is suggested)."""
    from glandpet.segmentation.size_calibration import MIN_SIZE_TRANSFER

    lines = [f"{'gland':<14}{'b':>7}{'SE':>7}{'pairs':>7}"]
    keep = {}
    for r in st.itertuples():
        if r.b == r.b:  # not NaN
            lines.append(f"{r.gland:<14}{r.b:>7.2f}{r.se:>7.2f}{r.n:>7}")
            if r.b < MIN_SIZE_TRANSFER:
                lines[-1] += ("   (registration carries almost none of the size: the volume comes from the atlases "
                              "and cannot be corrected; use atlases that span the patients' gland sizes)")
            elif r.b < 0.9 and r.se <= MAX_SE_TO_SUGGEST:
                keep[r.gland] = round(min(1.0, float(r.b)), 2)
            elif r.b < 0.9:
                lines[-1] += f"   (uncertain, SE > {MAX_SE_TO_SUGGEST}: validate more atlases before using it)"
        else:
            lines.append(f"{r.gland:<14}{'-':>7}{'-':>7}{r.n:>7}   (too few pairs or too little size spread to fit)")
    if keep:
        lines.append("registration carries only part of a patient's gland size (b < 1): to correct the volumes, set "
                     "segmentation: size_transfer: {" + ", ".join(f"{g}: {b}" for g, b in keep.items()) + "}")
    return "\n".join(lines)


def format_medians(med: pd.DataFrame) -> str:
    lines = [f"{'gland':<14}{'n':>4}{'Dice':>8}{'MSD mm':>9}{'HD95 mm':>9}{'|vol err| %':>13}{'vol err %':>11}"
             f"{'atlases vol err %':>19}{'vol err small / large half %':>30}"]
    for r in med.itertuples():
        lines.append(f"{r.gland:<14}{r.n:>4}{r.dice:>8.3f}{r.msd_mm:>9.2f}{r.hd95_mm:>9.2f}"
                     f"{r.abs_volume_error_pct:>13.1f}{r.volume_error_pct:>+11.1f}{r.atlases_volume_error_pct:>+19.1f}"
                     f"{f'{r.volume_error_small_pct:+.1f} / {r.volume_error_large_pct:+.1f}':>30}"
                     + (f"   ({r.n_failed} failed)" if r.n_failed else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    from glandpet.segmentation.segment_command import load_segmentation_config, read_atlas_dir

    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, not {args.threads}")
    if args.output is not None and not str(args.output).endswith(".tsv"):
        raise UserError(f"-o {args.output}: the table is written as TSV (name it .tsv)")
    atlases = [read_atlas_dir(d) for d in args.atlas_dirs]
    names = [a["name"] for a in atlases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"atlas name(s) given twice: {', '.join(dup)} (each atlas folder's name must be unique)")
    if len(atlases) < 2:
        raise UserError("leave-one-out needs at least 2 atlas folders")
    seg = load_segmentation_config(args.config)
    held = choose_subjects(names, args.subjects, args.seed)
    libs = {h: choose_library(h, names, args.atlases, args.seed) for h in held}
    n_reg = sum(len(v) for v in libs.values())
    cost = estimate_cost(n_reg, args.threads)
    out = sys.stdout
    sizes = sorted({len(v) for v in libs.values()})
    print(f"glandpet atlas validate: {len(atlases)} atlases, {len(held)} held out, each segmented with "
          f"{'/'.join(map(str, sizes))} others: {n_reg} registrations, estimated {cost['wall_minutes']:.0f} min "
          f"on {args.threads} thread(s) ({cost['cpu_hours']:.2f} CPU-hours)", file=out, flush=True)
    voter_rows: list[dict] = []
    df = validate_atlases(atlases, seg_config=seg, subjects=held, n_atlases=args.atlases, seed=args.seed,
                          threads=args.threads, out_tsv=args.output, labels_dir=args.labels_dir, voters=voter_rows)
    failed = sorted(set(df.loc[df["error"].notna(), "atlas"]))
    for name in failed:
        msg = df.loc[df["atlas"] == name, "error"].iloc[0]
        print(f"  {name}: segmentation failed: {msg}", file=sys.stderr)
    cpu_h = df.drop_duplicates("atlas")["cpu_seconds"].sum() / 3600.0
    print(f"\nmedians per gland ({len(held)} held-out scan(s); {cpu_h:.2f} CPU-hours):", file=out)
    print(format_medians(medians_per_gland(df)), file=out)
    if voter_rows:
        import pandas as pd

        voters = pd.DataFrame(voter_rows)
        print("\nsize transfer per gland (how much of a patient's gland size the registration carries: "
              "glandpet/segmentation/size_calibration.py):", file=out)
        print(format_size_transfer(size_transfer_per_gland(voters)), file=out)
    if args.output:
        print(f"-> {args.output} (voters: {voters_path(args.output)})", file=out)
    return 1 if failed else 0

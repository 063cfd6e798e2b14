"""Parotid segmentation on real CT: leave-one-out on the OpenKBP scans (24 real head-and-neck
planning CTs with clinical parotid contours, in atlas layout), with libraries of N atlases.

    python benchmarks/real_ct.py [--data DIR] [--cases K] [--atlases 5 10 23] [--seed 0]
                                 [--threads 2] [--config CONFIG] [--out DIR] [--library N]
                                 [--scans NAME [NAME ...]] [--size-transfer-from VOTERS.tsv ...]
    python benchmarks/real_ct.py --summarise TABLE.tsv [TABLE.tsv ...]

Each held-out scan (all, or K chosen by a seeded draw: ``--cases``) is segmented with N of the
other scans (a seeded draw per held-out scan, the same for every run; N >= 23: all the others),
by the workflow's segmentation with default settings (or ``--config``'s ``segmentation:`` keys),
through :func:`glandpet.segmentation.atlas_validate.validate_atlases` -- the function behind
``glandpet atlas validate``. Prints per scan the Dice, surface distances and volume error of each
parotid and the scan's wall and CPU time; per N the medians, the time per scan and the CPU-hours
(and what the full 24-scan run would cost); at the end one summary row per N beside the issue's
target (median Dice >= 0.82, median |volume error| <= 12 %). The per-scan tables go to
``--out`` (default: a temporary folder) as ``real_ct_<N>atlases.tsv``.

``--scans``: hold out these scans only (by name), e.g. to split the full leave-one-out between
processes or machines: a scan's library depends only on its name and the seed, so the parts give
the rows the whole run would give.

``--summarise``: no segmentation; the per-scan tables of one or more runs (e.g. the parts of a
split run) read together: the medians per gland, whether the automatic volume follows the contour's
(Spearman) beside a predictor that ignores the image (each held-out gland given the median contour
volume of the other scans), and how well the confidence ranks the Dice (Spearman; the glands of
Dice < 0.6 caught by ``review_below`` 0.6 and the share flagged), as ``benchmarks/seg_confidence.py``
scores it. Where the voters' tables of the runs lie beside them (``real_ct_<N>atlases_voters.tsv``),
also the volume error the size-transfer correction (:mod:`glandpet.segmentation.size_calibration`)
gives each gland, the transfer fitted on the *other* scans' voters (no scan's contour sets its own
correction): the automatic volume times the calibrated volume over its voters' median -- an estimate
without segmenting again (the segmentation resizes the gland before its intensity refinement,
which on real CT leaves a parotid's volume within a few per cent); ``--size-transfer-from`` gives
the real thing.

``--size-transfer-from VOTERS.tsv ...``: segment with the size-transfer correction on, each held-out
scan with the transfer fitted on the voters of the other scans in these tables (a first run's
``real_ct_<N>atlases_voters.tsv``).

``--library N``: one fixed library of N scans (a seeded draw) segments every held-out scan, drawn
from the other scans -- a study's set-up, and the one where an atlas template
(``segmentation: {atlas_registration: template}`` in ``--config``) is built once for all scans.

The full run (24 scans x 5 + 10 + 23 atlases = 912 registrations) takes hours; a subset proves the
set-up: ``--cases 2 --atlases 2``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "openkbp-parotid-ct"
TARGET_DICE = 0.82
TARGET_ABS_VOLUME_ERROR_PCT = 12.0


def read_cases(data: Path) -> list[str]:
    """Case folders listed in cases.tsv (all of them when it is absent) that hold an atlas."""
    tsv = data / "cases.tsv"
    if tsv.is_file():
        with open(tsv, newline="") as fh:
            names = [row["case"] for row in csv.DictReader(fh, delimiter="\t")]
    else:
        names = sorted(p.name for p in data.iterdir() if p.is_dir())
    return [n for n in names if (data / n / "labels.nii.gz").is_file()]


def scan_line(name: str, rows: list[dict], info: dict) -> str:
    if info.get("error"):
        return f"  {name:<14} FAILED ({info['error']})  {info['seconds']:6.0f} s"
    parts = []
    for r in sorted(rows, key=lambda r: (r["gland"], r["side"])):
        parts.append(f"{r['gland']}_{r['side']}: Dice {r['dice']:.3f} MSD {r['msd_mm']:5.2f} mm "
                     f"HD95 {r['hd95_mm']:5.1f} mm vol {r['volume_auto_ml']:5.1f}/{r['volume_contour_ml']:5.1f} mL "
                     f"({r['volume_error_pct']:+5.1f} %; atlases {r.get('volume_atlases_ml') or float('nan'):5.1f} mL)")
    return (f"  {name:<14} " + " | ".join(parts)
            + f"  [{info['seconds']:.0f} s wall, {info['cpu_seconds']:.0f} CPU-s]")


def summarise(tables: list[Path]) -> int:
    """Print the medians, the volume tracking and the confidence figures of per-scan tables."""
    import numpy as np
    import pandas as pd

    from glandpet.segmentation.atlas_validate import format_medians, medians_per_gland, voters_path
    from glandpet.segmentation.confidence import REVIEW_BELOW

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from seg_confidence import LOW_DICE, flag_figures, spearman

    missing = [str(t) for t in tables if not t.is_file()]
    if missing:
        print(f"real_ct: no such table: {', '.join(missing)}", file=sys.stderr)
        return 2
    df = pd.concat([pd.read_csv(t, sep="\t") for t in tables], ignore_index=True)
    dup = df.duplicated(["atlas", "gland", "side"], keep="last")
    if dup.any():
        print(f"real_ct: {int(dup.sum())} repeated rows (the same scan in two tables): the last kept")
        df = df[~dup]
    print(f"real_ct: {df['atlas'].nunique()} held-out scans from {len(tables)} table(s)")
    print(format_medians(medians_per_gland(df)))
    ok = df[df["error"].isna() & (df["gland"] == "parotid")]
    if ok.empty:
        return 0
    vol, auto = ok["volume_contour_ml"].to_numpy(float), ok["volume_auto_ml"].to_numpy(float)
    # the image-blind predictor: each gland at the median contour volume of the other scans' parotids
    blind = np.array([np.median(ok.loc[ok["atlas"] != a, "volume_contour_ml"]) for a in ok["atlas"]])
    per_scan = df.drop_duplicates("atlas")
    print(f"parotid volume: contour median {np.median(vol):.1f} mL (range {vol.min():.1f}-{vol.max():.1f}); "
          f"Spearman(automatic, contour) {spearman(auto, vol):.2f}, (atlases' median, contour) "
          f"{spearman(ok['volume_atlases_ml'], vol):.2f}")
    print(f"  |volume error| median: automatic {np.median(np.abs(auto / vol - 1)) * 100:.1f} %, "
          f"image-blind (other scans' median contour) {np.median(np.abs(blind / vol - 1)) * 100:.1f} %")
    fig = flag_figures(ok["confidence"], ok["dice"], REVIEW_BELOW)
    print(f"parotid confidence: Spearman with Dice {spearman(ok['confidence'], ok['dice']):.2f}; "
          f"{fig['n_low']} of {fig['n']} glands under Dice {LOW_DICE}, {fig['recall']:.2f} of them flagged "
          f"(review_below {REVIEW_BELOW}); {fig['flagged']:.2f} of all flagged")
    print(f"time per scan (median): {per_scan['seconds'].median():.0f} s wall, {per_scan['cpu_seconds'].median():.0f} CPU-s; "
          f"{per_scan['cpu_seconds'].sum() / 3600:.2f} CPU-hours in all")
    voter_tables = [voters_path(t) for t in tables if voters_path(t).is_file()]
    done = ok["size_transfer"].notna() if "size_transfer" in ok else pd.Series(False, index=ok.index)
    if done.any():
        print(f"parotid volumes corrected in the run for the size transfer: {int(done.sum())} of {len(ok)} glands "
              f"(b {ok.loc[done, 'size_transfer'].min():.2f}-{ok.loc[done, 'size_transfer'].max():.2f})")
    if voter_tables and not done.all():  # an estimate for the glands the run did not correct
        corrected_volumes(ok[~done], pd.concat([pd.read_csv(t, sep="\t") for t in voter_tables], ignore_index=True))
    return 0


def corrected_volumes(ok, voters) -> None:
    """Print the parotid volume error after the size-transfer correction, each scan's transfer
    fitted on the other scans' voters."""
    import numpy as np

    from glandpet.segmentation.atlas_validate import size_transfer_per_gland
    from glandpet.segmentation.size_calibration import calibrated_volume

    voters = voters.drop_duplicates(["atlas", "gland", "side", "voter"], keep="last")
    errs, bs = [], {}
    for r in ok.itertuples():
        if r.atlas not in bs:
            st = size_transfer_per_gland(voters, exclude=r.atlas)
            bs[r.atlas] = float(st.loc[st.gland == r.gland, "b"].iloc[0]) if (st.gland == r.gland).any() else float("nan")
        v = voters[(voters.atlas == r.atlas) & (voters.gland == r.gland) & (voters.side == r.side)]
        est = calibrated_volume(v.voter_contour_ml, v.voter_warped_ml, bs[r.atlas]) if bs[r.atlas] == bs[r.atlas] else None
        pos = v.voter_warped_ml[v.voter_warped_ml > 0]
        if est is None or pos.empty:
            continue
        errs.append((r.volume_contour_ml, 100.0 * (r.volume_auto_ml * est / float(np.median(pos)) / r.volume_contour_ml - 1)))
    if not errs:
        return
    vol, err = np.array(errs).T
    small = vol < np.median(vol)
    b = np.array([x for x in bs.values() if x == x])
    print(f"parotid volume corrected for the size transfer (b {np.median(b):.2f}, range {b.min():.2f}-{b.max():.2f}, "
          f"fitted on the other scans): |error| median {np.median(np.abs(err)):.1f} %, signed {_pct(np.median(err))} %; "
          f"smaller / larger half {_pct(np.median(err[small]))} / {_pct(np.median(err[~small]))} % ({len(err)} glands)")


def _pct(x: float) -> str:
    """A signed percentage to 0.1, never '-0.0'."""
    return f"{round(float(x), 1) + 0.0:+.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the OpenKBP atlases (cases.tsv)")
    ap.add_argument("--cases", type=int, default=None, metavar="K", help="hold out only K scans (seeded choice)")
    ap.add_argument("--atlases", type=int, nargs="+", default=[5, 10, 23], metavar="N",
                    help="library sizes (default 5 10 23; N >= number of other scans: all of them)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scan and library choices (default 0)")
    ap.add_argument("--threads", type=int, default=2, help="threads per segmentation (default 2, as the workflow)")
    ap.add_argument("--config", default=None, help="a study config whose segmentation: keys to use (default: defaults)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the per-scan tables (TSV)")
    ap.add_argument("--scans", nargs="+", default=None, metavar="NAME",
                    help="hold out these scans only (names as in cases.tsv); the libraries are those of the full run")
    ap.add_argument("--library", type=int, default=None, metavar="N",
                    help="one fixed library of N scans for every held-out scan (held-out scans drawn from the rest)")
    ap.add_argument("--size-transfer-from", nargs="+", type=Path, default=None, metavar="VOTERS",
                    help="correct volumes for the size transfer, each scan's fitted on the other scans' voters here")
    ap.add_argument("--summarise", nargs="+", type=Path, default=None, metavar="TABLE",
                    help="no segmentation: summarise these per-scan tables (real_ct_<N>atlases.tsv) together")
    args = ap.parse_args(argv)
    if args.summarise:
        return summarise(args.summarise)

    from glandpet.segmentation.atlas_validate import choose_fixed_library, choose_library, choose_subjects, estimate_cost, format_medians, medians_per_gland, validate_atlases
    from glandpet.segmentation.segment_command import load_segmentation_config, read_atlas_dir

    if not args.data.is_dir():
        print(f"real_ct: {args.data} not found (the OpenKBP atlases; see --data)", file=sys.stderr)
        return 2
    names = read_cases(args.data)
    atlases = [read_atlas_dir(args.data / n) for n in names]
    seg = load_segmentation_config(args.config)
    fixed = choose_fixed_library(names, args.library, args.seed) if args.library else None
    if fixed:
        args.atlases = [len(fixed)]
        held = choose_subjects([n for n in names if n not in fixed], args.cases, args.seed)
    else:
        held = choose_subjects(names, args.cases, args.seed)
    if args.scans:
        unknown = sorted(set(args.scans) - set(names))
        if unknown:
            print(f"real_ct: no such scan(s) in {args.data}: {', '.join(unknown)}", file=sys.stderr)
            return 2
        wanted = set(args.scans)
        held = [h for h in held if h in wanted]
        if not held:
            print("real_ct: --scans leaves no scan to hold out (with --cases/--library)", file=sys.stderr)
            return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="real_ct_"))
    out.mkdir(parents=True, exist_ok=True)
    n_reg = sum(len(fixed or choose_library(h, names, n, args.seed)) for n in args.atlases for h in held)
    cost = estimate_cost(n_reg, args.threads)
    print(f"real_ct: {len(names)} scans in {args.data}; {len(held)} held out ({', '.join(held)}); libraries of "
          f"{', '.join(map(str, args.atlases))} atlases; {n_reg} registrations, estimated "
          f"{cost['wall_minutes']:.0f} min on {args.threads} thread(s) ({cost['cpu_hours']:.2f} CPU-hours)", flush=True)
    defaults = load_segmentation_config(None)
    changed = {k: v for k, v in seg.items() if defaults.get(k) != v}
    print(f"real_ct: segmentation settings: {changed if changed else 'the defaults'}"
          + (" + size_transfer, each scan's fitted on the other scans' voters" if args.size_transfer_from else ""),
          flush=True)
    summary = []
    for n in args.atlases:
        n_eff = len(fixed or choose_library(held[0], names, n, args.seed))
        print(f"\n== {n_eff} atlases per held-out scan ==", flush=True)
        t0 = time.perf_counter()
        table = out / f"real_ct_{n_eff}atlases.tsv"
        if args.size_transfer_from:
            df = corrected_run(atlases, seg, held, n, args, table, fixed)
        else:
            df = validate_atlases(atlases, seg_config=seg, subjects=held, n_atlases=n, seed=args.seed,
                                  threads=args.threads, out_tsv=table, progress=False,
                                  on_scan=lambda name, rows, info: print(scan_line(name, rows, info), flush=True),
                                  library=fixed)
        wall = time.perf_counter() - t0
        per_scan = df.drop_duplicates("atlas")
        med = medians_per_gland(df)
        print(format_medians(med))
        cpu_h = per_scan["cpu_seconds"].sum() / 3600.0
        s_scan, cpu_scan = per_scan["seconds"].median(), per_scan["cpu_seconds"].median()
        print(f"time per scan (median): {s_scan:.0f} s wall, {cpu_scan:.0f} CPU-s; this run {wall / 60:.1f} min, "
              f"{cpu_h:.3f} CPU-hours; all {len(names)} scans: ~{cpu_scan * len(names) / 3600:.2f} CPU-hours")
        par = med[med.gland == "parotid"]
        if len(par):
            summary.append((n_eff, int(par.n.iloc[0]), float(par.dice.iloc[0]), float(par.abs_volume_error_pct.iloc[0]),
                            float(par.volume_error_pct.iloc[0]), s_scan, cpu_scan, cpu_h))
    print(f"\nsummary (parotid, medians over left and right; target Dice >= {TARGET_DICE}, "
          f"|volume error| <= {TARGET_ABS_VOLUME_ERROR_PCT:.0f} %):")
    print("| atlases | parotids | Dice | abs vol err % | vol err % | s / scan | CPU-s / scan | CPU-h (run) | target met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n_eff, n, d, ave, ve, s, c, h in summary:
        met = "yes" if d >= TARGET_DICE and ave <= TARGET_ABS_VOLUME_ERROR_PCT else "no"
        print(f"| {n_eff} | {n} | {d:.3f} | {ave:.1f} | {ve:+.1f} | {s:.0f} | {c:.0f} | {h:.3f} | {met} |")
    print(f"tables: {out}")
    return 0


def corrected_run(atlases, seg, held, n, args, table, fixed):
    """Each held-out scan segmented with ``segmentation.size_transfer`` fitted on the other scans'
    voters (``args.size_transfer_from``); the tables written as the scans finish."""
    import pandas as pd

    from glandpet.segmentation.atlas_validate import size_transfer_per_gland, validate_atlases, voters_path, write_tsv
    from glandpet.segmentation.size_calibration import MIN_SIZE_TRANSFER
    from glandpet.tables import ATLAS_VALIDATION_VOTERS

    voters = pd.concat([pd.read_csv(t, sep="\t") for t in args.size_transfer_from], ignore_index=True)
    dfs, vts = [], []
    for name in held:
        st = size_transfer_per_gland(voters, exclude=name).dropna(subset=["b"])
        transfer = {r.gland: round(min(1.0, max(MIN_SIZE_TRANSFER, float(r.b))), 4) for r in st.itertuples()}
        print(f"  {name}: size transfer {transfer} (fitted without it)", flush=True)
        dfs.append(validate_atlases(atlases, seg_config={**seg, "size_transfer": transfer}, subjects=[name],
                                    n_atlases=n, seed=args.seed, threads=args.threads, progress=False, library=fixed,
                                    on_scan=lambda nm, rows, info: print(scan_line(nm, rows, info), flush=True),
                                    voters=vts))
        write_tsv(pd.concat(dfs, ignore_index=True), table)
        write_tsv(vts, voters_path(table), ATLAS_VALIDATION_VOTERS)
    return pd.concat(dfs, ignore_index=True)


if __name__ == "__main__":
    sys.exit(main())

"""Measure glandpet.cohort.statistics.aggregate_tables on N synthetic per-subject `gland_stats` files.

Usage: python benchmarks/aggregate.py [--subjects 5000] [--repeats 3] [--dir DIR]

Writes N Parquet files (20 rows each: 2 sessions x 5 glands x 2 sides, the GLAND_STATS schema),
then times (a) aggregate_tables (pyarrow.dataset, one pass), and, for comparison, (b) a
per-file pyarrow.parquet.read_table + concat_tables loop and (c) pandas.read_parquet per file
+ pd.concat. Prints one line per method: median wall seconds over the repeats, rows, peak RSS.
File creation is not timed. CPU time (all threads) is printed beside the wall time because a
shared machine's load inflates the wall figure. The page cache is warm after the first repeat (the median shows the
warm figure; the first repeat is printed too).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from glandpet.cohort.statistics import aggregate_tables
from glandpet.glands import GLANDS, SESSIONS, SIDES
from glandpet.tables import GLAND_STATS, provenance, to_table


def write_files(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = [(s, g, d) for s in SESSIONS for g in GLANDS for d in SIDES]
    m = len(keys)
    prov = provenance({"bench": True})
    # one template table, values replaced per subject (the writing is not what we measure)
    base = {
        "session": [k[0] for k in keys],
        "tracer": ["Ga-68 PSMA-11" if k[0] == "psma" else "Ga-68 FAPI-46" for k in keys],
        "gland": [k[1] for k in keys],
        "side": [k[2] for k in keys],
        "suv_type": ["bw"] * m,
        "pvc_method": ["gtm"] * m,
        "pvc_fwhm_mm": [6.5] * m,
        **{k: [v] * m for k, v in prov.items()},
    }
    import pandas as pd

    tmpl = to_table(pd.DataFrame(base | {"subject_id": ["x"] * m}), GLAND_STATS)
    paths = []
    for i in range(n):
        sid = f"s{i:05d}"
        vals = rng.gamma(4.0, 2.0, size=(8, m))
        cols = {
            "subject_id": pa.array([sid] * m),
            "group": pa.array(["pss" if i % 2 else "control"] * m),
            "volume_ml": vals[0],
            "suv_max": vals[1] * 2,
            "suv_peak": vals[2] * 1.5,
            "suv_mean": vals[3],
            "suv_median": vals[4],
            "suv_sd": vals[5] / 4,
            "suv_p90": vals[6] * 1.3,
            "total_uptake_ml": vals[0] * vals[3],
            "suv_mean_pvc": vals[7] * 1.3,
            "n_voxels": pa.array(rng.integers(1, 2000, m), pa.int64()),
        }
        t = tmpl
        for name, arr in cols.items():
            t = t.set_column(t.schema.get_field_index(name), GLAND_STATS.field(name), pa.array(arr, GLAND_STATS.field(name).type))
        p = root / f"sub-{sid}" / f"sub-{sid}_gland_stats.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, p)
        paths.append(str(p))
    return paths


def _time(fn, repeats):
    ts, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return ts, cpu, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    ap.add_argument("--no-baselines", action="store_true", help="time aggregate_tables only")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        t0 = time.perf_counter()
        paths = write_files(Path(tmp), a.subjects)
        print(f"wrote {len(paths)} files in {time.perf_counter() - t0:.1f} s (not part of the measurement)")
        methods = {"aggregate_tables (pyarrow.dataset)": lambda: aggregate_tables(paths, schema=GLAND_STATS)}
        if not a.no_baselines:
            methods["read_table per file + concat_tables"] = lambda: pa.concat_tables([pq.read_table(p) for p in paths])

            def _pandas():
                import pandas as pd

                return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)

            methods["pandas read_parquet per file + concat"] = _pandas
        for name, fn in methods.items():
            ts, cpu, out = _time(fn, a.repeats)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"{name}: median {statistics.median(ts):.2f} s wall, {statistics.median(cpu):.2f} s CPU "
                f"(first {ts[0]:.2f} s) over {a.repeats} runs, "
                f"{len(out)} rows from {len(paths)} files, peak RSS so far {rss:.0f} MiB"
            )


if __name__ == "__main__":
    main()

"""Benchmark: convert + SUV of the 545-slice real Siemens whole-body PET, and dcm2niix side by side.

    python benchmarks/ingest.py [SERIES_DIR] [--repeat 3] [--cohort 20 | --cohort-dir DIR]

With --cohort N (or --cohort-dir), also indexes a phantom cohort and converts every selected CT and
PET session to NIfTI (+ SUVbw), in one process, and prints the seconds, MB/s and peak RSS.

Each measurement runs in a fresh subprocess (so interpreter start-up, imports and peak RSS are
those of one real `glandpet convert` call). Prints wall seconds (median), MB/s of DICOM input,
and peak RSS (MiB, from getrusage of the child).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / ".." / "shared" / "data" / "real-pet" / "qin-headneck-0139-fdg-wb" / "image"


def run(cmd: list[str], repeat: int, check_output: Path | None = None) -> tuple[float, float] | None:
    """Median wall and peak RSS; None when the tool fails (or writes no NIfTI into check_output)."""
    walls, rss = [], 0.0
    for _ in range(repeat):
        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, cwd=ROOT)
            _, status, ru = os.wait4(proc.pid, 0)  # per-child rusage (peak RSS of this run only)
            walls.append(time.perf_counter() - t)
            proc.returncode = os.waitstatus_to_exitcode(status)
            fo.seek(0)
            fe.seek(0)
            r = subprocess.CompletedProcess(cmd, proc.returncode, fo.read(), fe.read())
        child_rss = ru.ru_maxrss
        if r.returncode != 0 or (check_output is not None and not list(check_output.glob("*.nii*"))):
            if check_output is not None:
                print(f"note: {cmd[0]} failed on this series: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
                return None
            raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
        if check_output is not None:
            for f in check_output.iterdir():
                f.unlink()
        rss = max(rss, child_rss)
    return statistics.median(walls), rss / 1024.0


def in_process_breakdown(series: Path, out: Path) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from glandpet.writers import write_nifti
    from glandpet.dicom.series import load_series
    from glandpet.suv.factors import suv_result

    t0 = time.perf_counter()
    s = load_series(series)
    t1 = time.perf_counter()
    res = suv_result(s.datasets, s.label)
    data = s.data * np.float32(res.factors["suvbw"])
    t2 = time.perf_counter()
    import nibabel as nib

    img = nib.Nifti1Image(data, s.affine_ras)
    write_nifti(img, out)
    t3 = time.perf_counter()
    return {"read+pixels": t1 - t0, "suv": t2 - t1, "nifti gzip write": t3 - t2}


def cohort_benchmark(cohort: Path) -> None:
    """Index + convert + SUV of a whole phantom cohort, in this process."""
    from glandpet.dicom.convert import convert_series
    from glandpet.dicom.catalog import index_tree

    dicom = cohort / "dicom"
    mb = sum(f.stat().st_size for f in dicom.rglob("*") if f.is_file()) / 1e6
    t0 = time.perf_counter()
    result = index_tree(dicom, cohort / "subjects.tsv", jobs=2)
    t_index = time.perf_counter() - t0
    files = dict(zip(result.files["series_key"], result.files["paths"]))
    sel = result.series[result.series["selected"] & (result.series["role"] == "pet_ac")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in sel.itertuples():
            convert_series([dicom / p for p in files[r.paired_ct_key]], Path(tmp) / f"{r.subject_id}_{r.session}_ct.nii.gz")
            convert_series([dicom / p for p in files[r.series_key]], Path(tmp) / f"{r.subject_id}_{r.session}_pet.nii.gz",
                           suv="bw")
    t_conv = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = int(result.stats.get("n_files", 0))
    print(f"\nphantom cohort {cohort}: {result.series['subject_id'].nunique()} subjects, {len(sel)} sessions, "
          f"{n} files, {mb:.0f} MB")
    print(f"{'index (2 processes)':44s} {t_index:8.2f} s {mb / t_index:8.1f} MB/s")
    print(f"{'convert CT + PET (SUVbw), all sessions':44s} {t_conv:8.2f} s {mb / t_conv:8.1f} MB/s   "
          f"({t_conv / max(1, len(sel)):.2f} s per session)")
    print(f"{'peak RSS of this process':44s} {rss:8.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("series", nargs="?", default=str(DEFAULT))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cohort", type=int, default=0, help="generate a phantom cohort of N subjects and time it")
    ap.add_argument("--cohort-dir", default=None, help="an existing phantom cohort to time")
    a = ap.parse_args()
    if a.cohort_dir or a.cohort:
        if a.cohort_dir:
            cohort_benchmark(Path(a.cohort_dir))
        else:
            from glandpet.phantom.cohort import generate_cohort

            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                generate_cohort(tmp, a.cohort, seed=0, n_atlases=1, jobs=2, progress=False)
                print(f"phantom generation ({a.cohort} subjects, 1 atlas, 2 processes): {time.perf_counter() - t0:.1f} s")
                cohort_benchmark(Path(tmp))
    series = Path(a.series)
    if not series.is_dir():
        raise SystemExit(f"series folder absent: {series}")
    mb = sum(f.stat().st_size for f in series.iterdir() if f.is_file()) / 1e6
    nfiles = sum(1 for f in series.iterdir() if f.is_file())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        py = sys.executable
        w, r = run([py, "-m", "glandpet.cli", "suv-factors", str(series)], a.repeat)
        rows.append(("glandpet suv-factors (headers only)", w, r))
        for suv in ("none", "bw"):
            w, r = run([py, "-m", "glandpet.cli", "convert", str(series), str(tmp / f"g_{suv}.nii.gz"), "--suv", suv],
                       a.repeat)
            rows.append((f"glandpet convert --suv {suv} (.nii.gz)", w, r))
        w, r = run([py, "-c", "import glandpet.dicom.convert, glandpet.suv.factors"], a.repeat)
        rows.append(("python start-up + imports only", w, r))
        d2n = shutil.which("dcm2niix")
        if d2n:
            for z in ("y", "n"):
                od = tmp / f"d2n_{z}"
                od.mkdir()
                got = run([d2n, "-z", z, "-b", "y", "-f", "pet", "-o", str(od), str(series)], a.repeat, od)
                if got is None:
                    rows.append((f"dcm2niix -z {z} (FAILED)", float("nan"), float("nan")))
                else:
                    rows.append((f"dcm2niix -z {z}", *got))
        bd = in_process_breakdown(series, tmp / "bd.nii.gz")
    print(f"\nseries: {series} ({nfiles} files, {mb:.1f} MB); median of {a.repeat} runs; cores: {os.cpu_count()}")
    print(f"{'step':44s} {'wall s':>8s} {'MB/s':>8s} {'peak RSS MiB':>13s}")
    ref = next((w for n, w, _ in rows if n == "dcm2niix -z y"), None)
    for name, w, r in rows:
        ratio = f"  ({w / ref:.1f}x dcm2niix -z y)" if ref and name.startswith("glandpet convert") else ""
        print(f"{name:44s} {w:8.2f} {mb / w:8.1f} {r:13.0f}{ratio}")
    if not shutil.which("dcm2niix"):
        print("dcm2niix not installed (apt-get install -y dcm2niix) - comparison skipped")
    print("\nin-process breakdown (convert --suv bw):")
    for k, v in bd.items():
        print(f"  {k:20s} {v:6.2f} s")
    try:
        import isal  # noqa: F401

        print("gzip: python-isal (igzip) level 1")
    except ImportError:
        print("gzip: zlib level 1 (python-isal not installed)")


if __name__ == "__main__":
    main()

"""Seconds and peak memory of the registration and segmentation steps for one phantom subject.

    python benchmarks/segment.py PHANTOM_DIR [--subject S001] [--threads 2] [--atlases 1 3 5]
                                 [--workdir DIR] [--fusion auto|majority|jlf]

PHANTOM_DIR is a cohort written by ``glandpet phantom`` (DICOM is converted once, not timed in the
per-step table). Each step runs in a fresh process (so its peak RSS is its own, interpreter and
imports included). With fewer atlases in the phantom than asked, atlases are reused cyclically
(the timing is what matters; the Dice column then flatters nothing but says so).
Threads: PET->CT runs with its rule's ``threads`` (rules/register.smk: 1, for bit-reproducible
transforms); the other steps with ``--threads`` (their rules' value, 2, by default).
Prints one table row per step and atlas count (wall seconds, CPU seconds of the step's process: on a
shared machine the CPU column is the stable one; peak RSS), and the per-gland Dice against the
phantom's truth.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _child(q, fn_name, kwargs, threads):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    t0 = time.perf_counter()
    from glandpet.registration import pet_to_ct
    from glandpet.registration import sessions
    from glandpet.segmentation import multi_atlas as S

    fn = {"pet2ct": pet_to_ct.register_pet_to_ct, "align": sessions.align_sessions, "segment": S.segment_subject,
          "to_session": S.labels_to_session, "to_pet": S.labels_to_pet}[fn_name]
    if fn_name == "segment":  # --fusion is a segmentation parameter
        from glandpet.segmentation.params import SegmentationParams

        kwargs = dict(kwargs)
        kwargs["params"] = SegmentationParams(fusion=kwargs.pop("fusion", "auto"))
    t1 = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    c1 = ru.ru_utime + ru.ru_stime
    try:
        res = fn(**kwargs)
        err = None
    except Exception as e:  # report, keep benchmarking
        res, err = None, repr(e)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    q.put({"seconds": time.perf_counter() - t1, "seconds_with_imports": time.perf_counter() - t0,
           "cpu_seconds": ru.ru_utime + ru.ru_stime - c1,
           "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "error": err,
           "result": res if isinstance(res, dict) else None})


def rule_threads(rule: str, default: int) -> int:
    """``threads:`` of a workflow rule (rules/*.smk), so each step is timed as the workflow runs it."""
    import re

    for smk in sorted((Path(__file__).resolve().parents[1] / "rules").glob("*.smk")):
        m = re.search(rf"^rule {rule}:\n(?:(?!^rule ).*\n)*?    threads: (\d+)", smk.read_text(), re.M)
        if m:
            return int(m.group(1))
    return default


def run_step(fn_name, itk_threads, **kwargs):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn_name, kwargs, itk_threads))
    p.start()
    out = q.get()
    p.join()
    return out


def _convert(ph, sid, work):
    from glandpet.dicom.convert import convert_series

    ses = {}
    for sesdir in sorted(glob.glob(f"{ph}/dicom/{sid}/*")):
        s = "psma" if "PSMA" in sesdir.upper() else "fapi"
        series = sorted(glob.glob(sesdir + "/*"))
        ctd = [d for d in series if "CT" in Path(d).name.upper() and "PET" not in Path(d).name.upper()]
        petd = [d for d in series if "PET" in Path(d).name.upper() and "NAC" not in Path(d).name.upper()]
        o = f"{work}/{sid}_ses-{s}"
        if not os.path.exists(o + "_ct.nii.gz"):
            convert_series(ctd[0], o + "_ct.nii.gz")
            convert_series(petd[0], o + "_pet.nii.gz")
        ses[s] = o
    return ses


def _dice(ph, sid, ses, path):
    import nibabel as nib
    import numpy as np

    from glandpet.glands import DEFAULT_LABELS

    t = np.asarray(nib.load(f"{ph}/truth/sub-{sid}/ses-{ses}/sub-{sid}_ses-{ses}_space-ct_dseg.nii.gz").dataobj)
    g = np.asarray(nib.load(path).dataobj)
    out = {}
    for lab in DEFAULT_LABELS:
        a, b = t == lab.index, g == lab.index
        if a.any():
            out[lab.name] = 2 * (a & b).sum() / (a.sum() + b.sum())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phantom")
    ap.add_argument("--subject", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--atlases", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--fusion", default="auto")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    ph = a.phantom
    work = a.workdir or tempfile.mkdtemp(prefix="gp_bench_")
    os.makedirs(work, exist_ok=True)
    subs = sorted(os.path.basename(p) for p in glob.glob(f"{ph}/dicom/*"))
    sid = a.subject or next((s for s in subs if len(glob.glob(f"{ph}/dicom/{s}/*")) == 2), subs[0])
    ses = _convert(ph, sid, work)
    atl = sorted(glob.glob(f"{ph}/atlases/*/"))
    atlas_dicts = [dict(name=Path(p).name, ct=p + "ct.nii.gz", labels=p + "labels.nii.gz",
                        label_table=p + "labels.tsv") for p in atl]
    ref = "psma" if "psma" in ses else next(iter(ses))
    rows = []

    def rec(step, n, r):
        rows.append((step, n, r["seconds"], r["cpu_seconds"], r["peak_mib"], r["error"]))
        print(f"  {step:<22} atlases={n}  {r['seconds']:7.1f} s  {r['cpu_seconds']:7.1f} CPU s  {r['peak_mib']:7.0f} MiB"
              f"  {r['error'] or ''}", file=sys.stderr, flush=True)
        res = r.get("result") or {}
        if step == "segment_subject" and res.get("seconds"):
            print("    " + "  ".join(f"{k} {v:.1f} s" for k, v in res["seconds"].items()), file=sys.stderr, flush=True)

    common = 0.0
    common_cpu = 0.0
    for s, o in ses.items():
        n = rule_threads("convert_ct_register_pet", a.threads)
        r = run_step("pet2ct", n, ct_path=o + "_ct.nii.gz", pet_path=o + "_pet.nii.gz",
                     out_xfm=o + "_from-pet_to-ct_xfm.mat", threads=n)
        rec(f"pet_to_ct[{s}]", "-", r)
        common += r["seconds"]
        common_cpu += r["cpu_seconds"]
    if len(ses) == 2:
        r = run_step("align", a.threads, fixed_ct=ses["psma"] + "_ct.nii.gz", moving_ct=ses["fapi"] + "_ct.nii.gz",
                     out_prefix=f"{work}/{sid}_from-fapi_to-psma", threads=a.threads)
        rec("align_sessions", "-", r)
        common += r["seconds"]
        common_cpu += r["cpu_seconds"]
    dices = {}
    totals = {}
    for n in a.atlases:
        use = [dict(d, name=f"{d['name']}_{i}") for i, d in enumerate(atlas_dicts[i % len(atlas_dicts)]
                                                                      for i in range(n))]
        out = ses[ref] + f"_n{n}_dseg.nii.gz"
        r = run_step("segment", a.threads, subject_ct_path=ses[ref] + "_ct.nii.gz", atlases=use, out_dseg=out,
                     out_tsv=out.replace(".nii.gz", ".tsv"), fusion=a.fusion, threads=a.threads)
        rec("segment_subject", n, r)
        tot = common + r["seconds"]
        cpu = common_cpu + r["cpu_seconds"]
        outs = {ref: out}
        if len(ses) == 2:
            other = "fapi" if ref == "psma" else "psma"
            o2 = ses[other] + f"_n{n}_dseg.nii.gz"
            r2 = run_step("to_session", a.threads, dseg_fixed_path=out, moving_ct_path=ses[other] + "_ct.nii.gz",
                          session_xfm_prefix=f"{work}/{sid}_from-fapi_to-psma", out_dseg=o2)
            rec("labels_to_session", n, r2)
            tot += r2["seconds"]
            cpu += r2["cpu_seconds"]
            outs[other] = o2
        for s, o in outs.items():
            r3 = run_step("to_pet", a.threads, dseg_ct_path=o, pet_path=ses[s] + "_pet.nii.gz",
                          pet_to_ct_xfm=ses[s] + "_from-pet_to-ct_xfm.mat", out_path=o.replace("_dseg", "_pet_dseg"))
            rec(f"labels_to_pet[{s}]", n, r3)
            tot += r3["seconds"]
            cpu += r3["cpu_seconds"]
            dices[(n, s)] = _dice(ph, sid, s, o)
        totals[n] = (tot, cpu)
    print(f"\nsubject {sid}, sessions {sorted(ses)}, threads {a.threads}, fusion {a.fusion}, "
          f"{len(atlas_dicts)} distinct atlases in {ph}")
    print(f"{'step':<24}{'atlases':>8}{'seconds':>10}{'CPU s':>10}{'peak MiB':>10}")
    for step, n, sec, cpu, mib, err in rows:
        print(f"{step:<24}{str(n):>8}{sec:>10.1f}{cpu:>10.1f}{mib:>10.0f}{('  ' + err) if err else ''}")
    for n, (tot, cpu) in totals.items():
        print(f"{'TOTAL (this stage)':<24}{n:>8}{tot:>10.1f}{cpu:>10.1f}")
    if dices:
        names = sorted({k for d in dices.values() for k in d})
        print("\nDice vs truth:  " + "  ".join(f"{k}" for k in names))
        for (n, s), d in dices.items():
            print(f"  n={n} {s:<5} " + "  ".join(f"{d.get(k, float('nan')):.3f}" for k in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

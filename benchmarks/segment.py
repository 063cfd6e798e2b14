"""Seconds and peak memory of the registration and segmentation steps for one phantom subject.

    python benchmarks/segment.py PHANTOM_DIR [--subject S001] [--threads 2] [--atlases 1 3 5]
                                 [--workdir DIR] [--fusion auto|majority|jlf]
    python benchmarks/segment.py PHANTOM_DIR --cohort [--registration pairwise template]
                                 [--atlases 10] [--jobs 2] [--workdir DIR]

PHANTOM_DIR is a cohort written by ``glandpet phantom`` (DICOM is converted once, not timed in the
per-step table). Each step runs in a fresh process (so its peak RSS is its own, interpreter and
imports included). With fewer atlases in the phantom than asked, atlases are reused cyclically
(the timing is what matters; the Dice column then flatters nothing but says so).
Threads: PET->CT runs with its rule's ``threads`` (rules/register.smk: 1, for bit-reproducible
transforms); the other steps with ``--threads`` (their rules' value, 2, by default).
Prints one table row per step and atlas count (wall seconds, CPU seconds of the step's process: on a
shared machine the CPU column is the stable one; peak RSS), and the per-gland Dice against the
phantom's truth.

``--cohort``: the segmentation step alone, of every subject's reference session, for each atlas
count and each ``--registration`` path (``pairwise``: every atlas registered to the subject;
``template``: each atlas once to the library's template, the subject once to it, composed:
glandpet/segmentation/atlas_template.py). Subjects run ``--jobs`` at a time on one ITK thread each
(the workflow's ``threads: 1``); the template is built once per library first (its cost printed
apart: it is paid once per study, not per subject). Prints per subject the CPU seconds and the Dice
per gland, then per path the medians over subjects and sides beside each other, and what 1,000
subjects would cost. A segmentation already in ``--workdir`` (its metrics JSON beside it) is
reused, so one path can be added to an earlier run of the other.
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
          "to_session": S.labels_to_session, "to_pet": S.labels_to_pet, "template": _template}[fn_name]
    if fn_name == "segment":  # --fusion and the registration path are segmentation parameters
        from glandpet.segmentation.params import SegmentationParams

        kwargs = dict(kwargs)
        kwargs["params"] = SegmentationParams(fusion=kwargs.pop("fusion", "auto"),
                                              atlas_registration=kwargs.pop("registration", "pairwise"))
        if kwargs.get("template"):
            from glandpet.segmentation.atlas_template import load_template

            kwargs["template"] = load_template(kwargs["template"])
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


def _template(atlases, cache_root, workers):
    from glandpet.segmentation.atlas_template import template_for

    t = template_for(atlases, cache_root, workers=workers)
    return {"directory": str(t.directory), **t.build}


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
    ap.add_argument("--cohort", action="store_true", help="segmentation only, every subject, medians")
    ap.add_argument("--registration", nargs="+", default=["pairwise"], choices=["pairwise", "template"])
    ap.add_argument("--jobs", type=int, default=2, help="--cohort: subjects side by side (one ITK thread each)")
    a = ap.parse_args(argv)
    if a.cohort:
        return cohort_main(a)
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
        use = _atlas_set(atlas_dicts, n)
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


def _ref_ct(ph, sid, work):
    """The reference session (PSMA, else the only one) of a phantom subject and its CT as NIfTI."""
    ses = _convert(ph, sid, work)
    ref = "psma" if "psma" in ses else next(iter(ses))
    return ref, ses[ref] + "_ct.nii.gz"


def _atlas_set(atlas_dicts, n):
    """``n`` atlases of the phantom's set, reused cyclically (renamed) when it holds fewer."""
    return [dict(d, name=f"{d['name']}_{i}") for i, d in enumerate(atlas_dicts[i % len(atlas_dicts)]
                                                                   for i in range(n))]


def cohort_main(a) -> int:
    """--cohort: see the module docstring."""
    import json
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    ph = a.phantom
    work = a.workdir or tempfile.mkdtemp(prefix="gp_bench_")
    os.makedirs(work, exist_ok=True)
    subs = sorted(os.path.basename(p) for p in glob.glob(f"{ph}/dicom/*"))
    refs = {sid: _ref_ct(ph, sid, work) for sid in subs}
    atl = sorted(glob.glob(f"{ph}/atlases/*/"))
    atlas_dicts = [dict(name=Path(p).name, ct=p + "ct.nii.gz", labels=p + "labels.nii.gz",
                        label_table=p + "labels.tsv") for p in atl]
    templates = {}
    for n in a.atlases:
        if "template" in a.registration:
            if n > len(atlas_dicts):
                print(f"template path: {n} atlases asked, {len(atlas_dicts)} in the phantom", file=sys.stderr)
                return 2
            r = run_step("template", 1, atlases=atlas_dicts[:n], cache_root=f"{work}/templates", workers=a.jobs)
            if r["error"]:
                print(f"template of {n} atlases failed: {r['error']}", file=sys.stderr)
                return 1
            templates[n] = r["result"]
            print(f"template of {n} atlases: {r['result']['cpu_seconds']:.0f} CPU-s, {r['result']['seconds']:.0f} s "
                  f"wall on {a.jobs} worker(s) (once per library; {r['result']['directory']})", flush=True)
    tasks = [(reg, n, sid) for reg in a.registration for n in a.atlases for sid in subs]

    def one(task):
        reg, n, sid = task
        ses, ct = refs[sid]
        out = f"{work}/{sid}_{reg}_n{n}_dseg.nii.gz"
        meta = out.replace(".nii.gz", ".json")
        if os.path.exists(meta):
            return task, json.loads(Path(meta).read_text()), True
        use = atlas_dicts[:n] if n <= len(atlas_dicts) else _atlas_set(atlas_dicts, n)
        kw = dict(subject_ct_path=ct, atlases=use, out_dseg=out, out_tsv=out.replace(".nii.gz", ".tsv"),
                  fusion=a.fusion, threads=1, registration=reg)
        if reg == "template":
            kw["template"] = templates[n]["directory"]
        r = run_step("segment", 1, **kw)
        rec = {k: r[k] for k in ("seconds", "cpu_seconds", "peak_mib", "error")}
        if not r["error"]:
            rec["dice"] = _dice(ph, sid, ses, out)
            res = r.get("result") or {}
            rec["stage_seconds"] = res.get("seconds", {})
            per_region: dict[str, float] = {}
            for info in res.get("atlases", {}).values():
                for rname, sec in info.get("regions", {}).items():
                    per_region[rname] = round(per_region.get(rname, 0.0) + sec, 1)
            rec["region_seconds"] = per_region  # wall seconds per region, summed over its atlases
            rec["atlases_per_region"] = {k: v.get("atlases") for k, v in res.get("regions", {}).items()}
        Path(meta).write_text(json.dumps(rec))
        return task, rec, False

    results = {}
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for (reg, n, sid), rec, cached in pool.map(one, tasks):
            results[(reg, n, sid)] = rec
            d = rec.get("dice", {})
            print(f"  {reg:<9} n={n:<3} {sid}  {rec['cpu_seconds']:6.0f} CPU-s {rec['seconds']:6.0f} s "
                  f"{rec['peak_mib']:6.0f} MiB  " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(d.items()))
                  + ("  (cached)" if cached else "") + (f"  {rec['error']}" if rec["error"] else ""), flush=True)
    glands = ["parotid", "submandibular", "sublingual", "lacrimal", "tubarial"]
    print(f"\n{len(subs)} subjects, reference sessions, fusion {a.fusion}, 1 ITK thread per subject, "
          f"{a.jobs} side by side; median over subjects and sides")
    print("| path | atlases | " + " | ".join(glands) + " | CPU-s / subject | 1,000 subjects (CPU-h) |")
    print("|---|---|" + "---|" * (len(glands) + 2))
    for reg in a.registration:
        for n in a.atlases:
            recs = [results[(reg, n, sid)] for sid in subs if not results[(reg, n, sid)]["error"]]
            if not recs:
                continue
            med = []
            for g in glands:
                v = [x for r in recs for k, x in r["dice"].items() if k.startswith(g + "_")]
                med.append(f"{statistics.median(v):.3f}" if v else "-")
            cpu = statistics.median(r["cpu_seconds"] for r in recs)
            once = templates.get(n, {}).get("cpu_seconds", 0.0) if reg == "template" else 0.0
            est = (cpu * 1000 + once) / 3600.0
            print(f"| {reg} | {n} | " + " | ".join(med) + f" | {cpu:.0f} | {est:.0f} |")
    if templates:
        print("template path: the library's template built once (" + ", ".join(
            f"{n} atlases {t['cpu_seconds']:.0f} CPU-s" for n, t in templates.items()) + "), included in the estimate")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The progress display: redrawn line on a terminal, one summary line elsewhere, silence when quiet."""

from __future__ import annotations

import io

from glandpet.progress import Progress, format_seconds, track


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tty_redraws_with_count_rate_and_eta():
    out, clock = FakeTTY(), Clock()
    bar = Progress(10, "indexing", unit="files", stream=out, interval=0.0, clock=clock)
    for _ in range(4):
        clock.t += 0.5
        bar.update()
    text = out.getvalue()
    assert text.startswith("\r")
    assert text.count("\r") == 4  # one redraw per update (interval 0)
    last = text.split("\r")[-1]
    # 4 files in 2 s: 2.0/s; 6 left: 3 s
    assert "indexing: 4/10 files" in last and "2.0/s" in last and "0:03 left" in last
    clock.t += 1.0
    bar.close()
    final = out.getvalue().split("\r")[-1]
    assert final.endswith("\n") and "indexing: 4/10 files in 3.0 s" in final


def test_tty_throttles_redraws():
    out, clock = FakeTTY(), Clock()
    bar = Progress(1000, "x", stream=out, interval=1.0, clock=clock)
    for _ in range(100):
        clock.t += 0.05  # 5 s in all: about one redraw per second
        bar.update()
    assert 4 <= out.getvalue().count("\r") <= 6


def test_not_a_tty_prints_one_summary_line():
    out, clock = io.StringIO(), Clock()
    with Progress(3, "checking subjects", unit="subjects", stream=out, clock=clock) as bar:
        for _ in range(3):
            clock.t += 1.0
            bar.update()
    assert out.getvalue() == "checking subjects: 3 subjects in 3.0 s (1.0/s)\n"


def test_quiet_and_custom_message():
    out = FakeTTY()
    bar = Progress(2, "x", stream=out, quiet=True)
    bar.update(2)
    bar.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    bar = Progress(2, "x", stream=out)
    bar.update(2)
    bar.close("glandpet phantom: 2 subjects")
    bar.close("again")  # closing twice prints once
    assert out.getvalue() == "glandpet phantom: 2 subjects\n"


def test_track_and_format():
    out = io.StringIO()
    assert list(track(range(5), "items", stream=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue().startswith("items: 5 items in ")
    assert format_seconds(7) == "0:07" and format_seconds(205) == "3:25" and format_seconds(3723) == "1:02:03"


def test_phantom_generation_uses_it(tmp_path, capsys, monkeypatch):
    """generate_cohort's progress: one summary line when stderr is not a terminal (individuals faked)."""
    import glandpet.tables
    from glandpet.phantom import cohort

    monkeypatch.setattr(glandpet.tables, "write_table", lambda *a, **k: None)

    calls = []

    def fake_task(kind, *args):
        calls.append(kind)
        return kind, {"subject": {"subject_id": f"S{len(calls):03d}", "group": "pss", "essdai": 1,
                                  "schirmer_mm": 1}, "truth": [], "transforms": []} if kind == "subject" else {}

    monkeypatch.setattr(cohort, "_task", fake_task)
    cohort.generate_cohort(tmp_path, 2, seed=0, n_atlases=1, progress=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("glandpet phantom: 2 subjects") and "\r" not in err


# ------------------------------------------------------------------------------ the workflow's plan
class _Rule:
    def __init__(self, name):
        self.name = name


class _Job:
    def __init__(self, rule):
        self.rule = _Rule(rule)


class _Dag:
    """Snakemake 9's DAG: needrun_jobs() without the finished ones, finished_jobs an iterator."""

    def __init__(self, todo, done):
        self.todo, self.done = todo, done

    def needrun_jobs(self):
        return iter(self.todo)

    @property
    def finished_jobs(self):
        return filter(None, self.done)


def _record(msg, event):
    import logging

    rec = logging.LogRecord("snakemake.logging", logging.INFO, __file__, 1, msg, None, None)
    rec.event = event
    return rec


def test_plan_printed_once_after_the_index_checkpoint():
    """Before: only Snakemake's "2 of 3 steps (67%) done" (the plan before the index expanded it)."""
    from glandpet.progress import PlanAfterCheckpoint

    done = [_Job("demo_phantom"), _Job("catalog_dicom")]
    dag = _Dag([_Job("convert_pet")] * 3 + [_Job("measure_glands")] * 3 + [_Job("cohort_tables")], done)
    out = io.StringIO()
    h = PlanAfterCheckpoint(lambda: dag, "catalog_dicom", stream=out)
    h.emit(_record("rule catalog_dicom:", "job_info"))  # before the checkpoint finished: nothing
    h.emit(_record("Finished jobid: 1 (Rule: catalog_dicom)", "job_finished"))
    h.emit(_record(None, "progress"))  # "2 of 3 steps": printed before the DAG is updated
    assert out.getvalue() == ""
    h.emit(_record("rule convert_pet:", "job_info"))
    h.emit(_record("rule convert_pet:", "job_info"))
    assert out.getvalue() == ("glandpet: after the catalog_dicom step the plan is 7 job(s) to run (2 done):\n"
                              "  convert_pet     3\n  measure_glands  3\n  cohort_tables   1\n")


def test_dry_run_before_the_index_says_the_plan_ends_there():
    """Before: `snakemake -n` of a study listed the index step only, without a word."""
    from glandpet.progress import PlanAfterCheckpoint

    out = io.StringIO()
    h = PlanAfterCheckpoint(lambda: None, "catalog_dicom", dryrun=lambda: True, checkpoint_done=lambda: False,
                            stream=out)
    h.emit(_record("This was a dry-run (flag -n). The order of jobs does not reflect the order of execution.", None))
    assert out.getvalue().startswith("glandpet: this plan ends at the catalog_dicom step")
    assert "snakemake --until catalog_dicom" in out.getvalue()
    out = io.StringIO()
    h = PlanAfterCheckpoint(lambda: None, "catalog_dicom", dryrun=lambda: True, checkpoint_done=lambda: True,
                            stream=out)
    h.emit(_record("This was a dry-run (flag -n).", None))
    assert out.getvalue() == ""  # the index has run: Snakemake's own plan is the whole plan

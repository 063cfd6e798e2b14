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

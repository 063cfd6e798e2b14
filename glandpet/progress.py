"""One small progress display for every long command (phantom, index, init, check).

On a terminal: a line redrawn in place (``\\r``) with counts, rate and time left, at most every
`interval` seconds. When the stream is not a terminal (Snakemake logs, CI, a pipe): nothing while
running, and one summary line at the end. ``quiet=True`` prints nothing at all.

    with Progress(len(files), "indexing", unit="files") as bar:
        for f in files:
            ...
            bar.update()
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, TypeVar

__all__ = ["PlanAfterCheckpoint", "Progress", "format_seconds", "plan_text", "track"]

T = TypeVar("T")


def format_seconds(s: float) -> str:
    """'0:07', '3:25', '1:02:03'."""
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts done out of `total` (None: unknown total, no ETA)."""

    def __init__(self, total: int | None, label: str, *, unit: str = "items", stream: IO[str] | None = None,
                 interval: float = 0.2, quiet: bool = False, clock=time.perf_counter):
        self.total = total
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.quiet = quiet
        self.tty = (not quiet) and _isatty(self.stream)
        self.clock = clock
        self.done = 0
        self.t0 = clock()
        self._last_draw = -float("inf")
        self._width = 0
        self.closed = False

    # --------------------------------------------------------------- text
    def rate(self) -> float:
        dt = self.clock() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        text = f"{self.label}: {count} {self.unit} ({rate:.1f}/s" if rate < 10 else \
            f"{self.label}: {count} {self.unit} ({rate:.0f}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {format_seconds((self.total - self.done) / rate)} left"
        return text + ")"

    def summary(self) -> str:
        dt = self.clock() - self.t0
        count = f"{self.done}/{self.total}" if self.total is not None and self.total != self.done else f"{self.done}"
        return f"{self.label}: {count} {self.unit} in {dt:.1f} s ({self.rate():.1f}/s)"

    # --------------------------------------------------------------- drawing
    def _draw(self) -> None:
        text = self.line()
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.tty:
            return
        now = self.clock()
        if now - self._last_draw >= self.interval or (self.total is not None and self.done >= self.total):
            self._last_draw = now
            self._draw()

    def close(self, message: str | None = None) -> None:
        """End the display: on a terminal, redraw the final line and end it; otherwise print the summary
        line. `message` replaces the summary."""
        if self.closed:
            return
        self.closed = True
        if self.quiet:
            return
        text = message or self.summary()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + "\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], label: str, *, total: int | None = None, unit: str = "items",
          stream: IO[str] | None = None, quiet: bool = False) -> Iterator[T]:
    """Iterate `items` with a :class:`Progress` display."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, label, unit=unit, stream=stream, quiet=quiet) as bar:
        for x in items:
            yield x
            bar.update()


# ------------------------------------------------------------------------------ the workflow's plan
def plan_text(to_run: Mapping[str, int], done: int, checkpoint: str = "catalog_dicom") -> str:
    """The plan once a checkpoint has expanded it: jobs per rule, in the order given."""
    total = sum(to_run.values())
    width = max([len(r) for r in to_run] + [5])
    lines = [f"glandpet: after the {checkpoint} step the plan is {total} job(s) to run ({done} done):"]
    lines += [f"  {rule.ljust(width)}  {n}" for rule, n in to_run.items()]
    return "\n".join(lines)


class PlanAfterCheckpoint(logging.Handler):
    """Added to Snakemake's logger by the Snakefile. Snakemake's "2 of 3 steps (67%) done" counts the
    plan known before the index checkpoint ran; when the first job after the checkpoint starts (the
    plan is expanded by then), print the real plan (jobs per rule) once. In a dry run whose checkpoint
    has not run, say that the plan shown ends at it and how to see the rest."""

    def __init__(self, dag: Callable[[], Any], checkpoint: str = "catalog_dicom", *,
                 dryrun: Callable[[], bool] = lambda: False,
                 checkpoint_done: Callable[[], bool] = lambda: False, stream: IO[str] | None = None):
        super().__init__(logging.INFO)
        self.dag, self.checkpoint, self.dryrun = dag, checkpoint, dryrun
        self.checkpoint_done = checkpoint_done
        self.stream = stream
        self.armed = self.printed = False

    def _print(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self.printed:
            return
        try:
            event = str(getattr(getattr(record, "event", None), "value", getattr(record, "event", "")) or "")
            msg = record.getMessage() if record.msg is not None else ""
            if event == "job_finished" and f"(Rule: {self.checkpoint})" in msg:
                self.armed = True
            elif self.armed and event in ("job_info", "job_started"):
                self.printed = True
                dag = self.dag()
                counts = Counter(job.rule.name for job in dag.needrun_jobs())  # not finished ones
                done = sum(1 for _ in dag.finished_jobs)  # an iterator in Snakemake 9
                self._print(plan_text(dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))), done,
                                      self.checkpoint))
            elif msg.startswith("This was a dry-run") and self.dryrun() and not self.checkpoint_done():
                self.printed = True
                self._print(f"glandpet: this plan ends at the {self.checkpoint} step: the steps after it depend on "
                            f"what it finds in the DICOM tree. `snakemake --until {self.checkpoint} --cores N` runs "
                            f"only it; a dry run after that shows the whole plan.")
        except Exception:  # noqa: BLE001 - a display must never break the run
            self.printed = True

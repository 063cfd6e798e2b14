"""The one whole-workflow run that the slow tests share: its config, and helpers to call Snakemake on it.

The run itself is the session fixture ``workflow_run`` (conftest.py): several test files assert on it,
so the demo workflow runs once per test session."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIG = {"demo": {"subjects": 2, "seed": 1, "atlases": 2}}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(workdir: Path, **extra) -> None:
    import yaml

    cfg = {"results": str(workdir / "results"), **CONFIG, **extra}
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


def planned_jobs(workdir: Path, **extra) -> dict[str, int]:
    """Jobs a dry run with a changed config would run, by rule."""
    write_config(workdir, **extra)
    try:
        out = snakemake(workdir, "-n", "--cores", "2").stdout
    finally:
        write_config(workdir)
    counts: dict[str, int] = {}
    in_table = False
    for line in out.splitlines():
        if line.startswith("job") and "count" in line:
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    return counts

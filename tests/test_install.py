"""The README's install, then the README's report command, in a FRESH virtual environment (issue 17:
`pip install -e .` then `snakemake --report results/report.html` failed, pygments came only with the
test extra). The venv has no system site packages and gets the package WITHOUT extras, so a
dependency that only the test or slurm extra (or this machine) provides makes the command fail here.

The report runs on the shared demo run (`workflow_run`, conftest.py): no extra pipeline run.

Speed: pip resolves ~100 packages against the index one by one (~3.5 min here, nothing of it
cached by pip), so the wheels of the declared dependencies are downloaded once into a wheelhouse
(~/.cache/glandpet/wheelhouse/<key>, or $GLANDPET_WHEELHOUSE) keyed by the dependency lists of
pyproject.toml, the Python version and the platform; a changed dependency list downloads afresh.
The install itself is then offline (--no-index: only what pyproject.toml declares is there to
install) and skips byte-compilation."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# Not part of what `pip install .` reads; skipped when copying the source tree.
_NOT_SOURCE = (".git", ".snakemake", "results", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV", "CONDA_PREFIX")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(argv: list, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run outside the repository: `python -c`/`-m` put the working folder first on sys.path, and
    the repository's glandpet/ must not stand in for the installed one."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=_clean_env(), cwd=cwd or Path.home())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _requirements() -> tuple[list[str], list[str]]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(meta["project"]["dependencies"]), list(meta["build-system"]["requires"])


def wheelhouse(src: Path) -> Path:
    """Wheels of the declared (no-extras) dependencies and of the build backend, downloaded once per
    dependency list."""
    deps, build = _requirements()
    spec = {"deps": sorted(deps), "build": sorted(build), "python": list(sys.version_info[:2]),
            "platform": [sys.platform, platform.machine()]}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("GLANDPET_WHEELHOUSE", Path.home() / ".cache" / "glandpet" / "wheelhouse"))
    wh = root / key
    if (wh / ".complete").is_file():
        return wh
    part = root / f"{key}.partial"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--dest", part, src, *build], timeout=1800)
    (part / ".complete").write_text(json.dumps(spec))
    for old in root.iterdir():  # an older dependency list's wheels
        if old.is_dir() and old != part:
            shutil.rmtree(old, ignore_errors=True)
    part.rename(wh)
    return wh


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> dict:
    """A new venv (no system site packages) with `pip install <repo>` (no extras) in it."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "glandpet-src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    t0 = time.perf_counter()
    wh = wheelhouse(src)
    t1 = time.perf_counter()
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], timeout=300)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", wh, "--no-compile", src], timeout=1800)
    t2 = time.perf_counter()
    print(f"\nwheelhouse {t1 - t0:.0f} s, venv + install {t2 - t1:.0f} s")
    return {"python": py, "venv": venv, "tmp": tmp}


def test_the_venv_is_isolated(fresh_venv):
    py = fresh_venv["python"]
    out = _run([py, "-c", "import sys, site, glandpet; print(sys.prefix != sys.base_prefix, "
                          "site.ENABLE_USER_SITE, glandpet.__file__)"], timeout=120,
               cwd=fresh_venv["tmp"]).stdout.split()
    assert out[:2] == ["True", "False"], out
    assert out[2].startswith(str(fresh_venv["venv"])), out  # the installed copy, not the repo
    # the extras' packages are not there: the report below cannot lean on them
    for extra_only in ("pytest", "polars", "duckdb", "snakemake_executor_plugin_slurm"):
        proc = subprocess.run([str(py), "-c", f"import {extra_only}"], capture_output=True, env=_clean_env(),
                              cwd=fresh_venv["tmp"])
        assert proc.returncode != 0, f"{extra_only} is importable in the fresh venv"


def test_readme_report_command_after_readme_install(fresh_venv, workflow_run):
    """README: `pip install -e .` then `snakemake --report results/report.html` (here on the shared
    demo run, with that run's Snakefile, folder and config)."""
    py = fresh_venv["python"]
    report = fresh_venv["tmp"] / "report.html"
    t0 = time.perf_counter()
    proc = _run([py, "-m", "snakemake", "-s", REPO / "Snakefile", "--directory", workflow_run,
                 "--configfile", workflow_run / "config.yaml", "--report", report], timeout=900,
                cwd=fresh_venv["tmp"])
    print(f"\nreport {time.perf_counter() - t0:.0f} s")
    assert "Report created" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    html = report.read_text(errors="replace")
    assert "<html" in html[:2000].lower() and len(html) > 100_000, (len(html), html[:300])


def test_documented_glandpet_command_after_readme_install(fresh_venv):
    """The console script the README documents is on the venv's PATH and answers."""
    out = _run([fresh_venv["venv"] / "bin" / "glandpet", "--version"], timeout=120).stdout
    assert out.startswith("glandpet ")

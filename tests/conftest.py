"""Shared fixtures. Data in ../shared/data is read in place; tests that need it skip where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


#: the session-scoped fixtures that take minutes (whole workflow runs, a phantom cohort), in order
#: of precedence. Under pytest-xdist (README: ``pytest -n 2 --dist loadgroup``, as .ci/run) a test
#: module goes to one worker whole (its module-scoped fixtures are built once), and every module
#: with a test that uses one of these runs goes to the same worker as the others that use it (the
#: run is built once).
SHARED_RUNS = ("workflow_run", "walkthrough", "small_cohort")
#: the longest groups (minutes; a clean-checkout CI run, 2 cores) start first, so that the two
#: workers end together instead of one starting the accuracy cohort when the other is done
FIRST = ("workflow_run", "tests/test_segmentation_accuracy.py", "walkthrough", "tests/test_segmentation_real_ct.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.has_plugin("xdist"):
        return
    module_of = {item.nodeid: item.nodeid.split("::")[0] for item in items}
    uses: dict[str, set[str]] = {}
    for item in items:
        uses.setdefault(module_of[item.nodeid], set()).update(getattr(item, "fixturenames", ()))
    group = {m: next((n for n in SHARED_RUNS if n in names), m) for m, names in uses.items()}
    rank = {g: FIRST.index(g) if g in FIRST else len(FIRST) for g in group.values()}
    items.sort(key=lambda it: rank[group[module_of[it.nodeid]]])
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[module_of[item.nodeid]]))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (a user's clone): test needs it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def load_benchmark():
    """Import a script of ``benchmarks/`` by name (``load_benchmark("real_ct")``) to test its
    pure parts: the benchmarks are scripts, not a package."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """A 2-subject phantom cohort (one pSS with two sessions, one control), one atlas; shared by
    the ingest tests."""
    from glandpet.phantom.cohort import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, 2, seed=5, n_atlases=1, progress=False)
    return out


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory) -> Path:
    """ONE run of the demo workflow (tests/workflow_run.py: CONFIG), shared by every slow test that
    reads its outputs. Tests that change its config must restore it (``planned_jobs`` does)."""
    from workflow_run import snakemake, write_config

    workdir = tmp_path_factory.mktemp("workflow")
    write_config(workdir)
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.fixture(scope="session")
def workflow_results(workflow_run) -> Path:
    return workflow_run / "results"

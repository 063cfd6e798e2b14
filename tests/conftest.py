"""Shared fixtures. Data in ../shared/data is read in place; tests that need it skip where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


#: the session-scoped fixtures that take minutes (whole workflow runs, a phantom cohort). Under
#: pytest-xdist (README: ``pytest -n 2 --dist loadgroup``, as .ci/run) every test that uses one goes to the same worker, so each is built once; any other test goes with its
#: module, so module-scoped fixtures are built once too.
SHARED_RUNS = ("workflow_run", "walkthrough", "small_cohort")
#: the longest groups (minutes; a clean-checkout CI run, 2 cores) start first, so that the two
#: workers end together instead of one starting the accuracy cohort when the other is done
FIRST = ("workflow_run", "tests/test_segmentation_accuracy.py", "walkthrough", "tests/test_segmentation_real_ct.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(config, items):
    def group(item) -> str:
        names = getattr(item, "fixturenames", ())
        return next((n for n in SHARED_RUNS if n in names), item.nodeid.split("::")[0])

    if not config.pluginmanager.has_plugin("xdist"):
        return
    groups = {item.nodeid: group(item) for item in items}
    items.sort(key=lambda it: FIRST.index(groups[it.nodeid]) if groups[it.nodeid] in FIRST else len(FIRST))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (a user's clone): test needs it")
    return SHARED_DATA


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

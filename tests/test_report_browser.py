"""The Snakemake report as a user sees it: results/report.html of the shared workflow run opened in
headless Debian Chromium (driven by Selenium through Debian's chromedriver), rendered by its own
JavaScript, then checked through the DOM: the result categories (Figures, QC montages, Tables),
one "Statistics" entry (Snakemake's own), every cohort figure, every subject's QC montage, the
statistics table, and that a
figure and a montage actually display. A screenshot of a displayed QC montage is saved to the
test's tmp folder; with GLANDPET_REFRESH_SCREENSHOT=1 it also replaces docs/report_screenshot.png.

Skipped only when Chromium, chromedriver or Selenium is missing AND GLANDPET_REQUIRE_CHROMIUM is
unset; CI (.ci/run) installs Debian's chromium and chromium-driver and sets it, so there a
missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO
from workflow_run import snakemake

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# per /work/.library/env/machines/python.md: a closed network refuses Chromium's background traffic
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1500,950")
RESULT_CATEGORIES = ("Figures", "QC montages", "Tables")

pytestmark = pytest.mark.slow


def _missing() -> list[str]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    return missing


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        msg = f"headless browser test needs {', '.join(missing)}"
        if os.environ.get("GLANDPET_REQUIRE_CHROMIUM"):
            pytest.fail(msg + " (GLANDPET_REQUIRE_CHROMIUM is set)")
        pytest.skip(msg + ": apt-get install chromium chromium-driver; pip install selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    profile = tempfile.mkdtemp(prefix="glandpet-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def report(workflow_run) -> Path:
    path = workflow_run / "results" / "report.html"
    if not path.exists():
        snakemake(workflow_run, "--report", str(path))
    return path


def _wait(cond, timeout: float = 60.0, what: str = "condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"report: timed out after {timeout:.0f} s waiting for {what}")


class Report:
    """The rendered report: navigation by the menu's visible texts, as a user clicks."""

    def __init__(self, driver, path: Path):
        from selenium.webdriver.common.by import By

        self.d, self.By = driver, By
        driver.get(path.as_uri())
        self.home()

    def menu_texts(self) -> list[str]:
        return [e.text.strip() for e in self.d.find_elements(self.By.CSS_SELECTOR, "nav li") if e.text.strip()]

    def home(self) -> None:
        links = self.d.find_elements(self.By.CSS_SELECTOR, "nav ol a")
        if links:
            links[0].click()
        _wait(lambda: "Results" in [t.title() for t in self.menu_texts()], what="the report's menu to render")

    def open(self, text: str) -> None:
        items = [e for e in self.d.find_elements(self.By.CSS_SELECTOR, "nav li a, nav li")
                 if e.text.strip() == text]
        assert items, f"no menu entry {text!r} in {self.menu_texts()}"
        items[-1].click()  # the last match: the Results section, below General
        _wait(lambda: text in self.breadcrumb(), what=f"{text!r} to open")

    def breadcrumb(self) -> list[str]:
        return [e.text.strip() for e in self.d.find_elements(self.By.CSS_SELECTOR, "nav ol li")]

    def rows(self) -> dict[str, object]:
        """The result files listed in the open category: {file name: row element}."""
        rows = _wait(lambda: self.d.find_elements(self.By.CSS_SELECTOR, "nav tr td")
                     and self.d.find_elements(self.By.CSS_SELECTOR, "nav tr"), what="the file list")
        out = {}
        for r in rows:
            name = r.text.strip().split("/")[-1]
            if name and name != "FILE":
                out[name] = r
        return out

    def show(self, row) -> None:
        """Click the row's eye button and wait until the image is decoded in the main pane."""
        eye = row.find_element(self.By.CSS_SELECTOR, "a[iconname=eye]")
        name = row.text.strip().split("/")[-1]
        eye.click()
        _wait(lambda: self.d.execute_script(
            "return Array.from(document.images).some(i => i.complete && i.naturalWidth > 0 &&"
            " (i.getAttribute('src') || '').includes('filename=' + arguments[0]))", name),
            what=f"{name} to display")


def test_report_renders_every_category_figure_table_and_montage(browser, report, workflow_results, tmp_path):
    rep = Report(browser, report)
    menu = rep.menu_texts()
    for cat in RESULT_CATEGORIES:
        assert cat in menu, f"category {cat!r} missing from the report menu {menu}"

    figures = sorted(p.name for p in (workflow_results / "figures" / "cohort").glob("*.png"))
    assert figures, "the run wrote no cohort figures"
    rep.open("Figures")
    listed = rep.rows()
    assert sorted(listed) == figures
    rep.show(listed["psma_vs_fapi.png"])

    # one "Statistics" entry: Snakemake's runtime statistics (a result category of that name made
    # two, and its Parquet file showed as an empty pane); the cohort statistics are under Tables
    assert menu.count("Statistics") == 1, menu

    rep.home()
    rep.open("Tables")
    assert sorted(rep.rows()) == ["gland_values.html", "qc.html", "results.html", "statistics.html"]
    # issue 18: qc.html opens on the review queue (the flagged glands, or "none flagged")
    rep.rows()["qc.html"].find_element(rep.By.CSS_SELECTOR, "a[iconname=eye]").click()

    def review_queue_shown() -> bool:
        for frame in browser.find_elements(rep.By.TAG_NAME, "iframe"):
            browser.switch_to.frame(frame)
            try:
                if "Review queue" in browser.page_source:
                    return True
            finally:
                browser.switch_to.default_content()
        return False

    _wait(review_queue_shown, what="the review queue in qc.html")
    review_shot = tmp_path / "review_queue.png"
    assert browser.save_screenshot(str(review_shot))
    if os.environ.get("GLANDPET_REFRESH_SCREENSHOT"):
        shutil.copyfile(review_shot, REPO / "docs" / "review_queue.png")

    montages = sorted(p.name for p in (workflow_results / "figures" / "qc").glob("sub-*_qc.png"))
    subjects = [m[len("sub-"): -len("_qc.png")] for m in montages]
    assert subjects, "the run wrote no QC montages"
    rep.home()
    rep.open("QC montages")
    menu = rep.menu_texts()
    assert all(s in menu for s in subjects), f"subjects {subjects} not all in {menu}"
    for s in reversed(subjects):  # the first subject stays open for the screenshot
        rep.home()
        rep.open("QC montages")
        rep.open(s)
        listed = rep.rows()
        assert list(listed) == [f"sub-{s}_qc.png"]
    rep.show(listed[f"sub-{subjects[0]}_qc.png"])

    shot = tmp_path / "report_screenshot.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("GLANDPET_REFRESH_SCREENSHOT"):
        shutil.copyfile(shot, REPO / "docs" / "report_screenshot.png")

    # issue 21: the report embeds the montage's thumbnail; its caption links the full image, which
    # lies beside the report (results/figures/qc/)
    s = subjects[0]
    rep.rows()[f"sub-{s}_qc.png"].find_element(rep.By.CSS_SELECTOR, "a[iconname=information-circle]").click()
    links = _wait(lambda: [a for a in browser.find_elements(rep.By.CSS_SELECTOR, f"a[href$='figures/qc/sub-{s}_qc.png']")
                           if a.is_displayed()], what="the caption's link to the full montage")
    full = report.parent / "figures" / "qc" / f"sub-{s}_qc.png"
    assert links[0].get_attribute("href") == full.as_uri() and full.stat().st_size > 10_000

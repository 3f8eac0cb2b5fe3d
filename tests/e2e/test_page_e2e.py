"""The status page end to end: the real watcher against the simulator, read by a real browser.

Headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium) opens the
page, the simulator's control interface changes a run, and the page must show it within 5 s
without a reload. A second browser, with JavaScript off, must get a correct table and working
filters from the server alone. The browser test saves a screenshot of the page to
`build/test-artifacts/` (or `$TEST_ARTIFACTS_DIR`). Without Chromium installed the browser
tests are skipped locally and fail under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait
from support import FAKE_KEY, wait_until
from support.e2e import CALLER, FAST, REPO, StartWatcher

from watcher.simulator import SimulatorThread
from watcher.simulator.scenarios import RunSpec, Scenario, Step

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1500,900",
)
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "build" / "test-artifacts")
TARGET = "k4q95w5"
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">"
FOREVER = 86_400.0


def steady(status: str | None) -> tuple[Step, ...] | None:
    return None if status is None else (Step(status, FOREVER),)


RUNS = (
    RunSpec(TARGET, "qwen3-8b-sft", "Qwen/Qwen3-8B", CALLER, steady("ACTIVE"), loop=False),
    RunSpec(
        "hodzdoc",
        "llama33-70b-rl",
        "meta-llama/Llama-3.3-70B-Instruct",
        "grace@example.com",
        (
            Step("BUILDING", 2),
            Step("DEPLOYING", 2),
            Step("LOADING_MODEL", 2),
            Step("ACTIVE", FOREVER),
        ),
        loop=False,
        instance_type="H100x8",
        node_count=2,
    ),
    RunSpec(
        "0epf91d",
        "gemma3-27b-sft",
        "google/gemma-3-27b-it",
        "linus@example.com",
        (Step("BUILDING", 3), Step("BUILD_FAILED", FOREVER)),
        loop=False,
    ),
    RunSpec("9is0j8h", "qwen3-32b-distill", "Qwen/Qwen3-32B", CALLER, steady("SCALED_TO_ZERO")),
    RunSpec("t9lgmxg", "qwen3-8b-trainer-only", "Qwen/Qwen3-8B", CALLER, steady(None)),
    RunSpec("xss0001", HOSTILE_NAME, "Qwen/Qwen3-8B", "grace@example.com", steady("ACTIVE")),
)


def browser_paths() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "needs Chromium: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[..., webdriver.Chrome]]:
    """Open headless Chromium windows, each with a fresh profile; all quit at teardown."""
    chromium, driver_path = browser_paths()
    drivers: list[webdriver.Chrome] = []

    def open_browser(*, javascript: bool = True) -> webdriver.Chrome:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}")
        if not javascript:
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2}
            )
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        drivers.append(driver)
        return driver

    yield open_browser
    for driver in drivers:
        driver.quit()


@pytest.fixture
def served() -> Iterator[SimulatorThread]:
    with SimulatorThread(Scenario(caller=CALLER, runs=RUNS), [FAKE_KEY]) as thread:
        yield thread


def watch_args(served: SimulatorThread, *extra: str) -> tuple[str, ...]:
    ids = [arg for spec in RUNS for arg in ("--run-id", spec.id)]
    return ("--api-url", served.url, *FAST, *ids, *extra)


def text_of(driver: WebDriver, selector: str) -> str:
    """The text of an element the script may be replacing right now, spaces collapsed."""
    for _ in range(5):
        try:
            found = driver.find_elements(By.CSS_SELECTOR, selector)
            return " ".join(found[0].text.split()) if found else ""
        except StaleElementReferenceException:
            continue
    return ""


def rows(driver: WebDriver) -> list[str]:
    script = "return [...document.querySelectorAll('#runs tbody tr[data-run-id]')]"
    ids: list[str] = driver.execute_script(script + ".map(r => r.dataset.runId)")
    return ids


def test_the_page_follows_a_status_change_live_and_safely(
    served: SimulatorThread, start_watcher: StartWatcher, browser: Callable[..., webdriver.Chrome]
) -> None:
    watcher = start_watcher(*watch_args(served))
    driver = browser()
    driver.get(watcher.url + "/")
    WebDriverWait(driver, 10).until(lambda d: "live" in text_of(d, "#freshness"))
    pill = f'#runs tr[data-run-id="{TARGET}"] .pill'
    WebDriverWait(driver, 10).until(lambda d: text_of(d, pill) == "ACTIVE")
    driver.execute_script("window.sameDocument = true")

    started = time.monotonic()
    control = httpx.put(f"{served.url}/_sim/runs/{TARGET}", json={"status": "UNHEALTHY"})
    assert control.status_code == 200, control.text
    WebDriverWait(driver, 5).until(lambda d: text_of(d, pill) == "UNHEALTHY")
    assert time.monotonic() - started < 5
    assert driver.execute_script("return window.sameDocument") is True  # no reload happened
    row = f'#runs tr[data-run-id="{TARGET}"]'
    assert text_of(driver, f"{row} .class-label") == "failing"
    assert "ACTIVE → UNHEALTHY" in text_of(driver, f"{row} .history li")
    assert text_of(driver, ".chip.c-failing") == "1 failing"
    assert driver.title.startswith("(2 in trouble)")  # UNHEALTHY and BUILD_FAILED

    # Names from the API are text: no element made of them, no script run from them.
    assert text_of(driver, '#runs tr[data-run-id="xss0001"] .name') == HOSTILE_NAME
    assert driver.find_elements(By.CSS_SELECTOR, "#runs img") == []
    assert "pwned" not in driver.title

    # Time in status ticks between fetches.
    since = f"{row} .since time"
    first = text_of(driver, since)
    WebDriverWait(driver, 5).until(lambda d: text_of(d, since) not in ("", first))

    # Filters and sorting in the browser, kept in the URL.
    search = driver.find_element(By.NAME, "q")
    search.send_keys("QWEN3-8B")
    WebDriverWait(driver, 3).until(lambda d: set(rows(d)) == {TARGET, "t9lgmxg", "xss0001"})
    search.clear()
    search.send_keys(" ")  # an input event: the filter is gone again
    Select(driver.find_element(By.NAME, "status_class")).select_by_value("failed")
    WebDriverWait(driver, 3).until(lambda d: rows(d) == ["0epf91d"])
    assert "status_class=failed" in driver.current_url
    Select(driver.find_element(By.NAME, "status_class")).select_by_value("")
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="run"] a').click()
    by_name = ["xss0001", "0epf91d", "hodzdoc", "9is0j8h", TARGET, "t9lgmxg"]  # "<img" first
    WebDriverWait(driver, 3).until(lambda d: rows(d) == by_name)
    assert "sort=run" in driver.current_url
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="run"] a').click()
    WebDriverWait(driver, 3).until(lambda d: rows(d) == by_name[::-1])
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="status"] a').click()

    # The strict Content-Security-Policy let everything the page needs through.
    log: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    complaints = [entry for entry in log if entry["level"] == "SEVERE"]
    assert complaints == []

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    WebDriverWait(driver, 3).until(lambda d: rows(d)[0] == TARGET)
    assert driver.save_screenshot(str(ARTIFACTS / "status-page.png"))


def test_without_javascript_the_server_renders_filters_and_sorts(
    served: SimulatorThread, start_watcher: StartWatcher, browser: Callable[..., webdriver.Chrome]
) -> None:
    watcher = start_watcher(*watch_args(served))
    wait_until(
        lambda: all(run["last_poll"] for run in watcher.get("/api/v1/runs").json()["runs"]),
        timeout=10,
        what="every run polled",
    )
    driver = browser(javascript=False)
    driver.get(watcher.url + "/")
    assert "js" not in (driver.find_element(By.TAG_NAME, "html").get_attribute("class") or "")
    assert set(rows(driver)) == {spec.id for spec in RUNS}
    assert text_of(driver, f'tr[data-run-id="{TARGET}"] .pill') == "ACTIVE"
    assert text_of(driver, 'tr[data-run-id="t9lgmxg"] .pill') == "no sampler"
    assert text_of(driver, 'tr[data-run-id="xss0001"] .name') == HOSTILE_NAME

    Select(driver.find_element(By.NAME, "owner")).select_by_value("grace@example.com")
    driver.find_element(By.CSS_SELECTOR, "#filters button.apply").click()
    WebDriverWait(driver, 5).until(lambda d: "owner=grace%40example.com" in d.current_url)
    assert set(rows(driver)) == {"hodzdoc", "xss0001"}
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="run"] a').click()
    WebDriverWait(driver, 5).until(lambda d: "sort=run" in d.current_url)
    assert rows(driver) == ["xss0001", "hodzdoc"]  # by name: "<img" before "llama"
    assert "owner=grace%40example.com" in driver.current_url


def test_the_page_and_its_api_answer_under_the_external_path(
    served: SimulatorThread, start_watcher: StartWatcher
) -> None:
    watcher = start_watcher(
        *watch_args(served, "--web-external-url", "https://ops.example.com/team/watcher/")
    )
    page = watcher.get("/team/watcher/")
    assert page.status_code == 200
    assert 'href="/team/watcher/metrics"' in page.text
    assert 'data-api="/team/watcher/api/v1/runs"' in page.text
    script = page.text.split('<script src="', 1)[1].split('"', 1)[0]
    assert script.startswith("/team/watcher/static/page.js?v=")
    assert watcher.get(script).headers["content-type"].startswith("text/javascript")
    assert watcher.get("/team/watcher/metrics").status_code == 200
    listed = watcher.get("/team/watcher/api/v1/runs?status_class=failed")
    assert listed.headers["content-type"] == "application/json"
    assert "default-src 'none'" in listed.headers["content-security-policy"]
    # A proxy that strips the prefix reaches the same page at the root.
    assert watcher.get("/").text.count("/team/watcher/static/") == 3
    one = watcher.get(f"/api/v1/runs/{TARGET}").json()
    assert one["run"]["owner"] == CALLER


def test_a_rejected_key_shows_as_a_banner(
    served: SimulatorThread, start_watcher: StartWatcher
) -> None:
    watcher = start_watcher(*watch_args(served), api_key="e2e-FAKE-but-wrong-key")
    document = wait_until(
        lambda: (doc := watcher.get("/api/v1/runs").json())["watcher"]["problems"] and doc,
        timeout=10,
        what="a problem on the page",
    )
    assert [p["kind"] for p in document["watcher"]["problems"]] == ["key_rejected"]
    page = watcher.get("/").text
    assert "API key rejected." in page
    assert "e2e-FAKE-but-wrong-key" not in page + json.dumps(document)


def test_the_demo_names_the_status_page_first(start_watcher: StartWatcher) -> None:
    watcher = start_watcher("--demo", api_key=None)
    first = watcher.logs()[0]
    assert (first["event"], first["status_page"]) == (
        "demo_started",
        f"http://localhost:{watcher.port}/",
    )
    document = wait_until(
        lambda: (doc := watcher.get("/api/v1/runs").json())["counts"]["unread"] == 0 and doc,
        timeout=10,
        what="every demo run read",
    )
    assert document["watcher"]["watched_runs"] >= 10

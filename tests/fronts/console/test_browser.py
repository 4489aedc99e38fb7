"""The console in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
installed by `.ci/run`) driven by selenium against a gateway that has served real traffic.

Signs in with a link from `bastion console login`, loads every page, searches, follows a call to
its story, verifies it, approves a held call from the approvals page (and the agent's retry then
runs), turns on the live tail and sees a new call arrive, and checks that HTML and script written
by an attacker (in arguments and tool names) show as text and never run. Screenshots of every page
go to `build/console-screenshots/` (or `$BASTION_SCREENSHOTS`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx
import pytest
from conftest import REPO

from .conftest import HOSTILE_TOOL, ConsoleEnv

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
T = TypeVar("T")
SHOTS = Path(os.environ.get("BASTION_SCREENSHOTS") or REPO / "build" / "console-screenshots")

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (make test installs it)"
)
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
        pytest.skip(
            "no browser: Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )
    profile = tempfile.mkdtemp(prefix="bastion-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--window-size=1400,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _shot(driver: webdriver.Chrome, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _no_alert(driver: webdriver.Chrome) -> None:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return
    text = alert.text
    alert.dismiss()
    raise AssertionError(f"a script ran in the console: alert({text!r})")


async def in_browser(fn: Callable[[], T]) -> T:
    """Run browser steps in a thread: the gateway they talk to runs on this test's event loop."""
    return await asyncio.to_thread(fn)


@pytest.fixture(scope="module")
async def signed_in(browser: webdriver.Chrome, console_env: ConsoleEnv) -> webdriver.Chrome:
    link = await console_env.login_link()

    def sign_in() -> None:
        browser.get(link)
        WebDriverWait(browser, 10).until(ec.url_to_be(f"{console_env.base}/console"))

    await in_browser(sign_in)
    return browser


async def test_every_page_loads_and_shows_no_script_but_its_own(
    signed_in: webdriver.Chrome, console_env: ConsoleEnv
) -> None:
    driver = signed_in

    def visit() -> None:
        for path, name in (
            ("/console", "overview"), ("/console/audit", "audit"), ("/console/approvals", "approvals"),
            ("/console/tools", "tools"), ("/console/policy", "policy"), ("/console/budgets", "budgets"),
        ):  # fmt: skip
            driver.get(f"{console_env.base}{path}")
            assert driver.find_element(By.TAG_NAME, "h1").text, path
            assert "root" in driver.find_element(By.TAG_NAME, "header").text
            _no_alert(driver)
            scripts = [s.get_attribute("src") for s in driver.find_elements(By.TAG_NAME, "script")]
            assert all(src == f"{console_env.base}/console/static/console.js" for src in scripts), scripts
            _shot(driver, name)

    await in_browser(visit)


async def test_search_to_story_to_verify(signed_in: webdriver.Chrome, console_env: ConsoleEnv) -> None:
    driver = signed_in

    def steps() -> None:
        driver.get(f"{console_env.base}/console/audit")
        driver.find_element(By.NAME, "user").send_keys("mallory")
        driver.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
        WebDriverWait(driver, 10).until(ec.url_contains("user=mallory"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert len(rows) == 1
        _shot(driver, "search-mallory")
        rows[0].find_element(By.TAG_NAME, "a").click()
        WebDriverWait(driver, 10).until(ec.url_contains(f"/console/calls/{console_env.ids['hostile-args']}"))
        _no_alert(driver)
        shown = driver.find_element(By.ID, "args").text  # the arguments as recorded, as JSON text
        assert '<script>alert(\\"xss\\")</script><img src=x onerror=alert(1)>' in shown
        assert not driver.find_elements(By.CSS_SELECTOR, "main img")
        _shot(driver, "story")
        driver.find_element(By.CSS_SELECTOR, "form[action$='/verify'] button").click()
        result = WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.ID, "verify-result")))
        assert result.text.startswith("ok"), result.text
        _shot(driver, "story-verified")

    await in_browser(steps)


async def test_a_tool_name_written_as_html_is_text(
    signed_in: webdriver.Chrome, console_env: ConsoleEnv
) -> None:
    driver = signed_in
    if not console_env.ids["hostile-tool"]:
        pytest.fail("the call to a tool named with HTML left no record")

    def steps() -> None:
        driver.get(f"{console_env.base}/console/calls/{console_env.ids['hostile-tool']}")
        _no_alert(driver)
        assert HOSTILE_TOOL in driver.find_element(By.TAG_NAME, "main").text
        assert not driver.find_elements(By.CSS_SELECTOR, "main b")
        driver.get(f"{console_env.base}/console/audit?tool={quote(HOSTILE_TOOL)}")
        assert HOSTILE_TOOL in driver.find_element(By.ID, "results").text
        _no_alert(driver)

    await in_browser(steps)


async def test_approve_from_the_approvals_page_and_the_call_runs(
    signed_in: webdriver.Chrome, console_env: ConsoleEnv
) -> None:
    env, driver = console_env, signed_in
    async with httpx.AsyncClient(timeout=10) as http:
        held = await env.call(http, "transfer", {"amount": 250, "to": "browser-acct"}, sub="carol")
        assert held.status_code == 202, held.text
        approval = held.json()["approval_id"]

        def approve() -> None:
            driver.get(f"{env.base}/console/approvals")
            form = driver.find_element(By.CSS_SELECTOR, f"form[action='/console/approvals/{approval}']")
            form.find_element(By.NAME, "reason").send_keys("checked the invoice")
            form.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
            try:
                WebDriverWait(driver, 10).until(
                    ec.text_to_be_present_in_element((By.TAG_NAME, "main"), "approved by root")
                )
            finally:
                _shot(driver, "approved")

        await in_browser(approve)
        again = await env.call(http, "transfer", {"amount": 250, "to": "browser-acct"}, sub="carol")
        assert again.status_code == 200, again.text


async def test_the_live_tail_adds_new_calls(signed_in: webdriver.Chrome, console_env: ConsoleEnv) -> None:
    env, driver = console_env, signed_in

    def open_tail() -> None:
        driver.get(f"{env.base}/console/audit?user=tail-watch")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 1
        driver.find_element(By.ID, "live").click()

    def three_rows() -> None:
        WebDriverWait(driver, 15).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 3
        )
        first = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")[0]
        assert "deny" in first.text and "tail-watch" in first.text
        assert "<i>during</i>" not in driver.page_source
        _no_alert(driver)
        _shot(driver, "live-tail")

    async with httpx.AsyncClient(timeout=10) as http:
        await env.call(http, "echo", {"text": "before the tail"}, sub="tail-watch")
        await in_browser(open_tail)
        await env.call(http, "echo", {"text": "<i>during</i>"}, sub="tail-watch")
        await env.call(http, "transfer", {"amount": 99999, "to": "x"}, sub="tail-watch")
    await in_browser(three_rows)

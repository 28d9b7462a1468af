"""The tracker's status page in a real headless Chromium (Debian's, nothing downloaded).

The page is loaded once; a stock client then holds and releases our
server's board, and the page must follow without a reload. Screenshots are
saved in the test's temporary directory (paths printed).
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
from tvm import rpc

from tests.server_support import start_server
from tests.status_support import STATUS_FLAG, status_port
from tests.support import running, start_tracker

pytestmark = pytest.mark.stock

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser(profile: Path):
    """Headless Chromium from Debian's packages, driven by Debian's chromedriver."""
    from selenium import webdriver  # the test extra installs it; only the browser may be absent
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(
            f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
            "apt-get install chromium chromium-driver (.ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1200,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_page_follows_a_session_without_reload(tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    logs = tmp_path / "logs"
    logs.mkdir()
    tracker = start_tracker(logs, *STATUS_FLAG)
    with running(tracker):
        port = status_port(tracker)
        server = start_server(logs, "page", "--tracker", f"127.0.0.1:{tracker.port}")
        with running(server):
            tracker.wait_for(r"server:page registered")
            driver = browser(tmp_path / "profile")
            try:
                driver.get(f"http://127.0.0.1:{port}/")
                # The page re-renders rows as events arrive: an element found just before a
                # re-render is stale when read, so a wait reads again instead of failing.
                wait = WebDriverWait(
                    driver, 30, ignored_exceptions=(StaleElementReferenceException,)
                )

                def board_state(_driver) -> str:
                    cells = driver.find_elements(By.CSS_SELECTOR, 'tr[data-key="page"] td.state')
                    return cells[0].text if cells else ""

                wait.until(lambda d: board_state(d) == "free")
                # A full reload would drop this marker.
                driver.execute_script("window.__notReloaded = true;")

                client = rpc.connect_tracker("127.0.0.1", tracker.port)
                session = client.request("page", session_timeout=60)
                wait.until(lambda d: board_state(d) == "busy")
                # The busy row names who holds the board.
                wait.until(
                    lambda d: (
                        "127.0.0.1" in d.find_element(By.CSS_SELECTOR, 'tr[data-key="page"]').text
                    )
                )
                busy_png = tmp_path / "status-page-busy.png"
                assert driver.save_screenshot(str(busy_png))
                print(f"screenshot: {busy_png}")

                session.upload(bytearray(1 << 20), "blob")
                del session
                gc.collect()  # a stock session ends when it is collected
                wait.until(lambda d: board_state(d) == "free")
                wait.until(
                    lambda d: (
                        "ok" in d.find_element(By.ID, "sessions").text
                        and "page" in d.find_element(By.ID, "sessions").text
                    )
                )
                assert driver.execute_script("return window.__notReloaded === true;")
                assert driver.find_elements(By.CSS_SELECTOR, "#chart svg polyline")
                free_png = tmp_path / "status-page-free.png"
                assert driver.save_screenshot(str(free_png))
                print(f"screenshot: {free_png}")
            finally:
                driver.quit()

"""The ECS's status page in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium): a running three-server cluster, a fourth added, one killed; the page
follows without being reloaded.

``CHAINSTORE_SCREENSHOT=docs/status-page.png pytest tests/test_status_page.py`` also saves
the page as the README shows it.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from ecs import protocol
from harness.processes import ECSProcess

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them as root: "
                "apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1200,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Read in one script: the page redraws every second, so elements found one call earlier may be
# gone (stale) by the next.
PAGE = """
const members = {};
for (const row of document.querySelectorAll("#members tbody tr")) {
  members[row.dataset.member] = [row.querySelector("td.state").textContent, row.className];
}
return {
  members: members,
  ranges: [...document.querySelectorAll("#ring g.range")].map(g => g.dataset.owner),
  chains: [...document.querySelectorAll("#chains tbody tr")].map(
    r => [r.dataset.owner, r.querySelector("td.lag").textContent]),
};
"""


def page(driver) -> dict:
    """The members (name -> [state text, row class]), the ring's ranges (by owner) and the
    chains (owner, lag) as the page shows them now."""
    return driver.execute_script(PAGE)


def test_the_status_page_follows_the_cluster_live(tmp_path, browser):
    ecs = ECSProcess(tmp_path, slots=4, initial_nodes=3, replication=3, heartbeat_interval=0.3,
                     failure_timeout=1.5).start()
    try:
        ecs.wait_ready(ring_size=3)
        port = ecs.config["web"].split(":")[1]
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 15, poll_frequency=0.1)
        # A mark that a reload would wipe out: the page must follow by itself.
        browser.execute_script("window.notReloaded = true;")
        first = sorted(ecs.status()["ring"])
        wait.until(lambda d: sorted(page(d)["members"]) == first
                   and all(state == "active" for state, _ in page(d)["members"].values())
                   and sorted(page(d)["ranges"]) == first)
        # each chain with its lag, a number once its head has reported
        wait.until(lambda d: sorted(o for o, _ in page(d)["chains"]) == first
                   and all(lag.isdigit() for _, lag in page(d)["chains"]))

        added = ecs.call(protocol.AddNodes, count=1, cache_strategy="LRU",
                         cache_size=100)["names"]
        assert len(added) == 1
        everyone = sorted(first + added)
        wait.until(lambda d: sorted(page(d)["members"]) == everyone
                   and sorted(page(d)["ranges"]) == everyone
                   and page(d)["members"][added[0]][0] == "active")

        victim = first[0]
        os.kill(ecs.server_pids()[victim][-1], signal.SIGKILL)
        wait.until(lambda d: "dead" in page(d)["members"][victim][1].split())
        assert page(browser)["members"][victim][0].split(",")[0] in ("dead", "failed")
        assert browser.execute_script("return window.notReloaded === true;")
        screenshot = os.environ.get("CHAINSTORE_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
    finally:
        ecs.stop()

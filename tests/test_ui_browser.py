"""The operator page in a real browser (issue 18): Debian's headless Chromium driven by
selenium, while a demo-like line runs: the counters move, a reject appears in the gallery,
a person marks it good with the keyboard, and export-labels puts it under good/. A
screenshot is saved (EDGE_INSPECT_SCREENSHOT names where; else the test's tmp dir).

Nothing here downloads a browser: the system chromium and chromedriver are used, and
Selenium Manager is told to stay offline. Without them the test skips and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import PY, ROOT
from ui_support import start_line

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver; .ci/run installs them)")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"          # Selenium Manager: never fetch a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              "--disable-dev-shm-usage", "--window-size=1400,1300",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    yield drv
    drv.quit()


def test_operator_page_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    agent = start_line(tmp_path)
    try:
        # the page redraws its lists as parts arrive: an element found may go stale
        wait = WebDriverWait(browser, 60, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,))
        browser.get(f"http://127.0.0.1:{agent.ui.port}/")
        assert browser.title == "edge-inspect"
        parts = lambda: int(browser.find_element(By.ID, "c-parts").text or 0)  # noqa: E731
        wait.until(lambda d: parts() > 0)
        first = parts()
        wait.until(lambda d: parts() > first)                 # the counters move
        assert browser.find_element(By.ID, "station").text == "ui-test"
        assert browser.find_element(By.ID, "health").text.count("model sha") == 1

        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".reject-card img"))[0]
        wait.until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", card))
        # the demo model gives class scores only: the card says there is no map to draw
        assert browser.find_elements(By.CSS_SELECTOR, ".reject-card .map-none")
        assert "no defect map" in browser.find_element(By.ID, "map-note").text
        live = browser.find_element(By.ID, "live")
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth > 0", live))
        assert browser.find_element(By.ID, "control").get_attribute("hidden") is not None

        who = browser.find_element(By.ID, "who")
        who.send_keys("tester")
        browser.find_element(By.TAG_NAME, "h1").click()     # leave the input: keys go to the page
        status = wait.until(lambda d: d.find_elements(By.ID, "review-status"))[0]
        path = status.get_attribute("data-path")
        assert path and "/reject/" in path
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#review-current img');"
            "return i && i.complete && i.naturalWidth > 0"))
        browser.find_element(By.TAG_NAME, "body").send_keys("g")
        wait.until(lambda d: any("good (tester)" in li.text for li in
                                 d.find_elements(By.CSS_SELECTOR, "#review-list li.done")))
        shot = Path(os.environ.get("EDGE_INSPECT_SCREENSHOT") or tmp_path / "operator-page.png")
        # the whole page, review queue included, not just the first screenful
        browser.set_window_size(1400, browser.execute_script(
            "return document.documentElement.scrollHeight") + 40)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        agent.shutdown()

    out = tmp_path / "dataset"
    p = subprocess.run([PY, "-m", "agent", "export-labels", str(out), "--recorder-dir",
                        str(agent.cfg.recorder.dir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert (out / "good" / path.rsplit("/", 1)[-1]).is_file()
    assert sorted(x.name for x in out.iterdir()) == ["good"]


def test_a_reject_shows_where_in_chromium(browser, tmp_path):
    """A bundle that ships its defect map (model_map.tflite, which `train` now exports): the
    page's reject card carries the overlay, and the overlaid picture differs from the plain
    one. The bundle is trained here, on synthetic data, by our own trainer."""
    pytest.importorskip("tensorflow", reason="trains a small bundle")
    import cv2
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    from agent.config import parse_config
    from agent.commands.daemon import Agent
    from convert.synthetic import make_synthetic_dataset, train_tiny_bundle
    from ui_support import Client, _NoNotify, line_config

    make_synthetic_dataset(tmp_path / "data" / "train", n_per_class=30, size=64, seed=1)
    train_tiny_bundle(tmp_path / "data", tmp_path / "bundle")
    assert (tmp_path / "bundle" / "model_map.tflite").is_file()
    make_synthetic_dataset(tmp_path / "parts", n_per_class=6, size=64, seed=2)
    line = tmp_path / "line"
    line.mkdir()
    for p in sorted((tmp_path / "parts" / "defect").iterdir()):
        cv2.imwrite(str(line / f"{p.stem}.png"), cv2.imread(str(p), cv2.IMREAD_UNCHANGED))
    raw = line_config(tmp_path).model_dump(mode="json")
    raw["camera"]["source"] = str(line)
    raw["model"]["bundle"] = str(tmp_path / "bundle")
    agent = Agent(parse_config(raw, tmp_path), notifier=_NoNotify()).start()
    try:
        # the page redraws its lists as parts arrive: an element found may go stale
        wait = WebDriverWait(browser, 60, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,))
        browser.get(f"http://127.0.0.1:{agent.ui.port}/")
        # the cards are redrawn as rejects arrive: read one in a single script
        first = wait.until(lambda d: d.execute_script(
            "const c = document.querySelector('.reject-card');"
            "return c && [c.dataset.seq, !!c.querySelector('.map-none')]"))
        seq, map_none = first
        assert not map_none, "the reject card says it has no defect map"
        assert browser.find_element(By.ID, "map-note").text == ""
        c = Client(agent.ui.port)
        st1, _, with_map = c.request("GET", f"/api/reject/{seq}.jpg")
        st0, _, plain = c.request("GET", f"/api/reject/{seq}.jpg?map=0")
        assert st1 == st0 == 200 and with_map != plain
        shot = tmp_path / "reject-with-map.png"
        assert browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        agent.shutdown()

"""The labelling page in a real headless browser, against a real server and `featurebank ui`.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`;
`.ci/run` installs them). The bank is embedded by the real `featurebank embed
--thumbnails` from PNG files; the page is its own process, talking gRPC with a token.
Screenshots of every view are saved in the test's temporary directory.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from tests.support.server import RunningServer, free_port, make_vector_bank, tiny_keras_model

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and os.path.exists(p)),
                None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no browser: install Debian's chromium and chromium-driver "
    "(apt-get install chromium chromium-driver) to run the page test",
)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
MIXED = {"purple": (130, 35, 130), "olive": (130, 120, 35)}
TOKEN = "ui-write-token"
KEYS = {"blue": "1", "green": "2", "red": "3"}  # the page's keys for the sorted labels
WRONG = "red/labelled-blue"


def write_png(path: Path, rgb: tuple[int, int, int], rng: np.random.Generator) -> Path:
    from PIL import Image

    px = np.clip(np.array(rgb) + rng.normal(0, 12, (40, 40, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path)
    return path


def make_images(folder: Path) -> tuple[Path, dict[str, str]]:
    """A manifest of labelled, unlabelled and mixed-colour PNGs (and one wrong label).

    Returns the manifest and the true colour of every key.
    """
    rng = np.random.default_rng(0)
    rows: list[list[str]] = [["path", "label", "split", "key"]]
    truth: dict[str, str] = {}
    for name, rgb in COLORS.items():
        for i in range(12):
            key = f"{name}/{i}"
            write_png(folder / f"{name}-{i}.png", rgb, rng)
            split = "val" if i in (6, 7) else "train"
            rows.append([f"{name}-{i}.png", name if i < 8 else "", split, key])
            truth[key] = name
    write_png(folder / "wrong.png", COLORS["red"], rng)
    rows.append(["wrong.png", "blue", "train", WRONG])
    truth[WRONG] = "red"
    for name, rgb in MIXED.items():
        for i in range(3):
            key = f"{name}/{i}"
            write_png(folder / f"{name}-{i}.png", rgb, rng)
            rows.append([f"{name}-{i}.png", "", "train", key])
            truth[key] = "red"
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return manifest, truth


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "featurebank", *args], capture_output=True, text=True,
        timeout=timeout, env=env,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ui")
    manifest, truth = make_images(tmp / "images")
    model = tiny_keras_model(tmp / "tiny.keras")
    bank = tmp / "bank"
    run_cli("embed", str(manifest), "--bank", str(bank), "--backbone", str(model),
            "--image-size", "32", "--dtype", "float32", "--labels", "manifest",
            "--thumbnails", "--no-progress")
    from featurebank.index.build import build_index

    build_index(bank, k=5)
    from featurebank.classify.evaluate import evaluate
    from featurebank.classify.report import write_report

    write_report(evaluate(bank, split="val", sklearn=False), bank / "reports" / "20260101-000000")
    other = make_vector_bank(tmp / "other", dim=8, n_per_class=10)  # a second bank to choose
    config = ServeConfig(bank=bank, named_banks={"other": other}, port=free_port(),
                         tokens=Tokens({"write": [TOKEN]}))
    with RunningServer(config) as server:
        port = free_port()
        ui = subprocess.Popen(
            [sys.executable, "-m", "featurebank", "ui", "--server", server.target,
             "--port", str(port), "--token", TOKEN],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert ui.stdout is not None
            line = ui.stdout.readline()
            assert f"http://127.0.0.1:{port}/" in line, line + (ui.stderr.read() if ui.stderr else "")
            driver = make_driver(tmp / "chromium-profile")
            try:
                yield {"driver": driver, "url": f"http://127.0.0.1:{port}/", "bank": bank,
                       "truth": truth, "shots": tmp, "images": tmp / "images", "server": server}
            finally:
                driver.quit()
        finally:
            ui.send_signal(signal.SIGTERM)
            try:
                assert ui.wait(timeout=20) == 0
            finally:
                if ui.poll() is None:
                    ui.kill()
    print(f"screenshots in {tmp}")


def make_driver(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait_for(driver: Any, condition: Any, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def labels_in_bank(bank: Path, keys: list[str]) -> list[str | None]:
    with store_mod.open(bank, readonly=True) as st:
        return list(st.get_by_keys(keys).labels)


def test_choose_a_bank_and_every_view_answers_from_it(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = page["driver"]
    d.get(page["url"] + "#search")
    label = wait_for(d, lambda drv: drv.find_element(By.ID, "bank-label").is_displayed()
                     and drv.find_element(By.ID, "bank-label"))
    choice = Select(label.find_element(By.ID, "bank-choice"))
    assert [o.get_attribute("value") for o in choice.options] == ["bank", "other"]
    assert choice.first_selected_option.text == "bank (default)"
    default_count = f"{len(page['truth'])} items"
    wait_for(d, lambda drv: drv.find_element(By.ID, "bank-info").text.startswith(default_count))
    choice.select_by_value("other")
    wait_for(d, lambda drv: drv.find_element(By.ID, "bank-info").text.startswith("30 items"))
    assert d.current_url.endswith("?bank=other#search")
    d.find_element(By.ID, "search-key").send_keys("dog/1-3")
    d.find_element(By.CSS_SELECTOR, "#search-form button").click()
    tiles = wait_for(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "#search-results .tile"))
    keys = [t.get_attribute("data-key") for t in tiles]
    assert keys and all(k.split("/")[0] in ("cat", "dog", "fox") for k in keys), keys
    d.refresh()  # the choice is in the address: a reload or a shared link keeps it
    wait_for(d, lambda drv: drv.find_element(By.ID, "bank-info").text.startswith("30 items"))
    assert Select(d.find_element(By.ID, "bank-choice")).first_selected_option.text == "other"
    d.save_screenshot(str(page["shots"] / "bank-choice.png"))
    d.get(page["url"] + "#search")  # back to the default bank for the other tests
    wait_for(d, lambda drv: drv.find_element(By.ID, "bank-info").text.startswith(default_count))


def test_search_by_upload_shows_neighbours_with_thumbnails(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    d = page["driver"]
    d.get(page["url"] + "#search")
    upload = write_png(page["images"] / "query-green.png", COLORS["green"],
                       np.random.default_rng(7))
    d.find_element(By.ID, "search-image").send_keys(str(upload))
    d.find_element(By.CSS_SELECTOR, "#search-form button").click()
    tiles = wait_for(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "#search-results .tile"))
    labels = [t.find_element(By.CLASS_NAME, "lab").text for t in tiles]
    assert labels[0] == "green" and labels.count("green") >= 5, labels
    assert "green" in d.find_element(By.ID, "search-guess").text
    loaded = d.execute_script(
        "return [...document.querySelectorAll('#search-results img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )
    assert loaded >= 8  # thumbnails from the bank, not placeholders
    d.save_screenshot(str(page["shots"] / "search.png"))


def test_label_three_suggestions_with_the_keyboard(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d, truth = page["driver"], page["truth"]
    d.get(page["url"] + "#label")
    wait_for(d, lambda drv: "space" in drv.find_element(By.ID, "keys-legend").text)
    d.find_element(By.CSS_SELECTOR, "#suggest-form button").click()

    def shown() -> str:  # read in the page: the card is re-rendered after every key
        text: str = d.execute_script(
            "const k = document.getElementById('queue-key'); return k ? k.textContent : '';"
        )
        return text

    def current() -> str:
        key: str = wait_for(d, lambda drv: shown())
        return key

    def press(key: str, then_not: str) -> None:
        ActionChains(d).send_keys(key).perform()
        wait_for(d, lambda drv: shown() != then_not)

    done: dict[str, str] = {}
    first = current()
    press(KEYS[truth[first]], first)
    done[first] = truth[first]
    second = current()
    press(KEYS["green"], second)  # a wrong key ...
    assert labels_in_bank(page["bank"], [second]) == ["green"]
    ActionChains(d).send_keys(Keys.BACKSPACE).perform()  # ... undone
    wait_for(d, lambda drv: shown() == second)
    assert labels_in_bank(page["bank"], [second]) == [None]
    press(KEYS[truth[second]], second)
    done[second] = truth[second]
    skipped = current()
    press(Keys.SPACE, skipped)
    third = current()
    press(KEYS[truth[third]], third)
    done[third] = truth[third]
    assert len(done) == 3 and skipped not in done
    assert labels_in_bank(page["bank"], list(done)) == list(done.values())
    assert labels_in_bank(page["bank"], [skipped]) == [None]
    assert d.find_elements(By.CSS_SELECTOR, "#queue-done li")[0].text.startswith(third)
    d.save_screenshot(str(page["shots"] / "label.png"))


def test_accept_an_audit_correction(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    d = page["driver"]
    d.get(page["url"] + "#audit")
    row = wait_for(d, lambda drv: [
        r for r in drv.find_elements(By.CSS_SELECTOR, ".finding") if r.get_attribute("data-key") == WRONG
    ])[0]
    assert "labelled blue" in row.text and "red" in row.text
    d.save_screenshot(str(page["shots"] / "audit.png"))
    row.find_element(By.CLASS_NAME, "accept").click()
    wait_for(d, lambda drv: "accepted" in row.get_attribute("class"))
    assert labels_in_bank(page["bank"], [WRONG]) == ["red"]


def test_rebuild_shows_progress_and_the_report_view(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    d = page["driver"]
    d.get(page["url"] + "#rebuild")
    d.find_element(By.ID, "rebuild-head").click()  # index only: the head is not needed here
    d.find_element(By.ID, "rebuild-start").click()
    wait_for(d, lambda drv: "rebuilt: index generation" in drv.find_element(By.ID, "message").text,
             timeout=120)
    assert d.find_element(By.ID, "rebuild-status").text == "done (100%)"
    d.save_screenshot(str(page["shots"] / "rebuild.png"))
    d.get(page["url"] + "#report")
    d.switch_to.frame(d.find_element(By.ID, "report-frame"))
    wait_for(d, lambda drv: "Metrics" in drv.find_element(By.TAG_NAME, "body").text)
    assert d.find_elements(By.CSS_SELECTOR, "figure img")  # the figures came along
    d.switch_to.default_content()
    d.save_screenshot(str(page["shots"] / "report.png"))

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
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient
from tests.support.server import (
    RunningServer,
    clustered,
    free_port,
    make_vector_bank,
    tiny_keras_model,
)
from tests.support.specs import make_spec

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
READ_TOKEN = "ui-read-token"
KEYS = {"blue": "1", "green": "2", "red": "3"}  # the page's keys for the sorted labels
WRONG = "red/labelled-blue"
# the quality bank's planted findings (vectors of three clusters, thumbnails by class colour)
Q_WRONG, Q_COPY, Q_LEAK, Q_ODD = "cat/1-3", "cat/1-5 copy", "fox/1-8 in test", "odd/0"
Q_NEW = "new/0 in test"  # a test item train has nothing like
Q_COLORS = {"cat": (220, 30, 30), "dog": (30, 200, 40), "fox": (30, 40, 220), "odd": (128, 128, 128)}


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


def jpeg(rgb: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(out, format="JPEG")
    return out.getvalue()


def make_quality_bank(root: Path) -> Path:
    """Three clusters of 12 with a cat labelled dog, an exact copy (same sha256), a train
    item copied into test, an item far from every cluster and a test item far from train."""
    from featurebank.index.build import build_index

    keys, vectors, labels = clustered(12, 16, noise=0.15)
    labels[keys.index(Q_WRONG)] = "dog"
    original, leaked = keys.index("cat/1-5"), keys.index("fox/1-8")
    far = 3 * np.random.default_rng(9).normal(size=(2, 16)).astype(np.float32)
    shas: list[dict[str, Any] | None] = [None] * len(keys)
    shas[original] = {"sha256": "0" * 64}
    with store_mod.create(root, make_spec(16)) as st:
        st.put_batch(keys, vectors, labels=labels, splits=["train"] * len(keys),
                     meta=shas, thumbnails=[jpeg(Q_COLORS[k.split("/")[0]]) for k in keys])
        st.put_batch(
            [Q_COPY, Q_LEAK, Q_ODD, Q_NEW],
            np.concatenate([vectors[[original, leaked]], far]),
            labels=["cat", None, None, None], splits=["train", "test", "none", "test"],
            meta=[{"sha256": "0" * 64}, None, None, None],
            thumbnails=[jpeg(Q_COLORS["cat"]), jpeg(Q_COLORS["fox"]), jpeg(Q_COLORS["odd"]),
                        jpeg(Q_COLORS["odd"])],
        )
    build_index(root, factory="Flat")
    return root


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
    quality = make_quality_bank(tmp / "quality")
    config = ServeConfig(bank=bank, named_banks={"other": other, "quality": quality},
                         port=free_port(), tokens=Tokens({"write": [TOKEN], "read": [READ_TOKEN]}))
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
                       "truth": truth, "shots": tmp, "images": tmp / "images", "server": server,
                       "quality": quality}
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
    assert [o.get_attribute("value") for o in choice.options] == ["bank", "other", "quality"]
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


def test_search_with_a_filter_shows_only_passing_items(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    d = page["driver"]
    d.get(page["url"] + "#search")
    d.find_element(By.ID, "search-key").send_keys("green/0")
    d.find_element(By.ID, "search-filter").send_keys('key prefix "red/"')
    d.find_element(By.CSS_SELECTOR, "#search-form button").click()
    keys = wait_for(d, lambda drv: [t.get_attribute("data-key") for t in
                                    drv.find_elements(By.CSS_SELECTOR, "#search-results .tile")])
    assert len(keys) >= 8 and all(k.startswith("red/") for k in keys), keys
    d.find_element(By.ID, "search-filter").send_keys(" and")  # now malformed: says where
    d.find_element(By.CSS_SELECTOR, "#search-form button").click()
    message = wait_for(d, lambda drv: drv.find_element(By.ID, "message").text)
    assert "position" in message and "filter" in message, message


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


def quality_rows(driver: Any, kind: str) -> dict[str, Any]:
    """The quality view's finding rows of `kind`, by key (a duplicate group by its keys)."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f".finding[data-kind={kind}]")
    return {r.get_attribute("data-key") or r.get_attribute("data-keys"): r for r in rows}


def quality_listed(driver: Any) -> dict[str, dict[str, Any]]:
    """Every kind's rows once the pass has answered (the summary is filled last but one)."""
    from selenium.webdriver.common.by import By

    wait_for(driver, lambda drv: "outliers" in drv.find_element(By.ID, "quality-summary").text
             and drv.find_elements(By.CSS_SELECTOR, "#quality-outliers > *"))
    return {kind: quality_rows(driver, kind) for kind in ("label", "duplicate", "leak", "outlier")}


def test_quality_view_lists_each_finding_and_acts_on_the_bank(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    d, qbank = page["driver"], page["quality"]
    d.get_log("browser")  # drained: what the earlier tests logged
    d.get(page["url"] + "?bank=quality#quality")
    rows = quality_listed(d)
    summary = d.find_element(By.ID, "quality-summary").text
    assert "Estimated wrong labels: 1." in summary and "cat ↔ dog" in summary, summary
    label = rows["label"][Q_WRONG]
    assert "labelled dog, looks like cat" in label.text
    assert len(label.find_elements(By.CSS_SELECTOR, ".evidence .tile")) >= 5  # the neighbours
    assert set(rows["duplicate"]) == {f"cat/1-5 {Q_COPY}", f"fox/1-8 {Q_LEAK}"}
    assert "exact copies" in rows["duplicate"][f"cat/1-5 {Q_COPY}"].text
    assert list(rows["leak"]) == [Q_LEAK] and "fox/1-8 in train" in rows["leak"][Q_LEAK].text
    assert Q_ODD in rows["outlier"] and "score" in rows["outlier"][Q_ODD].text
    split = quality_rows(d, "split")
    assert list(split) == ["test"] and "test: 2 items, 1 unlike every train item" in split["test"].text
    uncovered = split["test"].find_elements(By.CSS_SELECTOR, ".member")
    assert [m.get_attribute("data-key") for m in uncovered] == [Q_NEW]
    loaded = d.execute_script(
        "return [...document.querySelectorAll('#view-quality img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )
    assert loaded >= 10  # the bank's thumbnails, not placeholders
    d.save_screenshot(str(page["shots"] / "quality.png"))
    d.execute_script("arguments[0].scrollIntoView()", rows["leak"][Q_LEAK])
    d.save_screenshot(str(page["shots"] / "quality-leaks.png"))

    def done(node: Any) -> str:
        wait_for(d, lambda drv: {"done", "gone"} & set(node.get_attribute("class").split()))
        text: str = node.find_element(By.CLASS_NAME, "outcome").text
        return text

    label.find_element(By.CLASS_NAME, "relabel").click()  # to the suggested label
    assert done(label) == f"{Q_WRONG} relabelled dog → cat"
    copy = rows["duplicate"][f"cat/1-5 {Q_COPY}"].find_element(
        By.CSS_SELECTOR, f".member[data-key='{Q_COPY}']")
    copy.find_element(By.CLASS_NAME, "delete").click()
    assert done(copy) == f"{Q_COPY} deleted"
    leak = rows["leak"][Q_LEAK]
    leak.find_element(By.CLASS_NAME, "drop").click()
    assert done(leak) == f"{Q_LEAK} moved from test to none"
    twin = rows["duplicate"][f"fox/1-8 {Q_LEAK}"].find_element(
        By.CSS_SELECTOR, f".member[data-key='{Q_LEAK}']")
    assert done(twin) == f"{Q_LEAK} moved from test to none"  # the same item in its group
    odd = rows["outlier"][Q_ODD]
    odd.find_element(By.CLASS_NAME, "keep").click()
    assert done(odd) == f"{Q_ODD} kept"
    uncovered[0].find_element(By.CLASS_NAME, "train").click()
    assert done(uncovered[0]) == f"{Q_NEW} moved from test to train"
    with store_mod.open(qbank, readonly=True) as st:
        assert st.get_by_keys([Q_WRONG]).labels == ["cat"]
        assert st.missing([Q_COPY]) == [Q_COPY]
        assert st.get_by_keys([Q_LEAK]).splits == ["none"]
        assert st.get_by_keys([Q_NEW]).splits == ["train"]
    with FeatureBankClient(page["server"].target, token=TOKEN).for_bank("quality") as c:
        r = c.quality()
    assert Q_WRONG not in {f.key for f in r.label_errors} and not r.leaks
    assert Q_ODD not in {o.key for o in r.outliers} and r.counts["kept"] >= 1
    assert [sorted(m.key for m in g.members) for g in r.duplicates] == [["fox/1-8", Q_LEAK]]

    d.find_element(By.CSS_SELECTOR, "#quality-form button").click()  # the next pass
    wait_for(d, lambda drv: "kept earlier" in drv.find_element(By.ID, "quality-summary").text)
    rows = quality_listed(d)
    assert Q_ODD not in rows["outlier"] and not rows["leak"] and not rows["label"]
    assert set(rows["duplicate"]) == {f"fox/1-8 {Q_LEAK}"}
    d.save_screenshot(str(page["shots"] / "quality-after.png"))
    errors = [e["message"] for e in d.get_log("browser")
              if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
    assert not errors, errors  # no script error, no failed request


def test_a_read_only_page_says_why_it_cannot_act(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    from featurebank.server.ui import make_ui_server

    d = page["driver"]
    with FeatureBankClient(page["server"].target, token=READ_TOKEN) as client:
        ui = make_ui_server(client, port=0)
        serving = threading.Thread(target=ui.serve_forever, daemon=True)
        serving.start()
        try:
            d.get(f"http://127.0.0.1:{ui.server_port}/?bank=quality#quality")
            rows = quality_listed(d)
            group = rows["duplicate"][f"fox/1-8 {Q_LEAK}"]
            group.find_element(By.CLASS_NAME, "keep").click()
            message = wait_for(d, lambda drv: drv.find_element(By.CSS_SELECTOR, "#message.error").text)
            assert "KeepFinding needs a write token; this token only grants read" in message
            assert "start featurebank ui with a write token" in message, message
            assert "done" not in group.get_attribute("class")
        finally:
            ui.shutdown()
            serving.join(10)
    with FeatureBankClient(page["server"].target, token=READ_TOKEN).for_bank("quality") as c:
        assert [sorted(m.key for m in g.members) for g in c.quality().duplicates] == [
            ["fox/1-8", Q_LEAK]
        ]
    d.get(page["url"] + "#search")

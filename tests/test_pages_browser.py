"""The pages in a real browser: Debian's headless Chromium driven by Selenium through the system chromedriver (nothing
downloaded), against a real `serve` with an API key and kept texts. It tags abstracts and sees subjects and evidence,
checks that an abstract holding HTML is shown as text and nothing in it runs, gets the API's one-line error for bad
input, reviews three queue items and finds their labels in the store, and shows the model page; a screenshot of each
page goes to docs/. Skipped without the browser, unless LIGHTNING_CLS_REQUIRE_BROWSER is set (.ci/run sets it)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from pages_helpers import fused_export
from serving_helpers import ServerProcess, free_port

from lightning_cls.data.sample_data import KEYWORDS
from lightning_cls.store.feedback_store import FeedbackStore

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
DOCS = Path(__file__).resolve().parent.parent / "docs"
KEY = "a-test-key-for-the-pages"
HOSTILE = 'Dark halo <script>window.__xss = 1</script><img src="x" onerror="window.__xss = 2"> &amp; galaxy redshift.'


def _browser_or_skip():
    if CHROMIUM and DRIVER:
        return
    message = "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("LIGHTNING_CLS_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(sample_dir, tmp_path_factory):
    _browser_or_skip()
    folder = fused_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("browser") / "model", train_steps=150)
    db = tmp_path_factory.mktemp("browser-db") / "feedback.sqlite3"
    port = free_port()
    args = ["-m", "lightning_cls", "serve", "--model_dir", str(folder), "--port", str(port), "--keep_texts", "true"]
    args += ["--feedback_db", str(db), "--num_threads", "1", "--log_level", "warning", "--min_feedback", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_CLS_API_KEY", KEY)
        process = ServerProcess(args, port, tmp_path_factory.mktemp("browser-log") / "server.log")
        with process:
            process.db = db
            yield process


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def all_of(driver, css: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def test_tag_review_and_model_pages_in_a_browser(server, browser):
    browser.get(server.url + "/")
    # Without the key the page gets the API's 401, in one line.
    by_id(browser, "texts").send_keys("A galaxy.")
    by_id(browser, "tag-button").click()
    wait_for(browser, lambda d: "API key" in by_id(d, "tag-error").text)
    by_id(browser, "api-key").send_keys(KEY)
    by_id(browser, "api-key").submit()
    wait_for(browser, lambda d: "key set" in by_id(d, "key-state").text)
    assert KEY not in browser.current_url

    abstracts = [
        "A new survey of " + KEYWORDS["astrophysics"] + ".",
        HOSTILE,
        "We prove a bound: " + KEYWORDS["mathematics"] + ".",
        "Qubits: " + KEYWORDS["quantum physics"] + ".",
    ]
    box = by_id(browser, "texts")
    box.clear()
    box.send_keys("\n\n".join(abstracts))
    by_id(browser, "network").click()  # the network's occlusion too
    by_id(browser, "tag-button").click()
    wait_for(browser, lambda d: len(all_of(d, ".card.answer")) == len(abstracts))
    cards = all_of(browser, ".card.answer")
    assert all(len(c.find_elements("css selector", ".subject")) == 3 for c in cards)
    # The expert's words on every card: the page asked for them (a Tag clicked before /pages/info came waits for it).
    assert all(c.find_elements("css selector", ".phrase.lexical") for c in cards), [c.text for c in cards]
    assert any(c.find_elements("css selector", ".phrase.network") for c in cards)  # the network's spans
    assert "version " in cards[0].text and "%" in cards[0].text
    # The hostile abstract is shown as written, and nothing of it ran.
    assert "<script>window.__xss = 1</script>" in cards[1].text and 'onerror="window.__xss = 2"' in cards[1].text
    assert not all_of(browser, "#answers script, #answers img")
    assert browser.execute_script("return window.__xss === undefined")
    browser.save_screenshot(str(DOCS / "pages_tag.png"))

    # Bad input: the API's own one-line message.
    by_id(browser, "texts").clear()
    by_id(browser, "tag-button").click()
    wait_for(browser, lambda d: by_id(d, "tag-error").text == '"texts" is empty: give at least one text.')

    # Review: three items answered with one key each, their labels stored as feedback.
    browser.get(server.url + "/review")
    deadline = time.monotonic() + 30
    while not all_of(browser, ".card.review") and time.monotonic() < deadline:  # the answers are stored just after
        time.sleep(0.5)
        browser.refresh()
    wait_for(browser, lambda d: all_of(d, ".card.review"))
    assert all_of(browser, ".card.review .phrase.lexical")  # its evidence
    browser.save_screenshot(str(DOCS / "pages_review.png"))
    from selenium.webdriver.common.action_chains import ActionChains

    seen = []
    for _ in range(3):
        item = all_of(browser, ".card.review")[0]
        seen.append(item.find_element("css selector", ".text").text)
        ActionChains(browser).send_keys("1").perform()  # the first (most probable) subject
        wait_for(browser, lambda d, old=item: _replaced(d, old))
    assert len(set(seen)) == 3  # three different items
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        store = FeedbackStore(server.db, setup=False)
        labelled = store.counts()["feedback"]
        store.close()
        if labelled >= 3:
            break
        time.sleep(0.3)
    assert labelled == 3

    browser.get(server.url + "/model")
    wait_for(browser, lambda d: len(all_of(d, "svg.plot")) == 6)
    assert "Champion" in by_id(browser, "model-roles").text
    assert not by_id(browser, "model-error").text
    browser.save_screenshot(str(DOCS / "pages_model.png"))


def _replaced(driver, old) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        old.is_displayed()
        return False
    except StaleElementReferenceException:
        return True

"""The web page in a real headless Chromium (Debian's, driven by Playwright) against real servers
on loopback: the tiny model for plumbing, the default model for one behaviour test.

Each test also checks that the browser console showed no errors. Without Chromium the tests fail
and say how to install it (`make browser`): a browser test that skips passes silently.
With ``UI_SCREENSHOTS=<folder>``, the default-model test saves a screenshot of each
panel there (docs/usage.md's come from ``UI_SCREENSHOTS=docs/ui``)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# closed network refuses (noise, and seconds at start-up).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the web page's tests need Debian's chromium "
            "(`make browser` installs it; CHROMIUM_PATH points elsewhere)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A page on ``url`` that records console errors and uncaught exceptions."""

    def __init__(self, browser, url: str, **context) -> None:
        self.ctx = browser.new_context(**context)
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)

    def close(self) -> None:
        self.ctx.close()


# The page's Content-Security-Policy forbids eval, which wait_for_function's string predicates
# run on: waits use selectors and Playwright's expect (its own isolated world) instead, with
# wait_for_function's 30 s.
WAIT_MS = 30_000


def _expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


def _engine(url: str) -> dict:
    return httpx.get(f"{url}/ready", timeout=10).json()["engine"]


def _classify(page, task: str, text: str, expect: int = 1) -> list[str]:
    """Classify ``text`` with ``task`` on the page; the labels shown (``expect`` results)."""
    page.wait_for_selector(f"#classify-task option[value='{task}']", state="attached")
    page.select_option("#classify-task", task)
    page.fill("#classify-input", text)
    page.click("#classify-form button[type=submit]")
    _expect(page.locator("#classify-results .result")).to_have_count(expect, timeout=WAIT_MS)
    return page.locator("#classify-results .label").all_text_contents()


def _tab(page, name: str) -> None:
    page.click(f"#tab-{name}")
    page.wait_for_selector(f"#panel-{name}:not([hidden])")


def test_the_page_and_its_assets_are_served_from_the_package(tiny_server):
    srv = tiny_server()
    for path in ("/", "/ui", "/ui/assets/app.js", "/ui/assets/vendor/uPlot.iife.min.js"):
        r = httpx.get(srv.url + path, timeout=10)
        assert r.status_code == 200, path
    page = httpx.get(srv.url + "/", timeout=10).text
    assert "https://" not in page and "http://" not in page  # nothing from the internet
    assert httpx.get(f"{srv.url}/ui/config").json()["auth_required"] is False


def test_classify_chat_stop_and_health_on_the_tiny_model(browser, tiny_server):
    srv = tiny_server(ALLINONE_MEMORY_SAMPLE_S="1", ALLINONE_DEFAULT_MAX_TOKENS="2000")
    ui = Page(browser, srv.url + "/", locale="en-US")
    page = ui.page
    try:
        # classify: a label from the task's set, one bar per label, a latency
        (label,) = _classify(page, "sentiment-en", "I love this phone, it works great.")
        assert label in {"positive", "negative"}
        assert page.locator("#classify-results .bar-row").count() == 2
        assert "ms" in page.text_content("#classify-meta")

        # many texts, one per line
        page.check("#classify-many")
        assert len(_classify(page, "sentiment-en", "great\nawful\nfine", expect=3)) == 3

        # chat with the model itself, streamed; Stop cancels it on the server
        _tab(page, "chat")
        page.select_option("#chat-task", "m")
        page.fill("#chat-input", "Write a very long story about a dragon, with ten chapters.")
        before = _engine(srv.url)["cancelled"]
        page.click("#chat-send")
        _expect(page.locator("#chat-log .assistant .text").first).not_to_be_empty(timeout=WAIT_MS)
        page.click("#chat-stop")
        page.wait_for_selector("#chat-meta[data-finish]")
        assert page.get_attribute("#chat-meta", "data-finish") == "stopped"
        for _ in range(100):
            engine = _engine(srv.url)
            if engine["active"] == 0:
                break
            time.sleep(0.1)
        assert engine["active"] == 0 and engine["cancelled"] == before + 1
        assert page.text_content("#chat-log .assistant .text")  # the partial reply stays

        # health: the memory chart draws points, refreshed from the server
        _tab(page, "health")
        _expect(page.locator("#chart-memory")).to_have_attribute(
            "data-points", re.compile(r"^([2-9]|[1-9][0-9]+)$"), timeout=20_000
        )
        assert page.locator("#chart-memory canvas").count() == 1
        assert "MB" in page.text_content("#health-now")
        assert page.text_content("#server-status") == "ready"

        # every tab's name is readable: its text colour is not its background's
        for tab in page.locator("[role=tab]").all():
            fg, bg = tab.evaluate(
                "t => [getComputedStyle(t).color, getComputedStyle(t).backgroundColor]"
            )
            assert fg != bg
        # keyboard: arrow keys move between tabs
        page.focus("#tab-health")
        page.keyboard.press("ArrowLeft")
        assert page.get_attribute("#tab-extract", "aria-selected") == "true"
        assert ui.errors == []
    finally:
        ui.close()


def test_the_page_asks_for_the_key_when_the_server_needs_one(browser, tiny_server):
    srv = tiny_server(ALLINONE_API_KEYS='["sekrit"]')
    assert httpx.get(f"{srv.url}/").status_code == 200  # the page itself is public
    ui = Page(browser, srv.url + "/ui", locale="zh-CN")
    page = ui.page
    try:
        page.wait_for_selector("#key-form:not([hidden])")
        assert page.text_content("#tab-classify") == "分类"  # the browser's language
        page.fill("#key-input", "wrong")
        page.click("#key-form button[type=submit]")
        _expect(page.locator("#key-error")).not_to_be_empty(timeout=WAIT_MS)
        page.fill("#key-input", "sekrit")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-form", state="hidden")
        (label,) = _classify(page, "sentiment", "服务很好")
        assert label in {"正面", "负面"}
        # the wrong key's 401 is the only console error (the browser logs refused requests)
        assert all("401" in e for e in ui.errors), ui.errors
    finally:
        ui.close()


def test_each_panel_on_the_default_model_on_a_phone_width_screen(browser, server):
    shots = os.environ.get("UI_SCREENSHOTS")
    ui = Page(browser, server.url + "/", locale="en-US", viewport={"width": 390, "height": 844})
    page = ui.page

    def shot(name: str) -> None:
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)

    try:
        page.wait_for_selector("#classify-many")
        page.check("#classify-many")
        text = "The staff were kind and the room was spotless.\nNever again."
        assert _classify(page, "sentiment-en", text, expect=2) == ["positive", "negative"]
        # nothing wider than the phone's screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot("classify")

        _tab(page, "decide")
        page.click("#decide-form button[type=submit]")
        _expect(page.locator("#decide-results .result")).to_have_count(2, timeout=WAIT_MS)
        # "The parcel came two weeks late and the box was crushed." is about delivery
        assert page.locator("#decide-results .label").nth(1).text_content() == "delivery"
        shot("decide")

        _tab(page, "chat")
        page.select_option("#chat-task", "chat")
        page.fill("#chat-input", "What is the capital of France?")
        page.click("#chat-send")
        page.wait_for_selector("#chat-meta[data-finish]:not([data-finish=''])")
        assert "Paris" in page.text_content("#chat-log .assistant .text")
        shot("chat")

        _tab(page, "extract")
        page.fill(
            "#extract-input",
            "Customer: my order 1182 arrived broken. Agent: sorry, a replacement ships today.",
        )
        page.click("#extract-form button[type=submit]")
        _expect(page.locator("#extract-output")).to_have_text(
            re.compile(r".{3,}", re.DOTALL), timeout=WAIT_MS
        )
        shot("extract")

        _tab(page, "health")
        page.wait_for_selector("#chart-memory canvas")
        shot("health")
        assert ui.errors == []
    finally:
        ui.close()

"""The page in headless Chromium: streaming, Stop, errors, the queue, the model panel, the phone.

Screenshots go to test-output/ (desktop 1400 px and phone 390 px wide).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from model import loader as loader_module
from model.errors import GenerationFailed
from model.settings import SamplingSettings
from tests.fake_engine import FakeEngine
from tests.serving import serve
from tests.test_app import resolved
from web.config import AppConfig

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output"
WAIT_MS = 15_000
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}
CODE_REPLY = [
    "Here is a function:\n\n",
    "```python\n",
    "def greet(name: str) -> str:\n",
    '    return f"Hello, {name}!"\n',
    "```\n\n",
    "Call it as `greet('world')`.",
]

if not CHROMIUM.exists():
    pytest.skip(
        "Debian's Chromium is not installed (apt-get install -y chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def opened(browser, url: str, viewport: dict = DESKTOP) -> Iterator:
    """A fresh tab on the app, once its page has drawn."""
    page = browser.new_page(viewport=viewport)
    page.goto(url)
    page.locator("#message textarea").wait_for(timeout=WAIT_MS)
    try:
        yield page
    finally:
        page.close()


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(CODE_REPLY, chunk_delay_s=0.05)


@pytest.fixture(scope="module")
def url(engine: FakeEngine) -> Iterator[str]:
    with serve(engine) as (address, _):
        yield address


@pytest.fixture
def page(browser, url: str):
    with opened(browser, url) as tab:
        yield tab


def send(page, text: str) -> None:
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")


def edit_buttons(page) -> list:
    return [page.locator(f"#{name}") for name in ("send", "retry", "undo", "clear")]


# ---- streaming and Stop -------------------------------------------------------------------------


def test_a_streamed_reply_renders_as_markdown_with_highlighted_code(page, engine):
    engine.chunks, engine.chunk_delay_s = CODE_REPLY, 0.05
    send(page, "Write a Python function that greets someone.")
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text("Call it as", timeout=WAIT_MS)
    expect(chat.locator("pre code").first).to_contain_text("def greet", timeout=WAIT_MS)
    expect(page.locator("#reply-stats")).to_contain_text("tok/s", timeout=WAIT_MS)
    expect(page.locator("#reply-stats")).to_contain_text("· finished")
    expect(page.locator("#context-meter")).to_contain_text("of 4,096 tokens")
    expect(page.locator("#message textarea")).to_have_value("")
    assert engine.calls[-1].settings == SamplingSettings()  # untouched sliders, blank seed
    page.get_by_text("Prompt options").click()
    page.locator("#show-prompt input").check()
    prompt_view = page.locator("#prompt-view")
    tokens = engine.count_tokens(engine.calls[-1].segments)
    sent = "".join(segment.text for segment in engine.calls[-1].segments)
    expect(prompt_view.locator("textarea")).to_have_value(sent, timeout=WAIT_MS)
    expect(prompt_view).to_contain_text(f"Prompt sent to the model: {tokens:,} tokens")
    shot(page, "chat")


def test_stop_during_a_slow_stream_closes_the_engine_job(page, engine):
    engine.chunks, engine.chunk_delay_s = ["word "] * 400, 0.05
    engine.calls.clear()
    send(page, "Say 'word' four hundred times.")
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text("word word word", timeout=WAIT_MS)
    (call,) = engine.calls
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#stop")).to_be_enabled()
    send(page, "A second question while the first streams")
    expect(page.get_by_text("still being written").first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#message textarea")).to_have_value(
        "A second question while the first streams"
    )
    assert len(engine.calls) == 1  # no second job in this chat
    page.locator("#stop").click()
    assert call.closed_event.wait(WAIT_MS / 1000), "Stop did not close the engine's iterator"
    assert call.chunks_sent < len(engine.chunks)
    expect(page.locator("#reply-stats")).to_contain_text("Stopped", timeout=WAIT_MS)
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    expect(page.locator("#stop")).to_be_disabled()
    shot(page, "stopped")


def test_escape_stops_a_streaming_reply(page, engine):
    engine.chunks, engine.chunk_delay_s = ["word "] * 400, 0.05
    engine.calls.clear()
    send(page, "Say 'word' four hundred times.")
    expect(page.locator("#chatbot")).to_contain_text("word word", timeout=WAIT_MS)
    (call,) = engine.calls
    page.keyboard.press("Escape")
    assert call.closed_event.wait(WAIT_MS / 1000), "Escape did not stop the reply"
    expect(page.locator("#reply-stats")).to_contain_text("Stopped", timeout=WAIT_MS)
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)


def test_stop_is_inactive_while_nothing_streams(page, engine):
    expect(page.locator("#stop")).to_be_disabled()
    engine.chunks, engine.chunk_delay_s = ["Done."], 0.0
    send(page, "Quick one")
    stats = page.locator("#reply-stats")
    expect(stats).to_contain_text("tok/s", timeout=WAIT_MS)
    expect(page.locator("#stop")).to_be_disabled(timeout=WAIT_MS)
    expect(page.locator("#send")).to_be_enabled()


def test_an_example_in_the_empty_chat_sends_itself(page, engine):
    engine.chunks, engine.chunk_delay_s = ["Sure."], 0.0
    engine.calls.clear()
    example = page.get_by_text("palindrome").first
    expect(example).to_be_visible(timeout=WAIT_MS)
    example.click()
    expect(page.locator("#chatbot")).to_contain_text("Sure.", timeout=WAIT_MS)
    sent = "".join(segment.text for segment in engine.calls[-1].segments)
    assert "checks whether a string is a palindrome" in sent


# ---- errors leave the chat usable ---------------------------------------------------------------


def test_without_a_gpu_send_says_why_and_the_chat_stays_usable(browser):
    with serve(FakeEngine(gpu=None, loaded=False)) as (address, _):
        for viewport, name in ((DESKTOP, "no-gpu-reply"), (PHONE, "no-gpu-reply-phone")):
            with opened(browser, address, viewport) as page:
                send(page, "Write a function.")
                stats = page.locator("#reply-stats")
                expect(stats).to_contain_text("A CUDA GPU is required", timeout=WAIT_MS)
                for button in edit_buttons(page):
                    expect(button).to_be_enabled(timeout=WAIT_MS)
                expect(page.locator("#stop")).to_be_disabled()
                shot(page, name)
                send(page, "Another try.")  # Send works again: the same answer, not a lock
                expect(page.locator("#chatbot")).to_contain_text("Another try.", timeout=WAIT_MS)
                expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)


def test_a_reply_failing_midway_shows_its_message_and_unlocks_the_chat(browser):
    engine = FakeEngine(["Partial ", "answer ", "cut"], chunk_delay_s=0.05)
    with serve(engine) as (address, _):
        for viewport, name in ((DESKTOP, "failed-reply"), (PHONE, "failed-reply-phone")):
            engine.fail_next(
                GenerationFailed("Generation failed (out of GPU memory)."), after_chunks=2
            )
            with opened(browser, address, viewport) as page:
                send(page, "Explain recursion.")
                expect(page.locator("#chatbot")).to_contain_text("Partial answer", timeout=WAIT_MS)
                stats = page.locator("#reply-stats")
                expect(stats).to_contain_text("out of GPU memory", timeout=WAIT_MS)
                for button in edit_buttons(page):
                    expect(button).to_be_enabled(timeout=WAIT_MS)
                shot(page, name)
                page.locator("#retry").click()  # Retry asks again, and this time it is answered
                expect(stats).to_contain_text("tok/s", timeout=WAIT_MS)
                expect(page.locator("#chatbot")).to_contain_text("answer cut")


# ---- waiting for the GPU ------------------------------------------------------------------------


def test_a_second_tab_sees_that_its_reply_waits_and_how_many_are_ahead(browser):
    gate = threading.Event()  # the first reply holds the only place until released
    engine = FakeEngine(["First ", "reply."], max_concurrency=1, gate=gate)
    with serve(engine) as (address, _):
        with opened(browser, address) as first, opened(browser, address) as second:
            send(first, "Take the GPU.")
            expect(first.locator("#chatbot")).to_contain_text("First", timeout=WAIT_MS)
            with opened(browser, address, PHONE) as phone:
                send(second, "Then me.")
                stats = second.locator("#reply-stats")
                expect(stats).to_contain_text("Waiting for the GPU: yours is next", timeout=WAIT_MS)
                box = stats.bounding_box()
                assert box is not None and box["height"] > 10  # visible, not a zero-height line
                shot(second, "waiting")
                send(phone, "And me.")
                phone_stats = phone.locator("#reply-stats")
                expect(phone_stats).to_contain_text("1 reply is ahead of yours", timeout=WAIT_MS)
                shot(phone, "waiting-phone")
                gate.set()
                expect(stats).to_contain_text("tok/s", timeout=WAIT_MS)
                expect(phone_stats).to_contain_text("tok/s", timeout=WAIT_MS)
                expect(second.locator("#chatbot")).to_contain_text("First reply.")


# ---- the model panel ----------------------------------------------------------------------------


def test_a_load_shows_one_progress_line_and_a_failed_load_one_error(browser, monkeypatch):
    engine = FakeEngine(loaded=False)
    engine.load_gate = threading.Event()
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved(branch="6_5"))
    with serve(engine) as (address, _):
        with opened(browser, address) as page, opened(browser, address, PHONE) as phone:
            page.locator("#load").click()
            model_line = page.locator("#model-line")
            expect(model_line).to_contain_text("Loading someone/model-exl2 @ 6_5", timeout=WAIT_MS)
            # One display: no progress overlay on the GPU line, the branch box or the model line.
            expect(page.locator(".progress-text, .eta-bar")).to_have_count(0)
            shot(page, "loading")
            phone.locator("#model-line").scroll_into_view_if_needed()
            expect(phone.locator("#model-line")).to_contain_text("Loading", timeout=WAIT_MS)
            shot(phone, "loading-phone")
            engine.load_gate.set()
            expect(model_line).to_contain_text("ready · someone/model-exl2 @ 6_5", timeout=WAIT_MS)

            engine.load_gate = None
            engine.load_error = GenerationFailed("The weights do not fit in 9.0 GB; use q4.")
            page.locator("#load").click()
            expect(model_line).to_contain_text("load failed", timeout=WAIT_MS)
            expect(page.get_by_text("do not fit in 9.0 GB")).to_have_count(1)
            expect(page.locator(".toast-body")).to_have_count(0)  # no toast, no second copy
            expect(page.locator("#branch").get_by_text("Error")).to_have_count(0)
            shot(page, "load-failed")


def test_a_new_tab_shows_the_loaded_model_and_that_settings_apply_on_load(browser, monkeypatch):
    engine = FakeEngine(loaded=False)
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved(branch="6_5"))
    with serve(engine, AppConfig(rate_limit=0)) as (address, web):
        web.loader.load("6_5", 16384, "q4")
        with opened(browser, address) as page:
            expect(page.locator("#model-line")).to_contain_text("16,384-token context · q4 cache")
            expect(page.locator("#context input[type=number]")).to_have_value("16384")
            expect(page.locator("#cache-mode input[value=q4]")).to_be_checked()
            expect(page.locator("#branch input")).to_have_value(
                "6_5 · 6.5 bits · ~14.0 GB · fits", timeout=WAIT_MS
            )
            expect(page.locator("#load-note")).to_contain_text("take effect when you press Load")


# ---- the phone ----------------------------------------------------------------------------------


def test_on_a_phone_the_input_has_the_width_and_code_scrolls_inside_the_chat(browser, engine):
    engine.chunks, engine.chunk_delay_s = ["```python\nx = '" + "long " * 60 + "'\n```"], 0.0
    with serve(engine) as (address, _), opened(browser, address, PHONE) as page:
        box = page.locator("#message textarea").bounding_box()
        send_box = page.locator("#send").bounding_box()
        chat_box = page.locator("#chatbot").bounding_box()
        # Not squeezed beside Send and Stop: the input is as wide as the chat above it.
        assert box["width"] > 0.9 * chat_box["width"], (box, chat_box)
        assert send_box["y"] > box["y"]  # the buttons sit below the input
        send(page, "A long line of code.")
        code = page.locator("#chatbot pre").first
        expect(code).to_contain_text("long long", timeout=WAIT_MS)
        scroll, client = code.evaluate("node => [node.scrollWidth, node.clientWidth]")
        assert scroll > client  # the line scrolls inside its block
        page_width = page.evaluate("document.documentElement.scrollWidth")
        assert page_width <= PHONE["width"] + 1  # and the page itself does not
        shot(page, "phone")


# ---- nothing from other origins -----------------------------------------------------------------


class Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Counter.hits.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_reply_cannot_make_the_browser_fetch_another_origin(browser):
    outside = ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    threading.Thread(target=outside.serve_forever, daemon=True).start()
    elsewhere = f"http://127.0.0.1:{outside.server_port}"  # another port: another origin
    reply = [
        f"![chart]({elsewhere}/md.png?chat=secret)\n\n",
        f'<img src="{elsewhere}/img.png?chat=secret">\n\n',
        f"<div style=\"background:url('{elsewhere}/css.png?chat=secret')\">x</div>\n\n",
        f'<link rel="stylesheet" href="{elsewhere}/sheet.css">\n\nDone.',
    ]
    engine = FakeEngine(reply)
    answered = []  # responses the page got (a request the policy blocks gets none)
    try:
        with serve(engine) as (address, _), opened(browser, address) as page:
            page.on("response", lambda response: answered.append(response.url))
            send(page, "Show me a chart.")
            expect(page.locator("#chatbot")).to_contain_text("Done.", timeout=WAIT_MS)
            page.wait_for_timeout(1000)  # time for any image or style fetch to be tried
            origin = urlsplit(address).netloc
    finally:
        outside.shutdown()
    assert Counter.hits == []
    assert [url for url in answered if urlsplit(url).netloc not in (origin, "")] == []

"""The page in headless Chromium: streaming, Stop, errors, the queue, the model panel, the phone.

Screenshots go to test-output/ (desktop 1400 px, laptop 1280×800 and phone 390×844).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from engine import gpu_check
from engine import loading as loader_module
from engine.gpu_check import no_gpu_here
from starcoder2.errors import GenerationFailed
from starcoder2.settings import SamplingSettings
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import serve
from tests.web.test_app import resolved
from web.chat import FAILED_MARK, NO_GPU_SHORT
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
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output"
WAIT_MS = 15_000
DESKTOP = {"width": 1400, "height": 1000}
LAPTOP = {"width": 1280, "height": 800}
SHORT = {"width": 1280, "height": 600}
PHONE = {"width": 390, "height": 844}
SCREENS = {"laptop": LAPTOP, "phone": PHONE}
BUBBLES = "#chatbot [data-testid=user], #chatbot [data-testid=bot]"  # one per message
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


def shot(page, name: str, *, whole: bool = True) -> None:
    """The whole page, or (whole=False) what the screen shows."""
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=whole)


def on_screen(page, selector: str) -> bool:
    """The element lies wholly inside the window as it is scrolled now."""
    box = page.locator(selector).last.bounding_box()
    height, width = page.viewport_size["height"], page.viewport_size["width"]
    return (
        box is not None
        and box["y"] >= 0
        and box["y"] + box["height"] <= height + 0.5
        and (box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5)
    )


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


def test_escape_closing_a_dropdown_leaves_the_reply_streaming(page, engine):
    engine.chunks, engine.chunk_delay_s = ["word "] * 400, 0.05
    engine.calls.clear()
    send(page, "Say 'word' four hundred times.")
    expect(page.locator("#chatbot")).to_contain_text("word word", timeout=WAIT_MS)
    (call,) = engine.calls
    page.locator("#branch input").click()  # the branch list opens
    page.keyboard.press("Escape")  # ... and closes: that Escape was not for the reply
    page.wait_for_timeout(300)
    assert not call.closed_event.is_set()
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#message textarea").click()
    page.keyboard.press("Escape")
    assert call.closed_event.wait(WAIT_MS / 1000), "Escape did not stop the reply"


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
                failure = page.locator(BUBBLES).last
                expect(failure).to_contain_text(NO_GPU_SHORT, timeout=WAIT_MS)
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
                failure = page.locator(BUBBLES).last
                expect(failure).to_contain_text("out of GPU memory", timeout=WAIT_MS)
                stats = page.locator("#reply-stats")
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
        web.loader.load("6_5", 32768, "q4")
        with opened(browser, address) as page:
            expect(page.locator("#model-line")).to_contain_text("32,768-token context · q4 cache")
            expect(page.locator("#context input[type=number]")).to_have_value("32768")
            expect(page.locator("#cache-mode input[value=q4]")).to_be_checked()
            expect(page.locator("#branch input")).to_have_value(
                "6_5 · 6.5 bits · ~14.4 GB · fits", timeout=WAIT_MS
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


# ---- the first minutes: the screen, the errors, the font, the message box -----------------------


@pytest.mark.parametrize("screen", SCREENS)
def test_the_message_box_is_on_screen_without_scrolling_at_every_step(browser, screen):
    engine = FakeEngine(["word "] * 200, chunk_delay_s=0.03)
    with serve(engine) as (address, _), opened(browser, address, SCREENS[screen]) as page:
        assert page.evaluate("window.scrollY") == 0
        assert on_screen(page, "#message textarea")
        shot(page, f"first-empty-{screen}", whole=False)

        page.get_by_text("palindrome").first.click()  # an example: it must not push the box away
        expect(page.locator("#chatbot")).to_contain_text("word word word", timeout=WAIT_MS)
        assert on_screen(page, "#message textarea") and on_screen(page, BUBBLES)
        shot(page, f"first-streaming-{screen}", whole=False)
        page.locator("#stop").click()
        expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)

        engine.chunks, engine.chunk_delay_s = ["Half an ", "answer"], 0.0
        engine.fail_next(GenerationFailed("Generation failed (out of GPU memory)."), after_chunks=1)
        send(page, "Explain recursion.")
        failure = page.locator(BUBBLES).last
        expect(failure).to_contain_text("out of GPU memory", timeout=WAIT_MS)
        assert on_screen(page, "#message textarea") and on_screen(page, BUBBLES)
        shot(page, f"first-failed-{screen}", whole=False)

        page.locator("#load").scroll_into_view_if_needed()  # the model panel (below, on a phone)
        assert on_screen(page, "#load") and on_screen(page, "#message textarea")
        shot(page, f"first-model-panel-{screen}", whole=False)


def test_on_a_short_screen_the_chat_stays_in_view_while_the_settings_scroll(browser):
    with serve(FakeEngine()) as (address, _), opened(browser, address, SHORT) as page:
        page.get_by_text("Sampling").click()
        page.get_by_text("Prompt options").click()
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_timeout(300)
        assert page.evaluate("window.scrollY") > 300  # the settings made the page long
        assert on_screen(page, "#message textarea") and on_screen(page, "#send")
        shot(page, "first-short-screen-scrolled", whole=False)


@pytest.mark.parametrize("screen", SCREENS)
def test_a_new_message_comes_into_view_when_sent_from_further_down(browser, screen):
    engine = FakeEngine(["An answer."])
    with serve(engine) as (address, _), opened(browser, address, SCREENS[screen]) as page:
        page.get_by_text("Sampling").click()  # a longer page, scrolled to its end
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        send(page, "Are you there?")
        expect(page.locator("#chatbot")).to_contain_text("An answer.", timeout=WAIT_MS)
        expect(page.locator(BUBBLES).last).to_be_in_viewport(ratio=1)
        assert on_screen(page, "#message textarea")


@pytest.mark.parametrize("screen", SCREENS)
def test_a_failed_reply_says_why_in_the_answers_place_without_repeating_the_banner(browser, screen):
    engine = FakeEngine(gpu=None, loaded=False)
    with serve(engine) as (address, _), opened(browser, address, SCREENS[screen]) as page:
        banner = page.locator("#no-gpu")
        expect(banner).to_have_text(no_gpu_here())
        send(page, "Write a function.")
        bubbles = page.locator(BUBBLES)
        expect(bubbles).to_have_count(2, timeout=WAIT_MS)  # the question, and why no answer
        expect(bubbles.last).to_have_text(f"{FAILED_MARK} {NO_GPU_SHORT}".replace("**", ""))
        expect(page.locator("#reply-stats")).to_have_text("")
        body = page.locator("body").inner_text()
        assert body.count(no_gpu_here()) == 1  # the banner only
        send(page, "Another try.")  # the unanswered question and its failure are replaced
        expect(page.locator("#chatbot")).to_contain_text("Another try.", timeout=WAIT_MS)
        expect(bubbles).to_have_count(2, timeout=WAIT_MS)
        expect(page.locator("#chatbot")).not_to_contain_text("Write a function.")


def test_the_model_never_sees_a_failure_and_retry_asks_the_question_again(page, engine):
    engine.chunks, engine.chunk_delay_s = ["Fine ", "now."], 0.0
    engine.calls.clear()
    engine.fail_next(GenerationFailed("Generation failed (out of GPU memory)."), after_chunks=0)
    send(page, "First question")
    expect(page.locator(BUBBLES).last).to_contain_text("out of GPU memory")
    page.locator("#retry").click()
    expect(page.locator(BUBBLES).last).to_have_text("Fine now.", timeout=WAIT_MS)
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    send(page, "Second question")
    expect(page.locator(BUBBLES)).to_have_count(4, timeout=WAIT_MS)
    expect(page.locator(BUBBLES).last).to_have_text("Fine now.", timeout=WAIT_MS)
    prompts = ["".join(segment.text for segment in call.segments) for call in engine.calls]
    sent = prompts[-1]
    assert "First question" in sent and "Fine now." in sent and "Not answered" not in sent


def test_a_blank_message_leaves_the_chat_ready_and_the_next_one_is_answered(page, engine):
    engine.chunks, engine.chunk_delay_s = ["Here."], 0.0
    engine.calls.clear()
    send(page, "   ")
    page.wait_for_timeout(300)  # what a blank send would set off has had time to run
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    assert engine.calls == []
    send(page, "A real question")
    expect(page.locator(BUBBLES).last).to_have_text("Here.", timeout=WAIT_MS)
    send(page, "At once another")  # sent the moment the reply ends: not ignored
    expect(page.locator(BUBBLES)).to_have_count(4, timeout=WAIT_MS)


@pytest.mark.parametrize("screen", SCREENS)
def test_the_busy_state_ends_in_the_same_update_as_a_failed_reply(browser, screen):
    with serve(FakeEngine(gpu=None, loaded=False)) as (address, _):
        with opened(browser, address, SCREENS[screen]) as page:
            # At the first change that shows the failure, is Stop already off and Send on?
            page.evaluate(
                """() => {
                  window.seen = [];
                  const chat = document.querySelector("#chatbot");
                  let last = "";
                  new MutationObserver(() => {
                    const shown = chat.textContent;
                    if (!shown.includes("Not answered") || shown === last) return;
                    last = shown;  // a new failure on screen: how do the buttons stand?
                    window.seen.push([document.querySelector("#stop").disabled,
                                      document.querySelector("#send").disabled]);
                  }).observe(chat, { childList: true, subtree: true, characterData: true });
                }"""
            )
            bubbles = page.locator(BUBBLES)
            for attempt in range(5):
                send(page, f"Attempt {attempt}")
                expect(bubbles.nth(-2)).to_have_text(f"Attempt {attempt}", timeout=WAIT_MS)
                # This attempt's failure, not the last one's (Send is on until the lock lands).
                expect(bubbles.last).to_contain_text("Not answered", timeout=WAIT_MS)
                expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
            seen = page.evaluate("window.seen")
    assert len(seen) >= 5 and all(
        seen_stop_off and not send_off for seen_stop_off, send_off in seen
    )


def test_bold_headings_draw_every_letter_from_one_font_served_by_the_app(browser):
    fonts: list[str] = []
    with serve(FakeEngine(gpu=None, loaded=False)) as (address, _):
        with opened(browser, address, LAPTOP) as page:
            page.on("request", lambda request: fonts.append(request.url))
            page.reload()
            page.locator("#message textarea").wait_for(timeout=WAIT_MS)
            page.evaluate("document.fonts.ready")
            cdp = page.context.new_cdp_session(page)
            cdp.send("DOM.enable")
            cdp.send("CSS.enable")
            root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
            used = {}
            for selector in ("#title h1", "#no-gpu .banner"):
                node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})
                platform = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node["nodeId"]})
                used[selector] = {font["familyName"] for font in platform["fonts"]}
            origin = urlsplit(address).netloc
    # The files are Source Sans 3, the font's current name; one family for every letter.
    assert used == {"#title h1": {"Source Sans 3"}, "#no-gpu .banner": {"Source Sans 3"}}, used
    font_files = [url for url in fonts if url.endswith((".woff2", ".woff", ".ttf"))]
    assert font_files and all(urlsplit(url).netloc == origin for url in font_files)
    assert not any("SemiBold" in url for url in font_files)  # the 5 KB subset


@pytest.mark.parametrize("screen", SCREENS)
def test_the_message_box_is_named_focused_and_tells_how_to_stop(browser, screen):
    with serve(FakeEngine()) as (address, _), opened(browser, address, SCREENS[screen]) as page:
        box = page.get_by_role("textbox", name="Message to the model")
        expect(box).to_be_focused(timeout=WAIT_MS)
        assert "Escape stops a reply" in box.get_attribute("placeholder")
        assert page.evaluate("window.scrollY") == 0  # focusing did not scroll the page


@pytest.mark.parametrize("screen", SCREENS)
def test_load_says_why_it_is_off_without_a_gpu(browser, screen):
    with serve(FakeEngine(gpu=None, loaded=False)) as (address, _):
        with opened(browser, address, SCREENS[screen]) as page:
            expect(page.locator("#load")).to_be_disabled()
            note = page.locator("#load-note")
            expect(note).to_contain_text("Load is off: there is no GPU here")
            expect(note).not_to_contain_text("take effect when you press")


def test_on_a_space_the_banner_names_the_spaces_settings_tab_not_the_pages(browser, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/starcoder2")
    gpu_check.no_gpu_here.cache_clear()
    try:
        with serve(FakeEngine(gpu=None, loaded=False)) as (address, _):
            with opened(browser, address, PHONE) as page:
                banner = page.locator("#no-gpu")
                expect(banner).to_contain_text("on the Space's page, open the Settings tab")
                expect(banner).to_contain_text("under Space hardware")
                shot(page, "first-space-banner-phone", whole=False)
    finally:
        monkeypatch.delenv("SPACE_ID")
        gpu_check.no_gpu_here.cache_clear()

"""The app in headless Chromium: a streamed reply renders, and Stop cancels the engine's job."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import app
from model.settings import SamplingSettings
from tests.fake_engine import FakeEngine

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(CODE_REPLY, chunk_delay_s=0.05)


@pytest.fixture(scope="module")
def url(engine: FakeEngine) -> Iterator[str]:
    demo = app.build_demo(engine)
    _, address, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True
    )
    yield address
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.locator("#message textarea").wait_for(timeout=WAIT_MS)
    yield page
    page.close()


def send(page, text: str) -> None:
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")


def test_a_streamed_reply_renders_as_markdown_with_highlighted_code(page, engine):
    engine.chunks, engine.chunk_delay_s = CODE_REPLY, 0.05
    send(page, "Write a Python function that greets someone.")
    chat = page.locator("#chatbot")
    expect = sync_api.expect
    expect(chat).to_contain_text("Call it as", timeout=WAIT_MS)
    expect(chat.locator("pre code").first).to_contain_text("def greet", timeout=WAIT_MS)
    expect(page.locator("#reply-stats")).to_contain_text("tok/s", timeout=WAIT_MS)
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
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat.png"), full_page=True)


def test_stop_during_a_slow_stream_closes_the_engine_job(page, engine):
    engine.chunks, engine.chunk_delay_s = ["word "] * 400, 0.05
    engine.calls.clear()
    send(page, "Say 'word' four hundred times.")
    chat = page.locator("#chatbot")
    sync_api.expect(chat).to_contain_text("word word word", timeout=WAIT_MS)
    (call,) = engine.calls
    expect = sync_api.expect
    expect(page.locator("#send")).to_be_disabled()
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
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "stopped.png"), full_page=True)


def test_stop_with_nothing_running_changes_nothing(page, engine):
    engine.chunks, engine.chunk_delay_s = ["Done."], 0.0
    send(page, "Quick one")
    stats = page.locator("#reply-stats")
    sync_api.expect(stats).to_contain_text("tok/s", timeout=WAIT_MS)
    before = stats.inner_text()
    page.locator("#stop").click()
    page.wait_for_timeout(500)  # give a wrong "Stopped" time to appear
    assert stats.inner_text() == before
    sync_api.expect(page.locator("#send")).to_be_enabled()

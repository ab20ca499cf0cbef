"""The Gradio app on a scripted engine: streaming, Stop, history edits, settings, errors and API."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from engine import loading as loader_module
from engine.api import Finished
from engine.gpu_check import no_gpu_here
from engine.hub import DownloadProgress, ModelSource
from engine.loading import ModelLoader
from starcoder2.branches import BRANCHES, pick_branch
from starcoder2.errors import ContextTooLong, GenerationFailed, InvalidSetting
from starcoder2.prompt import build_prompt
from starcoder2.settings import FIELDS, SamplingSettings
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import free_port, serve
from web import chat as chat_module
from web.chat import FAILED_MARK, NO_GPU_SHORT, is_failure
from web.config import AppConfig, parse_config
from web.errors import GENERIC_ERROR
from web.panel import branch_choices
from web.server import WebApp, build_app

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 15  # upper bound for anything that should happen "soon"; tests never sleep to sync
DEFAULT_VALUES = [spec.default for spec in FIELDS]


def run_chat(web: WebApp, history, *, system="", prefix="", values=None, seed=None):
    """Drive the chat handler to the end; each update is (chat, stats, meter, prompt)."""
    respond = web.fn("respond")
    return list(respond(history, system, prefix, *(values or DEFAULT_VALUES), seed))


def refusal(updates: list) -> str:
    """The failure bubble's text of a reply that was not answered ('' if it was)."""
    chat = updates[-1][0] if updates else []
    last = chat[-1] if chat else None
    return last["content"] if is_failure(last) else ""


def resolved(folder: str = "/models/sc2", branch: str | None = "4_25"):
    """A stand-in for download.resolve_model_dir that finds `folder` at once."""
    label = f"someone/model-exl2 @ {branch}" if branch else folder
    return lambda **kwargs: ModelSource(Path(folder), branch, label)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---- /generate over HTTP ------------------------------------------------------------------------


def test_generate_streams_the_whole_text_so_far_in_order():
    engine = FakeEngine(["def ", "add(a, b):", "\n    return a + b"])
    with serve(engine) as (url, _):
        job = Client(url, verbose=False).submit("Write add.", api_name="/generate")
        outputs = list(job)
    assert outputs == ["def ", "def add(a, b):", "def add(a, b):\n    return a + b"]


def test_generate_wraps_the_prompt_as_one_user_instruction():
    engine = FakeEngine()
    with serve(engine) as (url, _):
        Client(url, verbose=False).predict("Explain recursion.", api_name="/generate")
    (call,) = engine.calls
    assert "".join(s.text for s in call.segments) == build_prompt([user("Explain recursion.")])


def test_generate_passes_validated_settings_in_the_documented_order():
    engine = FakeEngine()
    with serve(engine) as (url, _):
        Client(url, verbose=False).predict(
            "Hi", 0.7, 0.9, 40, 0.05, 1.1, 64.0, 7, api_name="/generate"
        )
    assert engine.calls[0].settings == SamplingSettings(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        max_new_tokens=64,
        seed=7,
    )


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("temperature", 5.0, "temperature must be between 0 and 2"),
        ("max_new_tokens", 12.5, "max_new_tokens must be a whole number"),
        ("top_k", -1, "top_k must be between 0 and 200"),
    ],
)
def test_generate_rejects_bad_settings_before_the_engine_sees_them(setting, value, message):
    engine = FakeEngine()
    with serve(engine) as (url, _), pytest.raises(AppError, match=message):
        Client(url, verbose=False).predict("Hi", **{setting: value}, api_name="/generate")
    assert engine.calls == []


def test_cancelling_a_generate_job_closes_the_engine_stream():
    engine = FakeEngine(["tok "] * 400, chunk_delay_s=0.02)
    with serve(engine) as (url, _):
        job = Client(url, verbose=False).submit("Count forever.", api_name="/generate")
        assert next(iter(job)) == "tok "  # the client knows the job's id once output arrives
        call = engine.calls[0]
        job.cancel()
        assert call.closed_event.wait(WAIT_S), "the engine's iterator was never closed"
    assert call.chunks_sent < len(engine.chunks)


def test_one_clients_cancel_leaves_another_clients_stream_running():
    engine = FakeEngine(["x"] * 200, chunk_delay_s=0.02)
    with serve(engine) as (url, _):
        keeper = Client(url, verbose=False).submit("Keep going.", api_name="/generate")
        quitter = Client(url, verbose=False).submit("Stop soon.", api_name="/generate")
        assert next(iter(quitter)) == "x" and next(iter(keeper)) == "x"  # both are running
        calls = {"".join(s.text for s in c.segments): c for c in engine.calls}
        cancelled = next(c for prompt, c in calls.items() if "Stop soon." in prompt)
        kept = next(c for prompt, c in calls.items() if "Keep going." in prompt)
        quitter.cancel()
        assert cancelled.closed_event.wait(WAIT_S)
        assert keeper.result(timeout=WAIT_S) == "x" * 200
    assert not kept.closed and cancelled.chunks_sent < 200


def test_loading_a_model_raises_the_job_limit_of_a_running_queue(monkeypatch):
    gate = threading.Event()  # holds every job after its first chunk
    engine = FakeEngine(["a", "b"], loaded=False, max_concurrency=2, gate=gate)
    loader = ModelLoader(engine, repo="someone/model-exl2")
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved())
    with serve(engine, loader=loader) as (url, _), ThreadPoolExecutor(2) as pool:
        with pytest.raises(AppError, match="not ready"):
            Client(url, verbose=False).predict("Hi", api_name="/generate")  # queue runs, limit 1
        loader.load("auto", 4096, "fp16")
        jobs = [Client(url, verbose=False).submit(p, api_name="/generate") for p in ("1", "2")]
        first_chunks = [pool.submit(lambda job=job: next(iter(job))) for job in jobs]
        try:
            assert [chunk.result(timeout=WAIT_S) for chunk in first_chunks] == ["a", "a"]
        finally:
            gate.set()
        assert [job.result(timeout=WAIT_S) for job in jobs] == ["ab", "ab"]


def test_api_lists_only_the_generate_endpoint():
    with serve(FakeEngine()) as (url, _):
        api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/generate"]
    assert api["unnamed_endpoints"] == {}
    names = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert names == ["prompt", *(spec.name for spec in FIELDS), "seed"]


def test_domain_errors_reach_the_client_as_their_own_message():
    error = GenerationFailed("The GPU job failed (out of memory); the next request can run.")
    with serve(FakeEngine(error=error)) as (url, _), pytest.raises(AppError) as raised:
        Client(url, verbose=False).predict("Hi", api_name="/generate")
    assert str(raised.value) == str(error)


def test_unexpected_errors_become_a_generic_message_without_details(caplog):
    engine = FakeEngine(error=RuntimeError("CUDA kernel at 0xdeadbeef"))
    with serve(engine) as (url, _), pytest.raises(AppError) as raised:
        Client(url, verbose=False).predict("Hi", api_name="/generate")
    assert str(raised.value) == GENERIC_ERROR
    assert "0xdeadbeef" in caplog.text  # logged for the operator, not shown to the user


def test_without_a_gpu_the_api_answers_with_the_cuda_message():
    engine = FakeEngine(gpu=None)
    with serve(engine) as (url, _), pytest.raises(AppError) as raised:
        Client(url, verbose=False).predict("Hi", api_name="/generate")
    assert str(raised.value) == no_gpu_here()
    assert engine.calls == []


# ---- the chat handler ---------------------------------------------------------------------------


def test_chat_streams_the_reply_into_the_history_with_stats():
    web = build_app(FakeEngine(["Sure", ", here", " it is."]))
    history = [user("Write a haiku.")]
    updates = run_chat(web, history)
    chats = [update[0] for update in updates]
    assert chats[0] == history  # the question shows before the first token
    assert [c[-1]["content"] for c in chats[1:4]] == ["Sure", "Sure, here", "Sure, here it is."]
    assert chats[-1] == [*history, assistant("Sure, here it is.")]
    stats = updates[-1][1]
    assert "0.05 s to first token" in stats and "42.0 tok/s" in stats and "finished" in stats


def test_chat_puts_system_text_and_response_prefix_into_the_prompt():
    engine = FakeEngine(["def f(): pass\n```"])
    web = build_app(engine)
    history = [user("Hi"), assistant("Hello!"), user("Write f.")]
    updates = run_chat(web, history, system="Answer in Python.", prefix="```python\n")
    sent = "".join(s.text for s in engine.calls[0].segments)
    expected = build_prompt(history, system="Answer in Python.", response_prefix="```python\n")
    assert sent == expected
    assert updates[-1][0][-1] == assistant("```python\ndef f(): pass\n```")
    prompt_view = updates[0][3]  # shows exactly what was sent, and its size
    assert prompt_view.value == expected
    assert prompt_view.label.endswith(f"{engine.count_tokens(engine.calls[0].segments):,} tokens")


def test_chat_reads_the_history_in_the_shape_the_page_sends_it():
    engine = FakeEngine(["fine"])
    web = build_app(engine)
    page_shape = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "text", "text": "Write f."}]},
    ]
    run_chat(web, page_shape)
    sent = "".join(s.text for s in engine.calls[0].segments)
    assert sent == build_prompt([user("Hi"), assistant("Hello!"), user("Write f.")])


def test_chat_meter_shows_the_budget_and_notes_dropped_turns():
    engine = FakeEngine(max_seq_len=1024, tokens_per_char=1.0)
    web = build_app(engine)
    old = [user("a" * 300), assistant("b" * 300)]
    values = [*DEFAULT_VALUES[:-1], 256]  # max_new_tokens
    updates = run_chat(web, [*old, *old, user("Now?")], values=values)
    meter = updates[0][2]
    assert "of 1,024 tokens" in meter and "+ 256 max new" in meter
    assert "2 oldest turns were left out" in meter
    assert "aaa" not in "".join(s.text for s in engine.calls[0].segments)


def test_closing_the_chat_handler_closes_the_engine_stream():
    engine = FakeEngine(["a", "b", "c", "d"])
    web = build_app(engine)
    respond = web.fn("respond")([user("Hi")], "", "", *DEFAULT_VALUES, None)
    next(respond)  # "Generating…"
    next(respond)  # the first token
    respond.close()  # what Gradio does on Stop or disconnect
    assert engine.calls[0].closed
    assert engine.calls[0].chunks_sent == 1
    assert web.admission.running == 0  # its place on the GPU is free again


def test_chat_refuses_bad_settings_before_the_engine_sees_them():
    engine = FakeEngine()
    web = build_app(engine)
    values = [*DEFAULT_VALUES]
    values[0] = float("nan")  # temperature
    assert "temperature must be between 0 and 2" in refusal(
        run_chat(web, [user("Hi")], values=values)
    )
    assert "seed must be between 0 and" in refusal(run_chat(web, [user("Hi")], seed="-3"))
    assert "seed must be a whole number, or blank" in refusal(
        run_chat(web, [user("Hi")], seed="lucky")
    )
    assert engine.calls == []


def test_chat_passes_the_seed_and_sliders_to_the_engine():
    engine = FakeEngine()
    web = build_app(engine)
    values = [0.5, 0.9, 20, 0.1, 1.2, 100.0]
    run_chat(web, [user("Hi")], values=values, seed=" 99 ")
    assert engine.calls[0].settings == SamplingSettings(0.5, 0.9, 20, 0.1, 1.2, 100, 99)


def test_a_blank_seed_box_means_a_random_seed():
    read_seed = chat_module.read_seed
    assert read_seed("") is None and read_seed("  ") is None and read_seed(None) is None
    assert read_seed("42") == 42


def test_chat_shows_domain_errors_as_their_message_and_keeps_the_question():
    error = ContextTooLong("The prompt is 9,000 tokens but the context is 8,192; lower it.")
    web = build_app(FakeEngine(error=error))
    updates = run_chat(web, [user("Hi")])
    assert refusal(updates) == f"{FAILED_MARK} {error}"
    # The question stays, answered by the failure; Send or Retry asks it again.
    assert updates[-1][0][:-1] == [user("Hi")]
    assert chat_module.plain_history(updates[-1][0]) == [user("Hi")]  # the model never sees it


def test_chat_without_a_gpu_answers_with_the_cuda_message():
    engine = FakeEngine(gpu=None)
    web = build_app(engine)
    # Short in the chat; the banner at the top holds the cause and the remedy, once.
    assert refusal(run_chat(web, [user("Hi")])) == f"{FAILED_MARK} {NO_GPU_SHORT}"
    assert engine.calls == []
    banners = [b for b in web.demo.blocks.values() if isinstance(b, gr.HTML) and b.visible]
    assert any(no_gpu_here() in str(b.value) for b in banners)


def test_without_a_gpu_bad_input_still_gets_its_own_message_first():
    web = build_app(FakeEngine(gpu=None))
    values = [*DEFAULT_VALUES]
    values[0] = -1.0  # temperature
    assert "temperature must be between 0 and 2 (got -1)" in refusal(
        run_chat(web, [user("Hi")], values=values)
    )
    assert "The message is empty" in refusal(run_chat(web, [user("  ")]))
    with serve(FakeEngine(gpu=None)) as (url, _):
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="The prompt is empty"):
            client.predict("", api_name="/generate")
        with pytest.raises(AppError, match="temperature must be between 0 and 2"):
            client.predict("Hi", temperature=-1, api_name="/generate")
        with pytest.raises(AppError, match="No GPU to run the model"):
            client.predict("Hi", api_name="/generate")


def test_chat_before_a_model_is_loaded_says_to_load_one():
    web = build_app(FakeEngine(loaded=False))
    assert re.search(
        r"not ready .*Load one in the Model panel", refusal(run_chat(web, [user("Hi")]))
    )


@pytest.mark.parametrize(
    ("engine", "state", "words"),
    [
        (FakeEngine(gpu=None, loaded=False), "no_gpu", "No GPU to run the model"),
        (FakeEngine(loaded=False), "empty", "press Load on the page"),
        (FakeEngine(), "ready", "The model serves."),
    ],
)
def test_health_says_the_state_with_a_reason_a_person_can_act_on(engine, state, words):
    with serve(engine) as (url, _):
        answer = httpx.get(f"{url}health", timeout=WAIT_S)
    assert answer.status_code == (200 if state == "ready" else 503)
    assert answer.json()["state"] == state and words in answer.json()["message"]
    if state == "no_gpu":
        assert answer.json()["message"] == no_gpu_here()


def test_the_no_gpu_banner_is_hidden_when_a_gpu_is_present():
    web = build_app(FakeEngine())
    banners = [b for b in web.demo.blocks.values() if isinstance(b, gr.HTML)]
    assert not any(b.visible and no_gpu_here() in str(b.value) for b in banners)


def test_a_finished_reply_says_why_it_ended_in_plain_words():
    stats = chat_module.format_stats
    finished = run_chat(build_app(FakeEngine(["x"])), [user("Hi")])[-1][1]
    assert finished.endswith("· finished")
    for reason, words in [("max_new_tokens", "hit max new tokens"), ("cancelled", "stopped")]:
        event = Finished("x", 1, 1, 0, 0.1, 10.0, reason)
        assert stats(event).endswith(f"· {words}")


def test_a_waiting_reply_says_how_many_are_ahead_then_streams():
    gate = threading.Event()  # the first reply holds the only place until released
    engine = FakeEngine(["a", "b"], max_concurrency=1, gate=gate)
    web = build_app(engine)
    first = web.fn("respond")([user("First")], "", "", *DEFAULT_VALUES, None)
    assert next(first)[1] == "Generating…"
    next(first)  # "a": it holds the place
    second = web.fn("respond")([user("Second")], "", "", *DEFAULT_VALUES, None)
    assert next(second)[1] == chat_module.waiting_line(0)
    assert "yours is next" in chat_module.waiting_line(0)
    assert "2 replies are ahead of yours" in chat_module.waiting_line(2)
    gate.set()
    list(first)
    rest = list(second)
    assert rest[0][1] == "Generating…" and rest[-1][0][-1] == assistant("ab")


# ---- history edits ------------------------------------------------------------------------------


def test_sending_appends_the_question_and_clears_the_box():
    history = [user("Hi"), assistant("Hello")]
    assert chat_module.add_user_message("Next?", history) == ("", [*history, user("Next?")])


def test_sending_a_blank_message_changes_nothing():
    history = [user("Hi"), assistant("Hello")]
    assert chat_module.add_user_message("   ", history) == ("   ", history)


def test_sending_after_a_stopped_empty_reply_replaces_the_unanswered_question():
    assert chat_module.add_user_message("Better", [user("Hi")]) == ("", [user("Better")])


def test_sending_while_a_reply_streams_is_refused_and_the_text_stays():
    with pytest.raises(gr.Error, match="still being written"):
        chat_module.add_user_message("Another question", [user("Hi")], busy=True)


def test_chat_controls_lock_while_busy_and_stop_reports_only_a_running_reply():
    busy, *edits, stop = chat_module.chat_controls(True)
    assert busy is True and all(b.interactive is False for b in edits) and stop.interactive
    stats, busy, *edits, stop = chat_module.stop_pressed(True)
    assert stats == "**Stopped.**" and busy is False
    assert all(b.interactive is True for b in edits) and stop.interactive is False
    stats, busy, *_ = chat_module.stop_pressed(False)
    assert stats is not None and stats != "**Stopped.**"  # gr.skip(): the stats line is kept
    assert busy is False


def test_retry_drops_the_last_answer_so_its_question_is_asked_again():
    history = [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]
    assert chat_module.retry_history(history) == history[:3]
    assert chat_module.retry_history(history[:3]) == history[:3]
    assert chat_module.retry_history([]) == []


def test_retry_then_chat_answers_the_same_question_again():
    engine = FakeEngine(["again"])
    web = build_app(engine)
    history = [user("Q1"), assistant("A1")]
    updates = run_chat(web, chat_module.retry_history(history))
    assert updates[-1][0] == [user("Q1"), assistant("again")]


def test_undo_removes_the_last_turn_and_gives_back_its_question():
    history = [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]
    undo = chat_module.undo_history
    assert undo(history) == (history[:2], "Q2")
    assert undo([user("Q1"), assistant("A1"), user("Q2")]) == (history[:2], "Q2")
    assert undo([]) == ([], "")


# ---- model panel --------------------------------------------------------------------------------


def test_branch_choices_show_each_estimate_and_what_fits():
    choices = dict((value, label) for label, value in branch_choices(12.0, 4096, "fp16"))
    picked = pick_branch(12.0, 4096, "fp16")
    bigger = list(BRANCHES)[list(BRANCHES).index(picked) + 1]
    assert choices["auto"] == f"auto → {picked}"
    assert choices[picked].endswith("fits") and choices[bigger].endswith("too big")
    assert choices["3_5"].endswith("fits")
    assert re.search(r"~\d+\.\d GB", choices["8_0"])
    no_gpu = dict((value, label) for label, value in branch_choices(None, 4096, "q4"))
    assert no_gpu["auto"] == "auto (no GPU found)"


def test_a_smaller_cache_lowers_the_estimates_shown():
    def gb(label: str) -> float:
        return float(re.search(r"~(\d+\.\d) GB", label).group(1))

    fp16 = dict((v, gb(label)) for label, v in branch_choices(24.0, 16384, "fp16")[1:])
    q4 = dict((v, gb(label)) for label, v in branch_choices(24.0, 16384, "q4")[1:])
    assert all(q4[name] < fp16[name] for name in fp16)


@pytest.mark.parametrize(
    ("context", "cache_mode", "words"),
    [(4096, "fp8", "choose one of fp16, q8, q6, q4"), (1000, "fp16", "multiple of 256")],
)
def test_a_load_with_a_bad_context_or_cache_is_refused_before_any_download(
    monkeypatch, context, cache_mode, words
):
    engine = FakeEngine(loaded=False)
    loader = ModelLoader(engine, repo="someone/model-exl2")
    monkeypatch.setattr(loader_module, "resolve_model_dir", lambda **kwargs: pytest.fail("fetched"))
    with pytest.raises(InvalidSetting, match=words):
        loader.load("4_25", context, cache_mode)
    assert engine.loads == []


def test_loader_downloads_then_loads_reporting_each_step(monkeypatch):
    engine = FakeEngine(loaded=False, max_concurrency=6)
    loader = ModelLoader(engine, repo="someone/model-exl2")
    seen = {}

    def fake_resolve(**kwargs):
        seen.update(kwargs)
        kwargs["on_progress"](DownloadProgress(5 * 10**8, 10**9, 1, 2, 2e8))
        return ModelSource(Path("/models/sc2-4_25"), "4_25", "someone/model-exl2 @ 4_25")

    monkeypatch.setattr(loader_module, "resolve_model_dir", fake_resolve)
    reports = []
    status = loader.load("4_25", 8192, "q4", reports.append)
    assert seen["repo"] == "someone/model-exl2" and seen["branch"] == "4_25"
    assert seen["context_tokens"] == 8192 and seen["cache_mode"] == "q4"
    assert engine.loads == [
        {"model_dir": "/models/sc2-4_25", "max_seq_len": 8192, "cache_mode": "q4"}
    ]
    texts = [report.text for report in reports]
    assert any("0.5 of 1.0 GB" in text for text in texts)
    assert "Loading layers: 3 of 3" in texts and reports[-1].fraction == 1.0
    assert status.state == "ready" and loader.loaded.label == "someone/model-exl2 @ 4_25"


def test_load_runs_in_the_background_and_raises_the_gpu_places(monkeypatch):
    engine = FakeEngine(loaded=False, max_concurrency=6)
    web = build_app(engine, AppConfig(repo="someone/model-exl2"))
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved("/models/sc2-4_25"))
    model_line, timer = web.fn("load_clicked")("4_25", 8192.0, "q4", "")
    assert timer.active and timer.value == 1.0  # the page's timer shows the progress
    web.panel.last_load.join(WAIT_S)
    assert engine.loads == [
        {"model_dir": "/models/sc2-4_25", "max_seq_len": 8192, "cache_mode": "q4"}
    ]
    line = web.fn("tick")()[1]
    assert "ready · someone/model-exl2 @ 4_25 · 8,192-token context · q4 cache" in line
    assert "/models/sc2-4_25" not in line  # a Hub download is named by repo and branch
    assert web.admission.slots == 6


def test_a_local_model_folder_is_named_by_its_path(monkeypatch):
    engine = FakeEngine(loaded=False)
    web = build_app(engine, AppConfig(model_dir="/data/my-model"))
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved("/data/my-model", None))
    web.loader.load("auto", 4096, "fp16")
    assert "ready · /data/my-model · 4,096-token context" in web.fn("tick")()[1]


def test_a_failed_load_shows_its_message_once_on_the_model_line(monkeypatch):
    engine = FakeEngine(loaded=False)
    engine.load_error = ContextTooLong("The weights and a 16,384-token cache do not fit; use q4.")
    web = build_app(engine)
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved())
    web.fn("load_clicked")("4_25", 16384, "fp16", "")
    web.panel.last_load.join(WAIT_S)
    line = web.fn("tick")()[1]
    assert line.count("do not fit; use q4.") == 1 and "load failed" in line


def test_start_up_load_runs_in_the_background_and_shows_its_progress(monkeypatch):
    engine = FakeEngine(loaded=False, max_concurrency=3)
    config = AppConfig(branch="4_25")
    web = build_app(engine, config)
    downloading, release = threading.Event(), threading.Event()

    def slow_resolve(**kwargs):
        kwargs["on_progress"](DownloadProgress(10**9, 4 * 10**9, 1, 4, 1e8))
        downloading.set()
        assert release.wait(WAIT_S)
        return ModelSource(Path("/models/sc2-4_25"), "4_25", "x @ 4_25")

    monkeypatch.setattr(loader_module, "resolve_model_dir", slow_resolve)
    thread = web.loader.load_in_background("4_25", 4096, "fp16")
    assert downloading.wait(WAIT_S)
    gpu_line, line, timer = web.fn("tick")()
    assert "Downloading: 1.0 of 4.0 GB, 1 of 4 files, 100 MB/s" in line
    assert timer.active and timer.value == 1.0  # every second while loading
    release.set()
    thread.join(WAIT_S)
    assert engine.loads[0]["model_dir"] == "/models/sc2-4_25"
    gpu_line, line, timer = web.fn("tick")()
    assert "ready" in line and timer.value == 5.0  # then every few seconds
    assert web.admission.slots == 3


def test_a_new_page_shows_the_loaded_model_not_the_start_up_defaults(monkeypatch):
    engine = FakeEngine(loaded=False)
    web = build_app(engine, AppConfig())  # defaults: auto, 4096, fp16
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved(branch="6_5"))
    web.loader.load("auto", 16384, "q4")
    gpu_line, branch, context, cache, line, timer = web.fn("page_opened")()
    assert (branch.value, context, cache) == ("6_5", 16384, "q4")
    assert "16,384-token context · q4 cache" in line


def test_the_compile_line_counts_files_and_time_and_estimates_what_is_left():
    from engine.loading import compiling_text

    early = compiling_text(0, 48, 30.0, 600.0)
    assert "0 of 48 files, 30 s so far, about 9 min 30 s left" in early
    paced = compiling_text(12, 48, 120.0, 600.0)  # 10 s a file, 36 files to go
    assert "12 of 48 files, 2 min 00 s so far, about 6 min 00 s left" in paced
    assert paced.startswith("Compiling exllamav2's CUDA extension (first start only)")


def test_a_load_that_compiles_the_extension_says_so_in_the_panel(monkeypatch):
    from engine.api import LoadStep

    engine = FakeEngine(loaded=False)
    engine.load_steps = [LoadStep("compiling", 3, 48), LoadStep("layers", 1, 1)]
    engine.load_gate = threading.Event()
    web = build_app(engine)
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved())
    shown = []
    original = engine.load

    def load(*args, on_progress=None, **kwargs):
        def report(step):
            on_progress(step)
            shown.append(web.fn("tick")()[1])

        return original(*args, on_progress=report, **kwargs)

    engine.load = load
    thread = web.loader.load_in_background("auto", 4096, "fp16")
    engine.load_gate.set()
    thread.join(WAIT_S)
    assert "Compiling exllamav2's CUDA extension (first start only): 3 of 48 files" in shown[0]


def test_load_without_a_gpu_answers_with_the_cuda_message():
    web = build_app(FakeEngine(gpu=None, loaded=False))
    web.fn("load_clicked")("auto", 4096, "fp16", "")
    web.panel.last_load.join(WAIT_S)
    assert no_gpu_here() in web.fn("tick")()[1]


def test_gpu_replies_start_at_once_and_wait_for_one_place_until_a_model_is_loaded():
    web = build_app(FakeEngine(loaded=False))
    gpu_fns = {fn.name: fn for fn in web.demo.fns.values() if fn.name in ("respond", "generate")}
    assert set(gpu_fns) == {"respond", "generate"}
    assert {fn.concurrency_limit for fn in gpu_fns.values()} == {None}  # they queue in admission
    assert web.admission.slots == 1


def test_sampling_sliders_are_built_from_the_settings_fields():
    web = build_app(FakeEngine())
    sliders = {b.label: b for b in web.demo.blocks.values() if isinstance(b, gr.Slider)}
    for spec in FIELDS:
        slider = sliders[spec.label]
        assert (slider.minimum, slider.maximum, slider.step) == (
            spec.minimum,
            spec.maximum,
            spec.step,
        )
        assert slider.value == spec.default


# ---- configuration and start-up -----------------------------------------------------------------


def test_flags_override_env_vars_which_override_defaults():
    env = {"SC2_CONTEXT": "8192", "SC2_CACHE_MODE": "q4", "GRADIO_SERVER_PORT": "9000"}
    config = parse_config(["--cache-mode", "q8"], env)
    assert (config.context, config.cache_mode, config.port) == (8192, "q8", 9000)
    assert parse_config([], {}) == AppConfig()
    assert parse_config([], {"SPACE_ID": "me/space"}).host == "0.0.0.0"


def test_the_model_loads_at_start_unless_no_load_is_given():
    assert parse_config([], {}).load_at_start
    assert not parse_config(["--no-load"], {}).load_at_start
    assert not parse_config([], {"SC2_NO_LOAD": "1"}).load_at_start
    assert parse_config([], {"SC2_NO_LOAD": "0"}).load_at_start


@pytest.mark.parametrize(
    "flag, env, field",
    [
        ("--no-cuda-graphs", "SC2_NO_CUDA_GRAPHS", "cuda_graphs"),
        ("--no-custom-matmul", "SC2_NO_CUSTOM_MATMUL", "custom_matmul"),
    ],
)
def test_a_decode_path_setting_is_on_unless_its_flag_or_variable_turns_it_off(
    monkeypatch, flag, env, field
):
    assert getattr(parse_config([], {}), field)
    assert not getattr(parse_config([flag], {}), field)
    assert not getattr(parse_config([], {env: "yes"}), field)
    assert getattr(parse_config([], {env: "0"}), field)
    import app
    from engine import client

    made = []
    monkeypatch.setattr(client, "EngineProcess", lambda **kwargs: made.append(kwargs))
    app.start_engines(parse_config([flag, "--max-jobs", "3"], {}))
    options = {"cuda_graphs": True, "custom_matmul": True, "stall_timeout_s": 10.0, field: False}
    assert made == [{"device": None, "max_jobs": 3, "options": options, "stall_timeout_s": 10.0}]


def test_the_stall_timeout_reaches_both_watches_and_must_be_sane(monkeypatch, capsys):
    import app
    from engine import client

    made = []
    monkeypatch.setattr(client, "EngineProcess", lambda **kwargs: made.append(kwargs))
    app.start_engines(parse_config([], {"SC2_STALL_TIMEOUT": "4.5"}))
    assert made[0]["stall_timeout_s"] == made[0]["options"]["stall_timeout_s"] == 4.5
    for bad in ("0", "-3", "nan", "601"):
        with pytest.raises(SystemExit):
            parse_config(["--stall-timeout", bad], {})
        assert "--stall-timeout must be between 1 and 600 seconds" in capsys.readouterr().err


def test_the_model_line_names_the_attention_and_the_decode_path():
    from engine.api import EngineStatus
    from web.panel import status_markdown

    status = EngineStatus(
        state="ready",
        attention="PyTorch attention (flash, gathered; decode: Triton split-KV)",
        decode="decode: CUDA graphs for 1–8 jobs + GPU sampling (captured in 1.2 s, 0.61 GB)",
    )
    line = status_markdown(status)
    assert "decode: Triton split-KV" in line and "CUDA graphs for 1–8 jobs" in line
    assert "decode: eager" in status_markdown(EngineStatus(state="ready"))


def test_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--context", "1000"], {})
    assert "multiple of 256" in capsys.readouterr().err


def test_help_lists_every_flag_its_env_var_and_default_without_importing_torch():
    code = "import sys, app; assert 'torch' not in sys.modules and 'exllamav2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    help_text = subprocess.run(
        [sys.executable, "app.py", "--help"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    help_text = " ".join(help_text.split())
    for flag, env in [
        ("--model-dir", "SC2_MODEL_DIR"),
        ("--repo", "SC2_REPO"),
        ("--branch", "SC2_BRANCH"),
        ("--context", "SC2_CONTEXT"),
        ("--cache-mode", "SC2_CACHE_MODE"),
        ("--host", "SC2_HOST"),
        ("--port", "SC2_PORT / GRADIO_SERVER_PORT"),
        ("--queue-size", "SC2_QUEUE_SIZE"),
        ("--auth", "SC2_AUTH"),
        ("--admin-token", "SC2_ADMIN_TOKEN"),
    ]:
        assert flag in help_text and f"env {env};" in help_text
    assert "--no-load" in help_text and "SC2_NO_LOAD=1" in help_text
    assert "--no-cuda-graphs" in help_text and "SC2_NO_CUDA_GRAPHS=1" in help_text
    assert "default: 4096" in help_text and "default: 32" in help_text


def run_app(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python app.py` as a user would, on this machine (no GPU)."""
    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_port_in_use_gives_one_line_naming_the_port_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app("--port", str(port))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"Port {port} on 127.0.0.1 is already in use (another app.py?); stop that server or "
        f"start this one with --port {port + 1} (or SC2_PORT)."
    )
    assert "Traceback" not in result.stderr


def test_the_terminal_says_once_why_there_is_no_gpu_and_never_suggests_a_share_link():
    port = free_port()
    started = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in started.stdout:
            lines.append(line)
            if "The page is at" in line:
                break
    finally:
        started.terminate()
        rest, _ = started.communicate(timeout=WAIT_S)
    output = "".join(lines) + (rest or "")
    assert f"The page is at http://127.0.0.1:{port}" in output
    # One line naming this machine's cause (a CPU-only torch here), not repeating itself.
    (said,) = [line for line in output.splitlines() if "No GPU to run the model" in line]
    assert said.endswith(f"{no_gpu_here()} The page says so too.")
    assert "share=True" not in output and "public link" not in output


def live_processes_in_group(group: int) -> list[str]:
    """The command lines of a process group's processes that still run (not those that ended
    and wait for init to reap them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # it ended while we looked
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == group and state != "Z":
            found.append(command)
    return found


def group_ended(group: int, within_s: float) -> list[str]:
    """Wait up to within_s for a process group to end; what still runs then ([] once ended).
    A child may still be tearing itself down for a moment after the app has exited."""
    deadline = time.monotonic() + within_s
    while (left := live_processes_in_group(group)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /proc: nothing tells us when another session's process ends
    return left


def test_ctrl_c_stops_the_app_and_its_engine_process_quietly_within_seconds():
    port = free_port()
    started = subprocess.Popen(
        [sys.executable, "app.py", "--no-load", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    watchdog = threading.Timer(120, lambda: os.killpg(started.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in started.stdout or ():
            lines.append(line)
            if "The page is at" in line:
                break
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=WAIT_S).status_code == 503
        os.killpg(started.pid, signal.SIGINT)  # what Ctrl+C in the terminal does
        stopped_at = time.monotonic()
        rest, _ = started.communicate(timeout=WAIT_S)
        seconds = time.monotonic() - stopped_at
    finally:
        watchdog.cancel()
        if started.poll() is None:
            os.killpg(started.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert seconds < 5, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert group_ended(started.pid, within_s=5) == []  # the engine process went with it


def test_with_a_gpu_the_app_loads_the_configured_branch_at_start_unless_told_not_to(monkeypatch):
    import app

    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved(branch="6_5"))
    engine = FakeEngine(loaded=False)
    web = build_app(engine, AppConfig(branch="6_5", context=8192))
    app.start(web, web.config)
    assert until_loaded(web)
    assert engine.loads == [{"model_dir": "/models/sc2", "max_seq_len": 8192, "cache_mode": "fp16"}]
    idle = FakeEngine(loaded=False)
    app.start(build_app(idle, AppConfig(load_at_start=False)), AppConfig(load_at_start=False))
    assert idle.loads == []


def until_loaded(web: WebApp) -> bool:
    """Wait for the start-up load thread (it is the loader's only thread)."""
    for thread in threading.enumerate():
        if thread.name == "model-loader":
            thread.join(WAIT_S)
    return web.engine.status.state == "ready"

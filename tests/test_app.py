"""The Gradio app on a scripted engine: streaming, Stop, history edits, settings, errors and API."""

from __future__ import annotations

import contextlib
import io
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from model import loader as loader_module
from model.branches import BRANCHES, pick_branch
from model.config import AppConfig, parse_config
from model.download import DownloadProgress
from model.errors import NO_GPU_MESSAGE, ContextTooLong, GenerationFailed
from model.loader import ModelLoader
from model.prompt import build_prompt
from model.settings import FIELDS, SamplingSettings
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 15  # upper bound for anything that should happen "soon"; tests never sleep to sync
DEFAULT_VALUES = [spec.default for spec in FIELDS]
PLACEHOLDER_URL = "http://127.0.0.1:7860/"

# The README's API section copies this example; a test runs it against a live app.
API_EXAMPLE = """\
from gradio_client import Client

client = Client("http://127.0.0.1:7860/")
job = client.submit(
    "Write a Python function that reverses a string.",  # prompt
    temperature=0.2,
    top_p=0.95,
    max_new_tokens=256,
    seed=1234,
    api_name="/generate",
)
for text in job:  # each value is the whole answer so far
    print(text)
"""


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(
    engine: FakeEngine, config: AppConfig | None = None, loader: ModelLoader | None = None
) -> Iterator[str]:
    """Launch the app on a random local port and yield its URL."""
    demo = app.build_demo(engine, config, loader)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True
    )
    try:
        yield url
    finally:
        demo.close()


def handler(demo: gr.Blocks, name: str):
    """The Python function behind one of the app's events."""
    return next(fn.fn for fn in demo.fns.values() if fn.name == name)


def run_chat(demo: gr.Blocks, history, *, system="", prefix="", values=None, seed=None):
    """Drive the chat handler to the end and return everything it yielded."""
    respond = handler(demo, "respond")
    return list(respond(history, system, prefix, *(values or DEFAULT_VALUES), seed))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def run_api_example(code: str, url: str) -> list[str]:
    """Run an API example against url and return the lines it printed."""
    assert PLACEHOLDER_URL in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(PLACEHOLDER_URL, url), "api_example", "exec"), {})
    return printed.getvalue().splitlines()


# ---- /generate over HTTP ------------------------------------------------------------------------


def test_generate_streams_the_whole_text_so_far_in_order():
    engine = FakeEngine(["def ", "add(a, b):", "\n    return a + b"])
    with serve(engine) as url:
        job = Client(url, verbose=False).submit("Write add.", api_name="/generate")
        outputs = list(job)
    assert outputs == ["def ", "def add(a, b):", "def add(a, b):\n    return a + b"]


def test_generate_wraps_the_prompt_as_one_user_instruction():
    engine = FakeEngine()
    with serve(engine) as url:
        Client(url, verbose=False).predict("Explain recursion.", api_name="/generate")
    (call,) = engine.calls
    assert "".join(s.text for s in call.segments) == build_prompt([user("Explain recursion.")])


def test_generate_passes_validated_settings_in_the_documented_order():
    engine = FakeEngine()
    with serve(engine) as url:
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
    with serve(engine) as url, pytest.raises(AppError, match=message):
        Client(url, verbose=False).predict("Hi", **{setting: value}, api_name="/generate")
    assert engine.calls == []


def test_cancelling_a_generate_job_closes_the_engine_stream():
    engine = FakeEngine(["tok "] * 400, chunk_delay_s=0.02)
    with serve(engine) as url:
        job = Client(url, verbose=False).submit("Count forever.", api_name="/generate")
        assert next(iter(job)) == "tok "  # the client knows the job's id once output arrives
        call = engine.calls[0]
        job.cancel()
        assert call.closed_event.wait(WAIT_S), "the engine's iterator was never closed"
    assert call.chunks_sent < len(engine.chunks)


def test_one_clients_cancel_leaves_another_clients_stream_running():
    engine = FakeEngine(["x"] * 200, chunk_delay_s=0.02)
    with serve(engine) as url:
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
    loader = ModelLoader(engine, AppConfig())
    monkeypatch.setattr(loader_module, "resolve_model_dir", lambda **kwargs: Path("/models/sc2"))
    with serve(engine, loader=loader) as url, ThreadPoolExecutor(2) as pool:
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
    with serve(FakeEngine()) as url:
        api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/generate"]
    assert api["unnamed_endpoints"] == {}
    names = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert names == ["prompt", *(spec.name for spec in FIELDS), "seed"]


def test_domain_errors_reach_the_client_as_their_own_message():
    error = GenerationFailed("The GPU job failed (out of memory); the next request can run.")
    with serve(FakeEngine(error=error)) as url, pytest.raises(AppError) as raised:
        Client(url, verbose=False).predict("Hi", api_name="/generate")
    assert str(raised.value) == str(error)


def test_unexpected_errors_become_a_generic_message_without_details(caplog):
    engine = FakeEngine(error=RuntimeError("CUDA kernel at 0xdeadbeef"))
    with serve(engine) as url, pytest.raises(AppError) as raised:
        Client(url, verbose=False).predict("Hi", api_name="/generate")
    assert str(raised.value) == app.GENERIC_ERROR
    assert "0xdeadbeef" in caplog.text  # logged for the operator, not shown to the user


def test_without_a_gpu_the_api_answers_with_the_cuda_message():
    engine = FakeEngine(gpu=None)
    with serve(engine) as url, pytest.raises(AppError) as raised:
        Client(url, verbose=False).predict("Hi", api_name="/generate")
    assert str(raised.value) == NO_GPU_MESSAGE
    assert "pick GPU hardware in Settings" in NO_GPU_MESSAGE
    assert engine.calls == []


def test_api_example_streams_an_answer():
    engine = FakeEngine(["def reverse(s):", "\n    return s[::-1]"])
    with serve(engine) as url:
        printed = run_api_example(API_EXAMPLE, url)
    assert printed[-1] == "    return s[::-1]"
    assert "def reverse(s):" in printed
    assert engine.calls[0].settings.seed == 1234


def test_readme_api_example_runs():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not written yet; test_api_example_streams_an_answer covers it")
    section = readme.read_text(encoding="utf-8").split("## API", 1)
    assert len(section) == 2, "README has no '## API' section"
    block = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert block, "README's API section has no python example"
    engine = FakeEngine(["print('hi')"])
    with serve(engine) as url:
        printed = run_api_example(block.group(1), url)
    assert printed and printed[-1] == "print('hi')"


# ---- the chat handler ---------------------------------------------------------------------------


def test_chat_streams_the_reply_into_the_history_with_stats():
    demo = app.build_demo(FakeEngine(["Sure", ", here", " it is."]))
    history = [user("Write a haiku.")]
    yields = run_chat(demo, history)
    chats = [y[1] for y in yields]
    assert chats[0] == history  # the question shows before the first token
    assert [c[-1]["content"] for c in chats[1:4]] == ["Sure", "Sure, here", "Sure, here it is."]
    assert chats[-1] == [*history, assistant("Sure, here it is.")]
    stats = yields[-1][2]
    assert "0.05 s to first token" in stats and "42.0 tok/s" in stats and "eos" in stats


def test_chat_puts_system_text_and_response_prefix_into_the_prompt():
    engine = FakeEngine(["def f(): pass\n```"])
    demo = app.build_demo(engine)
    history = [user("Hi"), assistant("Hello!"), user("Write f.")]
    yields = run_chat(demo, history, system="Answer in Python.", prefix="```python\n")
    sent = "".join(s.text for s in engine.calls[0].segments)
    expected = build_prompt(history, system="Answer in Python.", response_prefix="```python\n")
    assert sent == expected
    assert yields[-1][1][-1] == assistant("```python\ndef f(): pass\n```")
    prompt_view = yields[0][4]  # shows exactly what was sent, and its size
    assert prompt_view.value == expected
    assert prompt_view.label.endswith(f"{engine.count_tokens(engine.calls[0].segments):,} tokens")


def test_chat_meter_shows_the_budget_and_notes_dropped_turns():
    engine = FakeEngine(max_seq_len=1024, tokens_per_char=1.0)
    demo = app.build_demo(engine)
    old = [user("a" * 300), assistant("b" * 300)]
    values = [*DEFAULT_VALUES[:-1], 256]  # max_new_tokens
    yields = run_chat(demo, [*old, *old, user("Now?")], values=values)
    meter = yields[0][3]
    assert "of 1,024 tokens" in meter and "+ 256 max new" in meter
    assert "2 oldest turns were left out" in meter
    assert "aaa" not in "".join(s.text for s in engine.calls[0].segments)


def test_closing_the_chat_handler_closes_the_engine_stream():
    engine = FakeEngine(["a", "b", "c", "d"])
    demo = app.build_demo(engine)
    respond = handler(demo, "respond")(([user("Hi")]), "", "", *DEFAULT_VALUES, None)
    next(respond)  # the question
    next(respond)  # the first token
    respond.close()  # what Gradio does on Stop or disconnect
    assert engine.calls[0].closed
    assert engine.calls[0].chunks_sent == 1


def test_chat_rejects_bad_settings_before_the_engine_sees_them():
    engine = FakeEngine()
    demo = app.build_demo(engine)
    values = [*DEFAULT_VALUES]
    values[0] = float("nan")  # temperature
    with pytest.raises(gr.Error, match="temperature must be between 0 and 2"):
        run_chat(demo, [user("Hi")], values=values)
    with pytest.raises(gr.Error, match="seed must be between 0 and"):
        run_chat(demo, [user("Hi")], seed="-3")
    with pytest.raises(gr.Error, match="seed must be a whole number, or blank"):
        run_chat(demo, [user("Hi")], seed="lucky")
    assert engine.calls == []


def test_chat_passes_the_seed_and_sliders_to_the_engine():
    engine = FakeEngine()
    demo = app.build_demo(engine)
    values = [0.5, 0.9, 20, 0.1, 1.2, 100.0]
    run_chat(demo, [user("Hi")], values=values, seed=" 99 ")
    assert engine.calls[0].settings == SamplingSettings(0.5, 0.9, 20, 0.1, 1.2, 100, 99)


def test_a_blank_seed_box_means_a_random_seed():
    assert app.read_seed("") is None and app.read_seed("  ") is None and app.read_seed(None) is None
    assert app.read_seed("42") == 42


def test_chat_turns_domain_errors_into_their_message():
    error = ContextTooLong("The prompt is 9,000 tokens but the context is 8,192; lower it.")
    demo = app.build_demo(FakeEngine(error=error))
    with pytest.raises(gr.Error) as raised:
        run_chat(demo, [user("Hi")])
    assert raised.value.message == str(error)


def test_chat_without_a_gpu_answers_with_the_cuda_message():
    engine = FakeEngine(gpu=None)
    demo = app.build_demo(engine)
    with pytest.raises(gr.Error) as raised:
        run_chat(demo, [user("Hi")])
    assert raised.value.message == NO_GPU_MESSAGE
    assert engine.calls == []
    banners = [b for b in demo.blocks.values() if isinstance(b, gr.HTML) and b.visible]
    assert any(NO_GPU_MESSAGE in str(b.value) for b in banners)


def test_chat_before_a_model_is_loaded_says_to_load_one():
    demo = app.build_demo(FakeEngine(loaded=False))
    with pytest.raises(gr.Error, match="not ready .*Load one in the Model panel"):
        run_chat(demo, [user("Hi")])


def test_the_no_gpu_banner_is_hidden_when_a_gpu_is_present():
    demo = app.build_demo(FakeEngine())
    banners = [b for b in demo.blocks.values() if isinstance(b, gr.HTML)]
    assert not any(b.visible and NO_GPU_MESSAGE in str(b.value) for b in banners)


# ---- history edits ------------------------------------------------------------------------------


def test_sending_appends_the_question_and_clears_the_box():
    history = [user("Hi"), assistant("Hello")]
    assert app.add_user_message("Next?", history) == ("", [*history, user("Next?")])


def test_sending_a_blank_message_changes_nothing():
    history = [user("Hi"), assistant("Hello")]
    assert app.add_user_message("   ", history) == ("   ", history)


def test_sending_after_a_stopped_empty_reply_replaces_the_unanswered_question():
    assert app.add_user_message("Better", [user("Hi")]) == ("", [user("Better")])


def test_sending_while_a_reply_streams_is_refused_and_the_text_stays():
    with pytest.raises(gr.Error, match="still being written"):
        app.add_user_message("Another question", [user("Hi")], busy=True)


def test_chat_controls_lock_while_busy_and_stop_reports_only_a_running_reply():
    busy, *buttons = app.chat_controls(True)
    assert busy is True and all(b.interactive is False for b in buttons)
    stats, busy, *buttons = app.stop_pressed(True)
    assert stats == "**Stopped.**" and busy is False
    assert all(b.interactive is True for b in buttons)
    stats, busy, *_ = app.stop_pressed(False)
    assert stats is not None and stats != "**Stopped.**"  # gr.skip(): the stats line is kept
    assert busy is False


def test_retry_drops_the_last_answer_so_its_question_is_asked_again():
    history = [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]
    assert app.retry_history(history) == history[:3]
    assert app.retry_history(history[:3]) == history[:3]
    assert app.retry_history([]) == []


def test_retry_then_chat_answers_the_same_question_again():
    engine = FakeEngine(["again"])
    demo = app.build_demo(engine)
    history = [user("Q1"), assistant("A1")]
    yields = run_chat(demo, app.retry_history(history))
    assert yields[-1][1] == [user("Q1"), assistant("again")]


def test_undo_removes_the_last_turn_and_gives_back_its_question():
    history = [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]
    assert app.undo_history(history) == (history[:2], "Q2")
    assert app.undo_history([user("Q1"), assistant("A1"), user("Q2")]) == (history[:2], "Q2")
    assert app.undo_history([]) == ([], "")


# ---- model panel --------------------------------------------------------------------------------


def test_branch_choices_show_each_estimate_and_what_fits():
    choices = dict((value, label) for label, value in app.branch_choices(12.0, 4096, "fp16"))
    picked = pick_branch(12.0, 4096, "fp16")
    bigger = list(BRANCHES)[list(BRANCHES).index(picked) + 1]
    assert choices["auto"] == f"auto → {picked}"
    assert choices[picked].endswith("fits") and choices[bigger].endswith("too big")
    assert choices["3_5"].endswith("fits")
    assert re.search(r"~\d+\.\d GB", choices["8_0"])
    no_gpu = dict((value, label) for label, value in app.branch_choices(None, 4096, "q4"))
    assert no_gpu["auto"] == "auto (no GPU found)"


def test_a_smaller_cache_lowers_the_estimates_shown():
    def gb(label: str) -> float:
        return float(re.search(r"~(\d+\.\d) GB", label).group(1))

    fp16 = dict((v, gb(label)) for label, v in app.branch_choices(24.0, 16384, "fp16")[1:])
    q4 = dict((v, gb(label)) for label, v in app.branch_choices(24.0, 16384, "q4")[1:])
    assert all(q4[name] < fp16[name] for name in fp16)


def test_load_downloads_then_loads_and_raises_the_gpu_concurrency(monkeypatch):
    engine = FakeEngine(loaded=False, max_concurrency=6)
    config = AppConfig(repo="someone/model-exl2")
    demo = app.build_demo(engine, config)
    seen = {}

    def fake_resolve(**kwargs):
        seen.update(kwargs)
        kwargs["on_progress"](DownloadProgress(5 * 10**8, 10**9, 1, 2, 2e8))
        return Path("/models/sc2-4_25")

    monkeypatch.setattr(loader_module, "resolve_model_dir", fake_resolve)
    reports = []
    load = handler(demo, "load_clicked")
    panel = load("4_25", 8192.0, "q4", progress=lambda fraction, desc: reports.append(desc))
    assert seen["repo"] == "someone/model-exl2" and seen["branch"] == "4_25"
    assert seen["context_tokens"] == 8192 and seen["cache_mode"] == "q4"
    assert engine.loads == [
        {"model_dir": "/models/sc2-4_25", "max_seq_len": 8192, "cache_mode": "q4"}
    ]
    assert any("0.5 of 1.0 GB" in text for text in reports)
    assert any("Loading layers: 3 of 3" in text for text in reports)
    assert "ready" in panel[2] and "9.8 GB" in panel[2]
    limits = {fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert limits == {6}


def test_start_up_load_runs_in_the_background_and_shows_its_progress(monkeypatch):
    engine = FakeEngine(loaded=False, max_concurrency=3)
    config = AppConfig(branch="4_25", load_at_start=True)
    loader = ModelLoader(engine, config)
    demo = app.build_demo(engine, config, loader)
    downloading, release = threading.Event(), threading.Event()

    def slow_resolve(**kwargs):
        kwargs["on_progress"](DownloadProgress(10**9, 4 * 10**9, 1, 4, 1e8))
        downloading.set()
        assert release.wait(WAIT_S)
        return Path("/models/sc2-4_25")

    monkeypatch.setattr(loader_module, "resolve_model_dir", slow_resolve)
    thread = loader.load_in_background()
    assert downloading.wait(WAIT_S)
    panel = handler(demo, "refresh_model_panel")("4_25", 4096, "fp16")
    assert "Downloading: 1.0 of 4.0 GB, 1 of 4 files, 100 MB/s" in panel[2]
    release.set()
    thread.join(WAIT_S)
    assert engine.loads[0]["model_dir"] == "/models/sc2-4_25"
    assert engine.status.state == "ready"
    assert "ready" in handler(demo, "refresh_model_panel")("4_25", 4096, "fp16")[2]
    limits = {fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert limits == {3}


def test_gpu_events_start_at_one_job_until_a_model_is_loaded():
    demo = app.build_demo(FakeEngine(loaded=False))
    gpu_fns = [fn for fn in demo.fns.values() if fn.concurrency_id == app.GPU_GROUP]
    assert {fn.name for fn in gpu_fns} == {"respond", "generate"}
    assert {fn.concurrency_limit for fn in gpu_fns} == {1}


def test_load_without_a_gpu_answers_with_the_cuda_message():
    demo = app.build_demo(FakeEngine(gpu=None, loaded=False))
    with pytest.raises(gr.Error) as raised:
        handler(demo, "load_clicked")("auto", 4096, "fp16", progress=lambda *a, **k: None)
    assert raised.value.message == NO_GPU_MESSAGE


def test_sampling_sliders_are_built_from_the_settings_fields():
    demo = app.build_demo(FakeEngine())
    sliders = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    for spec in FIELDS:
        slider = sliders[spec.label]
        assert (slider.minimum, slider.maximum, slider.step) == (
            spec.minimum,
            spec.maximum,
            spec.step,
        )
        assert slider.value == spec.default


# ---- configuration ------------------------------------------------------------------------------


def test_flags_override_env_vars_which_override_defaults():
    env = {"SC2_CONTEXT": "8192", "SC2_CACHE_MODE": "q4", "GRADIO_SERVER_PORT": "9000"}
    config = parse_config(["--cache-mode", "q8"], env)
    assert (config.context, config.cache_mode, config.port) == (8192, "q8", 9000)
    assert parse_config([], {}) == AppConfig()
    assert parse_config([], {"SPACE_ID": "me/space"}).host == "0.0.0.0"


def test_start_up_loads_only_when_a_model_is_named():
    assert not parse_config([], {}).load_at_start
    assert parse_config(["--branch", "5_0"], {}).load_at_start
    assert parse_config([], {"SC2_MODEL_DIR": "/models/sc2"}).load_at_start


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
    ]:
        assert flag in help_text and f"env {env};" in help_text
    assert "default: 4096" in help_text and "default: 32" in help_text

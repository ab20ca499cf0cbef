"""The engine in its own process, on CPU: a scripted backend behind the real pipe, client and app.

The same crash, restart and routing code serves the GPU (tests/web/test_reliability_gpu.py runs the
real engine through it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from engine import api
from engine.api import Finished, GenerationRequest, TextDelta
from engine.client import EngineProcess
from engine.pool import PAGE_TOKENS, EnginePool, page_keys
from starcoder2.errors import GenerationFailed
from starcoder2.prompt import prompt_segments
from starcoder2.settings import SamplingSettings
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import serve
from tests.fakes.tiny_starcoder2 import write_tokenizer
from tests.web.test_reliability import until
from web.config import AppConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 15
SCRIPTED = "tests.fakes.fake_backend:ScriptedBackend"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A folder with a tokenizer, which is all the scripted backend and the edge need."""
    folder = tmp_path_factory.mktemp("scripted")
    write_tokenizer(folder)
    return folder


def started(model_dir: Path, **options) -> EngineProcess:
    engine = EngineProcess(backend=SCRIPTED, options=options)
    engine.load(str(model_dir), max_seq_len=2048)
    return engine


def request(engine, text: str = "Hi", tokens: int = 200) -> GenerationRequest:
    segments = prompt_segments([{"role": "user", "content": text}])
    settings = SamplingSettings(max_new_tokens=tokens)
    return GenerationRequest(tuple(engine.encode(segments)), settings, tuple(segments))


def test_a_reply_streams_from_the_engine_process_and_a_cancel_reaches_it(model_dir):
    engine = started(model_dir, chunks=["tok "] * 500, step_s=0.01)
    try:
        events = list(engine.stream(request(engine, tokens=5)))
        assert [type(event) for event in events] == [TextDelta] * 5 + [Finished]
        assert events[-1].text == "tok " * 5
        stream = engine.stream(request(engine, tokens=500))
        next(stream)
        assert engine._call("running_jobs") == 1
        stream.close()
        assert until(lambda: engine._call("running_jobs") == 0, WAIT_S)  # within a step or two
    finally:
        engine.close()
    assert not engine._process.is_alive()


def test_errors_in_the_engine_process_arrive_as_their_own_kind(model_dir):
    engine = started(model_dir)
    try:
        too_long = request(engine, "x " * 3000, tokens=8)
        with pytest.raises(Exception, match="too long") as raised:
            list(engine.stream(too_long))
        assert type(raised.value).__name__ == "ContextTooLong"
    finally:
        engine.close()


def test_an_engine_process_that_does_not_start_in_time_is_stopped_not_left_behind():
    before = set(multiprocessing.active_children())
    with pytest.raises(GenerationFailed, match="did not start within"):
        EngineProcess(backend=SCRIPTED, start_timeout_s=0.001)
    assert set(multiprocessing.active_children()) - before == set()


def test_killing_the_engine_process_ends_every_reply_within_a_second_and_it_comes_back(
    model_dir,
):
    engine = EngineProcess(backend=SCRIPTED, options={"chunks": ["tok "] * 500, "step_s": 0.02})
    with contextlib.closing(engine), serve(engine) as (url, web):
        engine.load(str(model_dir), max_seq_len=2048)
        web.admission.set_slots(engine.status.max_concurrency)
        jobs = [Client(url, verbose=False).submit(f"{n}", api_name="/generate") for n in range(8)]
        assert all(next(iter(job)).startswith("tok") for job in jobs)
        os.kill(engine.pid, signal.SIGKILL)
        killed = time.perf_counter()
        for job in jobs:
            with pytest.raises(AppError, match=r"engine process stopped \(exit code -9\)"):
                job.result(timeout=WAIT_S)
            assert time.perf_counter() - killed < 1.0
        assert httpx.get(f"{url}health").status_code in (200, 503)  # the page is still up
        assert until(lambda: httpx.get(f"{url}health").json()["state"] == "ready", WAIT_S)
        assert engine.restarts == 1 and engine.status.max_seq_len == 2048  # reloaded as before
        assert Client(url, verbose=False).predict("After.", max_new_tokens=3, api_name="/generate")


def test_the_web_process_imports_neither_torch_nor_exllamav2(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from engine.client import EngineProcess
from web.server import build_app

if __name__ == "__main__":  # an engine process re-imports this file
    engine = EngineProcess()  # the real engine, in its own process: it finds no GPU here
    web = build_app(engine)
    assert engine.gpu_info() is None and engine.pid is not None
    web.demo.close()
    engine.close()
    leaked = [name for name in ("torch", "exllamav2") if name in sys.modules]
    assert not leaked, f"imported in the web process: {{leaked}}"
    print("clean")
"""
    script = tmp_path / "web_process.py"  # a file: an engine process re-imports the main module
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("clean")


# ---- several engines ----------------------------------------------------------------------------


def ids(first: int, pages: int) -> tuple[int, ...]:
    return tuple(range(first, first + pages * PAGE_TOKENS))


def test_new_conversations_go_to_the_least_loaded_engine_and_follow_ups_to_their_own():
    gate = threading.Event()
    engines = [FakeEngine(["a", "b"], gate=gate), FakeEngine(["a", "b"], gate=gate)]
    pool = EnginePool(engines)
    settings = SamplingSettings(max_new_tokens=2)
    first = pool.stream(GenerationRequest(ids(0, 2), settings))
    next(first)
    second = pool.stream(GenerationRequest(ids(10_000, 2), settings))
    next(second)
    assert pool.running == [1, 1]  # two new conversations: one on each GPU
    follow_up = pool.stream(GenerationRequest(ids(0, 3), settings))  # shares 2 pages with first
    next(follow_up)
    assert pool.running == [2, 1] and len(engines[0].calls) == 2
    gate.set()
    for stream in (first, second, follow_up):
        list(stream)
    assert pool.running == [0, 0]
    assert pool.status.max_concurrency == sum(e.max_concurrency for e in engines)


def test_a_follow_up_goes_elsewhere_when_its_engine_is_full():
    gate = threading.Event()
    engines = [FakeEngine(["a", "b"], gate=gate, max_concurrency=1) for _ in range(2)]
    pool = EnginePool(engines)
    settings = SamplingSettings(max_new_tokens=2)
    busy = pool.stream(GenerationRequest(ids(0, 2), settings))
    next(busy)
    elsewhere = pool.stream(GenerationRequest(ids(0, 3), settings))
    next(elsewhere)
    assert pool.running == [1, 1]
    gate.set()
    list(busy), list(elsewhere)


def test_the_pools_status_adds_up_places_and_keeps_how_each_engine_runs():
    engines = [FakeEngine(max_concurrency=n) for n in (3, 5)]
    for engine in engines:
        engine._status = dataclasses.replace(
            engine.status, decode="decode: CUDA graphs for 1–8 jobs", attention="flash, paged"
        )
    status = EnginePool(engines).status
    assert status.max_concurrency == 8 and status.message == "2 of 2 engines serving."
    assert status.decode == "decode: CUDA graphs for 1–8 jobs"
    assert status.attention == "flash, paged"


def test_page_keys_name_whole_pages_only_and_chain_them():
    assert page_keys(range(PAGE_TOKENS - 1)) == []
    two = page_keys(range(2 * PAGE_TOKENS + 5))
    assert len(two) == 2 and page_keys(range(PAGE_TOKENS)) == two[:1]
    assert page_keys([7] * PAGE_TOKENS + list(range(PAGE_TOKENS)))[1] != two[1]


def test_when_one_engine_process_dies_the_other_keeps_serving(model_dir):
    options = {"chunks": ["tok "] * 500, "step_s": 0.02, "load_s": 1.5}  # a reload takes a while
    engines = [EngineProcess(backend=SCRIPTED, options=options) for _ in range(2)]
    pool = EnginePool(engines)
    try:
        pool.load(str(model_dir), max_seq_len=2048)
        streams = [pool.stream(request(pool, f"conversation {n}")) for n in range(4)]
        for stream in streams:
            next(stream)
        assert pool.running == [2, 2]
        os.kill(engines[0].pid, signal.SIGKILL)
        outcomes = []
        for stream in streams:
            try:
                for _ in range(5):
                    next(stream)
                outcomes.append("served")
            except GenerationFailed:
                outcomes.append("failed")
        assert sorted(outcomes) == ["failed", "failed", "served", "served"]
        assert pool.health == "degraded"  # still serving, on fewer GPUs
        assert until(lambda: pool.health == "ready", WAIT_S)
        for stream in streams:
            stream.close()
    finally:
        pool.close()


def test_the_server_holds_replies_for_every_gpus_engine():
    assert AppConfig(max_jobs=8, queue_size=32).places == 40
    assert AppConfig(max_jobs=8, queue_size=32, gpus=("0", "1")).places == 48


def test_gpus_are_parsed_and_counted_among_the_visible_ones(capsys):
    assert parse_config([], {}).gpus is None
    assert parse_config(["--gpus", "0,1"], {}).gpus == ("0", "1")
    assert parse_config([], {"SC2_GPUS": "1"}).gpus == ("1",)
    with pytest.raises(SystemExit):
        parse_config(["--gpus", "0,0"], {})
    assert "--gpus must be distinct GPU numbers" in capsys.readouterr().err
    assert api.device_names(None, {}) == [None]
    assert api.device_names(("0", "1"), {}) == ["0", "1"]
    assert api.device_names(("1",), {"CUDA_VISIBLE_DEVICES": "4,5"}) == ["5"]
    with pytest.raises(SystemExit, match="shows only 2"):
        api.device_names(("2",), {"CUDA_VISIBLE_DEVICES": "4,5"})


def test_a_failed_graph_capture_reaches_the_web_side_with_its_remedy():
    from engine.wire import Failure
    from starcoder2.errors import GraphCaptureFailed

    message = "Capturing … failed (RuntimeError: x); start with --no-cuda-graphs"
    error = Failure.of(GraphCaptureFailed(message)).exception()
    assert isinstance(error, GraphCaptureFailed) and "--no-cuda-graphs" in str(error)


def test_a_call_off_the_backends_list_is_refused_and_the_engine_serves_on(model_dir):
    engine = EngineProcess(backend=SCRIPTED)
    with contextlib.closing(engine):
        engine.load(str(model_dir), max_seq_len=2048)
        for name in ("close", "__init__", "submit", "_loop"):
            with pytest.raises(GenerationFailed, match=f"The engine has no call '{name}'"):
                engine._call(name)
        assert engine.health == "ready" and engine._call("running_jobs") == 0


def test_an_engine_process_that_cannot_be_started_raises_its_own_error(monkeypatch):
    from multiprocessing.context import SpawnProcess

    def refuse(process) -> None:
        raise OSError("Resource temporarily unavailable (no more processes)")

    monkeypatch.setattr(SpawnProcess, "start", refuse)
    with pytest.raises(OSError, match="no more processes"):
        EngineProcess(backend=SCRIPTED)

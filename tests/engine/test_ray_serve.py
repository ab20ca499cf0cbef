"""Engines as Ray Serve replicas on a local Ray cluster (CPU, fake GPUs, scripted engines): the
chat and the OpenAI API in front of two replicas, conversation affinity, a replica killed or
stalled mid-reply, and cancels."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the Ray path needs requirements-ray.txt")

from engine.api import GenerationRequest  # noqa: E402
from engine.ray_serve import RayEngines, deploy  # noqa: E402
from starcoder2.errors import GenerationFailed  # noqa: E402
from starcoder2.settings import FIELDS, SamplingSettings  # noqa: E402
from tests.fakes.serving import serve  # noqa: E402
from tests.fakes.tiny_starcoder2 import write_tokenizer  # noqa: E402
from tests.web.test_reliability import until  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPTED = "tests.fakes.fake_backend:ScriptedBackend"
WAIT_S = 30
DEFAULTS = [spec.default for spec in FIELDS]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with two fake GPUs: Ray places one replica on each."""
    ray.init(
        num_cpus=4,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield
    from ray import serve as ray_serve

    ray_serve.shutdown()
    ray.shutdown()


@pytest.fixture
def replicas(cluster, tmp_path):
    """Two scripted replicas; each records what it serves under tmp_path (a file per process)."""
    model = tmp_path / "model"
    model.mkdir()
    write_tokenizer(model)
    records = tmp_path / "records"
    records.mkdir()
    handle = deploy(
        model_dir=str(model),
        max_seq_len=4096,
        replicas=2,
        max_jobs=8,
        backend=SCRIPTED,
        options={"chunks": ["tok "] * 60, "step_s": 0.02, "record_to": str(records)},
        stall_timeout_s=2.0,
        health_check_s=0.5,
    )
    engines = RayEngines(handle, poll_s=0.25)
    assert until(lambda: engines.status.state == "ready" and engines.health == "ready", WAIT_S)
    yield engines, records
    engines.close()


def served(records: Path) -> dict[int, list[dict]]:
    """What each replica process recorded, by its pid."""
    return {
        int(path.stem): [json.loads(line) for line in path.read_text().splitlines()]
        for path in records.glob("*.jsonl")
    }


def replica_of(records: Path, first_ids: list[int]) -> int | None:
    """The pid of the replica that was asked a prompt starting with first_ids."""
    for pid, lines in served(records).items():
        if any(line.get("submitted", [])[: len(first_ids)] == first_ids for line in lines):
            return pid
    return None


def drain_all(streams: list, since: float) -> list[tuple[str, float]]:
    """Read every stream to its end at once: ("finished" or the error, seconds after `since`)."""
    outcomes: list[tuple[str, float]] = [("", 0.0)] * len(streams)

    def drain(index: int) -> None:
        try:
            list(streams[index])
            text = "finished"
        except GenerationFailed as error:
            text = str(error)
        outcomes[index] = (text, time.perf_counter() - since)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    return outcomes


def long_prompt(engines: RayEngines, seed: int) -> list[int]:
    """About 300 ids: more than one cache page, so the conversation has a key."""
    return [(seed * 7919 + i * 31) % 900 + 30 for i in range(300)]


def ask(engines: RayEngines, ids: list[int], tokens: int = 10):
    return engines.stream(GenerationRequest(tuple(ids), SamplingSettings(max_new_tokens=tokens)))


def test_two_replicas_serve_sixteen_requests_from_the_chat_and_the_api_at_once(replicas):
    engines, records = replicas
    assert engines.status.max_concurrency == 16  # 8 places on each of two replicas
    openai = pytest.importorskip("openai")
    results: dict[str, str] = {}
    with serve(engines) as (url, web):
        api = openai.OpenAI(base_url=f"{url}v1", api_key="none", max_retries=0)

        def by_api(n: int) -> None:
            answer = api.completions.create(
                model="starcoder2", prompt=f"def f{n}(x):" * 200, max_tokens=12
            )
            results[f"api {n}"] = answer.choices[0].text

        def by_chat(n: int) -> None:
            question = [{"role": "user", "content": f"Question {n}. " * 100}]
            updates = list(web.fn("respond")(question, "", "", *DEFAULTS, None))
            results[f"chat {n}"] = updates[-1][0][-1]["content"]

        threads = [threading.Thread(target=by_api, args=(n,)) for n in range(8)]
        threads += [threading.Thread(target=by_chat, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
    assert len(results) == 16
    assert all(text.startswith("tok tok") for text in results.values()), results
    per_replica = {pid: len(lines) for pid, lines in served(records).items()}
    assert len(per_replica) == 2 and sum(per_replica.values()) == 16, per_replica


def test_follow_up_turns_reach_the_replica_holding_their_conversation(replicas):
    engines, records = replicas
    firsts = [long_prompt(engines, seed) for seed in range(8)]
    for ids in firsts:
        list(ask(engines, ids))
    homes = {seed: replica_of(records, ids) for seed, ids in enumerate(firsts)}
    assert len(set(homes.values())) == 2, homes  # new conversations spread over both
    for turn in range(3):
        for seed, ids in enumerate(firsts):
            follow_up = [*ids, 5, 6, 7, turn, seed]  # the same first page, then more
            list(ask(engines, follow_up))
            asked = [
                pid
                for pid, lines in served(records).items()
                if any(line.get("submitted") == follow_up for line in lines)
            ]
            assert asked == [homes[seed]], (seed, turn, asked, homes[seed])


def test_a_replica_killed_mid_reply_fails_its_replies_within_two_seconds_and_the_other_serves(
    replicas,
):
    engines, records = replicas
    streams = [ask(engines, long_prompt(engines, 100 + n), tokens=60) for n in range(6)]
    for stream in streams:
        next(stream)  # every reply is under way
    victim = next(iter(served(records)))
    os.kill(victim, signal.SIGKILL)
    killed = time.perf_counter()
    outcomes = drain_all(streams, since=killed)
    lost = [(text, after) for text, after in outcomes if text != "finished"]
    assert lost and all("replica serving this reply stopped" in text for text, _ in lost), outcomes
    assert all(after < 2.0 for _, after in lost), outcomes  # each told within two seconds
    assert any(text == "finished" for text, _ in outcomes)  # the other replica's went on
    started = time.perf_counter()
    fresh = list(ask(engines, list(range(40, 60))))  # while Ray starts a new replica
    assert fresh[-1].text.startswith("tok") and time.perf_counter() - started < 5
    assert until(lambda: engines.health == "ready" and engines.faults.restarts >= 1, WAIT_S)


def test_a_stalled_replica_is_found_by_its_health_check_and_replaced(replicas):
    engines, records = replicas
    streams = [ask(engines, long_prompt(engines, 200 + n), tokens=60) for n in range(6)]
    for stream in streams:
        next(stream)
    victim = next(iter(served(records)))
    (records / f"freeze-{victim}").touch()  # its steps stop, as on a stuck GPU
    frozen = time.perf_counter()
    outcomes = drain_all(streams, since=frozen)
    # The stall timeout (2 s) and a failed health check (every 0.5 s) end the replica.
    texts = [text for text, _ in outcomes]
    assert "finished" in texts and any(text != "finished" for text in texts), outcomes
    assert all(after < 15 for _, after in outcomes), outcomes
    assert until(lambda: victim not in _live_pids(), WAIT_S)  # Ray replaced it
    assert list(ask(engines, list(range(60, 80))))[-1].text.startswith("tok")


def test_an_api_client_hanging_up_cancels_its_job_on_the_replica_within_a_second(replicas):
    engines, records = replicas
    with serve(engines) as (url, _):
        body = {"prompt": "Count. " * 80, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{url}v1/completions", json=body, timeout=WAIT_S) as reply:
            next(reply.iter_lines())  # the first chunk, then the client leaves
        left = time.perf_counter()
        cancelled = lambda: any(  # noqa: E731
            "cancelled" in line for lines in served(records).values() for line in lines
        )
        assert until(cancelled, 5)
        assert time.perf_counter() - left < 1.0


def test_the_app_with_a_ray_address_serves_its_chat_and_metrics_from_the_replicas(
    replicas, monkeypatch, tmp_path
):
    import app
    from engine import ray_serve
    from web.config import parse_config

    model = tmp_path / "app-model"
    model.mkdir()
    write_tokenizer(model)
    monkeypatch.setattr(ray_serve, "REAL_ENGINE", SCRIPTED)  # the cluster's "GPUs" are fake
    flags = ["--ray-address", "auto", "--ray-replicas", "2", "--model-dir", str(model)]
    config = parse_config(flags, {})
    engines = app.start_engines(config)
    try:
        assert until(lambda: engines.health == "ready", WAIT_S)
        with serve(engines, config) as (url, web):
            question = [{"role": "user", "content": "Through Ray?"}]
            answer = list(web.fn("respond")(question, "", "", *DEFAULTS, None))[-1][0][-1]
            # 64 pages on each of two replicas, once both have reported.
            both = lambda: "sc2_kv_cache_pages 128" in httpx.get(f"{url}metrics").text  # noqa: E731
            assert until(both, WAIT_S)
        assert answer["content"].startswith("Hello")  # the scripted engine's default reply
        assert web.admission.slots == 16  # 8 places on each
        replicas_before = {report.replica for _, report in engines._reports.values()}
        again = app.start_engines(config)  # a front started again with the same settings
        assert until(lambda: again.health == "ready", WAIT_S)
        replicas_after = {report.replica for _, report in again._reports.values()}
        assert replicas_after <= replicas_before  # the same replicas: nothing was reloaded
        again.close()
    finally:
        engines.close()


def _live_pids() -> set[int]:
    return {int(path.name) for path in Path("/proc").iterdir() if path.name.isdigit()}


def test_with_no_replica_running_the_app_says_so_and_refuses_at_once(monkeypatch):
    from engine import ray_serve
    from starcoder2.errors import NotReady

    class NoReplica:
        """A deployment handle whose every replica is gone (Ray would hold the call)."""

        def __getattr__(self, name):
            raise AssertionError(f"{name} was called with no replica running")

    monkeypatch.setattr(ray_serve, "_running_replicas", lambda: 0)
    engines = RayEngines(NoReplica(), poll_s=60)  # type: ignore[arg-type]
    try:
        assert engines.health == "restarting" and engines.status.state == "restarting"
        assert "Ray is starting them" in engines.status.message
        assert engines.gpu_info() is None and engines.cache_pages() == (0, 0)
        with pytest.raises(NotReady, match="No engine replica is running"):
            engines.encode([])
    finally:
        engines.close()

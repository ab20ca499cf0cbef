"""The app over HTTP vs the engine alone: streaming clients on /generate, 1, 4 and 8 at a time.

Usage (GPU): python bench/app_bench.py --model DIR --out bench/results/app-4_25.json
Three variants in one run, each with the same clients and prompt:
- "engine": the engine alone, in this process (no web server);
- "app, engine in the web process": the previous path, the engine's thread beside Gradio's;
- "app, engine process": the engine in its own process (engine.client), as the app runs now;
- "OpenAI API, engine process": the same, streaming /v1/chat/completions.
Clients run in their own process, as real clients do, and speak HTTP + server-sent events to
/gradio_api/call/generate, so the numbers are the server's, not a client library's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import in_threads  # noqa: E402

TEXT = "Write a Python function that merges two sorted lists. " * 4
NEW_TOKENS = 128
CLIENTS = (1, 4, 8)


def clients_main(url: str, clients: int, route: str = "generate") -> None:
    """Client process: `clients` concurrent streams over HTTP; prints their timings."""
    import httpx

    from starcoder2.settings import FIELDS

    values = {spec.name: spec.default for spec in FIELDS} | {"max_new_tokens": NEW_TOKENS}
    data = [TEXT, *(values[spec.name] for spec in FIELDS), None]
    chat = {
        "messages": [{"role": "user", "content": TEXT}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
    }

    def openai_one(_):
        with httpx.Client(base_url=url, timeout=120) as http:
            started, first = time.perf_counter(), None
            with http.stream("POST", "/v1/chat/completions", json=chat) as stream:
                for line in stream.iter_lines():
                    if first is None and '"content"' in line:
                        first = time.perf_counter()
            return {"ttft_s": first - started, "stream_s": time.perf_counter() - first}

    def one(_):
        if route == "openai":
            return openai_one(_)
        with httpx.Client(base_url=url, timeout=120) as http:
            started = time.perf_counter()
            event = http.post("/gradio_api/call/generate", json={"data": data}).json()["event_id"]
            first = None
            with http.stream("GET", f"/gradio_api/call/generate/{event}") as stream:
                for line in stream.iter_lines():
                    if first is None and line.startswith("data:") and line.strip() != 'data: [""]':
                        first = time.perf_counter()
            return {"ttft_s": first - started, "stream_s": time.perf_counter() - first}

    print("RESULT " + json.dumps(in_threads(clients, one)))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(ttfts: list[float], rates: list[float], tokens: int, wall: float) -> dict:
    return {
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "tok_s_per_client": statistics.mean(rates),
        "aggregate_tok_s": tokens / wall,
    }


class Recorded:
    """An EngineClient that keeps every Finished event (the tokens each reply really had)."""

    def __init__(self, client) -> None:
        self.client = client
        self.finals: list = []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def stream(self, request):
        from engine.api import Finished

        for event in self.client.stream(request):
            if isinstance(event, Finished):
                self.finals.append(event)
            yield event


def engine_alone(engine, clients: int) -> dict:
    """The same job straight on the engine, timed the way a client sees it (first text shown)."""
    from engine.api import Finished, GenerationRequest
    from starcoder2.prompt import prompt_segments
    from starcoder2.settings import SamplingSettings

    segments = prompt_segments([{"role": "user", "content": TEXT}])
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    request = GenerationRequest(tuple(engine.encode(segments)), settings, tuple(segments))

    def one(_):
        started, first = time.perf_counter(), None
        for event in engine.stream(request):
            if first is None and event.text:
                first = time.perf_counter()
            if isinstance(event, Finished):
                end = time.perf_counter()
                return {
                    "ttft_s": first - started,
                    "stream_s": end - first,
                    "tokens": event.new_tokens,
                }
        raise RuntimeError("stream ended without a Finished event")

    started = time.perf_counter()
    alone = in_threads(clients, one)
    wall = time.perf_counter() - started
    rates = [(a["tokens"] - 1) / a["stream_s"] for a in alone if a["stream_s"] > 0]
    return summary([a["ttft_s"] for a in alone], rates, sum(a["tokens"] for a in alone), wall)


def through_the_app(client, clients: int, route: str = "generate") -> dict:
    """`clients` HTTP clients in another process against the app serving `client`."""
    from web.config import AppConfig
    from web.server import build_app

    recorded = Recorded(client)
    web = build_app(recorded, AppConfig(queue_size=64, max_jobs=16, rate_limit=0))
    options = {**web.launch_options(), "server_name": "127.0.0.1", "server_port": None}
    _, url, _ = web.demo.launch(**options, prevent_thread_lock=True, quiet=True)
    command = [sys.executable, __file__, "--client", url, "--route", route]
    try:
        # Warm-up: a new server's first request pays one-off costs (first event, first route).
        subprocess.run([*command, "--clients", "1"], capture_output=True, check=True)
        recorded.finals.clear()
        started = time.perf_counter()
        done = subprocess.run(
            [*command, "--clients", str(clients)], capture_output=True, text=True, check=True
        )
        wall = time.perf_counter() - started
    finally:
        web.demo.close()
    timings = json.loads(done.stdout.split("RESULT ", 1)[1])
    tokens = statistics.mean(f.new_tokens for f in recorded.finals)
    rates = [(tokens - 1) / t["stream_s"] for t in timings if t["stream_s"] > 0]
    total = sum(f.new_tokens for f in recorded.finals)
    return summary([t["ttft_s"] for t in timings], rates, total, wall)


def scripted_rows() -> dict:
    """The web process's overhead on CPU: the same scripted pace in-process and across the pipe."""
    from engine.client import EngineProcess
    from tests.fakes.fake_engine import FakeEngine
    from tests.fakes.tiny_starcoder2 import write_tokenizer

    step_s, tokens = 0.01, NEW_TOKENS
    rows: dict = {"gpu": None, "engine": f"scripted, {1 / step_s:.0f} tokens/s per reply"}
    local = FakeEngine(["tok "] * tokens, chunk_delay_s=step_s, max_concurrency=16)
    rows["app, engine in the web process"] = {str(n): through_the_app(local, n) for n in CLIENTS}
    folder = Path(tempfile.mkdtemp(prefix="scripted-"))
    write_tokenizer(folder)  # the edge tokenizes with it, as with a real model
    process = EngineProcess(
        backend="tests.fakes.fake_backend:ScriptedBackend",
        options={"chunks": ["tok "] * tokens, "step_s": step_s, "max_jobs": 16},
    )
    try:
        process.load(str(folder), max_seq_len=4096)
        rows["app, engine process"] = {str(n): through_the_app(process, n) for n in CLIENTS}
    finally:
        process.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--route", default="generate", help=argparse.SUPPRESS)
    parser.add_argument(
        "--scripted",
        action="store_true",
        help="no GPU: scripted engines at 100 tokens/s, in the web process and in an engine "
        "process, to measure what the process boundary itself costs",
    )
    args = parser.parse_args()
    if args.client:
        clients_main(args.client, args.clients, args.route)
        return
    if args.scripted:
        rows = scripted_rows()
        print(json.dumps(rows, indent=1))
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
        return

    from engine.client import EngineProcess
    from engine.inproc import InProcessEngine

    engine = InProcessEngine(max_jobs=16)
    engine.load(str(args.model), max_seq_len=4096)
    gpu = engine.gpu_info()
    rows: dict = {"gpu": gpu.name if gpu else None, "new_tokens": NEW_TOKENS}
    engine_alone(engine, 1)  # warm-up
    try:
        rows["engine"] = {str(n): engine_alone(engine, n) for n in CLIENTS}
        rows["app, engine in the web process"] = {
            str(n): through_the_app(engine, n) for n in CLIENTS
        }
    finally:
        engine.close()
    process = EngineProcess(max_jobs=16)
    try:
        process.load(str(args.model), max_seq_len=4096)
        rows["app, engine process"] = {str(n): through_the_app(process, n) for n in CLIENTS}
        rows["OpenAI API, engine process"] = {
            str(n): through_the_app(process, n, "openai") for n in CLIENTS
        }
    finally:
        process.close()
    for n in map(str, CLIENTS):
        alone = rows["engine"][n]
        for variant in (
            "app, engine in the web process",
            "app, engine process",
            "OpenAI API, engine process",
        ):
            row = rows[variant][n]
            row["tok_s_vs_engine"] = row["tok_s_per_client"] / alone["tok_s_per_client"]
            row["ttft_overhead_p50_s"] = row["ttft_p50_s"] - alone["ttft_p50_s"]
        print(n, json.dumps({k: rows[k][n] for k in rows if isinstance(rows[k], dict)}), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""The app over HTTP vs the engine alone: streaming clients on /generate, 1, 4 and 8 at a time.

Usage (GPU): python bench/app_bench.py --model DIR --out app.json
Clients run in their own process, as real clients do, and speak HTTP + server-sent events to
/gradio_api/call/generate, so the numbers are the server's, not a client library's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import in_threads  # noqa: E402

TEXT = "Write a Python function that merges two sorted lists. " * 4
NEW_TOKENS = 128


def clients_main(url: str, clients: int) -> None:
    """Client process: `clients` concurrent streams over Gradio's HTTP API; prints their timings."""
    import httpx

    from model.settings import FIELDS

    values = {spec.name: spec.default for spec in FIELDS} | {"max_new_tokens": NEW_TOKENS}
    data = [TEXT, *(values[spec.name] for spec in FIELDS), None]

    def one(_):
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


def engine_alone(stream, segments, settings) -> dict:
    """The same job straight on the engine, timed the way a client sees it (first text shown)."""
    from model.engine import Finished

    started = time.perf_counter()
    first = None
    for event in stream(segments, settings):
        if first is None and event.text:
            first = time.perf_counter()
        if isinstance(event, Finished):
            end = time.perf_counter()
            return {"ttft_s": first - started, "stream_s": end - first, "tokens": event.new_tokens}
    raise RuntimeError("stream ended without a Finished event")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        clients_main(args.client, args.clients)
        return

    import app
    from model.engine import Engine, Finished
    from model.prompt import prompt_segments
    from model.settings import SamplingSettings

    engine = Engine(max_jobs=16)
    engine.load(str(args.model), max_seq_len=4096)
    finals: list[Finished] = []
    original = engine.stream

    def recording(segments, settings):
        for event in original(segments, settings):
            if isinstance(event, Finished):
                finals.append(event)
            yield event

    engine.stream = recording
    demo = app.build_demo(engine, app.AppConfig(queue_size=64))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    segments = prompt_segments([{"role": "user", "content": TEXT}])
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    list(original(segments, settings))  # warm-up
    rows = {}
    try:
        for clients in (1, 4, 8):
            finals.clear()
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "--client", url, "--clients", str(clients)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            wall = time.perf_counter() - started
            timings = json.loads(done.stdout.split("RESULT ", 1)[1])
            tokens = statistics.mean(f.new_tokens for f in finals)
            app_ttft = [t["ttft_s"] for t in timings]
            app_row = {
                "ttft_p50_s": statistics.median(app_ttft),
                "ttft_p95_s": percentile(app_ttft, 0.95),
                "tok_s_per_client": statistics.mean(
                    (tokens - 1) / t["stream_s"] for t in timings if t["stream_s"] > 0
                ),
                "aggregate_tok_s": sum(f.new_tokens for f in finals) / wall,
            }
            started = time.perf_counter()
            alone = in_threads(clients, lambda _: engine_alone(original, segments, settings))
            wall = time.perf_counter() - started
            engine_ttft = [a["ttft_s"] for a in alone]
            engine_row = {
                "ttft_p50_s": statistics.median(engine_ttft),
                "ttft_p95_s": percentile(engine_ttft, 0.95),
                "tok_s_per_client": statistics.mean(
                    (a["tokens"] - 1) / a["stream_s"] for a in alone if a["stream_s"] > 0
                ),
                "aggregate_tok_s": sum(a["tokens"] for a in alone) / wall,
            }
            rows[str(clients)] = {"app": app_row, "engine": engine_row}
            print(clients, json.dumps(rows[str(clients)]), flush=True)
    finally:
        demo.close()
        engine.close()
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

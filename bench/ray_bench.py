"""Through Ray Serve vs an engine process on this machine, with the scripted engine (CPU).

Usage: python bench/ray_bench.py --out bench/results/ray-scripted-cpu.json
The same scripted engine (64 chunks, one per 10 ms step, up to 16 jobs in a step) serves
`clients` callers at once, each asking REQUESTS replies in turn, through the EngineClient the
web side uses: an engine process (engine.client), or one Ray Serve replica (engine.ray_serve) on
a local Ray cluster. Reported: replies per second in all, and the time to the first text and to
the end of a reply (median, p90), so what Ray adds shows beside what the engine takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import in_threads  # noqa: E402

SCRIPTED = "tests.fakes.fake_backend:ScriptedBackend"
OPTIONS = {"chunks": ["tok "] * 64, "step_s": 0.01, "max_jobs": 16}
CLIENTS = (1, 8, 32)
REQUESTS = 8  # per client


def one_reply(engine, n: int) -> dict:
    from engine.api import Finished, GenerationRequest
    from starcoder2.settings import SamplingSettings

    ids = tuple(range(20 + n % 7, 320 + n % 7))  # a page and more: Ray routes it by its key
    request = GenerationRequest(ids, SamplingSettings(max_new_tokens=64))
    started, first = time.perf_counter(), None
    for event in engine.stream(request):
        if first is None:
            first = time.perf_counter()
        if isinstance(event, Finished):
            break
    return {"ttft_s": first - started, "total_s": time.perf_counter() - started}


def measure(engine) -> dict:
    rows = {}
    for clients in CLIENTS:
        one_reply(engine, 0)  # warm-up
        started = time.perf_counter()
        runs = in_threads(
            clients, lambda c: [one_reply(engine, c * REQUESTS + i) for i in range(REQUESTS)]
        )
        wall = time.perf_counter() - started
        replies = [reply for run in runs for reply in run]
        ttft = sorted(reply["ttft_s"] for reply in replies)
        total = sorted(reply["total_s"] for reply in replies)
        rows[str(clients)] = {
            "replies_per_s": len(replies) / wall,
            "ttft_ms_median": 1000 * statistics.median(ttft),
            "ttft_ms_p90": 1000 * ttft[int(0.9 * (len(ttft) - 1))],
            "reply_ms_median": 1000 * statistics.median(total),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import ray

    from engine.client import EngineProcess
    from engine.ray_serve import RayEngines, deploy
    from tests.fakes.tiny_starcoder2 import write_tokenizer

    model = Path(tempfile.mkdtemp())
    write_tokenizer(model)
    results: dict = {"options": OPTIONS, "requests_per_client": REQUESTS}
    process = EngineProcess(backend=SCRIPTED, options=OPTIONS)
    process.load(str(model), max_seq_len=4096)
    try:
        results["engine process"] = measure(process)
    finally:
        process.close()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    options = {key: value for key, value in OPTIONS.items() if key != "max_jobs"}
    handle = deploy(model_dir=str(model), max_seq_len=4096, replicas=1, max_jobs=16,
                    backend=SCRIPTED, options=options)  # fmt: skip
    engines = RayEngines(handle)
    try:
        results["Ray Serve, one replica"] = measure(engines)
    finally:
        engines.close()
        ray.shutdown()
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

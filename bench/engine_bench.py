"""Engine benchmark on a GPU: our engine vs stock exllamav2 0.3.2, one process per variant.

Usage: python bench/engine_bench.py --model /dev/shm/sc2-6_5 --out results-6_5.json

Variants: stock exllamav2 (dynamic generator, defaults: torch SDPA, unpaged without flash-attn),
stock with `no_sdpa=True` (its correct but slow attention), and ours (engine.gpu.engine.Engine:
fixes applied, paged) five ways: "ours-graph" (decode steps replayed as CUDA graphs, sampling on the
GPU, each step enqueued before the previous step's tokens are read; the default),
"ours-graph-custom-matmul" (the same with our EXL2 matmul wherever it matched exllamav2's and won
at load), "ours-graph-sync" (as ours-graph, but reading each step's tokens before enqueuing the
next), "ours-eager" (`cuda_graphs=False`: exllamav2's decode loop, our Triton decode kernel) and
"ours-previous" (eager, and one-token steps on the prefill backend, as before the kernel;
contexts only). Stock cannot read the real config key `norm_epsilon`, so it runs on a view of the
folder whose config.json also carries `layer_norm_epsilon`. Each process measures batch-1 decode
and prefill at several prompt lengths and peak VRAM; ours also measures concurrent jobs, a long
prefill arriving while others decode, and decode at a 30k-token context among other jobs against
4k. The app over HTTP: bench/app_bench.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTEXTS = (128, 512, 4096, 12288)
NEW_TOKENS = 64
MAX_SEQ_LEN = 32768
LONG_PROMPTS = (4096, 30720)  # decode among other jobs, at a common and at a 30k-token context


def bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    import torch

    source = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del source, target
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / seconds / 1e9


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of weights a decode step reads: everything but the embedding table (one row read)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                if "embed_tokens" in name:
                    continue
                meta = handle.get_slice(name)
                count = 1
                for dim in meta.get_shape():
                    count *= dim
                total += count * {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2}.get(
                    meta.get_dtype(), 1
                )
    return total


def prompt(length: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [0] + [rng.randrange(100, 1000) for _ in range(length - 1)]


# ---- stock exllamav2 ----


def stock_view(folder: Path) -> Path:
    """A folder of links to the model whose config also has `layer_norm_epsilon`."""
    view = Path(tempfile.mkdtemp(prefix="stock-"))
    for item in folder.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item)
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_epsilon"] = config["norm_epsilon"]
    (view / "config.json").write_text(json.dumps(config))
    return view


def run_stock(folder: Path, no_sdpa: bool) -> dict:
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    config = ExLlamaV2Config(str(stock_view(folder)))
    config.max_seq_len = MAX_SEQ_LEN
    config.no_sdpa = no_sdpa
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=MAX_SEQ_LEN, lazy=True)
    model.load_autosplit(cache)
    generator = ExLlamaV2DynamicGenerator(model, cache, ExLlamaV2Tokenizer(config), paged=False)

    def one(ids):
        job = ExLlamaV2DynamicJob(
            input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, stop_conditions=[],
            gen_settings=ExLlamaV2Sampler.Settings.greedy(),
        )  # fmt: skip
        generator.enqueue(job)
        while generator.num_remaining_jobs():
            for result in generator.iterate():
                if result.get("eos"):
                    final = result
        return {
            "prefill_tok_s": len(ids) / final["time_prefill"],
            "decode_tok_s": (final["new_tokens"] - 1) / final["time_generate"],
        }

    return measure_contexts(one)


# ---- ours ----


def run_ours(folder: Path, variant: str) -> dict:
    from engine.api import Finished, GenerationRequest
    from engine.gpu import attention
    from engine.inproc import InProcessEngine
    from starcoder2.settings import SamplingSettings

    if variant == "ours-previous":
        attention.decode_backend = attention.attention_backend  # type: ignore[assignment]
    if variant == "ours-graph-sync":
        from engine.gpu.generator import Generator

        Generator.look_ahead = False
    engine = InProcessEngine(
        max_jobs=16,
        cuda_graphs=variant.startswith("ours-graph"),
        custom_matmul=variant == "ours-graph-custom-matmul",
    )
    status = engine.load(str(folder), max_seq_len=MAX_SEQ_LEN)
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)

    def one(ids):
        events = engine.stream(GenerationRequest(tuple(ids), settings))
        final = [e for e in events if isinstance(e, Finished)][-1]
        return {
            "prefill_tok_s": len(ids) / final.time_to_first_token_s,
            "decode_tok_s": final.decode_tokens_per_s,
            "new_tokens": final.new_tokens,
        }

    results = measure_contexts(one)
    results["status"] = status.message
    results["decode"] = status.decode
    results["load_seconds"] = status.load_seconds
    results["cache_tokens"] = status.cache_tokens
    if variant != "ours-previous":
        results["concurrency"] = concurrency(engine)
        results["long_among_others"] = long_among_others(engine)
        results["repeatability"] = repeatability(engine)
        results["prefill_while_decoding"] = prefill_while_decoding(engine)
    engine.close()
    return results


def measure_contexts(one) -> dict:
    import torch

    one(prompt(64, 0))  # warm-up
    torch.cuda.reset_peak_memory_stats()
    rows = {}
    for length in CONTEXTS:
        rows[str(length)] = one(prompt(length, length))
    free, total = torch.cuda.mem_get_info()
    return {
        "contexts": rows,
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "used_gb": (total - free) / 1e9,
    }


def consume(engine, ids, max_new_tokens, arrivals=None):
    """Run one job to the end; returns (Finished, seconds). Appends token arrival times if asked."""
    from engine.api import Finished, GenerationRequest
    from starcoder2.settings import SamplingSettings

    started = time.perf_counter()
    request = GenerationRequest(tuple(ids), SamplingSettings(max_new_tokens=max_new_tokens))
    for event in engine.stream(request):
        if arrivals is not None:
            arrivals.append(time.perf_counter())
        if isinstance(event, Finished):
            return event, time.perf_counter() - started
    raise RuntimeError("stream ended without a Finished event")


def in_threads(count: int, work) -> list:
    results = [None] * count

    def run(i):
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def concurrency(engine) -> dict:
    """Aggregate and per-job decode speed with 1-16 jobs submitted together."""
    rows = {}
    for jobs in (1, 2, 4, 8, 16):
        started = time.perf_counter()
        done = in_threads(jobs, lambda i: consume(engine, prompt(128, 1000 + i), 128))
        wall = time.perf_counter() - started
        tokens = sum(final.new_tokens for final, _ in done)
        rows[str(jobs)] = {
            "aggregate_tok_s": tokens / wall,
            "per_job_decode_tok_s": statistics.mean(f.decode_tokens_per_s for f, _ in done),
        }
    return rows


def long_among_others(engine) -> dict:
    """Decode speed of a job with a 4k- and with a 30k-token prompt, each while 3 short jobs decode
    beside it (decode at 30k as a share of decode at 4k: flat means near 1)."""
    rows = {}
    for length in LONG_PROMPTS:
        done = in_threads(
            4,
            lambda i, length=length: consume(
                engine, prompt(length, 3000 + length) if i == 0 else prompt(128, 3000 + i), 256
            ),
        )
        final = done[0][0]
        rows[str(length)] = {
            "decode_tok_s": final.decode_tokens_per_s,
            "time_to_first_token_s": final.time_to_first_token_s,
            "new_tokens": final.new_tokens,
        }
    long, common = (rows[str(n)]["decode_tok_s"] for n in reversed(LONG_PROMPTS))
    rows["long_over_common"] = long / common
    return rows


def repeatability(engine) -> dict:
    """One greedy prompt (the default sampling is greedy) 5 times alone and 5 times among 7 other
    jobs: how many distinct replies (1 = repeatable). The random model's near-tied logits make any
    difference in summation order show within a few tokens."""

    def reply(ids):
        return consume(engine, ids, 128)[0].text

    ids = prompt(512, 4242)
    alone = [reply(ids) for _ in range(5)]
    among = [
        in_threads(8, lambda i: reply(ids if i == 0 else prompt(128, 5000 + i)))[0]
        for _ in range(5)
    ]
    return {
        "distinct_alone": len(set(alone)),
        "distinct_among_others": len(set(among)),
        "distinct_overall": len(set(alone + among)),
    }


def prefill_while_decoding(engine) -> dict:
    """7 jobs decode; a 4k-token prompt arrives. How long is each generator step meanwhile?

    Every step gives each decoding job one token, so the longest step while the newcomer's prompt
    is being ingested is the longest the 7 wait for a token. Steps are timed around exllamav2's
    `iterate()`; counting text events instead would mix in text held back for incomplete UTF-8.
    With look-ahead a step's tokens are read in the next `iterate()`, so the longest gap between
    a decoding job's text events over the same span is kept beside it: what a client sees.
    """
    single, _ = consume(engine, prompt(2048, 7), 1)  # one prefill chunk, alone
    steps = []
    iterate = engine.engine._generator.iterate

    def timed():
        started = time.perf_counter()
        result = iterate()
        steps.append((started, time.perf_counter()))
        return result

    engine.engine._generator.iterate = timed
    arrivals = [[] for _ in range(7)]
    window = []

    def decoder(i):
        return consume(engine, prompt(128, 2000 + i), 400, arrivals[i])

    def newcomer():
        deadline = time.perf_counter() + 60
        while min(len(a) for a in arrivals) < 5 and time.perf_counter() < deadline:
            time.sleep(0.005)
        window.append(time.perf_counter())
        final = consume(engine, prompt(4096, 9), 16)
        return final

    try:
        finals = in_threads(8, lambda i: decoder(i) if i < 7 else newcomer())
    finally:
        engine.engine._generator.iterate = iterate
    newcomer_final, _ = finals[7]
    start = window[0]
    end = start + newcomer_final.time_to_first_token_s
    during = [b - a for a, b in steps if b > start and a < end]
    others = [b - a for a, b in steps if b <= start or a >= end]
    pairs = [pair for times in arrivals for pair in itertools.pairwise(times)]
    gaps = [b - a for a, b in pairs if b > start and a < end]
    return {
        "one_2048_chunk_prefill_s": single.time_to_first_token_s,
        "newcomer_time_to_first_token_s": newcomer_final.time_to_first_token_s,
        "median_step_s": statistics.median(others),
        "max_step_during_prefill_s": max(during) if during else 0.0,
        "steps_during_prefill": len(during),
        "max_event_gap_during_prefill_s": max(gaps) if gaps else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stall-only", action="store_true", help="only the prefill-stall test")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument(
        "--variants",
        default=(
            "ours-graph,ours-graph-custom-matmul,ours-graph-sync,ours-eager,ours-previous,"
            "stock-sdpa,stock-no_sdpa"
        ),
        help="comma-separated, run in this order, one process each",
    )
    args = parser.parse_args()
    if args.stall_only:
        from engine.inproc import InProcessEngine

        engine = InProcessEngine(max_jobs=16)
        engine.load(str(args.model), max_seq_len=MAX_SEQ_LEN)
        consume(engine, prompt(64, 0), 8)  # warm-up
        args.out.write_text(json.dumps(prefill_while_decoding(engine), indent=1))
        engine.close()
        return
    if args.variant:
        import torch

        if args.variant.startswith("ours"):
            result = run_ours(args.model, args.variant)
        else:
            result = run_stock(args.model, no_sdpa=args.variant == "stock-no_sdpa")
        result["gpu"] = torch.cuda.get_device_name(0)
        print("RESULT " + json.dumps(result))
        return

    import torch

    results = {
        "model": str(args.model),
        "gpu": torch.cuda.get_device_name(0),
        "bandwidth_gbps": bandwidth_gbps(),
        "weight_bytes_per_token": weight_bytes_per_token(args.model),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--model", str(args.model), "--out", str(args.out)]
        command += ["--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        results[variant] = json.loads(lines[-1][7:]) if lines else {"error": done.stderr[-3000:]}
        args.out.write_text(json.dumps(results, indent=1))  # partial results survive a timeout
        print(variant, "done", flush=True)


if __name__ == "__main__":
    main()

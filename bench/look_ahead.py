"""Look-ahead decode against reading each step's tokens first: one engine, the two modes in turn.

Both modes replay the same CUDA graphs and sample on the GPU; they differ only in whether a step
is enqueued before the host reads the previous step's tokens (`Generator.look_ahead`). Switching
between rounds on one loaded engine keeps everything else equal. Each round measures batch-1
decode after a 128-token prompt and the aggregate of 8 jobs at once.

Usage (GPU): python bench/look_ahead.py --model /dev/shm/sc2-fp16 --out look-ahead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_bench import consume, in_threads, prompt  # noqa: E402

NEW_TOKENS = 128


def one_round(engine) -> dict:
    final, _ = consume(engine, prompt(128, 0), NEW_TOKENS)
    started = time.perf_counter()
    done = in_threads(8, lambda i: consume(engine, prompt(128, 1000 + i), NEW_TOKENS))
    wall = time.perf_counter() - started
    return {
        "batch_1_decode_tok_s": final.decode_tokens_per_s,
        "jobs_8_aggregate_tok_s": sum(f.new_tokens for f, _ in done) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode, alternating")
    args = parser.parse_args()
    import torch

    from engine.gpu.generator import Generator
    from engine.inproc import InProcessEngine

    engine = InProcessEngine(max_jobs=8)
    status = engine.load(str(args.model), max_seq_len=4096)
    one_round(engine)  # warm-up: the first 8-job round ran 13% slower than the rest
    rounds: dict[str, list] = {"look-ahead": [], "sync": []}
    results = {"model": str(args.model), "gpu": torch.cuda.get_device_name(0)}
    results |= {"status": status.message, "rounds": rounds}
    for _ in range(args.rounds):
        for mode in rounds:
            Generator.look_ahead = mode == "look-ahead"
            ahead_before = engine.engine._generator.ahead_steps
            row = one_round(engine)
            row["ahead_steps"] = engine.engine._generator.ahead_steps - ahead_before
            rounds[mode].append(row)
            args.out.write_text(json.dumps(results, indent=1))  # partial results survive
    engine.close()
    for key in ("batch_1_decode_tok_s", "jobs_8_aggregate_tok_s"):
        ahead = statistics.median(r[key] for r in rounds["look-ahead"])
        sync = statistics.median(r[key] for r in rounds["sync"])
        results[key] = {"look-ahead": ahead, "sync": sync, "ratio": ahead / sync}
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("tok_s")}))


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: cProfile of greedy decoding through exllamav2 with our fixes.

Usage (GPU): python bench/profile_decode.py --model DIR [--unpaged] [--tokens 256] [--jobs 1]
Prints the functions with the most own time; at batch 1 this is the CPU work that bounds decode.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--unpaged", action="store_true")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()

    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    from engine.gpu import compat

    compat.apply_all()
    config = ExLlamaV2Config(str(args.model))
    config.max_seq_len = 4096
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=4096 * args.jobs, lazy=True)
    model.load_autosplit(cache)
    generator = ExLlamaV2DynamicGenerator(
        model, cache, ExLlamaV2Tokenizer(config), paged=not args.unpaged,
        max_batch_size=max(args.jobs, 1), max_seq_len=4096,
    )  # fmt: skip

    def run(tokens):
        for _ in range(args.jobs):
            generator.enqueue(
                ExLlamaV2DynamicJob(
                    input_ids=torch.randint(100, 1000, (1, 128)),
                    max_new_tokens=tokens,
                    stop_conditions=[],
                    gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                )  # fmt: skip
            )
        steps = 0
        while generator.num_remaining_jobs():
            generator.iterate()
            steps += 1
        return steps

    run(16)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    steps = run(args.tokens)
    plain_ms = 1000 * (time.perf_counter() - started) / steps
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    steps = run(args.tokens)
    profiler.disable()
    elapsed = time.perf_counter() - started
    mode = "unpaged" if args.unpaged else "paged"
    print(
        f"{mode}, {args.jobs} job(s): {steps} steps, {plain_ms:.2f} ms per step "
        f"({1000 * elapsed / steps:.2f} under the profiler)"
    )
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()

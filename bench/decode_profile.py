"""Where a decode step's GPU time goes, eager and as a CUDA graph, and how noisy it is.

Usage (GPU): python bench/decode_profile.py --model /dev/shm/sc2-4_25 --out profile-4_25.json

For each decode path (eager: exllamav2's generator with its per-module graphs warmed up, which
switch on after ~205 calls per shape; graph: ours), one greedy job (then 8) decodes past the
warm-up, then the profiler records 32 steps: wall time per step, GPU kernel time per step, the
EXL2 matmuls' share and their achieved bandwidth (bytes of quantized weights read per step / their
kernel time).
Noise: teacher-forced logits of two eager forwards of the same step (EXL2 matmuls add partial sums
with atomics), graph against eager, and the first token where two free-running greedy runs part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import prompt, weight_bytes_per_token  # noqa: E402

WARM_STEPS = 300
PROFILED_STEPS = 32
MAX_SEQ_LEN = 4096


def greedy_job(ids, new_tokens):
    import torch
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    return ExLlamaV2DynamicJob(
        input_ids=torch.tensor([ids]),
        max_new_tokens=new_tokens,
        stop_conditions=[],
        gen_settings=ExLlamaV2Sampler.Settings.greedy(),
    )


def run_to_end(generator, job) -> list[int]:
    tokens: list[int] = []
    generator.enqueue(job)
    while generator.num_remaining_jobs():
        for result in generator.iterate():
            if "token_ids" in result:
                tokens += result["token_ids"][0].tolist()
    return tokens


def profile_steps(generator, weight_bytes: int, jobs: int = 1) -> dict:
    """Decode `jobs` jobs past the warm-up, then profile PROFILED_STEPS steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for i in range(jobs):
        generator.enqueue(greedy_job(prompt(128, 1 + i), WARM_STEPS + PROFILED_STEPS + 16))
    steps = 0
    while steps < WARM_STEPS:
        generator.iterate()
        steps += 1
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            generator.iterate()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / PROFILED_STEPS
    while generator.num_remaining_jobs():
        generator.iterate()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time_total
    gpu_us = sum(kernels.values()) / PROFILED_STEPS
    gemm_us = sum(t for n, t in kernels.items() if "q_half" in n or "gemm" in n) / PROFILED_STEPS
    top = sorted(kernels.items(), key=lambda item: -item[1])[:12]
    return {
        "wall_ms_per_step": wall * 1000,
        "gpu_ms_per_step": gpu_us / 1000,
        "gpu_busy_share": gpu_us / 1e6 / wall,
        "matmul_ms_per_step": gemm_us / 1000,
        "matmul_gbps": weight_bytes / (gemm_us / 1e6) / 1e9 if gemm_us else 0.0,
        "top_kernels_us_per_step": {name[:90]: t / PROFILED_STEPS for name, t in top},
    }


def teacher_forced_spread(engine, steps=32) -> dict:
    """Max |logit difference| of two eager forwards per step, and of the graph against eager."""
    import torch
    from exllamav2.attn import ExLlamaV2Attention

    model, cache, graphs = engine._model, engine._cache, engine._graphs
    ids = prompt(600, 5)
    table = torch.tensor([[4, 1, 6]], dtype=torch.int32)

    def params(position, q_len):
        seqlens = torch.tensor([position], dtype=torch.int32)
        return ExLlamaV2Attention.PagedParams(1, table, seqlens, position + q_len, 256, q_len)

    spread = delta = 0.0
    flips = clear = 0
    with torch.inference_mode():
        model.forward_chunk(
            input_ids=torch.tensor([ids[:-1]]), attn_params=params(0, 599), cache=cache
        )
        position, current = len(ids) - 1, torch.tensor([[ids[-1]]])
        for _ in range(steps):
            one = model.forward_chunk(
                input_ids=current, attn_params=params(position, 1), cache=cache
            )
            one = one["logits"].float()[0, 0]
            two = model.forward_chunk(
                input_ids=current, attn_params=params(position, 1), cache=cache
            )
            two = two["logits"].float()[0, 0]
            spread = max(spread, (one - two).abs().max().item())
            if graphs is not None:
                seqlens = torch.tensor([position], dtype=torch.int32)
                graph = graphs.run(current, table, seqlens).float()[0, 0].clone()
                delta = max(delta, (graph - one).abs().max().item())
                top2 = one.topk(2).values
                if (top2[0] - top2[1]).item() > spread:
                    clear += 1
                    flips += int(graph.argmax() != one.argmax())
            current = one.argmax().view(1, 1).cpu()
            position += 1
    result = {"eager_vs_eager_max_abs": spread}
    if graphs is not None:
        result |= {"graph_vs_eager_max_abs": delta, "argmax_flips_beyond_spread": flips,
                   "steps_beyond_spread": clear}  # fmt: skip
    return result


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    from engine.gpu.engine import Engine

    weights = weight_bytes_per_token(args.model)
    results: dict = {"model": str(args.model), "gpu": torch.cuda.get_device_name(0)}
    runs = {}
    for name, graphs in (("eager", False), ("graph", True)):
        engine = Engine(max_jobs=8, cuda_graphs=graphs)
        status = engine.load(str(args.model), max_seq_len=MAX_SEQ_LEN)
        generator = engine._generator  # idle engine: the bench drives its generator directly
        row = {"status": status.message, **profile_steps(generator, weights)}
        row["8_jobs"] = profile_steps(generator, weights, 8)
        runs[name] = run_to_end(generator, greedy_job(prompt(128, 2), 256))
        if graphs:
            row["free_running_first_divergence_vs_eager"] = first_divergence(
                runs["graph"], runs["eager"]
            )
        else:
            again = run_to_end(generator, greedy_job(prompt(128, 2), 256))
            row["free_running_first_divergence_eager_vs_eager"] = first_divergence(
                runs["eager"], again
            )
        row |= teacher_forced_spread(engine)
        results[name] = row
        args.out.write_text(json.dumps(results, indent=1))
        engine.close()
        print(name, json.dumps(row)[:400], flush=True)


if __name__ == "__main__":
    main()

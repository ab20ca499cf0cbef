"""Our attention functions alone, on StarCoder2-15B's head shapes, per SDPA backend.

Usage (GPU): python bench/attention_bench.py [--out attention.json]

Random fp16 tensors (48 query heads, 4 KV heads, head dim 128). Decode calls use a new key length
on every call, as decoding does; prefill uses 2,048-token chunks. Each cell is the mean wall time
per call (synchronized), after a warm-up. Also lists the CUDA kernels each path runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADS, KV_HEADS, DIM, PAGE = 48, 4, 128, 256


def timed(fn, calls: int) -> float:
    """Mean ms per call of fn(i), i = 0..calls-1, synchronized around the loop."""
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / calls


def kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call runs, most time first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(1)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return [f"{e.key[:90]} {e.device_time_total:.0f}us" for e in rows if e.device_time_total][:6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine.gpu import attention

    torch.manual_seed(0)
    half = dict(device="cuda", dtype=torch.float16)
    backends = {
        "default": None,
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "math": [SDPBackend.MATH],
    }
    print("torch", torch.__version__, "cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled())
    results: dict = {"torch": torch.__version__, "cells": []}

    def cell(name, backend, fn, calls):
        try:
            if backends.get(backend) is None:
                fn(0)
                ms = timed(fn, calls)
            else:
                with sdpa_kernel(backends[backend]):
                    fn(0)
                    ms = timed(fn, calls)
        except RuntimeError as error:
            ms = None
            print(f"{name:58s} {backend:15s} n/a ({str(error).splitlines()[0][:60]})")
        else:
            print(f"{name:58s} {backend:15s} {ms:8.3f} ms")
        results["cells"].append({"case": name, "backend": backend, "ms": ms})

    # Decode, unpaged: keys grow by one each call (a new shape every call).
    for batch, context in ((1, 128), (1, 4096), (1, 12288), (8, 4096)):
        q = torch.randn(batch, 1, HEADS, DIM, **half)
        k = torch.randn(batch, context + 64, KV_HEADS, DIM, **half)
        v = torch.randn_like(k)

        def decode(i, q=q, k=k, v=v, context=context):
            n = context + i % 64
            return attention.dense_decode(q, k[:, :n], v[:, :n], 0.088, None)

        for backend in backends:
            cell(f"decode unpaged b{batch} ctx{context}", backend, decode, 64)
        results.setdefault("kernels", {})[f"decode unpaged b{batch} ctx{context}"] = kernels(decode)

    # Paged, as exllamav2 calls it (40 layers per plan), for each of our backends.
    for batch, context, q_len, window in (
        (1, 128, 1, 0), (1, 4096, 1, 0), (1, 12288, 1, 4096), (8, 4096, 1, 0), (8, 12288, 1, 4096),
        (16, 4096, 1, 0), (1, 2048, 2048, 4096), (1, 4096, 2048, 4096), (1, 10240, 2048, 4096),
    ):  # fmt: skip
        pages_each = (context + q_len + 64 + PAGE - 1) // PAGE
        k_cache = torch.randn(batch * pages_each + 1, PAGE, KV_HEADS, DIM, **half)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(batch * pages_each, device="cuda", dtype=torch.int32)
        table = table.view(batch, pages_each)
        q = torch.randn(batch, q_len, HEADS, DIM, **half)
        k_new = torch.randn(batch, q_len, KV_HEADS, DIM, **half)
        lengths = [torch.full((batch,), context - q_len + i, device="cuda", dtype=torch.int32)
                   for i in range(64)]  # fmt: skip
        size = (window - 1, window - 1) if window else (-1, -1)
        name = f"paged b{batch} ctx{context} q{q_len} window{window} (per layer)"
        for backend in attention.BACKENDS:

            def paged(
                i, q=q, k=k_new, kc=k_cache, vc=v_cache, t=table, n=lengths, b=backend, w=size
            ):
                seqlens = n[(i // 40) % 64]
                args = (q, kc, vc, k, k, seqlens, t, 0.088)
                return attention.paged_attention(*args, window_size=w, backend=b)

            cell(name, backend, paged, 160 if q_len == 1 else 40)
            if results["cells"][-1]["ms"] is not None:
                results.setdefault("kernels", {})[f"{name} {backend}"] = kernels(paged)
        del k_cache, v_cache

    for name, rows in results["kernels"].items():
        print(name)
        for row in rows:
            print("   ", row)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

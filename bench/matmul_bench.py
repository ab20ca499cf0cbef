"""One decode step's EXL2 matmuls of StarCoder2-15B's shape: ours (engine/gpu/exl2_matmul.py)
against exllamav2's gemm_half_q_half, at 1, 2, 4, 8 and 16 rows.

Usage (GPU): python bench/matmul_bench.py --bits 4.25 --out bench/results/matmul-4_25.json

The 40 layers' q, k, v, o, up and down projections and the head, each with weights in memory of
its own (so nothing is served from L2 across layers): one random draw per shape in exllamav2's
file layout with a fixed mix of widths, copied for each layer of that shape and handed to
exllamav2's make_q_matrix, which reorders it as a load does.
Each side's whole step is captured in one CUDA graph and replayed; the figure is the mean time
of a replay. Ours is timed at each launch shape in LAUNCHES, each first checked against
exllamav2's output on the first layer of every shape. Speed depends on shapes, widths and group
sizes, not on weight values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 6144, 24576, 512, 40, 49152
# Shares of each layer's input rows per width (groups of 32 rows), near the named bits per weight
# with the 4-bit scales: 4.25 ≈ 3/4 at 4 bits and 1/4 at 5; 6.5 ≈ 3/4 at 6 bits and 1/4 at 8.
MIXES = {"4.25": ((5, 0.25), (4, 0.75)), "6.5": ((8, 0.25), (6, 0.75))}
HEAD_MIX = ((8, 0.15), (6, 0.85))  # the converter's head: 6 bits with some 8
ROWS = (1, 2, 4, 8, 16)


def shapes() -> list[tuple[int, int, str]]:
    per_layer = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN)]
    per_layer += [(HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
    layers = [(k, n, "layer") for _ in range(LAYERS) for k, n in per_layer]
    return layers + [(HIDDEN, VOCAB, "head")]


def groups_for(height: int, mix) -> list[tuple[int, int]]:
    tiles = height // 32
    out, left = [], tiles
    for i, (bits, share) in enumerate(mix):
        count = left if i == len(mix) - 1 else round(tiles * share)
        out += [(bits, 32)] * count
        left -= count
    return out


def copy_gbps() -> float:
    import torch

    from engine.gpu.decode_matmul import replay_ms

    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = replay_ms(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", choices=sorted(MIXES), default="4.25")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from exllamav2.ext import exllamav2_ext as ext_c

    from engine.gpu.decode_matmul import LAUNCHES, replay_ms
    from engine.gpu.exl2_matmul import DEFAULT, prepare
    from engine.gpu.exl2_matmul import matmul as ours
    from engine.gpu.graphs import AUTOTUNE_CALLS
    from tests.fakes.exl2_layers import exllamav2_matrix, random_layer

    scratch = torch.empty(HIDDEN * VOCAB, dtype=torch.float16, device="cuda")
    started = time.perf_counter()
    layers, kept, weight_bytes, draws = [], [], 0, {}
    for seed, (k, n, kind) in enumerate(shapes()):
        if (k, n, kind) not in draws:
            mix = HEAD_MIX if kind == "head" else MIXES[args.bits]
            draws[k, n, kind] = random_layer(
                seed, groups_for(k, mix), n, loaded=False, device="cuda", weights=False
            )[:2]
        draw, height = draws[k, n, kind]
        tensors = {key: tensor.clone() for key, tensor in draw.items()}
        handle, _ = exllamav2_matrix(tensors, scratch)
        weight_bytes += sum(tensors[key].nbytes for key in ("q_weight", "q_scale"))
        layers.append((prepare(tensors, height), handle, k, n))
        kept.append(tensors)  # the handle points into them (make_q_matrix adds q_group_map)
    torch.cuda.synchronize()
    print(f"{len(layers)} layers built in {time.perf_counter() - started:.0f} s", flush=True)

    firsts: dict[tuple[int, int], int] = {}  # the first layer of each shape
    for i, (*_, k, n) in enumerate(layers):
        firsts.setdefault((k, n), i)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "copy_gbps": round(copy_gbps(), 1),
        "weight_bytes": weight_bytes,  # q_weight and q_scale: what a step must read
        "mix": {"layers": MIXES[args.bits], "head": HEAD_MIX, "group_rows": 32},
        "rows": {},
    }
    for rows in ROWS:
        inputs = {k: torch.randn(rows, k, device="cuda").half() for k in (HIDDEN, INTERMEDIATE)}
        outputs = [torch.empty(rows, n, device="cuda").half() for *_, n in layers]

        def theirs(outputs=outputs, inputs=inputs):
            for (_, handle, k, _), out in zip(layers, outputs, strict=True):
                ext_c.gemm_half_q_half(inputs[k], handle, out, False)

        def mine(inputs=inputs, launch=DEFAULT):
            for layer, _, k, _ in layers:
                ours(inputs[k], layer, launch)

        for i in firsts.values():  # exllamav2 times a shape's first calls, waiting: not capturable
            _, handle, k, _ = layers[i]
            for _ in range(AUTOTUNE_CALLS):
                ext_c.gemm_half_q_half(inputs[k], handle, outputs[i], False)
        theirs()
        launches = {}
        for launch in LAUNCHES:
            worst = 0.0
            for i in firsts.values():
                layer, _, k, _ = layers[i]
                got = ours(inputs[k], layer, launch)
                top = outputs[i].float().abs().max()
                worst = max(worst, float((got.float() - outputs[i].float()).abs().max() / top))
            ms = replay_ms(lambda launch=launch: mine(launch=launch))
            launches[launch.name] = {"ms": round(ms, 3), "diff": round(worst, 5)}
        best = min(launches, key=lambda key: launches[key]["ms"])
        cell = {"ours_ms": launches[best]["ms"], "exllamav2_ms": round(replay_ms(theirs), 3)}
        cell["ours_launch"] = best
        cell["ours_gbps"] = round(weight_bytes / cell["ours_ms"] / 1e6, 1)
        cell["exllamav2_gbps"] = round(weight_bytes / cell["exllamav2_ms"] / 1e6, 1)
        cell["launches"] = launches  # diff: largest difference from exllamav2, relative
        result["rows"][str(rows)] = cell
        print(rows, cell, flush=True)
        if args.out:  # rows done so far survive a run cut short
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

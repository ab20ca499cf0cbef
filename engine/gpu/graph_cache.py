"""Groups of many small kernels replayed from CUDA graphs, captured at first use per input shape.

Rows are padded to a power of two, so a few graphs serve every batch. The capture synchronises
the device once per shape; replays do not. Elsewhere than CUDA the function simply runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def bucket(n: int, smallest: int) -> int:
    """The power of two at or above n (and smallest): few shapes, so few graphs."""
    return max(smallest, 1 << (n - 1).bit_length())


_GRAPHS: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
_POOLS: dict[int, Any] = {}


def replay(
    key: tuple, fn: Callable[..., tuple[torch.Tensor, ...]], *inputs: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """fn(*inputs), on CUDA from a graph captured at the first call with these shapes: a group's
    few hundred small kernels cost more to launch one by one than to run."""
    rows = inputs[0].shape[0]
    padded = bucket(rows, 1)
    inputs = tuple(torch.cat([t, t[:1].expand(padded - rows, *t.shape[1:])]) for t in inputs)
    device = inputs[0].device
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return tuple(t[:rows] for t in fn(*inputs))
    key = (*key, device.index, *(tuple(t.shape) for t in inputs))
    if key not in _GRAPHS:
        static = [t.clone() for t in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn(*static)  # first use outside the capture (lazy initialisation, workspaces)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = _POOLS.setdefault(device.index or 0, torch.cuda.graph_pool_handle())
        # thread_local: the engine process's other threads may query the GPU meanwhile.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = fn(*static)
        _GRAPHS[key] = (graph, static, outputs)
    graph, static, outputs = _GRAPHS[key]
    for target, source in zip(static, inputs, strict=True):
        target.copy_(source)
    graph.replay()
    # Graphs share one memory pool: copy the outputs out before another replay reuses it.
    return tuple(t[:rows].clone() for t in outputs)

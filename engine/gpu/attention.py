"""Attention for StarCoder2 under exllamav2 without flash-attn: the dense math (causal, windowed,
GQA-aware) and paged attention with `flash_attn_with_kvcache`'s contract, which engine.gpu.compat
puts in exllamav2's place.

Three implementations of the paged contract, fastest first; the first that passes a check against
the plain one on the GPU serves (`attention_backend`):
- "flash, paged": torch's bundled flash-attention kernel reads the pages through the block table;
- "flash, gathered": the same kernel over each sequence's pages copied out first;
- "sdpa": torch SDPA over the gathered pages with a mask (any GPU). cuDNN's SDPA is kept out: torch
  picks it by default on Hopper, and it builds a plan for every new shape (~50 ms; decode makes a
  new shape each step).
One-token steps take our Triton kernel (engine/gpu/decode_attention.py) when it passes the same
check.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def window_mask(q_positions: torch.Tensor, k_len: int, window: int) -> torch.Tensor:
    """Boolean mask (..., q, k): key j is visible from position p iff p - window < j <= p."""
    keys = torch.arange(k_len, device=q_positions.device)
    p = q_positions.unsqueeze(-1)
    visible = keys <= p
    if window:
        visible &= keys > p - window
    return visible


def dense_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """One query token per sequence. q (B, 1, H, D), k/v (B, K, Hk, D) -> (B, 1, H*D).

    The H // Hk query heads that share a KV head are folded into the query axis, so every K/V head
    is read once and nothing is repeated in memory. mask: (B, K) boolean or None.
    """
    batch, _, heads, dim = q.shape
    kv_heads = k.shape[2]
    folded = q.view(batch, kv_heads, heads // kv_heads, dim)
    if mask is not None:
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        folded, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.reshape(batch, 1, heads * dim)


def dense_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int
) -> torch.Tensor:
    """One sequence, queries at the end of the keys. q (1, Q, H, D), k/v (1, K, Hk, D)."""
    q_len, k_len = q.shape[1], k.shape[1]
    first = k_len - q_len
    if window and k_len > window:
        # Keys older than the first query's window are never visible: drop them, then mask the band.
        start = max(0, first - window + 1)
        k, v = k[:, start:], v[:, start:]
        positions = torch.arange(first - start, k.shape[1], device=q.device)
        mask = window_mask(positions, k.shape[1], window)
    else:
        mask = causal_lower_right(q_len, k_len)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(1, q_len, -1)


BACKENDS = ("flash, paged", "flash, gathered", "sdpa")
# One-token steps: our Triton kernel (engine/gpu/decode_attention.py) when it passes the same check.
DECODE_KERNEL = "Triton split-KV"


@dataclass
class _Plan:
    """Indices of one forward pass; the same for every layer, so computed once."""

    seqlens: torch.Tensor
    table: torch.Tensor
    shape: tuple
    pages: torch.Tensor  # (B, max_pages) int64
    slots: torch.Tensor | None  # (B * Q,) flat cache rows the new k/v go to
    totals: torch.Tensor  # (B,) int32 keys per sequence, new ones included
    cu_q: torch.Tensor | None = None  # flash: (B + 1,) int32 query offsets
    cu_k: torch.Tensor | None = None  # flash: (B + 1,) int32 where each sequence's keys start
    decode_mask: torch.Tensor | None = None  # sdpa, Q == 1: (B, max_pages * page_size)
    lengths: list[int] | None = None  # sdpa, Q > 1: keys per sequence (one host sync)


_last_plan: list[_Plan | None] = [None]
_chosen: dict[tuple, str] = {}


def forget_plan() -> None:
    """Make the next forward compute its indices afresh (a CUDA graph's capture must)."""
    _last_plan[0] = None


def _plan(seqlens, table, q_len, page_size, window, appending, backend) -> _Plan:
    """Reuse the last plan while exllamav2 passes the same tensors (all layers of one forward)."""
    shape = (q_len, page_size, window, appending, backend)
    plan = _last_plan[0]
    if plan and plan.seqlens is seqlens and plan.table is table and plan.shape == shape:
        return plan
    batch, device = seqlens.shape[0], seqlens.device
    pages = table.to(torch.int64)
    totals = seqlens + q_len if appending else seqlens
    slots = None
    if appending:
        positions = seqlens.to(torch.int64)[:, None] + torch.arange(q_len, device=device)
        slots = (pages.gather(1, positions // page_size) * page_size + positions % page_size).view(
            -1
        )
    plan = _Plan(seqlens, table, shape, pages, slots, totals.to(torch.int32))
    # DECODE_KERNEL reads the table and totals as they are; the others need more.
    if backend.startswith("flash"):
        plan.cu_q = torch.arange(0, (batch + 1) * q_len, q_len, device=device, dtype=torch.int32)
    if backend == "flash, paged":  # keys are read through the table: offsets are cumulative
        plan.cu_k = F.pad(totals.cumsum(0, dtype=torch.int32), (1, 0))
    elif backend == "flash, gathered":  # each sequence's gathered keys take max_pages pages
        step = pages.shape[1] * page_size
        plan.cu_k = torch.arange(0, (batch + 1) * step, step, device=device, dtype=torch.int32)
    elif backend == "sdpa" and q_len == 1:  # sdpa decode: one mask over every page
        last = (totals.to(torch.int64) - 1)[:, None]
        plan.decode_mask = window_mask(last, pages.shape[1] * page_size, window)[:, 0]
    elif backend == "sdpa":  # sdpa prefill
        plan.lengths = totals.tolist()  # one host sync per forward, not per layer
    _last_plan[0] = plan
    return plan


def flash_forward(*args, **kwargs):
    """torch's bundled flash-attention kernel (varlen when given cumulative lengths)."""
    return torch.ops.aten._flash_attention_forward(*args, **kwargs)


def _flash(q, k, v, plan, max_k, scale, window, **extra) -> torch.Tensor:
    """torch's flash-attention forward over packed queries; q (B, Q, H, D) -> (B * Q, H, D)."""
    out = flash_forward(
        q.reshape(-1, q.shape[2], q.shape[3]),
        k,
        v,
        plan.cu_q,
        plan.cu_k,
        q.shape[1],
        max_k,
        0.0,
        True,
        False,
        scale=scale,
        window_size_left=window - 1 if window else None,
        **extra,
    )
    return out[0]


def _attend(backend, q, k_cache, v_cache, plan, scale, window) -> torch.Tensor:
    """Attention of q (B, Q, H, D) over each sequence's pages; returns (B, Q, H, D)."""
    batch, q_len, heads, dim = q.shape
    page_size = k_cache.shape[1]
    max_k = plan.pages.shape[1] * page_size
    if backend == DECODE_KERNEL:
        from engine.gpu.decode_attention import decode_attention

        query = q.reshape(batch, heads, dim)
        out = decode_attention(query, k_cache, v_cache, plan.table, plan.totals, scale, window)
        return out.view(batch, 1, heads, dim)
    if backend == "flash, paged":
        out = _flash(q, k_cache, v_cache, plan, max_k, scale, window, block_table=plan.table)
        return out.view(batch, q_len, heads, dim)
    if backend == "flash, gathered":
        flat = plan.pages.view(-1)
        keys = k_cache.index_select(0, flat).view(-1, *k_cache.shape[2:])
        values = v_cache.index_select(0, flat).view(-1, *v_cache.shape[2:])
        out = _flash(q, keys, values, plan, max_k, scale, window, seqused_k=plan.totals)
        return out.view(batch, q_len, heads, dim)
    with sdpa_kernel(SDPA_BACKENDS):
        if q_len == 1:
            keys = k_cache[plan.pages].flatten(1, 2)
            values = v_cache[plan.pages].flatten(1, 2)
            out = dense_decode(q, keys, values, scale, plan.decode_mask)
            return out.view(batch, 1, heads, dim)
        outputs = []
        for b, length in enumerate(plan.lengths):
            pages = plan.pages[b, : (length + page_size - 1) // page_size]
            keys = k_cache[pages].flatten(0, 1)[None, :length]
            values = v_cache[pages].flatten(0, 1)[None, :length]
            outputs.append(dense_prefill(q[b : b + 1], keys, values, scale, window))
        return torch.cat(outputs, dim=0).view(batch, q_len, heads, dim)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
    **unused,
) -> torch.Tensor:
    """flash_attn_with_kvcache's contract, in PyTorch, for a paged cache.

    q (B, Q, H, D); k_cache/v_cache (pages, page_size, Hk, D); k/v (B, Q, Hk, D) or None;
    cache_seqlens (B,) tokens already cached; block_table (B, max_pages) int32. The new k/v are
    written at cache_seqlens, then each query attends causally (aligned to the end) over its
    sequence, within `window_size[0] + 1` keys, itself included. No host sync on the flash
    backends, nor on any backend for one-token steps. `backend` forces DECODE_KERNEL (one-token
    steps) or one of BACKENDS (tests); by default the checked fastest serves.
    """
    dim = q.shape[3]
    page_size = k_cache.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    window = window_size[0] + 1 if window_size and window_size[0] >= 0 else 0
    if backend is None:
        keys = block_table.shape[1] * page_size if block_table is not None else 0
        one_token = q.shape[1] == 1 and (_for_graphs[0] or keys > EAGER_KERNEL_MIN_KEYS)
        choose = decode_backend if one_token else attention_backend
        backend = choose(q.device, q.dtype, q.shape[2], k_cache.shape[2], dim)
    plan = _plan(cache_seqlens, block_table, q.shape[1], page_size, window, k is not None, backend)
    if k is not None and v is not None and plan.slots is not None:  # slots: planned for appends
        rows = k_cache.shape[2:]
        k_cache.view(-1, *rows).index_copy_(0, plan.slots, k.reshape(-1, *rows))
        v_cache.view(-1, *rows).index_copy_(0, plan.slots, v.reshape(-1, *rows))
    return _attend(backend, q, k_cache, v_cache, plan, scale, window)


def attention_backend(device, dtype=torch.half, heads=8, kv_heads=2, dim=128) -> str:
    """The fastest of BACKENDS that matches "sdpa" on random pages on this GPU (checked once)."""
    key = (torch.device(device), dtype, heads, kv_heads, dim)
    if key not in _chosen:
        _chosen[key] = next(b for b in BACKENDS if b == "sdpa" or _passes_check(b, *key))
    return _chosen[key]


# Eager steps over at most this many keys take the prefill backend: the Triton kernel's two launches
# per layer cost more host time than its split saves (H200: 94 vs 116 tok/s at 512 tokens). Inside a
# CUDA graph launches cost nothing, and the table always spans the whole context.
EAGER_KERNEL_MIN_KEYS = 2048
_for_graphs = [False]


@contextmanager
def graph_steps() -> Iterator[None]:
    """One-token steps run here take DECODE_KERNEL at any length: a CUDA graph's warm-up and
    capture, so the kernel the graph holds is the one its warm-up compiled and loaded."""
    _for_graphs[0] = True
    try:
        yield
    finally:
        _for_graphs[0] = False


def decode_backend(device, dtype=torch.half, heads=8, kv_heads=2, dim=128) -> str:
    """DECODE_KERNEL when it matches "sdpa" on random pages on this GPU, else attention_backend."""
    key = (torch.device(device), dtype, heads, kv_heads, dim, "decode")
    if key not in _chosen:
        passes = torch.device(device).type == "cuda" and _passes_check(DECODE_KERNEL, *key[:5])
        _chosen[key] = DECODE_KERNEL if passes else attention_backend(*key[:5])
    return _chosen[key]


def _passes_check(backend, device, dtype, heads, kv_heads, dim) -> bool:
    """Several sequences, random page tables, one and many queries, with and without a window."""
    generator = torch.Generator(device=device).manual_seed(0)
    page_size, pages = 256, 16

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    try:
        for q_len, lengths, window in ((1, [1, 300, 700], 0), (1, [5, 520], 64), (1, [0], 0),
                                       (70, [0, 600], 0), (70, [0, 600], 100)):  # fmt: skip
            if backend == DECODE_KERNEL and q_len > 1:
                continue
            batch = len(lengths)
            k_cache, v_cache = (
                rand(pages, page_size, kv_heads, dim),
                rand(pages, page_size, kv_heads, dim),
            )
            order = torch.randperm(pages, device=device, generator=generator)
            table = order[: batch * 4].view(batch, 4).to(torch.int32)
            seqlens = torch.tensor(lengths, device=device, dtype=torch.int32)
            q = rand(batch, q_len, heads, dim)
            window_size = (window - 1, window - 1) if window else (-1, -1)
            args = (q, k_cache, v_cache, None, None, seqlens + q_len, table, dim**-0.5)
            out = paged_attention(*args, window_size=window_size, backend=backend)
            want = paged_attention(*args, window_size=window_size, backend="sdpa")
            if not (out - want).abs().max().item() < 1e-2:
                return False
    except Exception:  # a probe: any failure (no kernel for this GPU, a compile error) rules it out
        return False
    return True

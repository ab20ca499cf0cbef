"""Paged decode attention in Triton: one query token per sequence, its keys split across programs.

Each program takes one sequence, one K/V head with the query heads that share it (packed as rows
of one tile, so every key is read once), and one slice of the keys. It reads keys through the page
table and returns its slice's output with the log-sum-exp; a second kernel merges the slices. The
grid is fixed by the batch and the table's width, never by the sequences' lengths, which are read
on the device, so a CUDA graph can replay it: splits with no keys left idle. On a machine without
a GPU, Triton's interpreter runs the same kernels on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 there).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile; divides the page size
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634


# Sizes that vary from step to step are runtime arguments, never specialized on: one compile
# serves every batch, length and table width.
@triton.jit(do_not_specialize=["window", "table_stride", "splits", "tiles"])
def _split_kernel(
    q, k_cache, v_cache, table, totals, out_part, lse_part,
    scale_log2, window, table_stride, splits, tiles,
    PAGE: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    total = tl.load(totals + b)  # keys of this sequence, the new one included
    start = tl.maximum(total - tl.where(window > 0, window, total), 0)
    first_tile = start // BLOCK_N
    own = tl.cdiv(total, BLOCK_N) - first_tile  # tiles this sequence needs
    per_split = tl.cdiv(own, splits)
    t0 = first_tile + s * per_split
    t1 = tl.minimum(t0 + per_split, first_tile + own)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    rows = b * KV_HEADS * GROUP + h * GROUP + g  # query heads h * GROUP ... of sequence b
    q_mask = (g[:, None] < GROUP) & (d[None, :] < DIM)
    query = tl.load(q + rows[:, None] * DIM + d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(0, tiles):  # at most `tiles` per split; those past the sequence's end skip
        t = t0 + i
        if t < t1:
            keys = t * BLOCK_N + n
            page = tl.load(table + b * table_stride + (t * BLOCK_N) // PAGE).to(tl.int64)
            slot = page * PAGE + (t * BLOCK_N) % PAGE + n
            valid = (keys >= start) & (keys < total)
            offsets = (slot * KV_HEADS + h)[:, None] * DIM + d[None, :]
            kv_mask = valid[:, None] & (d[None, :] < DIM)
            k = tl.load(k_cache + offsets, mask=kv_mask, other=0.0)
            scores = tl.dot(query, tl.trans(k)) * scale_log2
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache + offsets, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    found = l_i > 0
    out = acc / tl.where(found, l_i, 1.0)[:, None]
    lse = tl.where(found, m_i + tl.log2(tl.where(found, l_i, 1.0)), float("-inf"))
    part = rows * splits + s
    tl.store(out_part + part[:, None] * DIM + d[None, :], out, mask=q_mask)
    tl.store(lse_part + part, lse, mask=g < GROUP)


@triton.jit(do_not_specialize=["splits"])
def _merge_kernel(
    out_part, lse_part, out, splits,
    DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_part + row * splits + s, mask=s < splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    mask = (s[:, None] < splits) & (d[None, :] < DIM)
    parts = tl.load(out_part + (row * splits + s)[:, None] * DIM + d[None, :], mask=mask, other=0.0)
    merged = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out + row * DIM + d, merged.to(out.dtype.element_ty), mask=d < DIM)


def grid_for(batch: int, kv_heads: int, max_keys: int, processors: int) -> tuple[int, int]:
    """(splits, most tiles per split) for `max_keys` keys: about two programs per processor."""
    tiles = math.ceil(max_keys / BLOCK_N)
    wanted = math.ceil(2 * processors / (batch * kv_heads))
    splits = max(1, min(wanted, MAX_SPLITS, tiles))
    return splits, math.ceil(tiles / splits)


def processors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; a few in Triton's interpreter."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    totals: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged keys.

    q (B, H, D); k_cache/v_cache (pages, page_size, Hk, D), contiguous; table (B, max_pages) int32;
    totals (B,) int32: keys per sequence, all already in the cache. A query sees the last `window`
    keys (0: all). Returns (B, H, D) in q's dtype.
    """
    batch, heads, dim = q.shape
    pages, page_size, kv_heads, _ = k_cache.shape
    if (
        page_size % BLOCK_N
        or heads % kv_heads
        or not (k_cache.is_contiguous() and q.is_contiguous())
    ):
        raise ValueError(
            f"decode_attention needs a page size divisible by {BLOCK_N} (got {page_size}), query "
            f"heads a multiple of K/V heads (got {heads} and {kv_heads}) and contiguous tensors"
        )
    group = heads // kv_heads
    splits, tiles = grid_for(batch, kv_heads, table.shape[1] * page_size, processors(q.device))
    out_part = torch.empty((batch * heads, splits, dim), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((batch * heads, splits), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(dim))
    _split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, table, totals, out_part, lse_part,
        scale * _LOG2E, window, table.stride(0), splits, tiles,
        PAGE=page_size, KV_HEADS=kv_heads, GROUP=group, DIM=dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(batch * heads,)](
        out_part, lse_part, out, splits, DIM=dim, BLOCK_S=MAX_SPLITS, BLOCK_D=block_d,
    )  # fmt: skip
    return out

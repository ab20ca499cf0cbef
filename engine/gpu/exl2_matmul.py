"""An EXL2 matmul for decode steps (1 to 16 rows) in Triton, on exllamav2's loaded weights in place.

y = x · W + bias for x (M ≤ 16, K) fp16. W's K input rows sit in q_weight sorted by bit width,
each width one segment (engine/gpu/exl2_layout.py). There is one launch per segment: a program
takes BLOCK_N columns and a run of the segment's 32-row tiles, reads each weight word once for all
M rows, unpacks the values through its width's bit map, multiplies them with the M rows' inputs
(gathered through q_perm) on the tensor cores and scales each tile's sums by its group's column
scales in fp32. Each program writes its partial sums to a slot of its own, and a second kernel
adds the slots in a fixed order: a row's result depends on its own inputs only, never on timing
or on the other rows (no atomics). The decode graphs take it per layer where it matches
exllamav2's product and is faster (engine/gpu/decode_matmul.py) unless --no-custom-matmul is
given; tests/engine/test_exl2_matmul*.py check it, bench/matmul_bench.py times it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from engine.gpu.decode_attention import processors
from engine.gpu.exl2_layout import CHUNKS, bit_map, row_order, segments

MAX_ROWS = 16  # the rows of one decode step this kernel serves (BLOCK_M)
TILE = 32  # input rows per step of a program: every width's chunk divides it
BLOCK_N = 64  # columns per program, and programs per SM: the defaults until tuned per GPU
PROGRAMS_PER_SM = 2


@cache
def lookup(bits: int) -> torch.Tensor:
    """(pieces, values, 4) int32: for each value of a chunk, each run of its bits in one word as
    (word, shift, mask, where the run goes in the value); unused pieces have mask 0."""
    runs = []
    for places in bit_map(bits):
        value_runs: list[list[int]] = []
        for bit, (word, at) in enumerate(places):
            last = value_runs[-1] if value_runs else None
            if last and last[0] == word and last[1] + last[2].bit_length() == at:
                last[2] = (last[2] << 1) | 1
            else:
                value_runs.append([word, at, 1, bit])
        runs.append(value_runs)
    pieces = max(len(r) for r in runs)
    table = torch.zeros((pieces, len(runs), 4), dtype=torch.int32)
    for value, value_runs in enumerate(runs):
        for piece, run in enumerate(value_runs):
            table[piece, value] = torch.tensor(run, dtype=torch.int32)
    return table


def extras(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of a 32-row tile whose bits span words: their rows in the tile (E,) and the
    runs after their first, (pieces - 1, E, 4) as in `lookup`, with words counted from the
    tile's first. 3 and 5 bits: 2 such values a tile; 6 bits: 8; others: none."""
    table = lookup(bits)
    values, words = CHUNKS[bits]
    spans = [v for v in range(values) if bool(table[1:, v, 2].any())]
    rows = [chunk * values + v for chunk in range(TILE // values) for v in spans]
    runs = torch.zeros((max(len(table) - 1, 0), len(rows), 4), dtype=torch.int32)
    for e, row in enumerate(rows):
        chunk, value = divmod(row, values)
        runs[:, e] = table[1:, value]
        runs[:, e, 0] += chunk * words
    return torch.tensor(rows, dtype=torch.int32), runs


@cache
def _tables(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lookup(bits) and extras(bits) on a device: made once, shared by every layer."""
    rows, runs = extras(bits)
    return lookup(bits).to(device), rows.to(device), runs.to(device)


@dataclass(frozen=True)
class Segment:
    bits: int
    row: int  # first sorted input row
    tiles: int  # 32-row tiles
    word: int  # first word row in q_weight
    tile_groups: torch.Tensor  # (tiles,) int32: each tile's group
    table: torch.Tensor  # lookup(bits), on the weights' device
    extra_rows: torch.Tensor  # extras(bits), on the weights' device
    extra_runs: torch.Tensor


@dataclass(frozen=True)
class Exl2Weights:
    """One quantized layer, read in place: nothing here copies q_weight."""

    q_weight: torch.Tensor
    q_perm: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor  # fp32 copy of the (groups,) maxima
    bias: torch.Tensor | None
    height: int
    width: int
    segments: tuple[Segment, ...]


class Unsupported(ValueError):
    """A layer this kernel does not take (exllamav2's kernel keeps it)."""


def prepare(tensors: dict[str, torch.Tensor], height: int) -> Exl2Weights:
    """The layer's loaded tensors, checked and indexed once at load."""
    q_weight = tensors["q_weight"]
    width = q_weight.shape[1]
    if width % 8:
        raise Unsupported(f"{height}x{width}: the width must be a multiple of 8")
    device = q_weight.device
    groups = segments(tensors["q_groups"].cpu(), height, q_weight.shape[0])
    merged: list[tuple[int, int, int, int, list[int]]] = []  # bits, row, rows, word, groups
    for index, (bits, row, rows, word) in enumerate(groups):
        if rows % TILE or bits not in CHUNKS:
            raise Unsupported(f"a group of {rows} rows at {bits} bits is not whole 32-row tiles")
        tile_groups = [index] * (rows // TILE)
        if merged and merged[-1][0] == bits:
            last = merged[-1]
            merged[-1] = (bits, last[1], last[2] + rows, last[3], last[4] + tile_groups)
        else:
            merged.append((bits, row, rows, word, tile_groups))
    return Exl2Weights(
        q_weight=q_weight,
        q_perm=row_order(tensors, height),
        q_scale=tensors["q_scale"],
        q_scale_max=tensors["q_scale_max"].float(),
        bias=tensors.get("bias"),
        height=height,
        width=width,
        segments=tuple(
            Segment(
                bits,
                row,
                rows // TILE,
                word,
                torch.tensor(tile_groups, dtype=torch.int32, device=device),
                *_tables(bits, device),
            )  # fmt: skip
            for bits, row, rows, word, tile_groups in merged
        ),
    )


def splits_for(tiles: int, column_blocks: int, programs: int) -> int:
    """How many runs to cut a segment's tiles into so the grid fills `programs` programs."""
    return max(1, min(tiles, -(-programs // column_blocks)))


@triton.jit(do_not_specialize=["M", "row0", "word0", "tiles", "per_split", "slot0"])
def _segment_kernel(
    x, x_stride, perm, q_weight, q_scale, scale_max, tile_groups, table, extra_rows, extra_runs,
    partial, M, N, row0, word0, tiles, per_split, slot0,
    BITS: tl.constexpr, VALUES: tl.constexpr, WORDS: tl.constexpr, EXTRA: tl.constexpr,
    EXTRA_PIECES: tl.constexpr,
    TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    column_block = tl.program_id(0)
    split = tl.program_id(1)
    cols = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows_m = tl.arange(0, BLOCK_M)
    row_ok = rows_m < M
    r = tl.arange(0, TILE)
    value = r % VALUES
    chunk_word = (r // VALUES) * WORDS  # the word row of each row's chunk within a tile
    scale_shift = (cols % 8) * 4
    shifts = tl.load(table + tl.arange(0, VALUES) * 4 + 1)  # one-word chunks: each value's shift
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * per_split
    last = tl.minimum(first + per_split, tiles)
    for t in range(first, last):
        k = tl.load(perm + row0 + t * TILE + r).to(tl.int32) & 0xFFFF
        xs = tl.load(x + rows_m[:, None] * x_stride + k[None, :], mask=row_ok[:, None], other=0.0)
        base = word0 + t * (TILE // VALUES) * WORDS
        if WORDS == 1:
            # 8, 4 and 2 bits: each value lies whole in one word; read the tile's words once
            # and spread each over the values it holds.
            words = tl.load(
                q_weight + (base + tl.arange(0, TILE // VALUES))[:, None] * N + cols[None, :],
                mask=col_ok[None, :],
                other=0,
            )
            spread = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            q = tl.reshape(spread, (TILE, BLOCK_N))
        else:
            # 6, 5 and 3 bits: every value's first run of bits, read from its word; the few
            # values whose bits span words get the rest below.
            entry = table + value * 4
            words = tl.load(
                q_weight + (base + chunk_word + tl.load(entry))[:, None] * N + cols[None, :],
                mask=col_ok[None, :],
                other=0,
            )
            q = (words >> tl.load(entry + 1)[:, None]) & tl.load(entry + 2)[:, None]
        weights = (q - (1 << (BITS - 1))).to(tl.float16)
        part = tl.dot(xs.to(tl.float16), weights)
        # The values whose bits span words: the rest of their bits, one row at a time as an
        # outer product (a sum over the EXTRA rows would compile to a tensor-core dot whose K is
        # below the instruction's, which counts each product several times).
        for j in tl.static_range(EXTRA):
            k_j = tl.load(perm + row0 + t * TILE + tl.load(extra_rows + j)).to(tl.int32) & 0xFFFF
            x_j = tl.load(x + rows_m * x_stride + k_j, mask=row_ok, other=0.0).to(tl.float32)
            rest = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for piece in tl.static_range(EXTRA_PIECES):
                run = extra_runs + (piece * EXTRA + j) * 4
                shift, bits, place = tl.load(run + 1), tl.load(run + 2), tl.load(run + 3)
                # an unused piece (mask 0) reads the tile's first word and keeps nothing of it
                words = tl.load(q_weight + (base + tl.load(run)) * N + cols, mask=col_ok, other=0)
                rest |= ((words >> shift) & bits) << place
            part += x_j[:, None] * rest.to(tl.float32)[None, :]
        group = tl.load(tile_groups + t)
        packed = tl.load(q_scale + group * (N // 8) + cols // 8, mask=col_ok, other=0)
        quarter = ((packed >> scale_shift) & 15) + 1
        scale = (quarter * quarter).to(tl.float32) * tl.load(scale_max + group)
        acc += part * scale[None, :]
    out = partial + (slot0 + split) * BLOCK_M * N + rows_m[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_kernel(
    partial, bias, y, y_stride, M, N, slots,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    ok = (rows_m[:, None] < M) & (cols[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for slot in range(0, slots):  # in order: the same sum whatever ran when
        acc += tl.load(partial + slot * BLOCK_M * N + rows_m[:, None] * N + cols[None, :], mask=ok)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y + rows_m[:, None] * y_stride + cols[None, :], acc.to(tl.float16), mask=ok)


def matmul(
    x: torch.Tensor,
    weights: Exl2Weights,
    *,
    block_n: int = BLOCK_N,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> torch.Tensor:
    """x (M ≤ 16, K) fp16 -> (M, N) fp16."""
    programs = programs_per_sm * processors(x.device)
    rows, depth = x.shape
    if rows > MAX_ROWS or depth != weights.height or x.stride(1) != 1:
        raise ValueError(
            f"x is {tuple(x.shape)}; this matmul takes up to {MAX_ROWS} contiguous rows of "
            f"{weights.height}."
        )
    n = weights.width
    column_blocks = triton.cdiv(n, block_n)
    plan = [
        splits_for(s.tiles, column_blocks, programs // len(weights.segments))
        for s in weights.segments
    ]
    partial = torch.empty((sum(plan), MAX_ROWS, n), dtype=torch.float32, device=x.device)
    slot = 0
    for segment, splits in zip(weights.segments, plan, strict=True):
        values, words = CHUNKS[segment.bits]
        _segment_kernel[(column_blocks, splits)](
            x, x.stride(0), weights.q_perm, weights.q_weight, weights.q_scale,
            weights.q_scale_max, segment.tile_groups, segment.table, segment.extra_rows,
            segment.extra_runs, partial,
            rows, n, segment.row, segment.word, segment.tiles, -(-segment.tiles // splits), slot,
            BITS=segment.bits, VALUES=values, WORDS=words, EXTRA=segment.extra_rows.numel(),
            EXTRA_PIECES=segment.extra_runs.shape[0],
            TILE=TILE, BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
        )  # fmt: skip
        slot += splits
    y = torch.empty((rows, n), dtype=torch.float16, device=x.device)
    bias = weights.bias if weights.bias is not None else y
    _sum_kernel[(column_blocks,)](
        partial, bias, y, y.stride(0), rows, n, slot,
        HAS_BIAS=weights.bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
    )  # fmt: skip
    return y

"""An EXL2 matmul for decode steps (1 to 16 rows) in Triton, on exllamav2's loaded weights in place.

y = x · W + bias for x (M ≤ 16, K) fp16. W's K input rows sit in q_weight sorted by bit width,
each width one segment of whole chunks (engine/gpu/exl2_layout.py): a chunk is VALUES rows packed
into WORDS words per column, and each value of a chunk lies at the same bits of the same words in
every chunk (`runs`). So one value's rows over a run of chunks form a (chunks, columns) tile that
shifts and masks take out of the chunks' (chunks, columns) word tiles, with no gather.

A call first gathers x through `Exl2Weights.order` into a (M, K') buffer whose columns hold each
segment's rows value by value (value 0 of every chunk, then value 1, ...), each value's run
padded to a multiple of 8 columns. Then there is one launch per segment (a width's groups, of
one size as exllamav2's converter makes them): a program takes BLOCK_N columns and a range of
the segment's steps. A step is STEP ≥ 16 chunks (16: the K of an fp16 tensor-core product); it
loads the chunks' WORDS word tiles (STEP, BLOCK_N), their groups' scales and each value's
(M, STEP) run of x, then for each value of the chunk takes its tile out of the words, scales it
to fp16 and adds its product with the run of x on the tensor cores, in fp32. Every address is
affine in the step (a chunk's group is counted, not looked up), so Triton's pipeliner copies the
next `Launch.stages - 1` steps into shared memory while one is multiplied, and the unpacking
runs on the words as the product reads them (tests/fakes/compiled_dots.py shows both in the
compiled code). A kernel is compiled per width and launch variant, whatever the layer.

Split-K: where the column blocks are too few to fill the GPU, a segment's steps are cut into
ranges, one program each per column block, each writing its sums to a slot of its own. The
layer's last launch, where it has one program per column block, adds the earlier slots in slot
order, its own sums and the bias into y; else a second kernel adds all the slots so. A row's
result depends on its own inputs and the launch variant only, never on timing or on the other
rows (no atomics). The decode graphs take it per layer shape where it matches exllamav2's
product and is faster (engine/gpu/decode_matmul.py, which times the `Launch` variants) unless
--no-custom-matmul is given; tests/engine/test_exl2_matmul*.py check it, bench/matmul_bench.py
times it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.gpu.decode_attention import processors
from engine.gpu.exl2_layout import CHUNKS, bit_map, row_order, segments

MAX_ROWS = 16  # the rows of one decode step this kernel serves (BLOCK_M)
TILE = 32  # rows per group unit: every group is whole 32-row tiles
DOT_DEPTH = 16  # chunks per step at least: the K of an fp16 tensor-core product
RUN_ALIGN = 8  # x's runs start at multiples of 8 fp16 (16 bytes): whole vector copies


@dataclass(frozen=True)
class Launch:
    """How the kernel is launched: a variant the engine times per layer shape at load."""

    block_n: int  # output columns per program
    block_k: int  # input rows per step of a program (at least 16 chunks of the width)
    warps: int
    stages: int  # Triton's software pipeline: the loads of stages - 1 steps ahead in flight
    per_sm: int  # programs per multiprocessor that split-K aims to fill

    @property
    def name(self) -> str:
        return f"n{self.block_n}k{self.block_k}w{self.warps}s{self.stages}p{self.per_sm}"


DEFAULT = Launch(block_n=64, block_k=256, warps=4, stages=3, per_sm=2)


def step_chunks(bits: int, block_k: int) -> int:
    """Chunks per step of a segment of this width: block_k rows, or 16 chunks if more."""
    values, _ = CHUNKS[bits]
    return max(DOT_DEPTH, block_k // values)


def runs(bits: int) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
    """For each value of a chunk, each run of its bits that lies in one word, as (word, shift,
    mask, place in the value): from the layout's bit map. Values lie whole in one word, but at
    6 bits (values 12-15: 4 + 2 bits) and 3 and 5 bits (values 30 and 31: a bit in each word)."""
    out = []
    for places in bit_map(bits):
        value_runs: list[list[int]] = []
        for bit, (word, at) in enumerate(places):
            last = value_runs[-1] if value_runs else None
            if last and last[0] == word and last[1] + last[2].bit_length() == at:
                last[2] = (last[2] << 1) | 1
            else:
                value_runs.append([word, at, 1, bit])
        out.append(tuple((w, shift, mask, place) for w, shift, mask, place in value_runs))
    return tuple(out)


RUNS = {bits: runs(bits) for bits in CHUNKS}


@triton.constexpr_function
def run_count(bits: int, value: int) -> int:
    return len(RUNS[bits][value])


@triton.constexpr_function
def run_of(bits: int, value: int, piece: int) -> tuple[int, int, int, int]:
    return RUNS[bits][value][piece]


@dataclass(frozen=True)
class Segment:
    """Consecutive groups of one width and one size (the last of them may be shorter): one
    launch. In exllamav2's layers, as its converter makes them, a width's groups are one size."""

    bits: int
    chunks: int
    word: int  # first word row in q_weight
    x_row: int  # first column of its runs in the gathered x (a multiple of RUN_ALIGN)
    x_run: int  # columns per value's run in the gathered x: chunks padded to RUN_ALIGN
    group: int  # its first group
    group_rows: int  # rows per group: 32 times a power of 2
    row: int  # first sorted input row


@dataclass(frozen=True)
class Exl2Weights:
    """One quantized layer, read in place: nothing here copies q_weight."""

    q_weight: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor  # fp32 copy of the (groups,) maxima
    bias: torch.Tensor | None
    height: int
    width: int
    segments: tuple[Segment, ...]
    nibbles: torch.Tensor  # (8,) int32: the shift of column n's scale in its word, for n % 8
    order: torch.Tensor  # (K',) int32: the input row of each column of the gathered x (K' ≥ K)


class Unsupported(ValueError):
    """A layer this kernel does not take (exllamav2's kernel keeps it)."""


def prepare(tensors: dict[str, torch.Tensor], height: int) -> Exl2Weights:
    """The layer's loaded tensors, checked and indexed once at load."""
    q_weight = tensors["q_weight"]
    width = q_weight.shape[1]
    if width % 8:
        raise Unsupported(f"{height}x{width}: the width must be a multiple of 8")
    if q_weight.numel() >= 2**31:
        raise Unsupported(f"{height}x{width}: q_weight has 2^31 words or more")
    device = q_weight.device
    segments_ = _segments(tensors["q_groups"].cpu(), height, q_weight.shape[0])
    _check_extents(tensors, segments_, height, width)
    perm = row_order(tensors, height).to(device=device, dtype=torch.int64) & 0xFFFF
    return Exl2Weights(
        q_weight=q_weight,
        q_scale=tensors["q_scale"],
        q_scale_max=tensors["q_scale_max"].float(),
        bias=tensors.get("bias"),
        height=height,
        width=width,
        segments=segments_,
        nibbles=torch.arange(0, 32, 4, dtype=torch.int32, device=device),
        order=perm[_gather_rows(segments_).to(device)].int(),
    )


def _check_extents(
    tensors: dict[str, torch.Tensor], segments_: tuple[Segment, ...], height: int, width: int
) -> None:
    """Every word, scale and bias the kernel reads lies in its tensor (on a GPU a read past one
    is an illegal address): a layer whose tensors disagree with its q_groups is refused."""
    groups = tensors["q_groups"].numel() // 2
    last = segments_[-1]
    wants = {
        "q_weight": (last.word + last.chunks * CHUNKS[last.bits][1], width),
        "q_scale": (groups, width // 8),
        "q_scale_max": (groups,),
        "bias": (width,),
    }
    for name, shape in wants.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape)
            raise Unsupported(f"{height}x{width}: {name} is {got}; its groups make it {shape}")


def _segments(q_groups: torch.Tensor, height: int, words: int) -> tuple[Segment, ...]:
    """The groups, merged where consecutive ones have one width and one size of 32 times a
    power of 2 rows, and a group after them of that width is no larger."""
    merged: list[list[int]] = []  # bits, first row, rows, first word, first group, group rows
    for index, (bits, row, rows, word) in enumerate(segments(q_groups, height, words)):
        if rows <= 0 or rows % TILE or bits not in CHUNKS:
            raise Unsupported(f"a group of {rows} rows at {bits} bits is not whole 32-row tiles")
        last = merged[-1] if merged else None
        size = last[5] if last else 0
        if last and last[0] == bits and last[2] % size == 0 and rows <= size:
            last[2] += rows
        else:
            power = rows & -rows == rows  # else the group is a segment of its own
            merged.append([bits, row, rows, word, index, rows if power else 2 * height])
    out, x_row = [], 0
    for bits, row, rows, word, group, group_rows in merged:
        values, _ = CHUNKS[bits]
        chunks = rows // values
        x_run = -(-chunks // RUN_ALIGN) * RUN_ALIGN
        group_rows = min(group_rows, 1 << (rows - 1).bit_length())  # a power of 2, ≥ rows
        out.append(Segment(bits, chunks, word, x_row, x_run, group, group_rows, row))
        x_row += values * x_run
    return tuple(out)


def _gather_rows(segments_: tuple[Segment, ...]) -> torch.Tensor:
    """For each column of the gathered x, the sorted input row it takes: per segment, value v of
    chunk c at x_row + v·x_run + c; the padding repeats the segment's first row (never used)."""
    columns = sum(CHUNKS[s.bits][0] * s.x_run for s in segments_)
    rows = torch.zeros(-(-columns // 16) * 16, dtype=torch.int64)
    for s in segments_:
        values, _ = CHUNKS[s.bits]
        by_value = torch.full((values, s.x_run), s.row, dtype=torch.int64)
        by_value[:, : s.chunks] = s.row + torch.arange(s.chunks * values).view(-1, values).t()
        rows[s.x_row : s.x_row + values * s.x_run] = by_value.flatten()
    return rows


@dataclass(frozen=True)
class Plan:
    """How a launch variant cuts a layer: per segment, its split-K (programs per column block)
    and the steps each program takes."""

    column_blocks: int
    splits: tuple[int, ...]
    per_split: tuple[int, ...]

    @property
    def finishes(self) -> bool:
        """Whether the last segment's one program per column block writes y (else a sum kernel
        does, from every program's slot)."""
        return self.splits[-1] == 1

    @property
    def slots(self) -> int:
        """Slots of partial sums written: one per program but a finishing one."""
        return sum(self.splits) - self.finishes


def plan(weights: Exl2Weights, launch: Launch, programs: int) -> Plan:
    """Each segment's launch fills `programs` programs, as far as its steps go."""
    column_blocks = triton.cdiv(weights.width, launch.block_n)
    splits, per_split = [], []
    for s in weights.segments:
        steps = triton.cdiv(s.chunks, step_chunks(s.bits, launch.block_k))
        split = max(1, min(steps, triton.cdiv(programs, column_blocks)))
        per_split.append(triton.cdiv(steps, split))
        splits.append(triton.cdiv(steps, per_split[-1]))  # none left without a step
    return Plan(column_blocks, tuple(splits), tuple(per_split))


@triton.jit
def _magic(q):
    """Non-negative int32 values below 2^23 as fp32 plus 2^23, exactly: their bits under the
    exponent of 2^23 (no conversion instruction; less 2^23 after, it is q)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _groups(segment, chunk, VALUES: tl.constexpr):
    """(STEP,) int32: the group of each chunk of a step."""
    _, _, _, _, group0, group_shift = segment
    return group0 + ((chunk * VALUES) >> group_shift)


@triton.jit
def _scales(scales, group, chunk_ok, N, BLOCK_N: tl.constexpr):
    """(STEP, BLOCK_N) fp32, exact: each chunk's group scale at each column; 0 past the segment's
    end, where x's run holds padding. Each word of q_scale is read once (it holds 8 columns')."""
    q_scale, scale_max, scale_words, nibble = scales
    packed = tl.load(
        q_scale + group[:, None] * (N // 8) + scale_words[None, :],
        mask=chunk_ok[:, None] & (scale_words < N // 8)[None, :],
        other=0,
    )
    STEP: tl.constexpr = group.shape[0]
    spread = tl.broadcast_to(packed[:, :, None], (STEP, BLOCK_N // 8, 8))
    quarter = ((spread.reshape(STEP, BLOCK_N) >> nibble[None, :]) & 15) + 1
    top = tl.load(scale_max + group, mask=chunk_ok, other=0.0)
    return (_magic(quarter * quarter) - 8388608.0) * top[:, None]


@triton.jit
def _product(acc, x_in, at, x_run, chunk, q, scale, BITS: tl.constexpr):
    """acc plus one value's run of x (BLOCK_M, STEP) from column `at` of the gathered x times its
    weights (q - 2^(BITS-1)) · scale for the value tile q (STEP, BLOCK_N), in fp16.

    q's bits under the fp16 exponent of 1024 read 1024 + q exactly (no conversion instruction);
    less 1024 + 2^(BITS-1) it is q - 2^(BITS-1) exactly, and times the scale (fp16, as
    exllamav2's kernel takes it) the weight, rounded once. The compiler packs two weights to a
    register for this (half2 arithmetic)."""
    xs, XK, rows_m, row_ok = x_in
    x = tl.load(
        xs + rows_m[:, None] * XK + (at + chunk)[None, :],
        mask=row_ok[:, None] & (chunk < x_run)[None, :],
        other=0.0,
    )
    magic = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    weights = (magic - (1024.0 + (1 << (BITS - 1)))) * scale
    return tl.dot(x, weights, acc)


@triton.jit
def _piece(words, RUN: tl.constexpr):
    """One run of a value's bits, (word, shift, mask, place), from a step's word tiles."""
    return ((words[RUN[0]] >> RUN[1]) & RUN[2]) << RUN[3]


@triton.jit
def _step(acc, x_in, w_in, scales, segment, i, SEGMENT: tl.constexpr):
    """acc plus step i of a segment: STEP chunks, each value's tile one product."""
    BITS: tl.constexpr = SEGMENT[0]
    VALUES: tl.constexpr = SEGMENT[1]
    WORDS: tl.constexpr = SEGMENT[2]
    STEP: tl.constexpr = SEGMENT[3]
    q_weight, N, cols, col_ok = w_in
    chunks, word0, x_row, x_run, _, _ = segment
    chunk = i * STEP + tl.arange(0, STEP)
    chunk_ok = chunk < chunks
    group = _groups(segment, chunk, VALUES)
    scale = _scales(scales, group, chunk_ok, N, cols.shape[0]).to(tl.float16)
    words = ()  # (STEP, BLOCK_N) int32 each: word w of every chunk of the step
    for w in tl.static_range(WORDS):
        at = (word0 + chunk * WORDS + w)[:, None] * N + cols[None, :]
        mask = chunk_ok[:, None] & col_ok[None, :]
        words = words + (tl.load(q_weight + at, mask=mask, other=0),)  # type: ignore[assignment]
    for v in tl.static_range(VALUES):
        q = _piece(words, run_of(BITS, v, 0))
        for p in tl.static_range(1, run_count(BITS, v)):  # bits that span words: 6, 5, 3 bits
            q |= _piece(words, run_of(BITS, v, p))
        acc = _product(acc, x_in, x_row + v * x_run, x_run, chunk, q, scale, BITS)
    return acc


@triton.jit
def _finish(acc, y, partial, bias, slot, finish, M, N, rows_m, cols, HAS_BIAS: tl.constexpr):
    """Write a program's sums: to its slot of partial; or, for the layer's last launch where
    one program takes a column block (finish), to y after the slots before it, in slot order
    (as _sum_kernel adds them), and the bias."""
    ok = (rows_m < M)[:, None] & (cols < N)[None, :]
    at = rows_m[:, None] * N + cols[None, :]
    if finish:
        total = tl.zeros_like(acc)
        for earlier in range(0, slot):
            total += tl.load(partial + earlier * M * N + at, mask=ok, other=0.0)
        total += acc
        if HAS_BIAS:
            total += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y + at, total.to(tl.float16), mask=ok)
    else:
        tl.store(partial + slot * M * N + at, acc, mask=ok)


NOT_SPECIALIZED = ["M", "chunks", "word0", "x_row8", "x_run8", "group0", "group_shift"]


@triton.jit(do_not_specialize=NOT_SPECIALIZED + ["per_split", "slot0", "finish"])
def _segment_kernel(
    xs, XK, q_weight, q_scale, scale_max, nibbles, bias, y, partial, M, N,
    chunks, word0, x_row8, x_run8, group0, group_shift, per_split, slot0, finish,
    SEGMENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N columns over its split's steps of one segment. SEGMENT: (bits,
    values, words, step chunks); x_row8 and x_run8 in 8s of columns (so the compiler knows the
    runs of x are 16-byte aligned); group_shift: log2 of the rows per group."""
    STEP: tl.constexpr = SEGMENT[3]
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    x_in = (xs, XK, rows_m, rows_m < M)
    w_in = (q_weight, N, cols, cols < N)
    scale_words = tl.program_id(0) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    scales = (q_scale, scale_max, scale_words, tl.load(nibbles + cols % 8))  # shift in its word
    segment = (chunks, word0, x_row8 * 8, x_run8 * 8, group0, group_shift)
    first = split * per_split
    last = tl.minimum(first + per_split, (chunks + STEP - 1) // STEP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(first, last):
        acc = _step(acc, x_in, w_in, scales, segment, i, SEGMENT)
    _finish(acc, y, partial, bias, slot0 + split, finish, M, N, rows_m, cols, HAS_BIAS)


@triton.jit
def _sum_kernel(
    partial, bias, y, M, N, slots,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = the slots' sums added in slot order, plus the bias, in fp16."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    ok = (rows_m[:, None] < M) & (cols[None, :] < N)
    at = rows_m[:, None] * N + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for slot in range(0, slots):  # in order: the same sum whatever ran when
        acc += tl.load(partial + slot * M * N + at, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y + at, acc.to(tl.float16), mask=ok)


def kernel_segment(segment: Segment, block_k: int) -> tuple[int, int, int, int]:
    """The kernel's SEGMENT: (bits, values, words, step chunks)."""
    return (segment.bits, *CHUNKS[segment.bits], step_chunks(segment.bits, block_k))


def matmul(x: torch.Tensor, weights: Exl2Weights, launch: Launch = DEFAULT) -> torch.Tensor:
    """x (M ≤ 16, K) fp16 -> (M, N) fp16."""
    rows, depth = x.shape
    if rows > MAX_ROWS or depth != weights.height or x.stride(1) != 1:
        raise ValueError(
            f"x is {tuple(x.shape)}; this matmul takes up to {MAX_ROWS} contiguous rows of "
            f"{weights.height}."
        )
    if x.dtype != torch.float16:
        raise ValueError(f"x is {x.dtype}; this matmul takes float16")
    n = weights.width
    cut = plan(weights, launch, launch.per_sm * processors(x.device))
    xs = x.index_select(1, weights.order)  # contiguous (M, K'): every load below is affine
    y = torch.empty((rows, n), dtype=torch.float16, device=x.device)
    slots = max(cut.slots, 1)  # (at least one: no launch takes a null pointer)
    partial = torch.empty((slots, rows, n), dtype=torch.float32, device=x.device)
    bias = weights.bias if weights.bias is not None else y
    slot = 0
    for index, segment in enumerate(weights.segments):
        splits = cut.splits[index]
        finish = cut.finishes and index == len(weights.segments) - 1
        _segment_kernel[(cut.column_blocks, splits)](
            xs, xs.shape[1], weights.q_weight, weights.q_scale, weights.q_scale_max,
            weights.nibbles, bias, y, partial, rows, n,
            segment.chunks, segment.word, segment.x_row // 8, segment.x_run // 8, segment.group,
            segment.group_rows.bit_length() - 1, cut.per_split[index], slot, int(finish),
            SEGMENT=kernel_segment(segment, launch.block_k), BLOCK_M=MAX_ROWS,
            BLOCK_N=launch.block_n, HAS_BIAS=weights.bias is not None,
            num_warps=launch.warps, num_stages=launch.stages,
        )  # fmt: skip
        slot += splits
    if not cut.finishes:
        _sum_kernel[(cut.column_blocks,)](
            partial, bias, y, rows, n, cut.slots,
            HAS_BIAS=weights.bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=launch.block_n,
        )  # fmt: skip
    return y

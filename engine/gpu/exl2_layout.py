"""exllamav2's EXL2 weights as they sit in VRAM once loaded, read back in plain torch.

A quantized linear layer of exllamav2 0.3.2 (ext.py make_q_matrix, cuda/q_matrix.cu) holds:
- q_weight (K words, N) int32: the K input rows sorted by bit width (8, 6, 5, 4, 3, 2 bits), each
  width one contiguous segment. A chunk of C rows at b bits takes C·b/32 words per column; its
  values are a little-endian bit stream (value i at bits i·b and up), which the load reorders in
  place, chunk by chunk (shuffle_kernel), so that the half2 dequantisation picks them apart.
- q_perm (K,) int16: sorted row s holds the weights of input row q_perm[s]. A down projection
  has none: its load reorders the up projection's outputs instead, so its input comes sorted.
- q_scale (groups, N/8) int32: a 4-bit scale per group and column, eight to a word; q_scale_max
  (groups,) fp16, already times 1/256: a column's scale is (q + 1)² · q_scale_max.
- q_groups (2·groups,) int16: each group's bit width and its first word row.
A weight is (q − 2^(b−1)) · scale. This module is the reference the matmul kernels are checked
against; `bit_map` says where each value's bits lie after the load's reordering.
"""

from __future__ import annotations

from functools import cache

import torch

# bits -> (values per chunk, 32-bit words per chunk) of the load's reordering.
CHUNKS = {8: (4, 1), 6: (16, 3), 5: (32, 5), 4: (8, 1), 3: (32, 3), 2: (16, 1)}
WIDTHS = (8, 6, 5, 4, 3, 2)  # the order of the segments in q_weight
_U32 = 0xFFFFFFFF


def shuffle(bits: int, words: list[int]) -> list[int]:
    """One chunk's words as exllamav2's shuffle_{bits}bit_* leaves them (cuda/quant/qdq_*.cuh)."""
    if bits == 8:
        return list(words)
    if bits in (4, 2):
        return [_spread(words[0], bits)]
    if bits in (3, 5):
        return _shuffle_odd(bits, words)
    return _shuffle_6(words)


def _spread(word: int, bits: int) -> int:
    """4 and 2 bits: even values to the low half-word, odd values to the high one."""
    mask, out = (1 << bits) - 1, 0
    for i in range(16 // bits):
        pair = word >> (2 * bits * i)
        out |= (pair & mask) << (i * bits)
        out |= ((pair >> bits) & mask) << (i * bits + 16)
    return out & _U32


def _shuffle_odd(bits: int, words: list[int]) -> list[int]:
    """3 and 5 bits: each word holds whole values, two per 2·bits, the last two values' bits
    spread one to a word at bits 15 and 31."""
    count = len(words)
    stream = sum(word << (32 * i) for i, word in enumerate(words))
    per_word = 32 // bits // 2 * 2  # whole values per word: 10 at 3 bits, 6 at 5
    mask = (1 << bits) - 1
    values = [(stream >> (bits * i)) & mask for i in range(32)]
    out = []
    for w in range(count):
        word = 0
        for i in range(per_word // 2):
            word |= values[w * per_word + 2 * i] << (i * bits)
            word |= values[w * per_word + 2 * i + 1] << (i * bits + 16)
        out.append(word)
    last_even, last_odd = values[30], values[31]
    for w in range(count):
        out[w] |= ((last_even >> w) & 1) << 15
        out[w] |= ((last_odd >> w) & 1) << 31
    return [word & _U32 for word in out]


def _shuffle_6(words: list[int]) -> list[int]:
    """6 bits: three words of 16 values, four whole values to a word and two split 4 + 2."""
    stream = words[0] | words[1] << 32 | words[2] << 64
    q = [(stream >> (6 * i)) & 0b111111 for i in range(16)]
    out = [q[4 * w] | q[4 * w + 1] << 16 | q[4 * w + 2] << 6 | q[4 * w + 3] << 22 for w in range(3)]
    out[0] |= (q[12] & 0b001111) << 12 | (q[13] & 0b001111) << 28
    out[2] |= (q[12] & 0b110000) << 8 | (q[13] & 0b110000) << 24
    out[1] |= (q[14] & 0b001111) << 12 | (q[15] & 0b001111) << 28
    out[2] |= (q[14] & 0b110000) << 10 | (q[15] & 0b110000) << 26
    return [word & _U32 for word in out]


@cache
def bit_map(bits: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """For each value of a chunk, where its bits lie once loaded: (word, bit), lowest bit first."""
    values, count = CHUNKS[bits]
    where = []
    for value in range(values):
        places = []
        for bit in range(bits):
            at = value * bits + bit
            words = [0] * count
            words[at // 32] = 1 << (at % 32)
            moved = shuffle(bits, words)
            (word,) = [w for w in range(count) if moved[w]]
            places.append((word, moved[word].bit_length() - 1))
        where.append(tuple(places))
    return tuple(where)


def segments(q_groups: torch.Tensor, height: int, words: int) -> list[tuple[int, int, int, int]]:
    """Each group as (bits, first sorted row, rows, first word row)."""
    groups = q_groups.view(-1, 2).tolist()
    out, row = [], 0
    for i, (bits, word) in enumerate(groups):
        end = groups[i + 1][1] if i + 1 < len(groups) else words
        rows = (end - word) * 32 // bits if i + 1 < len(groups) else height - row
        out.append((bits, row, rows, word))
        row += rows
    return out


def unpack(q_weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The values of a run of whole chunks at one width, (rows, N) int64, in their sorted order."""
    values, count = CHUNKS[bits]
    chunks = q_weight.shape[0] // count
    stacked = q_weight.reshape(chunks, count, -1).long() & _U32
    rows = []
    for places in bit_map(bits):
        value = torch.zeros_like(stacked[:, 0])
        for bit, (word, at) in enumerate(places):
            value |= ((stacked[:, word] >> at) & 1) << bit
        rows.append(value)
    return torch.stack(rows, 1).reshape(chunks * values, -1)


def scales(q_scale: torch.Tensor, q_scale_max: torch.Tensor, width: int) -> torch.Tensor:
    """(groups, N) float32: each group's scale per column."""
    packed = q_scale.long() & _U32
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], -1)
    q = nibbles.reshape(q_scale.shape[0], -1)[:, :width].float()
    return (q + 1) ** 2 * q_scale_max.float().view(-1, 1)


def dequantize(tensors: dict[str, torch.Tensor], height: int) -> torch.Tensor:
    """The layer's weights (K, N) float32 in input-row order, from its loaded tensors."""
    q_weight = tensors["q_weight"]
    width = q_weight.shape[1]
    scale = scales(tensors["q_scale"], tensors["q_scale_max"], width)
    parts = []
    for group, (bits, _, rows, word) in enumerate(
        segments(tensors["q_groups"], height, q_weight.shape[0])
    ):
        q = unpack(q_weight[word : word + rows * bits // 32], bits)
        parts.append((q - (1 << (bits - 1))).float() * scale[group])
    weights = torch.cat(parts)
    unsorted = torch.empty_like(weights)
    unsorted[row_order(tensors, height).long() & 0xFFFF] = weights  # int16 holds up to 65,535
    return unsorted


def row_order(tensors: dict[str, torch.Tensor], height: int) -> torch.Tensor:
    """q_perm, or the rows in order where the load left none (int16, as q_perm is)."""
    if "q_perm" in tensors:
        return tensors["q_perm"]
    device = tensors["q_weight"].device
    return torch.arange(height, dtype=torch.int32, device=device).to(torch.int16)

"""The EXL2 layout as exllamav2 leaves it in VRAM, read back on the CPU (engine/gpu/exl2_layout.py).

The reordering's bit positions are checked against the permutation comments in exllamav2 0.3.2's
cuda/quant/qdq_*.cuh, copied below: they say where each value lies, independently of the code.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.gpu.exl2_layout import CHUNKS, WIDTHS, bit_map, dequantize, shuffle, unpack
from tests.fakes.exl2_layers import mixed_widths, pack, random_layer

# Each word from bit 31 down to bit 0; a character names the value whose bit lies there
# (0-9, then a-v for 10-31). A value's bits run from the first word to the last, low to high.
PERMUTATIONS = {
    8: ["33333333 22222222  11111111 00000000"],
    6: [
        "dddd3333 33111111  cccc2222 22000000",
        "ffff7777 77555555  eeee6666 66444444",
        "ffddbbbb bb999999  eeccaaaa aa888888",
    ],
    5: [
        "v5555533 33311111  u4444422 22200000",
        "vbbbbb99 99977777  uaaaaa88 88866666",
        "vhhhhhff fffddddd  ugggggee eeeccccc",
        "vnnnnnll llljjjjj  ummmmmkk kkkiiiii",
        "vtttttrr rrrppppp  usssssqq qqqooooo",
    ],
    4: ["77775555 33331111  66664444 22220000"],
    3: [
        "v9997775 55333111  u8886664 44222000",
        "vjjjhhhf ffdddbbb  uiiiggge eecccaaa",
        "vtttrrrp ppnnnlll  usssqqqo oommmkkk",
    ],
    2: ["ffddbb99 77553311  eeccaa88 66442200"],
}


def test_each_value_lies_where_the_permutation_comments_of_exllamav2_say():
    for bits, words in PERMUTATIONS.items():
        places: dict[int, list[tuple[int, int]]] = {}
        for w, pattern in enumerate(words):
            marks = pattern.replace(" ", "")[::-1]  # index = bit position
            for at, mark in enumerate(marks):
                places.setdefault(int(mark, 36), []).append((w, at))
        assert bit_map(bits) == tuple(tuple(places[v]) for v in range(len(places))), bits


@pytest.mark.parametrize("bits", WIDTHS)
def test_unpacking_returns_every_value_packed_at_each_width(bits):
    count, _ = CHUNKS[bits]
    values = torch.randint(
        0, 2**bits, (4 * count, 5), generator=torch.Generator().manual_seed(bits)
    )
    assert torch.equal(unpack(pack(values, bits), bits), values)


def test_dequantizing_a_layer_of_mixed_widths_gives_each_input_row_its_weights():
    rng = random.Random(7)
    for seed in range(4):
        groups = mixed_widths(rng, 1, 4, most_tiles=3)
        tensors, height, expected = random_layer(seed, groups, width=8 * rng.randint(1, 3))
        assert torch.equal(dequantize(tensors, height), expected), groups


@pytest.mark.parametrize("bits", WIDTHS)
def test_packing_as_loaded_is_the_file_layout_reordered_by_the_ported_shuffle(bits):
    count, words = CHUNKS[bits]
    values = torch.randint(0, 2**bits, (3 * count, 4), generator=torch.Generator().manual_seed(1))
    plain = pack(values, bits, loaded=False).long() & 0xFFFFFFFF
    loaded = pack(values, bits).long() & 0xFFFFFFFF
    for chunk in range(3):
        for n in range(4):
            file_words = plain[chunk * words : (chunk + 1) * words, n].tolist()
            assert (
                shuffle(bits, file_words) == loaded[chunk * words : (chunk + 1) * words, n].tolist()
            )

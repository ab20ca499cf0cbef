"""EXL2 layers as exllamav2's load leaves them (engine/gpu/exl2_layout.py): built at random, or
those of a loaded model."""

from __future__ import annotations

import torch

from engine.gpu.exl2_layout import CHUNKS, WIDTHS, bit_map


def pack(values: torch.Tensor, bits: int, *, loaded: bool = True) -> torch.Tensor:
    """(rows, N) values -> (rows·bits/32, N) int32 words: as exllamav2's load leaves them, or
    (loaded=False) as the file holds them, a plain little-endian bit stream per chunk."""
    count, words = CHUNKS[bits]
    chunks = values.shape[0] // count
    v = values.long().view(chunks, count, -1)
    out = torch.zeros((chunks, words, values.shape[1]), dtype=torch.int64, device=values.device)
    for i, places in enumerate(bit_map(bits)):
        for j, (word, at) in enumerate(places):
            if not loaded:
                word, at = divmod(i * bits + j, 32)
            out[:, word] |= ((v[:, i] >> j) & 1) << at
    out = out.view(chunks * words, -1)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def mixed_widths(rng, fewest: int, most: int, most_tiles: int) -> list[tuple[int, int]]:
    """Groups (bits, rows) of `fewest` to `most` widths, widest first, two groups of 1 to
    `most_tiles` 32-row tiles at each: random_layer's height_groups."""
    widths = sorted(rng.sample(WIDTHS, rng.randint(fewest, most)), reverse=True)
    return [(bits, 32 * rng.randint(1, most_tiles)) for bits in widths for _ in range(2)]


def random_layer(
    seed: int,
    height_groups: list[tuple[int, int]],
    width: int,
    *,
    loaded: bool = True,
    device: str = "cpu",
    weights: bool = True,
):
    """A layer of groups (bits, rows) sorted by width, with a random row order, scales and values:
    (tensors, height, its weights (K, N) float32 in input-row order, or None).

    loaded=False gives the tensors as a file holds them, for exllamav2's make_q_matrix, which
    reorders q_weight and scales q_scale_max by 1/256 in place: then they read as loaded."""
    rng = torch.Generator(device).manual_seed(seed)
    words, q_groups, values = [], [], []
    row_word = 0
    for bits, rows in height_groups:
        v = torch.randint(0, 2**bits, (rows, width), generator=rng, device=device)
        q_groups += [bits, row_word]
        words.append(pack(v, bits, loaded=loaded))
        values.append((v, bits))
        row_word += rows * bits // 32
    height = sum(rows for _, rows in height_groups)
    groups = len(height_groups)
    q_scale_values = torch.randint(0, 16, (groups, width), generator=rng, device=device)
    packed = sum(q_scale_values[:, i::8].long() << (4 * i) for i in range(8))
    perm = torch.randperm(height, generator=rng, device=device)
    # Small enough that sums over 24,576 inputs stay far from fp16's limit, and normal fp16
    # numbers: exllamav2 scales them by 1/256 in place and they must come back exact.
    scale_max = ((0.5 + torch.rand(groups, generator=rng, device=device)) / 4096).half()
    tensors = {
        "q_weight": torch.cat(words),
        "q_perm": perm.to(torch.int16),
        "q_invperm": torch.argsort(perm).to(torch.int16),
        "q_scale": torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32),
        "q_scale_max": scale_max if loaded else scale_max * 256,
        "q_groups": torch.tensor(q_groups, dtype=torch.int16, device=device),
    }
    if not weights:
        return tensors, height, None
    scale = (q_scale_values + 1).float() ** 2 * scale_max.float().view(-1, 1)
    sorted_weights = torch.cat(
        [(v - 2 ** (bits - 1)).float() * scale[g] for g, (v, bits) in enumerate(values)]
    )
    expected = torch.empty_like(sorted_weights)
    expected[perm] = sorted_weights
    return tensors, height, expected


def exllamav2_matrix(
    tensors: dict[str, torch.Tensor], scratch: torch.Tensor | None = None
) -> tuple[int, torch.Tensor]:
    """exllamav2's QMatrix over file-layout tensors on the GPU (reordered in place): its handle
    for ext_c.gemm_half_q_half and the scratch it may dequantise into (layers may share one),
    which must outlive it."""
    from exllamav2.ext import make_q_matrix

    if scratch is None:
        size = tensors["q_perm"].numel() * tensors["q_weight"].shape[1]
        scratch = torch.empty(size, dtype=torch.float16, device=tensors["q_weight"].device)
    return make_q_matrix(tensors, scratch), scratch


def quantized_layers(model) -> list:
    """The EXL2 linear layers of a loaded exllamav2 model."""
    from exllamav2.linear import ExLlamaV2Linear

    return [
        module
        for module in model.modules_dict.values()
        if isinstance(module, ExLlamaV2Linear) and module.q_handle is not None
    ]

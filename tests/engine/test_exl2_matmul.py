"""The EXL2 decode matmul (engine/gpu/exl2_matmul.py) against x · W from the layout's reference
dequantisation; on the CPU, Triton's interpreter runs the kernels' own code on small layers."""

from __future__ import annotations

import random

import pytest
import torch

from engine.gpu.exl2_layout import WIDTHS, bit_map, dequantize
from engine.gpu.exl2_matmul import MAX_ROWS, Unsupported, lookup, matmul, prepare
from tests.fakes.exl2_layers import mixed_widths, random_layer


@pytest.mark.parametrize("bits", WIDTHS)
def test_the_lookup_table_rebuilds_every_bit_of_every_value(bits):
    table = lookup(bits)
    for value, places in enumerate(bit_map(bits)):
        covered = []
        for word, shift, mask, place in table[:, value].tolist():
            covered += [(word, shift + i) for i in range(mask.bit_length())]
            assert mask & (mask + 1) == 0  # one run of bits
            assert place == len(covered) - mask.bit_length() or mask == 0
        assert covered == list(places)


@pytest.mark.parametrize("bits", WIDTHS)
def test_each_width_alone_multiplies_as_its_weights_do_at_any_launch_shape(bits):
    tensors, height, weights = random_layer(bits, [(bits, 64), (bits, 32)], width=104)
    layer = prepare(tensors, height)
    for rows, block_n, per_sm in ((1, 32, 1), (MAX_ROWS, 128, 3)):
        x = torch.randn(rows, height, generator=torch.Generator().manual_seed(rows)).half()
        want = x.float() @ weights
        got = matmul(x, layer, block_n=block_n, programs_per_sm=per_sm).float()
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3 * want.abs().max()), (rows, block_n)


def test_random_layers_of_mixed_widths_multiply_as_their_weights_do():
    rng = random.Random(3)
    for seed in range(3):
        groups = mixed_widths(rng, 2, 4, most_tiles=2)
        tensors, height, weights = random_layer(seed, groups, width=8 * rng.randint(9, 12))
        if seed == 1:
            tensors["bias"] = torch.randn(weights.shape[1]).half()
        layer = prepare(tensors, height)
        for rows in (1, rng.randint(2, MAX_ROWS - 1), MAX_ROWS):
            x = torch.randn(rows, height, generator=torch.Generator().manual_seed(seed)).half()
            want = x.float() @ weights
            if "bias" in tensors:
                want += tensors["bias"].float()
            got = matmul(x, layer, programs_per_sm=2).float()
            assert torch.allclose(got, want, rtol=2e-3, atol=2e-3 * want.abs().max()), (
                groups,
                rows,
            )


def test_a_row_gets_the_same_result_whatever_rows_share_its_step():
    tensors, height, _ = random_layer(5, [(6, 64), (4, 64), (3, 32)], width=80)
    layer = prepare(tensors, height)
    x = torch.randn(MAX_ROWS, height, generator=torch.Generator().manual_seed(0)).half()
    alone = matmul(x[3:4].contiguous(), layer, programs_per_sm=2)
    assert torch.equal(matmul(x, layer, programs_per_sm=2)[3:4], alone)


def test_layers_the_kernel_cannot_take_are_refused_with_the_reason():
    tensors, height, _ = random_layer(0, [(4, 48)], width=16)  # 48 rows: not whole 32-row tiles
    with pytest.raises(Unsupported, match="48 rows at 4 bits"):
        prepare(tensors, height)
    tensors, height, _ = random_layer(0, [(4, 32)], width=16)
    with pytest.raises(ValueError, match="up to 16 contiguous rows of 32"):
        matmul(torch.zeros(17, 32).half(), prepare(tensors, height))


def test_a_layer_the_load_left_without_q_perm_takes_its_input_rows_in_order():
    """A down projection: the load reorders the up projection's outputs to match its rows."""
    tensors, height, weights = random_layer(6, [(5, 32), (4, 64)], width=40)
    sorted_weights = weights[tensors.pop("q_perm").long()]  # row s is input row q_perm[s]
    del tensors["q_invperm"]
    x = torch.randn(3, height, generator=torch.Generator().manual_seed(1)).half()
    got = matmul(x, prepare(tensors, height)).float()
    want = x.float() @ sorted_weights
    assert (got - want).abs().max() <= 4e-3 * want.abs().max()
    assert torch.equal(dequantize(tensors, height), sorted_weights)


def test_compiled_for_the_gpu_every_tensor_core_product_is_as_deep_as_the_instruction():
    """Triton's compiler (not its interpreter, which runs every CPU test here) turns a product
    summed over a few rows into a tensor-core dot; below the instruction's depth (K of 16 for fp16,
    8 for tf32) each product was counted several times on an H200. Compiled here for sm_80 and
    sm_90 without a GPU: the only dot is the tile's 16 rows by 32 inputs."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-m", "tests.fakes.compiled_dots"], capture_output=True, text=True,
        timeout=300, env=environment,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == 12
    for kernel, dots in found.items():
        assert dots == [[MAX_ROWS, 32]], kernel

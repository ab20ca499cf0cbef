"""The EXL2 decode matmul (engine/gpu/exl2_matmul.py) against x · W from the layout's reference
dequantisation; on the CPU, Triton's interpreter runs the kernels' own code on small layers, and
fails any read or write outside the tensors a kernel is given (tests/fakes/checked_memory.py)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.gpu.decode_matmul import LAUNCHES
from engine.gpu.exl2_layout import WIDTHS, bit_map, dequantize
from engine.gpu.exl2_matmul import (
    DEFAULT,
    MAX_ROWS,
    Launch,
    Unsupported,
    matmul,
    plan,
    prepare,
    runs,
    step_chunks,
)
from tests.fakes.checked_memory import checked_memory
from tests.fakes.exl2_layers import mixed_widths, random_layer


@pytest.fixture(autouse=True)
def bounds_checked():
    with checked_memory() as launched:
        yield launched


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.float(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


@pytest.mark.parametrize("bits", WIDTHS)
def test_the_runs_rebuild_every_bit_of_every_value(bits):
    for value, places in enumerate(bit_map(bits)):
        covered = []
        for word, shift, mask, place in runs(bits)[value]:
            assert mask & (mask + 1) == 0 and mask  # one run of bits
            assert place == len(covered)
            covered += [(word, shift + i) for i in range(mask.bit_length())]
        assert covered == list(places)


@pytest.mark.parametrize("bits", WIDTHS)
def test_each_width_alone_multiplies_as_its_weights_do_at_any_launch_shape(bits):
    tensors, height, weights = random_layer(bits, [(bits, 64), (bits, 32)], width=104)
    layer = prepare(tensors, height)
    assert [s.group_rows for s in layer.segments] == [64]  # the last group shorter
    shapes = ((1, Launch(32, 64, 2, 3, 1)), (MAX_ROWS, Launch(128, 256, 4, 2, 3)))
    for rows, launch in shapes:
        x = torch.randn(rows, height, generator=torch.Generator().manual_seed(rows)).half()
        assert close(matmul(x, layer, launch), x.float() @ weights), (rows, launch)


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
            assert close(matmul(x, layer), want), (groups, rows)


def uniform_layer(seed: int, rng: random.Random):
    """A layer as exllamav2's converter makes them: at each width groups of one size (32, 64 or
    128 rows), the last group of the layer maybe shorter; K rarely a multiple of a step."""
    widths = sorted(rng.sample(WIDTHS, rng.randint(2, 3)), reverse=True)
    groups = []
    for bits in widths:
        size = 32 * rng.choice((1, 2, 4))
        groups += [(bits, size)] * rng.randint(1, 3)
    bits, size = groups[-1]
    groups[-1] = (bits, 32 * rng.randint(1, size // 32))
    return random_layer(seed, groups, width=8 * rng.randint(3, 25))


def test_every_launch_variant_multiplies_as_the_weights_do():
    """K and N are not multiples of any step or column block; 1, some and 16 rows."""
    rng = random.Random(11)
    layers = [uniform_layer(seed, rng) for seed in range(2)]
    layers.append(random_layer(7, mixed_widths(rng, 3, 3, most_tiles=2), width=8 * 13))
    for tensors, height, weights in layers:
        tensors["bias"] = torch.randn(weights.shape[1]).half()
        layer = prepare(tensors, height)
        for launch in LAUNCHES:
            for rows in (1, rng.randint(2, MAX_ROWS - 1), MAX_ROWS):
                x = torch.randn(rows, height, generator=torch.Generator().manual_seed(rows)).half()
                want = x.float() @ weights + tensors["bias"].float()
                assert close(matmul(x, layer, launch), want), (layer.segments, launch, rows)


def test_a_width_is_one_launch_where_its_groups_are_one_size():
    rng = random.Random(11)
    tensors, height, _ = uniform_layer(0, rng)
    layer = prepare(tensors, height)
    assert len(layer.segments) == len(
        {bits for bits, _ in tensors["q_groups"].view(-1, 2).tolist()}
    )
    tensors, height, _ = random_layer(0, [(4, 32), (4, 64), (4, 64), (4, 96), (3, 32)], width=16)
    layer = prepare(tensors, height)
    assert [(s.bits, s.chunks * 8, s.group_rows) for s in layer.segments[:3]] == [
        (4, 32, 32),
        (4, 128, 64),
        (4, 96, 128),  # not a power of 2: a segment of its own
    ]
    assert max(plan(layer, DEFAULT, programs=16).splits) == 1  # one step each
    assert plan(prepare(*random_layer(0, [(4, 1024)], 16)[:2]), DEFAULT, 16).splits == (4,)


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.name)
def test_a_row_gets_the_same_bits_whatever_rows_share_its_step(launch):
    tensors, height, _ = random_layer(5, [(6, 64), (4, 96), (3, 32)], width=80)
    layer = prepare(tensors, height)
    x = torch.randn(MAX_ROWS, height, generator=torch.Generator().manual_seed(0)).half()
    together = matmul(x, layer, launch)
    for row in (0, 3, 15):
        assert torch.equal(together[row : row + 1], matmul(x[row : row + 1], layer, launch))


def test_layers_the_kernel_cannot_take_are_refused_with_the_reason():
    tensors, height, _ = random_layer(0, [(4, 48)], width=16)  # 48 rows: not whole 32-row tiles
    with pytest.raises(Unsupported, match="48 rows at 4 bits"):
        prepare(tensors, height)
    tensors, height, _ = random_layer(0, [(6, 64), (4, 32)], width=16)
    short = dict(tensors, q_scale=tensors["q_scale"][:1])  # its reads would leave the tensor
    with pytest.raises(
        Unsupported, match=r"96x16: q_scale is \(1, 2\); its groups make it \(2, 2\)"
    ):
        prepare(short, height)
    with pytest.raises(Unsupported, match=r"q_weight is \(12, 16\); its groups make it \(16, 16\)"):
        prepare(dict(tensors, q_weight=tensors["q_weight"][:-4]), height)
    tensors, height, _ = random_layer(0, [(4, 32)], width=16)
    with pytest.raises(ValueError, match="up to 16 contiguous rows of 32"):
        matmul(torch.zeros(17, 32).half(), prepare(tensors, height))
    with pytest.raises(ValueError, match="takes float16"):
        matmul(torch.zeros(2, 32), prepare(tensors, height))


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


def test_the_last_launch_finishes_the_sum_where_it_has_one_program_a_column_block(
    bounds_checked,
):
    """Each width is a launch; their programs' sums meet in slots, added in slot order by the
    last launch where it has one program per column block, else by a sum kernel."""
    tensors, height, weights = random_layer(2, [(5, 512), (4, 512)], width=512)
    layer = prepare(tensors, height)
    x = torch.randn(2, height, generator=torch.Generator().manual_seed(2)).half()
    kernel = "_segment_kernel"
    cases = ((1, [kernel, kernel]), (8, [kernel, kernel, "_sum_kernel"]))  # 8 column blocks
    for per_sm, kernels in cases:
        bounds_checked.clear()
        launch = Launch(64, 128, 4, 3, per_sm)  # 4 steps of 128 rows at 4 bits, 1 at 5
        assert close(matmul(x, layer, launch), x.float() @ weights)
        assert bounds_checked == kernels or not bounds_checked  # (none listed on a GPU)
    assert plan(layer, Launch(64, 128, 4, 3, 8), programs=64).splits == (1, 4)


def test_a_step_is_at_least_the_depth_of_a_tensor_core_product():
    for bits in WIDTHS:
        for launch in LAUNCHES:
            assert step_chunks(bits, launch.block_k) >= 16


def test_compiled_for_the_gpu_the_main_loop_is_prefetched_and_every_product_is_deep_enough():
    """Triton's compiler (not its interpreter, which runs every other CPU test here), for sm_80
    and sm_90 without a GPU, at the default launch: every tensor-core product takes 16 rows of x
    and at least 16 inputs (below the instruction's depth, K of 16 for fp16, each product was
    counted several times on an H200); every read of the main loop (words, scales, x) is an
    async copy into shared memory, none a plain load the loop would wait on, with `stages - 1`
    steps of them buffered."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    runs_ = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.compiled_dots", str(capability)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )  # fmt: skip
        for capability in (80, 90)
    ]
    for done in runs_:
        out, err = done.communicate(timeout=600)
        assert done.returncode == 0, err[-3000:]
        found = json.loads(out.strip().splitlines()[-1])
        assert len(found) == len(WIDTHS)
        for width, loop in found.items():
            bits = int(width.split()[0])
            step = step_chunks(bits, DEFAULT.block_k)
            assert {tuple(dot) for dot in loop["dots"]} == {(MAX_ROWS, step)}, width
            assert loop["plain_loads"] == [], width
            assert f"{step}x{DEFAULT.block_n} i32" in loop["copies"], width  # the word tiles
            assert f"{MAX_ROWS}x{step} f16" in loop["copies"], width  # x's runs
            assert loop["buffers"] == [DEFAULT.stages - 1], width

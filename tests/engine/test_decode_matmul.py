"""Which layers take our EXL2 matmul inside a decode graph, and how they are put back (on the CPU:
exllamav2's modules are stood in for by plain objects with the attributes read; the kernel runs in
Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from engine.gpu.decode_matmul import DecodeMatmul, Layer, parted
from engine.gpu.exl2_matmul import DEFAULT, prepare
from tests.fakes.exl2_layers import random_layer


class Linear:
    """Stands in for exllamav2's ExLlamaV2Linear: its class forward is exllamav2's kernel."""

    def __init__(self, key: str):
        self.key = key

    def forward(self, hidden_states, *args, **kwargs):
        return "exllamav2's kernel"


class Holder:
    """Stands in for an attention or MLP module: a fused C++ forward while q_handle is set."""

    def __init__(self, *linears: Linear):
        self.q_handle = object()
        self.submodules = list(linears)


def layer(key: str, seed: int, groups, width: int):
    tensors, height, weights = random_layer(seed, groups, width)
    return Layer(Linear(key), prepare(tensors, height)), weights


@pytest.fixture
def model():
    q, q_weights = layer("q_proj", 0, [(8, 32), (4, 64)], 48)
    o, _ = layer("o_proj", 1, [(6, 32), (4, 64)], 48)  # the same shape as q: one choice for both
    up, up_weights = layer("up_proj", 2, [(5, 64), (3, 32)], 64)
    attention, mlp = Holder(q.linear, o.linear), Holder(up.linear)
    head = Linear("lm_head")  # a module of the model that holds no layer of ours
    head.q_handle = object()
    modules = [attention, mlp, head]
    return type("Model", (), {"modules": modules}), [q, o, up], (q_weights, up_weights)


def test_within_serving_the_chosen_layers_call_ours_and_their_modules_leave_the_fused_path(model):
    loaded, layers, (q_weights, up_weights) = model
    attention, mlp, head = loaded.modules
    handles = (attention.q_handle, mlp.q_handle, head.q_handle)
    matmul = DecodeMatmul(layers, {}, faster_only=False)
    matmul.choose(3)
    assert matmul.launches[3] == {(96, 48): DEFAULT, (96, 64): DEFAULT}
    x = torch.randn(3, 1, 96).half()
    with matmul.serving(loaded, 3):
        assert attention.q_handle is None and mlp.q_handle is None
        assert head.q_handle is handles[2]
        y = layers[0].linear.forward(x, cache=None, loras=None)
        assert y.shape == (3, 1, 48)
        assert parted(y[:, 0], (x[:, 0].float() @ q_weights)) < 4e-3
        up = layers[2].linear.forward(x)
        assert parted(up[:, 0], (x[:, 0].float() @ up_weights)) < 4e-3
    assert (attention.q_handle, mlp.q_handle, head.q_handle) == handles
    assert all(each.linear.forward(x) == "exllamav2's kernel" for each in layers)


def test_a_batch_size_whose_step_parts_from_exllamav2s_keeps_exllamav2s_kernels(model):
    loaded, layers, _ = model
    attention = loaded.modules[0]
    logits = torch.randn(4, 1, 1000) * 20
    matmul = DecodeMatmul(layers, {}, faster_only=False)

    def step(parts_by: float):
        # our step's logits (the attention module off its fused path) part by `parts_by`
        return lambda: logits + (parts_by if attention.q_handle is None else 0.0)

    matmul.prepare_batch(loaded, 1, step(0.01))
    matmul.prepare_batch(loaded, 4, step(5.0))
    assert matmul.serves(1) and not matmul.serves(4)
    with matmul.serving(loaded, 4):
        assert all(module.q_handle is not None for module in loaded.modules)
        assert layers[0].linear.forward(None) == "exllamav2's kernel"
    line = matmul.summary(4)
    assert line.startswith("EXL2 matmul: ours for 2 of 2 shapes at 1 job(s), 0 of 2 shapes at 4")
    assert "1 batch size(s) kept exllamav2's (4: the step's logits parted" in line


def test_a_step_that_cannot_run_ours_keeps_exllamav2s_kernels_and_says_why(model):
    loaded, layers, _ = model
    matmul = DecodeMatmul(layers, {}, faster_only=False)

    def step():
        if loaded.modules[0].q_handle is None:
            raise RuntimeError("no kernel image is available for execution on the device")
        return torch.zeros(1, 1, 10)

    matmul.prepare_batch(loaded, 2, step)
    assert not matmul.serves(2)
    assert "(2: RuntimeError: no kernel image" in matmul.summary(2)
    assert all(module.q_handle is not None for module in loaded.modules)  # put back


def test_more_rows_than_the_kernel_takes_keep_exllamav2s_kernel(model):
    _, layers, _ = model
    matmul = DecodeMatmul(layers, {}, faster_only=False)
    matmul.choose(17)
    assert not matmul.serves(17)


def test_the_summary_says_why_no_layer_takes_ours():
    line = DecodeMatmul([], {"model.layers.0.mlp.up_proj": "not EXL2 (fp16 weights)"}).summary(8)
    assert line == "EXL2 matmul: exllamav2's (ours takes no layer: not EXL2 (fp16 weights))"

"""The EXL2 decode matmul on the GPU: against the exact product and exllamav2's own kernel
(gemm_half_q_half) on layers exllamav2 itself reordered at load, on every width, odd shapes and
1 to 16 rows; repeatable run to run and row by row; and inside a CUDA graph."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from engine.gpu.decode_matmul import LAUNCHES  # noqa: E402
from engine.gpu.exl2_layout import WIDTHS, dequantize  # noqa: E402
from engine.gpu.exl2_matmul import DEFAULT, MAX_ROWS, matmul, prepare  # noqa: E402
from tests.engine.test_engine_gpu import load_exllamav2  # noqa: E402
from tests.fakes.exl2_layers import exllamav2_matrix, quantized_layers, random_layer  # noqa: E402

pytestmark = pytest.mark.gpu


def errors(x, layer, handle, want, launch=DEFAULT):
    """Largest error of ours and of exllamav2's, relative to the largest output."""
    from exllamav2.ext import exllamav2_ext as ext_c

    theirs = torch.empty((x.shape[0], want.shape[1]), dtype=torch.half, device="cuda")
    ext_c.gemm_half_q_half(x, handle, theirs, False)
    ours = matmul(x, layer, launch)
    top = want.abs().max()
    return float((ours.float() - want).abs().max() / top), float(
        (theirs.float() - want).abs().max() / top
    )


def test_synthetic_layers_match_the_exact_product_as_closely_as_exllamav2_does():
    rng = random.Random(0)
    cases = [[(bits, 64)] for bits in WIDTHS]  # each width alone
    cases += [
        sorted([(b, 32 * rng.randint(1, 6)) for b in rng.sample(WIDTHS, rng.randint(2, 5))])[::-1]
        for _ in range(6)
    ]
    worst = {}
    for seed, groups in enumerate(cases):
        width = 8 * rng.randint(20, 400)  # not a multiple of the column block as a rule
        tensors, height, weights = random_layer(seed, groups, width, loaded=False, device="cuda")
        handle, scratch = exllamav2_matrix(tensors)  # reorders q_weight in place
        layer = prepare(tensors, height)
        for rows in sorted({1, 2, rng.randint(3, 15), MAX_ROWS}):
            x = torch.randn(rows, height, device="cuda").half()
            ours, theirs = errors(x, layer, handle, x.float() @ weights)
            # fp16 output rounding is 2^-11 of a value; both add in a different order.
            assert ours < 4e-3 and ours <= 2 * theirs + 1e-3, (groups, width, rows, ours, theirs)
            worst[str(groups)] = max(worst.get(str(groups), 0.0), ours)
        del scratch
    print("largest error relative to the largest output:", max(worst.values()))


@pytest.mark.parametrize("model", ["exl2", "decisive-exl2"])
def test_every_layer_of_a_loaded_model_multiplies_as_exllamav2s_kernel_does(model, request):
    folder = request.getfixturevalue(model.replace("-", "_") + "_dir")
    loaded, _ = load_exllamav2(folder)
    try:
        for module in quantized_layers(loaded):
            layer = prepare(module.q_tensors, module.in_features)
            weights = dequantize(module.q_tensors, module.in_features)
            for rows in (1, 5, MAX_ROWS):
                x = torch.randn(rows, module.in_features, device="cuda").half()
                want = x.float() @ weights.cuda()
                if module.has_bias:
                    want += module.q_tensors["bias"].float()
                ours, theirs = errors(x, layer, module.q_handle, want)
                assert ours < 4e-3 and ours <= 2 * theirs + 1e-3, (module.key, rows, ours, theirs)
    finally:
        loaded.unload()


def test_a_row_gets_the_same_bits_every_run_and_whatever_rows_share_its_step():
    tensors, height, _ = random_layer(1, [(8, 256), (6, 512), (4, 1024)], 4096, device="cuda")
    layer = prepare(tensors, height)
    x = torch.randn(MAX_ROWS, height, device="cuda").half()
    first = matmul(x, layer)
    assert all(torch.equal(matmul(x, layer), first) for _ in range(5))
    for row in (0, 7, 15):
        assert torch.equal(matmul(x[row : row + 1].contiguous(), layer), first[row : row + 1])


def test_the_matmul_replays_from_a_cuda_graph():
    tensors, height, weights = random_layer(2, [(5, 256), (3, 256)], 1000, device="cuda")
    layer = prepare(tensors, height)
    x = torch.randn(4, height, device="cuda").half()
    matmul(x, layer)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = matmul(x, layer)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, matmul(x, layer))
    assert torch.allclose(y.float(), x.float() @ weights, rtol=0, atol=4e-3 * y.abs().max())


def test_every_launch_variant_that_fits_this_gpu_multiplies_right_and_row_by_row():
    """Each variant the engine may choose, on layers whose K and N are no multiple of its step or
    column block, with each width's groups of one size (as exllamav2's converter makes them) or
    not; a variant needing more shared memory than this GPU has is skipped, as the engine does."""
    from triton.runtime.errors import OutOfResources

    layers = [
        [(8, 64), (8, 64), (6, 32), (5, 128), (5, 128), (5, 96), (4, 128), (3, 64), (2, 32)],
        [(6, 32), (6, 32), (4, 64), (4, 64), (4, 32)],
    ]
    ran = 0
    for seed, groups in enumerate(layers):
        tensors, height, weights = random_layer(seed, groups, 8 * 301, loaded=False, device="cuda")
        handle, scratch = exllamav2_matrix(tensors)
        layer = prepare(tensors, height)
        x = torch.randn(MAX_ROWS, height, device="cuda").half()
        for launch in LAUNCHES:
            try:
                together = matmul(x, layer, launch)
            except OutOfResources:
                continue
            ran += 1
            for rows in (1, 7):
                want = x[:rows].float() @ weights
                ours, theirs = errors(x[:rows], layer, handle, want, launch)
                assert ours < 4e-3 and ours <= 2 * theirs + 1e-3, (launch, rows, ours, theirs)
            for row in (0, 9, 15):
                alone = matmul(x[row : row + 1].contiguous(), layer, launch)
                assert torch.equal(alone, together[row : row + 1]), (launch, row)
        del scratch
    assert ran >= len(layers)  # the default fits every GPU the app runs on

"""The CPU reading of the EXL2 layout (engine/gpu/exl2_layout.py) against exllamav2's own
reconstruction (`ext_c.reconstruct`, fp16) of every quantized layer of a loaded model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from engine.gpu.exl2_layout import dequantize, segments  # noqa: E402
from tests.engine.test_engine_gpu import load_exllamav2  # noqa: E402
from tests.fakes.exl2_layers import quantized_layers  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["exl2", "decisive-exl2"])
def test_every_loaded_layer_reads_back_as_exllamav2_reconstructs_it(model, request):
    folder = request.getfixturevalue(model.replace("-", "_") + "_dir")
    loaded, _ = load_exllamav2(folder)
    layers = quantized_layers(loaded)
    widths = set()
    try:
        for layer in layers:
            tensors = {k: v.cpu() for k, v in layer.q_tensors.items() if v is not None}
            ours = dequantize(tensors, layer.in_features)
            theirs = layer.get_weight_tensor_dq().float().cpu()
            # exllamav2 rounds the scale, then each weight, to fp16: within 2 fp16 ulps.
            assert torch.allclose(ours, theirs, rtol=2**-9, atol=1e-7), layer.key
            widths |= {
                bits
                for bits, *_ in segments(
                    tensors["q_groups"], layer.in_features, tensors["q_weight"].shape[0]
                )
            }
    finally:
        loaded.unload()
    print(f"{model}: {len(layers)} layers, widths {sorted(widths)}")
    assert layers and len(widths) > 1

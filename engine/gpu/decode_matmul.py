"""Our EXL2 matmul (engine/gpu/exl2_matmul.py) in the decode graphs, where it is right and faster.

At load every EXL2 layer is indexed in place (nothing is copied) and multiplied once by random rows
with both kernels: a layer whose product parts from exllamav2's `gemm_half_q_half` by more than fp16
noise keeps exllamav2's kernel. Before each batch size is captured, each layer shape (in, out) is
timed with exllamav2's kernel and each of our launch variants (LAUNCHES) over all of its layers in a
CUDA graph, as a step runs them, and ours takes the shapes where a variant is faster, with that
variant. (The first load compiles a kernel per bit width and variant, a few seconds each; Triton
keeps them on disk for the next.) While that batch size is captured, those layers call ours, and the
attention and MLP modules holding them run exllamav2's Python forward (the same norms, rotary
embedding and attention, each projection through its layer's forward) instead of the fused C++ one.
Last, the whole step is computed both ways: where the logits part, the batch size keeps exllamav2's
kernels throughout. Prefill and eager decode always use exllamav2's. An engine made with
custom_matmul=False (--no-custom-matmul) skips all of this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.gpu.exl2_matmul import (
    DEFAULT,
    MAX_ROWS,
    Exl2Weights,
    Launch,
    Unsupported,
    matmul,
    prepare,
)
from engine.gpu.loading import is_oom

# Launch variants timed per layer shape (engine/gpu/exl2_matmul.py, Launch). Compiled for sm_90
# (python -m tests.fakes.compiled_dots --launches), a program takes 19-169 KB of shared memory and
# 72-255 registers a thread by width and variant, and as many as fit an H100 multiprocessor keep
# 33-164 KB of weights in flight; the main loop runs 5-8 instructions per weight. A variant that
# needs more shared memory than this GPU has (some widths on an A100 or L4) is skipped.
LAUNCHES = (
    DEFAULT,  # 64 columns, 256 rows a step, 4 warps, 3 stages, 2 programs per SM
    Launch(block_n=64, block_k=256, warps=4, stages=4, per_sm=2),  # a step more in flight
    Launch(block_n=64, block_k=128, warps=4, stages=4, per_sm=4),  # short steps, more programs
    Launch(block_n=32, block_k=256, warps=2, stages=4, per_sm=4),  # narrow: few columns (k, v)
    Launch(block_n=128, block_k=256, warps=8, stages=3, per_sm=2),
    Launch(block_n=256, block_k=128, warps=8, stages=3, per_sm=1),  # wide: many columns
)
# Largest difference from exllamav2's product, relative to its largest output, that is still the
# same product: each kernel is within 4e-3 of the exact one (tests/engine/test_exl2_matmul_gpu.py).
SAME_PRODUCT = 1e-2
# The same for a whole decode step's logits: 40 layers of such differences, never a wrong layout
# (which parts by the size of the logits themselves).
SAME_STEP = 5e-2


def replay_ms(step: Callable[[], Any], repeats: int = 20) -> float:
    """Mean time of one replay of `step` captured as a CUDA graph (compiled and tuned first)."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def parted(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest difference relative to the largest of `theirs`."""
    top = theirs.float().abs().max().clamp_min(1e-6)
    return float((ours.float() - theirs.float()).abs().max() / top)


@dataclass
class Layer:
    linear: Any  # exllamav2's ExLlamaV2Linear
    weights: Exl2Weights

    @property
    def shape(self) -> tuple[int, int]:
        return self.weights.height, self.weights.width

    def theirs(self, x: torch.Tensor) -> torch.Tensor:
        from exllamav2.ext import exllamav2_ext as ext_c

        out = torch.empty((x.shape[0], self.weights.width), dtype=torch.half, device=x.device)
        ext_c.gemm_half_q_half(x, self.linear.q_handle, out, False)
        return out


@dataclass
class DecodeMatmul:
    """Which layers of one loaded model take our matmul, per batch size."""

    layers: list[Layer]
    refused: dict[str, str]  # layer key -> why it keeps exllamav2's kernel
    launches: dict[int, dict[tuple[int, int], Launch]] = field(default_factory=dict)
    fell_back: dict[int, str] = field(default_factory=dict)  # batch -> why it keeps exllamav2's
    faster_only: bool = True  # False: ours for every layer it takes, untimed (tests)

    @classmethod
    def for_model(cls, model: Any, rows: int) -> DecodeMatmul:
        """Index and check every EXL2 layer of a loaded model against exllamav2's kernel; where
        this GPU cannot run ours at all, no layer takes it."""
        try:
            return cls._checked(model, rows)
        except Exception as error:
            if is_oom(error):
                raise
            return cls([], {"*": f"{type(error).__name__}: {error}"})

    @classmethod
    def _checked(cls, model: Any, rows: int) -> DecodeMatmul:
        from exllamav2.linear import ExLlamaV2Linear

        layers, refused = [], {}
        generator = torch.Generator(device="cuda").manual_seed(0)
        for module in model.modules_dict.values():
            if not isinstance(module, ExLlamaV2Linear) or module.q_handle is None:
                continue
            tensors = module.q_tensors
            if not isinstance(tensors, dict) or "q_weight" not in tensors:
                refused[module.key] = "not EXL2 (fp16 weights)"
                continue
            try:
                layer = Layer(module, prepare(tensors, module.in_features))
            except Unsupported as error:
                refused[module.key] = str(error)
                continue
            x = torch.randn(
                (min(rows, MAX_ROWS), module.in_features), generator=generator, device="cuda"
            ).half()
            difference = parted(matmul(x, layer.weights), layer.theirs(x))
            if difference > SAME_PRODUCT:
                refused[module.key] = f"parts from exllamav2's product by {difference:.1e}"
                continue
            layers.append(layer)
        return cls(layers, refused)

    def choose(self, batch: int) -> None:
        """Time both kernels per layer shape at this batch size; ours keeps the shapes it wins."""
        self.launches[batch] = {}
        if batch > MAX_ROWS:
            return
        by_shape: dict[tuple[int, int], list[Layer]] = {}
        for layer in self.layers:
            by_shape.setdefault(layer.shape, []).append(layer)
        for shape, layers in by_shape.items():
            if not self.faster_only:
                self.launches[batch][shape] = DEFAULT
                continue
            times = _times(layers, torch.randn((batch, shape[0]), device="cuda").half())
            best = min(times, key=times.__getitem__)
            if best is not None:
                self.launches[batch][shape] = best

    def prepare_batch(self, model: Any, batch: int, step: Callable[[], torch.Tensor]) -> None:
        """Choose for this batch size, then run the whole step both ways and keep exllamav2's
        kernels if the logits part, or if ours cannot run here."""
        try:
            self.choose(batch)
            if not self.serves(batch):
                return
            theirs = step().clone()
            with self.serving(model, batch):
                ours = step()
            difference = parted(ours, theirs)
            if difference > SAME_STEP:
                why = f"the step's logits parted from exllamav2's by {difference:.1e}"
                self.fall_back(batch, why)
        except Exception as error:
            if is_oom(error):
                raise
            self.fall_back(batch, f"{type(error).__name__}: {error}")

    def fall_back(self, batch: int, why: str) -> None:
        self.fell_back[batch] = why
        self.launches[batch] = {}

    def serves(self, batch: int) -> bool:
        return bool(self.launches.get(batch))

    @contextmanager
    def serving(self, model: Any, batch: int) -> Iterator[None]:
        """Within: the layers whose shape ours won at this batch size call ours, and the modules
        holding them take exllamav2's Python forward."""
        launches = self.launches.get(batch, {})
        chosen = [layer for layer in self.layers if layer.shape in launches]
        linears = {id(layer.linear) for layer in chosen}
        holders = [
            module
            for module in model.modules
            if getattr(module, "q_handle", None) is not None
            and any(id(sub) in linears for sub in getattr(module, "submodules", []))
        ]
        handles = [module.q_handle for module in holders]
        try:
            for layer in chosen:
                layer.linear.forward = _forward(layer.weights, launches[layer.shape])
            for module in holders:
                module.q_handle = None
            yield
        finally:
            for module, handle in zip(holders, handles, strict=True):
                module.q_handle = handle
            for layer in chosen:
                del layer.linear.forward

    def summary(self, max_jobs: int) -> str:
        """For the status line: how many shapes take ours at 1 job and at the most jobs."""
        shapes = len({layer.shape for layer in self.layers})
        if not shapes:
            why = next(iter(self.refused.values()), "no quantized layer")
            return f"EXL2 matmul: exllamav2's (ours takes no layer: {why})"
        ends = sorted({1, max_jobs})
        parts = [f"{len(self.launches.get(b, {}))} of {shapes} shapes at {b} job(s)" for b in ends]
        line = "EXL2 matmul: ours for " + ", ".join(parts) + " (exllamav2's elsewhere)"
        if self.fell_back:
            batch, why = min(self.fell_back.items())
            line += f"; {len(self.fell_back)} batch size(s) kept exllamav2's ({batch}: {why})"
        return line


def _times(layers: list[Layer], x: torch.Tensor) -> dict[Launch | None, float]:
    """Milliseconds for all these layers (one shape) at x's rows: exllamav2's (key None), ours
    per launch variant that runs on this GPU."""

    def ours(launch: Launch) -> Callable[[], list[torch.Tensor]]:
        return lambda: [matmul(x, layer.weights, launch) for layer in layers]

    times: dict[Launch | None, float] = {
        None: replay_ms(lambda: [layer.theirs(x) for layer in layers])
    }
    for launch in LAUNCHES:
        try:
            times[launch] = replay_ms(ours(launch))
        except Exception as error:  # too much shared memory for this GPU, say
            if is_oom(error):
                raise
    return times


def _forward(weights: Exl2Weights, launch: Launch) -> Callable[..., torch.Tensor]:
    """A layer's forward through our matmul, for the capture of one batch size."""

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        y = matmul(x, weights, launch)
        return y.view(*hidden_states.shape[:-1], weights.width)

    return forward

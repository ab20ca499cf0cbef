"""The paged decode forward as CUDA graphs, one per batch size, captured at load.

A step in which every job decodes one token copies its ids, cache lengths and page table into
static device buffers and replays one graph: embedding (a copy of the table on the GPU), every
layer and the head, with the logits left in a static buffer. Nothing in it reads a value back to
the host, so the CPU only launches it. exllamav2's own per-module graphs must be off
(`config.no_graphs`): a graph cannot be captured inside another's capture.

exllamav2 times each EXL2 matmul shape (rows, in, out) over its first 200 calls, waiting for the
GPU after each, before it keeps the faster of its two kernels: that wait cannot be captured, so
every shape a graph will hold is run that often first.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from engine.gpu import attention

if TYPE_CHECKING:
    from engine.gpu.decode_matmul import DecodeMatmul

AUTOTUNE_CALLS = 201  # exllamav2's AT_NUM_MEASURE (200) timed calls per matmul shape, then one


class DecodeGraphs:
    """Captured decode forwards for batch sizes 1 … max_jobs of one loaded model and cache."""

    def __init__(
        self,
        model: Any,
        cache: Any,
        max_jobs: int,
        max_seq_len: int,
        page_size: int,
        matmul: DecodeMatmul | None = None,
    ):
        self._model, self._cache = model, cache
        self.matmul = matmul  # our EXL2 matmul where it is checked and faster; None: exllamav2's
        self.max_jobs, self._page_size = max_jobs, page_size
        index = model.modules[1].device_idx
        self.device = torch.device("cuda", index)
        self.stream = model.get_device_context(index, scratch=False).stream
        # Each capture empties torch's cache on entry, so the baseline is taken empty too.
        torch.cuda.empty_cache()
        self._reserved_at_start = torch.cuda.memory_reserved(self.device)
        pages = -(-max_seq_len // page_size)
        self._ids = torch.zeros((max_jobs, 1), dtype=torch.long, device=self.device)
        self._seqlens = torch.zeros((max_jobs,), dtype=torch.int32, device=self.device)
        self._table = torch.zeros((max_jobs, pages), dtype=torch.int32, device=self.device)
        embedding = model.modules[0]
        self._embedding = embedding.embedding.weight.to(self.device)
        self._fp32_residual = embedding.archparams.residual_stream_fp32
        self._normalize = embedding.archparams.normalize_embeddings
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.vram_bytes = 0

    def covers(self, batch: int) -> bool:
        return batch in self._graphs

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first (they share one memory pool)."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for batch in range(self.max_jobs, 0, -1):
            with attention.graph_steps(), torch.cuda.stream(self.stream):
                self._tune(batch)
                self._forward(batch)  # warm-up: compiles kernels, runs the attention checks
                if self.matmul is not None:
                    self.matmul.prepare_batch(self._model, batch, partial(self._forward, batch))
            self.stream.synchronize()
            # The graph must compute its own indices, not reuse the warm-up's.
            attention.forget_plan()
            graph = torch.cuda.CUDAGraph()
            with (
                self._matmul_serving(batch),
                attention.graph_steps(),
                torch.cuda.graph(
                    graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"
                ),
            ):
                self._logits[batch] = self._forward(batch)
            attention.forget_plan()
            self._graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        # What stays: the embedding copy, the buffers and the graphs' pool (warm-ups' blocks go).
        torch.cuda.empty_cache()
        self.vram_bytes = torch.cuda.memory_reserved(self.device) - self._reserved_at_start

    def _matmul_serving(self, batch: int):
        if self.matmul is None:
            return nullcontext()
        return self.matmul.serving(self._model, batch)

    def _params(self, batch: int) -> Any:
        from exllamav2.attn import ExLlamaV2Attention

        params = ExLlamaV2Attention.PagedParams(
            batch_size=batch,
            block_index=torch.zeros((batch, 1), dtype=torch.int32),
            cache_seqlens=torch.zeros((batch,), dtype=torch.int32),
            max_cache_seqlen=self._table.shape[1] * self._page_size,
            page_size=self._page_size,
            q_len=1,
        )
        # Device buffers in place of the host tensors it was built with; never the sequential
        # shortcut, whose cache offset is computed on the host.
        params.block_index = self._table[:batch]
        params.cache_seqlens = self._seqlens[:batch]
        params.is_sequential = False
        return params

    def _tune(self, batch: int) -> None:
        """Run one module of each kind (their shapes repeat in every layer) and the head until
        exllamav2 has timed every matmul shape of this batch size."""
        modules = self._model.modules
        firsts = {type(module): module for module in reversed(modules[1:-1])}
        params = self._params(batch)
        start = self._embed(batch)
        for module in [*firsts.values(), modules[-1]]:
            for _ in range(AUTOTUNE_CALLS):
                module.forward(start.clone(), cache=self._cache, attn_params=params, past_len=0)

    def _embed(self, batch: int) -> torch.Tensor:
        x = F.embedding(self._ids[:batch], self._embedding)
        if self._fp32_residual:
            x = x.float()
        if self._normalize:
            x = x * x.shape[-1] ** 0.5
        return x

    def _forward(self, batch: int) -> torch.Tensor:
        params = self._params(batch)
        x = self._embed(batch)
        for module in self._model.modules[1:]:
            x = module.forward(x, cache=self._cache, attn_params=params, past_len=0, loras=None)
        padding = self._model.modules[-1].padding
        if padding > 0:
            x[:, :, -padding:] = -65504.0
        return x

    def run(self, ids: torch.Tensor, table: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, vocab) for ids (B, 1), table (B, pages) and seqlens (B,) on the host;
        ids may instead be on the GPU (a previous step's tokens, not yet read).

        The copies and the replay go on the model's stream; the logits stay valid until the next
        run on it.
        """
        batch = ids.shape[0]
        with torch.cuda.stream(self.stream):
            self._ids[:batch].copy_(ids, non_blocking=True)
            self._seqlens[:batch].copy_(seqlens, non_blocking=True)
            self._table[:batch, : table.shape[1]].copy_(table, non_blocking=True)
            self._graphs[batch].replay()
        return self._logits[batch]

    def to_host(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Pinned host copies of tensors, made on the current stream without waiting, and the
        event after which they hold the values."""
        copies = [torch.empty_like(t, device="cpu", pin_memory=True) for t in tensors]
        for copy, tensor in zip(copies, tensors, strict=True):
            copy.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return copies, done

    def release(self) -> None:
        """Drop the graphs and their buffers (unload, reload)."""
        self._graphs.clear()
        self._logits.clear()
        self._embedding = self._ids = self._seqlens = self._table = torch.empty(0)

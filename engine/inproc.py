"""The EngineClient protocol over an engine in this very process: benchmarks, tests and scripts
drive the GPU engine through the same interface as the web side drives an engine process.

An engine process (engine.client) adds what a server needs around it: a crash or a stall ends
only that process, which is restarted with the same model. Here a stuck engine stays stuck.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.types import (
    ALIVE_CHECK_S,
    EngineStatus,
    EventStream,
    Faults,
    Finished,
    GenerationRequest,
    GpuInfo,
    LoadProgress,
)
from starcoder2.branches import DEFAULT_CACHE_MODE, DEFAULT_CONTEXT
from starcoder2.errors import NO_MODEL_LOADED, GenerationFailed, NotReady
from starcoder2.prompt import Segment
from starcoder2.tokens import PromptEncoder

if TYPE_CHECKING:
    from engine.gpu.engine import Engine
    from engine.gpu.jobs import Job


class InProcessEngine:
    """One GPU engine (engine.gpu.engine.Engine, built with `options`) behind EngineClient."""

    def __init__(self, **options: Any) -> None:
        from engine.gpu.engine import Engine  # imports torch: only when one is made

        self.engine: Engine = Engine(**options)  # its internals, for benchmarks and GPU tests
        self._encoder: PromptEncoder | None = None

    @property
    def status(self) -> EngineStatus:
        return self.engine.status

    @property
    def health(self) -> str:
        return self.engine.health

    @property
    def faults(self) -> Faults:
        return Faults(0, self.engine.stuck_replies, 0)

    def gpu_info(self) -> GpuInfo | None:
        return self.engine.gpu_info()

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        if self._encoder is None:
            raise NotReady(NO_MODEL_LOADED)
        return self._encoder.encode(segments)

    def load(
        self,
        model_dir: str,
        *,
        max_seq_len: int = DEFAULT_CONTEXT,
        cache_mode: str = DEFAULT_CACHE_MODE,
        on_progress: LoadProgress | None = None,
    ) -> EngineStatus:
        self._encoder = None
        status = self.engine.load(
            model_dir, max_seq_len=max_seq_len, cache_mode=cache_mode, on_progress=on_progress
        )
        self._encoder = PromptEncoder.for_model(model_dir)
        return status

    def stream(self, request: GenerationRequest) -> EventStream:
        """Submit the request's ids; yield its events; closing the iterator cancels the job."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        handle = self.engine.submit(request.ids, request.settings, events.put, request.stop)
        return self._events(handle, events)

    def _events(self, handle: Job, events: queue.SimpleQueue) -> EventStream:
        try:
            while True:
                try:
                    event = events.get(timeout=ALIVE_CHECK_S)
                except queue.Empty:
                    # A worker that stopped (a reload) or died never answers: fail, do not hang.
                    if not self.engine.serving(handle):
                        raise GenerationFailed(
                            "The model was reloaded or stopped; send the message again."
                        ) from None
                    continue
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.engine.cancel(handle)

    def cache_pages(self) -> tuple[int, int]:
        return self.engine.cache_pages()

    def close(self) -> None:
        self._encoder = None
        self.engine.close()

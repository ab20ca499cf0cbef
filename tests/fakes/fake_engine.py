"""A scripted engine implementing engine.api.EngineClient, for the UI and API tests (CPU)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.api import (
    EngineClient,
    EngineStatus,
    EventStream,
    Faults,
    Finished,
    GenerationRequest,
    GpuInfo,
    LoadProgress,
    LoadStep,
    TextDelta,
)
from engine.gpu_check import no_gpu_here
from starcoder2.branches import DEFAULT_CACHE_MODE, DEFAULT_CONTEXT
from starcoder2.errors import GenerationFailed, NoGPU, NotReady
from starcoder2.prompt import Segment
from starcoder2.settings import SamplingSettings

FAKE_GPU = GpuInfo(name="Fake RTX 4090", total_gb=24.0, free_gb=22.5)


@dataclass
class StreamCall:
    """One stream() call as the fake saw it; `closed` turns True if the caller stopped early."""

    segments: list[Segment]
    settings: SamplingSettings
    ids: list[int]
    stop: tuple[str, ...]
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    closed_event: threading.Event = field(default_factory=threading.Event)
    chunks_sent: int = 0
    closed_at: float | None = None  # time.perf_counter() when the caller closed the stream

    @property
    def closed(self) -> bool:
        return self.closed_event.is_set()


class FakeEngine(EngineClient):
    """Streams `chunks` as TextDelta events then a Finished; records every call it receives."""

    def __init__(
        self,
        chunks: Sequence[str] = ("Hello", ",", " world", "!"),
        *,
        gpu: GpuInfo | None = FAKE_GPU,
        loaded: bool = True,
        max_seq_len: int = 4096,
        max_concurrency: int = 4,
        chunk_delay_s: float = 0.0,
        gate: threading.Event | None = None,
        error: Exception | None = None,
        tokens_per_char: float = 0.25,
    ) -> None:
        self.chunks = list(chunks)
        self.gpu = gpu
        self.chunk_delay_s = chunk_delay_s
        self.gate = gate  # when set, chunks after the first wait for it (a deterministic pause)
        self.error = error
        self.tokens_per_char = tokens_per_char
        self.max_concurrency = max_concurrency
        self.calls: list[StreamCall] = []
        self.loads: list[dict] = []
        self.call_made = threading.Event()
        self.load_gate: threading.Event | None = None  # when set, load() waits for it while loading
        self.loading = threading.Event()  # set while a load() is under way
        self.load_steps = [LoadStep("layers", done, 3) for done in range(1, 4)]
        self.load_error: Exception | None = None  # raised by the next load, once
        self._fault: tuple[Exception, int] | None = None
        self._degraded = False
        self.faults_seen = Faults()  # what a test says went wrong
        self._generation = 0  # bumped by every load/unload: streams of an older one are ended
        self._lock = threading.Lock()  # one load at a time, like the real engine
        self._status = (
            self._ready("/models/fake", max_seq_len, "fp16") if loaded else EngineStatus()
        )

    def _ready(self, model_dir: str, max_seq_len: int, cache_mode: str) -> EngineStatus:
        return EngineStatus(
            state="ready",
            model_dir=model_dir,
            max_seq_len=max_seq_len,
            cache_mode=cache_mode,
            batching="paged",
            max_concurrency=self.max_concurrency,
            load_seconds=1.5,
            vram_used_gb=9.8,
            message=f"Loaded {model_dir}: {max_seq_len:,}-token context, {cache_mode} cache.",
        )

    def gpu_info(self) -> GpuInfo | None:
        return self.gpu

    def load(
        self,
        model_dir: str,
        *,
        max_seq_len: int = DEFAULT_CONTEXT,
        cache_mode: str = DEFAULT_CACHE_MODE,
        on_progress: LoadProgress | None = None,
    ) -> EngineStatus:
        if self.gpu is None:
            raise NoGPU(no_gpu_here())
        with self._lock:
            self.loads.append(
                {"model_dir": model_dir, "max_seq_len": max_seq_len, "cache_mode": cache_mode}
            )
            self.unload()  # like the real engine: in-flight streams end with a reload error
            self._status = EngineStatus(state="loading", message=f"Loading {model_dir}…")
            self.loading.set()
            try:
                if self.load_gate is not None:
                    self.load_gate.wait(timeout=30)
                if self.load_error is not None:
                    error, self.load_error = self.load_error, None
                    self._status = EngineStatus(state="failed", message=str(error))
                    raise error
                for step in self.load_steps:
                    if on_progress is not None:
                        on_progress(step)
            finally:
                self.loading.clear()
            self._degraded = False
            self._status = self._ready(model_dir, max_seq_len, cache_mode)
            return self._status

    def unload(self) -> None:
        self._generation += 1
        self._status = EngineStatus()

    @property
    def status(self) -> EngineStatus:
        return self._status

    @property
    def faults(self) -> Faults:
        return self.faults_seen

    @property
    def health(self) -> str:
        """Like Engine.health: "degraded" after a failed job until the next one succeeds."""
        state = self._status.state
        return "degraded" if state == "ready" and self._degraded else state

    def fail_next(self, error: Exception, *, after_chunks: int = 1) -> None:
        """Make the next stream raise `error` after `after_chunks` chunks (a fault on the GPU)."""
        self._fault = (error, after_chunks)

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """Stand-in token ids: `tokens_per_char` of them per character."""
        if self._status.state != "ready":
            raise NotReady("No model is loaded yet; load one in the Model panel first.")
        return list(range(self.count_tokens(segments)))

    def count_tokens(self, segments: Sequence[Segment]) -> int:
        return max(1, round(sum(len(s.text) for s in segments) * self.tokens_per_char))

    def stream(self, request: GenerationRequest) -> EventStream:
        segments, settings = request.segments, request.settings
        if self.gpu is None:
            raise NoGPU(no_gpu_here())
        if self._status.state != "ready":
            raise NotReady("The model is not ready; load one first.")
        if self.error is not None:
            raise self.error
        call = StreamCall(list(segments), settings, list(request.ids), tuple(request.stop))
        self.calls.append(call)
        self.call_made.set()
        fault, self._fault = self._fault, None
        return self._events(call, self._generation, fault)

    def _events(
        self, call: StreamCall, generation: int, fault: tuple[Exception, int] | None
    ) -> EventStream:
        call.started.set()
        chunks = self.chunks[: call.settings.max_new_tokens]  # a chunk stands for a token
        reason = "max_new_tokens" if len(chunks) < len(self.chunks) else "eos"
        text = ""
        try:
            for index, chunk in enumerate(chunks):
                if index and self.gate is not None:
                    self.gate.wait(timeout=30)
                if index and self.chunk_delay_s:
                    time.sleep(self.chunk_delay_s)  # the pace of a GPU, not synchronisation
                if generation != self._generation:
                    raise GenerationFailed("The model is being reloaded; send the message again.")
                if fault is not None and index == fault[1]:
                    self._degraded = True
                    raise fault[0]
                call.chunks_sent += 1
                # Like the engine: a stop string ends the reply and is left out of its text.
                joined = text + chunk
                cut = min((joined.find(stop) for stop in call.stop if stop in joined), default=-1)
                if cut >= 0:
                    if joined[len(text) : cut]:
                        yield TextDelta(joined[len(text) : cut])
                    text, reason = joined[:cut], "stop_string"
                    break
                text += chunk
                yield TextDelta(chunk)
            self._degraded = False
            yield Finished(
                text=text,
                prompt_tokens=len(call.ids),
                new_tokens=call.chunks_sent,
                cached_tokens=0,
                time_to_first_token_s=0.05,
                decode_tokens_per_s=42.0,
                stop_reason=reason,
            )
        except GeneratorExit:
            call.closed_at = time.perf_counter()
            call.closed_event.set()  # what the real engine turns into a cancelled GPU job
            raise
        finally:
            call.finished.set()

    def cache_pages(self) -> tuple[int, int]:
        running = sum(1 for call in self.calls if not call.finished.is_set())
        return running, 16 * self.max_concurrency

    def close(self) -> None:
        self.unload()

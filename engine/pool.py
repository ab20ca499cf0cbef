"""Several engines (one per GPU) behind one EngineClient: a reply goes where it is cheapest.

A follow-up turn goes to the engine that served its conversation, whose cache still holds the
shared prefix (prefix caching works page by page, 256 tokens); a new conversation goes to the
engine with the fewest replies running. Each engine holds a whole copy of the model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from engine.types import (
    EngineClient,
    EngineStatus,
    EventStream,
    Faults,
    GenerationRequest,
    GpuInfo,
    LoadProgress,
)
from starcoder2.branches import DEFAULT_CACHE_MODE, DEFAULT_CONTEXT, PAGE_TOKENS
from starcoder2.errors import NO_MODEL_LOADED, NotReady
from starcoder2.prompt import Segment

REMEMBERED_PAGES = 100_000  # prefix pages whose engine the pool remembers (least recent go first)


def page_keys(ids: Sequence[int]) -> list[int]:
    """One key per whole page of the prompt; key k stands for the first k pages (chained)."""
    keys, key = [], 0
    for start in range(0, len(ids) - len(ids) % PAGE_TOKENS, PAGE_TOKENS):
        key = hash((key, tuple(ids[start : start + PAGE_TOKENS])))
        keys.append(key)
    return keys


class EnginePool(EngineClient):
    """Routes each reply to one of `engines`; loads, reports and closes them together."""

    def __init__(self, engines: Sequence[EngineClient]) -> None:
        self.engines = list(engines)
        self.running = [0] * len(self.engines)
        self._pages: OrderedDict[int, int] = OrderedDict()  # page key -> engine index
        self._lock = threading.Lock()

    # ---- status ----

    @property
    def status(self) -> EngineStatus:
        """Ready while any engine serves; places add up; the message lists each engine."""
        statuses = [engine.status for engine in self.engines]
        ready = [status for status in statuses if status.state == "ready"]
        if not ready:
            first = statuses[0]
            return EngineStatus(
                state=first.state, message=" · ".join(status.message for status in statuses)
            )
        return dataclasses.replace(  # per GPU as the first (vram_used_gb: each holds a copy)
            ready[0],
            max_concurrency=sum(status.max_concurrency for status in ready),
            load_seconds=max(status.load_seconds for status in ready),
            message=f"{len(ready)} of {len(statuses)} engines serving.",
            cache_tokens=sum(status.cache_tokens for status in ready),
        )

    @property
    def health(self) -> str:
        states = [engine.health for engine in self.engines]
        if all(state == "ready" for state in states):
            return "ready"
        if any(state in ("ready", "degraded") for state in states):
            return "degraded"  # still serving, on fewer GPUs
        return states[0]

    @property
    def faults(self) -> Faults:
        each = [engine.faults for engine in self.engines]
        return Faults(
            stalls=sum(f.stalls for f in each),
            stuck_replies=sum(f.stuck_replies for f in each),
            restarts=sum(f.restarts for f in each),
        )

    def gpu_info(self) -> GpuInfo | None:
        """Per GPU, the least of them: each GPU must hold a whole copy of the model."""
        found = [engine.gpu_info() for engine in self.engines]
        gpus = [gpu for gpu in found if gpu is not None]
        if len(gpus) < len(found):
            return None
        names = {gpu.name for gpu in gpus}
        name = names.pop() if len(names) == 1 else " + ".join(gpu.name for gpu in gpus)
        return GpuInfo(
            name=f"{len(gpus)} × {name} (per GPU)",
            total_gb=min(gpu.total_gb for gpu in gpus),
            free_gb=min(gpu.free_gb for gpu in gpus),
            engine_gb=max(gpu.engine_gb for gpu in gpus),
        )

    # ---- load and encode ----

    def load(
        self,
        model_dir: str,
        *,
        max_seq_len: int = DEFAULT_CONTEXT,
        cache_mode: str = DEFAULT_CACHE_MODE,
        on_progress: LoadProgress | None = None,
    ) -> EngineStatus:
        """Load every engine at once; the first engine's progress stands for all."""
        with self._lock:
            self._pages.clear()

        def load_one(index: int) -> EngineStatus:
            progress = on_progress if index == 0 else None
            return self.engines[index].load(
                model_dir, max_seq_len=max_seq_len, cache_mode=cache_mode, on_progress=progress
            )

        with ThreadPoolExecutor(len(self.engines)) as pool:
            for result in [pool.submit(load_one, i) for i in range(len(self.engines))]:
                result.result()  # the first failure is raised
        return self.status

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        for engine in self.engines:
            if engine.status.state == "ready":
                return engine.encode(segments)
        raise NotReady(NO_MODEL_LOADED)

    # ---- routing ----

    def choose(self, ids: Sequence[int]) -> int:
        """The engine for a prompt: the one holding its longest known prefix if it has room,
        else the ready one with the fewest replies running."""
        ready = [i for i, engine in enumerate(self.engines) if engine.status.state == "ready"]
        if not ready:
            raise NotReady("No engine is ready; wait for the model to load.")
        keys = page_keys(ids)
        with self._lock:
            holder = next((self._pages[key] for key in reversed(keys) if key in self._pages), None)
            places = {i: self.engines[i].status.max_concurrency for i in ready}
            if holder in places and self.running[holder] < places[holder]:
                chosen = holder
            else:
                chosen = min(ready, key=lambda i: (self.running[i] / places[i], i))
            for key in keys:
                self._pages[key] = chosen
                self._pages.move_to_end(key)
            while len(self._pages) > REMEMBERED_PAGES:
                self._pages.popitem(last=False)
            self.running[chosen] += 1
        return chosen

    def stream(self, request: GenerationRequest) -> EventStream:
        index = self.choose(request.ids)
        try:
            events = self.engines[index].stream(request)
        except BaseException:
            self._done(index)
            raise
        return self._events(index, events)

    def _events(self, index: int, events: EventStream) -> EventStream:
        try:
            yield from events
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            self._done(index)

    def _done(self, index: int) -> None:
        with self._lock:
            self.running[index] -= 1

    def cache_pages(self) -> tuple[int, int]:
        pages = [engine.cache_pages() for engine in self.engines]
        return sum(used for used, _ in pages), sum(total for _, total in pages)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()

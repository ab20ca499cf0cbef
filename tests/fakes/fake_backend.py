"""A scripted engine for engine.process, with the real Engine's surface (CPU, no torch).

Runs inside a real engine process, so tests on a CPU machine cross the same process boundary,
pipe and restart logic as the GPU: scripted chunks stand in for the model's tokens.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from engine.api import EngineStatus, Finished, GpuInfo, LoadProgress, LoadStep, TextDelta
from engine.wire import ENGINE_CALLS
from starcoder2.branches import DEFAULT_CACHE_MODE, DEFAULT_CONTEXT
from starcoder2.errors import ContextTooLong, NotReady
from starcoder2.settings import SamplingSettings

FAKE_GPU = GpuInfo(name="Fake GPU", total_gb=24.0, free_gb=20.0)


class _Job:
    def __init__(self, ids: Sequence[int], settings: SamplingSettings, sink) -> None:
        self.ids, self.settings, self.sink = list(ids), settings, sink
        self.sent = 0
        self.cancelled = False
        self.started = time.time()


class ScriptedBackend:
    """Streams `chunks` to every job, one chunk per step of `step_s`, all jobs in one loop."""

    CALLS = (*ENGINE_CALLS, "prompts", "running_jobs")  # read-outs for the tests

    def __init__(
        self,
        max_jobs: int = 8,
        chunks: Sequence[str] = ("Hello", ",", " world", "!"),
        step_s: float = 0.01,
        gpu: bool = True,
        load_s: float = 0.0,
        record_to: str | None = None,
        cuda_graphs: bool = True,  # the real Engine's options, which a script has no use for
        custom_matmul: bool = True,
        stall_timeout_s: float = 10.0,
    ) -> None:
        self.max_jobs = max_jobs
        self.chunks = list(chunks)
        self.step_s = step_s
        self.gpu = FAKE_GPU if gpu else None
        self.load_s = load_s
        self.status = EngineStatus()
        self.health = "empty"
        self.steps = 0  # its loop's turns: the progress a beat reports
        self.submitted: list[list[int]] = []  # every prompt it was given, as token ids
        self.stuck_replies = 0
        self._jobs: list[_Job] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        # With record_to, a file per process: what it was asked and what it cancelled, one JSON
        # line each (tests see which replica served what); a file freeze-<pid> there stops its
        # steps as a stuck GPU would.
        self.record = Path(record_to) / f"{os.getpid()}.jsonl" if record_to else None
        self.freeze = Path(record_to) / f"freeze-{os.getpid()}" if record_to else None
        threading.Thread(target=self._run, name="scripted-steps", daemon=True).start()

    def _note(self, **what) -> None:
        if self.record is not None:
            with self.record.open("a") as log:
                log.write(json.dumps(what) + "\n")

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
        self.unload()
        self.status = EngineStatus(state="loading", model_dir=model_dir)
        for done in range(1, 4):
            time.sleep(self.load_s / 3)
            if on_progress is not None:
                on_progress(LoadStep("layers", done, 3))
        self.status = EngineStatus(
            state="ready",
            model_dir=model_dir,
            max_seq_len=max_seq_len,
            cache_mode=cache_mode,
            batching="paged",
            max_concurrency=self.max_jobs,
            vram_used_gb=1.0,
            message="Loaded the scripted model.",
        )
        self.health = "ready"
        return self.status

    def unload(self) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.sink(NotReady("The model is being reloaded; send the message again."))
        self.status, self.health = EngineStatus(), "empty"

    def submit(self, ids: Sequence[int], settings: SamplingSettings, sink, stop=()) -> _Job:
        if self.status.state != "ready":
            raise NotReady(f"The model is not ready ({self.status.state}); load one first.")
        if len(ids) + settings.max_new_tokens > self.status.max_seq_len:
            raise ContextTooLong(f"The prompt is {len(ids):,} tokens; too long.")
        job = _Job(ids, settings, sink)
        with self._lock:
            self._jobs.append(job)
            self.submitted.append(list(ids))
        self._note(submitted=list(ids))
        return job

    def cancel(self, job: _Job) -> None:
        self._drop(job)
        self._note(cancelled=job.ids)

    def _drop(self, job: _Job) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)

    def cache_pages(self) -> tuple[int, int]:
        with self._lock:
            return len(self._jobs), 64

    def progress(self) -> int:
        return self.steps

    def prompts(self) -> list[list[int]]:
        """The token ids of every prompt submitted (tests ask through EngineProcess._call)."""
        with self._lock:
            return list(self.submitted)

    def running_jobs(self) -> int:
        """How many jobs are in the loop (tests ask through EngineProcess._call)."""
        with self._lock:
            return len(self._jobs)

    def close(self) -> None:
        self._stopped.set()
        self.unload()

    def _run(self) -> None:
        while not self._stopped.wait(self.step_s):
            if self.freeze is not None and self.freeze.exists():
                continue  # stuck: no step ends, nothing moves
            self.steps += 1
            with self._lock:
                jobs = list(self._jobs)
            for job in jobs:
                limit = min(len(self.chunks), job.settings.max_new_tokens)
                if job.sent < limit:
                    job.sink(TextDelta(self.chunks[job.sent]))
                    job.sent += 1
                if job.sent >= limit:
                    self._drop(job)
                    job.sink(
                        Finished(
                            text="".join(self.chunks[:limit]),
                            prompt_tokens=len(job.ids),
                            new_tokens=limit,
                            cached_tokens=0,
                            time_to_first_token_s=0.01,
                            decode_tokens_per_s=100.0,
                            stop_reason="max_new_tokens" if limit < len(self.chunks) else "eos",
                        )
                    )

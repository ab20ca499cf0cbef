"""Download (if needed) then load one model at a time, with progress a page can show."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.gpu_check import no_gpu_here
from engine.hub import DownloadProgress, ModelSource, resolve_model_dir
from engine.types import EngineClient, EngineStatus, LoadStep
from starcoder2.branches import check_load_settings
from starcoder2.errors import ChatError, NoGPU, NotReady

logger = logging.getLogger(__name__)

# exllamav2's first-start build, measured on 2 cores for 3 GPU architectures: 1,665 CPU-seconds.
BUILD_CPU_S_PER_ARCH = 1665 / 3


@dataclass(frozen=True)
class LoadProgressState:
    """What a load is doing now: a line of text and, when known, the fraction done."""

    text: str
    fraction: float | None = None


def minutes(seconds: float) -> str:
    """'45 s', '3 min 20 s': a duration as people say it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def build_estimate_s(cpus: int | None = None, archs: int | None = None) -> float:
    """Roughly how long exllamav2's first-start build takes on this machine."""
    cpus = cpus or os.cpu_count() or 1
    jobs = min(cpus, int(os.environ.get("MAX_JOBS") or cpus))
    if archs is None:
        archs = len([a for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").split(";") if a]) or 1
    return BUILD_CPU_S_PER_ARCH * archs / max(1, jobs)


def compiling_text(done: int, total: int, elapsed_s: float, estimate_s: float) -> str:
    """The page's line while exllamav2 compiles: files, time so far, and roughly what is left."""
    if done >= 2:  # the files so far give the pace
        left = elapsed_s / done * (total - done)
    else:
        left = max(0.0, estimate_s - elapsed_s)
    return (
        f"Compiling exllamav2's CUDA extension (first start only): {done} of {total} files, "
        f"{minutes(elapsed_s)} so far, about {minutes(left)} left."
    )


def available_vram_gb(engine: EngineClient) -> float | None:
    """Free VRAM plus what the loaded model holds, since a reload frees that first."""
    gpu = engine.gpu_info()
    if gpu is None:
        return None
    status = engine.status
    held = status.vram_used_gb if status.state == "ready" else 0.0
    return min(gpu.total_gb, gpu.free_gb + held)


class ModelLoader:
    """Download then load one model at a time; shared by the Load button and start-up."""

    def __init__(self, engine: EngineClient, *, repo: str, model_dir: str | None = None) -> None:
        self.engine = engine
        self.repo = repo
        self.model_dir = model_dir
        self.progress: LoadProgressState | None = None  # set while a load runs
        self.loaded: ModelSource | None = None  # what the engine holds now
        self.error: str | None = None  # why the last load failed, until the next one starts
        self._lock = threading.Lock()
        self._listeners: list[Callable[[EngineStatus], None]] = []

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def on_loaded(self, listener: Callable[[EngineStatus], None]) -> None:
        """Call listener(status) after every successful load."""
        self._listeners.append(listener)

    def load(
        self,
        branch: str,
        context_tokens: int,
        cache_mode: str,
        report: Callable[[LoadProgressState], None] | None = None,
    ) -> EngineStatus:
        """Resolve the folder (downloading if needed), load it and return the EngineStatus."""
        if not self._lock.acquire(blocking=False):
            raise NotReady("A model is already loading; wait for it to finish, then try again.")
        try:
            self.error = None
            return self._load(branch, context_tokens, cache_mode, report)
        except ChatError as error:
            self.error = str(error)
            raise
        except Exception:
            self.error = "Loading failed on the server (the details are in its log)."
            raise
        finally:
            self.progress = None
            self._lock.release()

    def _load(self, branch, context_tokens, cache_mode, report) -> EngineStatus:
        def show(text: str, fraction: float | None = None) -> None:
            self.progress = LoadProgressState(text, fraction)
            if report is not None:
                report(self.progress)

        free_gb = available_vram_gb(self.engine)
        if free_gb is None:
            raise NoGPU(no_gpu_here())
        context_tokens, cache_mode = check_load_settings(context_tokens, cache_mode)

        def downloaded(progress: DownloadProgress) -> None:
            total = progress.bytes_total or 1
            show(
                f"Downloading: {progress.bytes_done / 1e9:.1f} of {total / 1e9:.1f} GB, "
                f"{progress.files_done} of {progress.files_total} files, "
                f"{progress.bytes_per_s / 1e6:.0f} MB/s",
                progress.bytes_done / total,
            )

        show("Finding the model…")
        source = resolve_model_dir(
            model_dir=self.model_dir,
            repo=self.repo,
            branch=branch,
            context_tokens=context_tokens,
            cache_mode=cache_mode,
            free_vram_gb=free_gb,
            on_progress=downloaded,
        )
        show(f"Loading {source.label}…", 0.0)
        compile_started: list[float] = []
        estimate = build_estimate_s()

        def loading(step: LoadStep) -> None:
            if step.stage == "compiling":
                compile_started[:] = compile_started or [time.monotonic()]
                elapsed = time.monotonic() - compile_started[0]
                text = compiling_text(step.done, step.total, elapsed, estimate)
                show(text, step.done / max(step.total, 1))
            elif step.stage == "graphs":
                show(f"Capturing CUDA graphs for 1–{step.total} jobs", 1.0)
            else:
                show(f"Loading layers: {step.done} of {step.total}", step.done / max(step.total, 1))

        self.loaded = None
        status = self.engine.load(
            str(source.folder),
            max_seq_len=context_tokens,
            cache_mode=cache_mode,
            on_progress=loading,
        )
        self.loaded = source
        for listener in self._listeners:
            listener(status)
        return status

    def load_in_background(
        self, branch: str, context_tokens: int, cache_mode: str
    ) -> threading.Thread:
        """Start loading in a thread; progress and the outcome go to the log (and the page)."""

        def run() -> None:
            last = [""]

            def log(progress: LoadProgressState) -> None:
                stage = progress.text.split(":")[0]
                if stage != last[0]:  # one line per stage, not per layer
                    logger.info(progress.text)
                    last[0] = stage

            try:
                status = self.load(branch, context_tokens, cache_mode, log)
                logger.info(status.message)
            except ChatError as error:
                logger.error("Loading the model failed: %s", error)
            except Exception:
                logger.exception("Loading the model failed")

        thread = threading.Thread(target=run, name="model-loader", daemon=True)
        thread.start()
        return thread

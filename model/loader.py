"""Download (if needed) then load one model at a time, with progress text; start-up in a thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from model.branches import validate_context
from model.config import AppConfig
from model.download import DownloadProgress, resolve_model_dir
from model.errors import NO_GPU_MESSAGE, ChatError, NoGPU, NotReady

logger = logging.getLogger(__name__)


def available_vram_gb(engine) -> float | None:
    """Free VRAM plus what the loaded model holds, since a reload frees that first."""
    gpu = engine.gpu_info()
    if gpu is None:
        return None
    status = engine.status
    held = status.vram_used_gb if status.state == "ready" else 0.0
    return min(gpu.total_gb, gpu.free_gb + held)


class ModelLoader:
    """Download then load one model at a time; shared by the Load button and start-up."""

    def __init__(self, engine, config: AppConfig) -> None:
        self.engine = engine
        self.config = config
        self.progress_text = ""
        self._lock = threading.Lock()
        self._listeners: list[Callable[[object], None]] = []

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def on_loaded(self, listener: Callable[[object], None]) -> None:
        """Call listener(status) after every successful load."""
        self._listeners.append(listener)

    def load(
        self,
        branch: str,
        context_tokens: int,
        cache_mode: str,
        report: Callable[[float | None, str], None] | None = None,
    ):
        """Resolve the folder (downloading if needed), load it and return the EngineStatus."""
        if not self._lock.acquire(blocking=False):
            raise NotReady("A model is already loading; wait for it to finish, then try again.")
        try:

            def show(fraction: float | None, text: str) -> None:
                self.progress_text = text
                if report is not None:
                    report(fraction, text)

            free_gb = available_vram_gb(self.engine)
            if free_gb is None:
                raise NoGPU(NO_GPU_MESSAGE)
            context_tokens = validate_context(context_tokens)

            def downloaded(progress: DownloadProgress) -> None:
                total = progress.bytes_total or 1
                show(
                    progress.bytes_done / total,
                    f"Downloading: {progress.bytes_done / 1e9:.1f} of {total / 1e9:.1f} GB, "
                    f"{progress.files_done} of {progress.files_total} files, "
                    f"{progress.bytes_per_s / 1e6:.0f} MB/s",
                )

            show(None, "Finding the model…")
            folder = resolve_model_dir(
                model_dir=self.config.model_dir,
                repo=self.config.repo,
                branch=branch,
                context_tokens=context_tokens,
                cache_mode=cache_mode,
                free_vram_gb=free_gb,
                on_progress=downloaded,
            )
            show(0.0, f"Loading {folder}…")
            status = self.engine.load(
                str(folder),
                max_seq_len=context_tokens,
                cache_mode=cache_mode,
                on_progress=lambda done, total: show(
                    done / max(total, 1), f"Loading layers: {done} of {total}"
                ),
            )
            for listener in self._listeners:
                listener(status)
            return status
        finally:
            self.progress_text = ""
            self._lock.release()

    def load_in_background(self) -> threading.Thread:
        """Start loading the configured model in a thread, logging progress; errors are logged."""

        def run() -> None:
            last = [""]

            def log(_fraction: float | None, text: str) -> None:
                if text.split(":")[0] != last[0]:
                    logger.info(text)
                    last[0] = text.split(":")[0]

            try:
                status = self.load(
                    self.config.branch, self.config.context, self.config.cache_mode, log
                )
                logger.info(status.message)
            except ChatError as error:
                logger.error("Loading the model at start-up failed: %s", error)
            except Exception:
                logger.exception("Loading the model at start-up failed")

        thread = threading.Thread(target=run, name="model-loader", daemon=True)
        thread.start()
        return thread

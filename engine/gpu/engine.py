"""The GPU engine: loads a model with exllamav2 (imported on the first load) and runs its jobs.

One worker thread owns exllamav2's dynamic generator. Callers submit token ids through a queue
with a sink that receives small frozen events, `TextDelta`s then one `Finished`; `cancel` ends a
job early. The engine process (engine.process) and the in-process client (engine.inproc) are its
callers; both take prompts already fitted to the context by the web side.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.gpu.jobs import STOP_REASONS, Job, Sink, new_job
from engine.gpu.loading import cache_tokens, import_exllamav2, is_oom
from engine.gpu_check import no_gpu_here
from engine.hub import check_model_dir
from engine.stall import DEFAULT_STALL_TIMEOUT_S, ProgressClock
from engine.types import (
    DEFAULT_MAX_JOBS,
    EngineStatus,
    Finished,
    GpuInfo,
    LoadProgress,
    LoadStep,
    TextDelta,
)
from starcoder2.branches import (
    DEFAULT_CACHE_MODE,
    DEFAULT_CONTEXT,
    GB,
    MAX_CONTEXT,
    PAGE_TOKENS,
)
from starcoder2.errors import (
    DoesNotFit,
    GenerationFailed,
    GraphCaptureFailed,
    NoGPU,
    NotReady,
)
from starcoder2.prompt import STOP_STRINGS
from starcoder2.settings import SamplingSettings

logger = logging.getLogger(__name__)


class Engine:
    """Loads a StarCoder2 EXL2/FP16 folder onto the GPU and streams completions for many callers."""

    def __init__(
        self,
        *,
        max_jobs: int = DEFAULT_MAX_JOBS,
        paged: bool | None = None,
        cuda_graphs: bool = True,
        custom_matmul: bool = True,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        self._max_jobs = max_jobs
        self._paged_choice = paged  # None: paged whenever the attention backend allows it
        self._cuda_graphs = cuda_graphs  # decode steps as CUDA graphs where the cache allows
        # Our EXL2 matmul in the graphs, per layer shape where it matches exllamav2's and is faster.
        self._custom_matmul = custom_matmul
        self._status = EngineStatus()
        self._load_lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        # exllamav2's objects (untyped); None while nothing is loaded.
        self._model: Any = None
        self._cache: Any = None
        self._generator: Any = None
        self._generator_class: Any = None
        self._generator_args: dict = {}
        self._graphs: Any = None  # engine.gpu.graphs.DecodeGraphs while they serve
        self._degraded = False  # a job failed and was recovered from; cleared by the next success
        self._steps = 0  # generator steps finished
        self._reply_clock: ProgressClock[Job] = ProgressClock(stall_timeout_s)
        self.stuck_replies = 0  # replies ended alone because they stopped moving

    # ---- GPU and status ----

    def gpu_info(self) -> GpuInfo | None:
        """The first CUDA GPU's name and memory, or None when there is none."""
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)
        reserved = torch.cuda.memory_reserved(0)
        return GpuInfo(torch.cuda.get_device_name(0), total / GB, free / GB, reserved / GB)

    def _free_gb(self) -> float:
        gpu = self.gpu_info()
        if gpu is None:
            raise NoGPU(no_gpu_here())
        return gpu.free_gb

    @property
    def status(self) -> EngineStatus:
        return self._status

    def progress(self) -> tuple[int, int]:
        """Changes whenever the worker moves: steps finished, and positions cached within a step
        (each prefill chunk). Read from the engine process's heartbeat thread."""
        generator = self._generator
        jobs = list(generator.active_jobs) if generator is not None else []
        return self._steps, sum(sequence.kv_position for job in jobs for sequence in job.sequences)

    @property
    def health(self) -> str:
        """One of HEALTH_STATES: "degraded" after a recovered fault until a job succeeds again."""
        state = self._status.state
        if state != "ready":
            return state
        if self._worker is None or not self._worker.is_alive():
            return "failed"
        return "degraded" if self._degraded else "ready"

    # ---- load / unload ----

    def load(
        self,
        model_dir: str,
        *,
        max_seq_len: int = DEFAULT_CONTEXT,
        cache_mode: str = DEFAULT_CACHE_MODE,
        on_progress: LoadProgress | None = None,
    ) -> EngineStatus:
        """Load (or reload) a model; in-flight jobs are ended with a clear error first."""
        if self.gpu_info() is None:
            raise NoGPU(no_gpu_here())
        folder = check_model_dir(model_dir)
        with self._load_lock:
            self.unload()
            self._status = EngineStatus(
                state="loading",
                model_dir=str(folder),
                max_seq_len=max_seq_len,
                cache_mode=cache_mode,
                message=f"Loading {folder.name}…",
            )
            started = time.perf_counter()
            free_before = self._free_gb()
            try:
                self._load(folder, max_seq_len, cache_mode, on_progress)
            except BaseException as error:
                self._free()
                self._status = EngineStatus(state="failed", message=str(error))
                if is_oom(error):
                    raise DoesNotFit(
                        f"The model and a {max_seq_len:,}-token {cache_mode} cache do not fit in "
                        f"{self._free_gb():.1f} GB free; lower the context, use a q4 cache "
                        "or a smaller branch."
                    ) from None
                raise
            used_gb = free_before - self._free_gb()
            # The worker runs before the status says ready, so no job is handed to a missing one.
            self._worker = threading.Thread(target=self._run, name="exllamav2-worker", daemon=True)
            self._worker.start()
            self._status = self._ready_status(folder, max_seq_len, cache_mode, started, used_gb)
            return self._status

    def _load(self, folder: Path, max_seq_len: int, cache_mode: str, on_progress) -> None:
        report = on_progress or (lambda step: None)
        import_exllamav2(report)
        import torch
        from exllamav2 import (
            ExLlamaV2,
            ExLlamaV2Cache,
            ExLlamaV2Cache_Q4,
            ExLlamaV2Cache_Q6,
            ExLlamaV2Cache_Q8,
            ExLlamaV2Config,
            ExLlamaV2Tokenizer,
        )
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        from engine.gpu import compat

        compat.apply_all()
        config = ExLlamaV2Config(str(folder))
        config.max_seq_len = max_seq_len
        # Our attention never materializes the score matrix: no need to shrink prefill chunks.
        config.max_attention_size = config.max_input_len * MAX_CONTEXT
        paged = True if self._paged_choice is None else self._paged_choice
        jobs = self._max_jobs if paged else 1
        graphs = self._cuda_graphs and paged and cache_mode == "fp16"
        # exllamav2's per-module graphs cannot be captured inside ours.
        config.no_graphs = config.no_graphs or graphs
        tokens = cache_tokens(folder, config, max_seq_len, cache_mode, jobs, self._free_gb())

        cache_class = {
            "fp16": ExLlamaV2Cache,
            "q8": ExLlamaV2Cache_Q8,
            "q6": ExLlamaV2Cache_Q6,
            "q4": ExLlamaV2Cache_Q4,
        }[cache_mode]
        self._model = ExLlamaV2(config)
        self._cache = cache_class(self._model, max_seq_len=tokens, lazy=True)
        self._model.load_autosplit(
            self._cache, callback=lambda done, total: report(LoadStep("layers", done, total))
        )
        tokenizer = ExLlamaV2Tokenizer(config)
        self._generator_args = dict(
            model=self._model,
            cache=self._cache,
            tokenizer=tokenizer,
            max_batch_size=jobs,
            max_seq_len=max_seq_len,
            paged=paged,
        )
        self._generator_class = ExLlamaV2DynamicGenerator
        if graphs:
            self._capture_graphs(jobs, max_seq_len, report)
        self._generator = self._generator_class(**self._generator_args)
        self._degraded = False
        self._jobs, self._paged, self._cache_total = jobs, paged, tokens
        torch.cuda.synchronize()

    def _capture_graphs(self, jobs: int, max_seq_len: int, report) -> None:
        """Capture a decode step per batch size; our generator then replays them."""
        from engine.gpu.decode_matmul import DecodeMatmul
        from engine.gpu.generator import Generator
        from engine.gpu.graphs import DecodeGraphs

        report(LoadStep("graphs", 0, jobs))
        matmul = DecodeMatmul.for_model(self._model, jobs) if self._custom_matmul else None
        self._graphs = DecodeGraphs(
            self._model, self._cache, jobs, max_seq_len, PAGE_TOKENS, matmul=matmul
        )
        try:
            self._graphs.capture()
        except Exception as error:
            if is_oom(error):
                raise  # reported as what does not fit
            raise GraphCaptureFailed(
                f"Capturing the decode step as CUDA graphs failed ({type(error).__name__}: "
                f"{error}); start with --no-cuda-graphs (SC2_NO_CUDA_GRAPHS=1) to decode eagerly."
            ) from error
        self._generator_class = Generator
        self._generator_args["graphs"] = self._graphs

    def _ready_status(self, folder, max_seq_len, cache_mode, started, used_gb) -> EngineStatus:
        import torch

        from engine.gpu import attention, compat

        if not self._paged:
            kernels = "PyTorch SDPA"
        elif compat.has_real_flash_attn():
            kernels = "flash-attn (paged)"
        else:
            config = self._model.config
            heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
            backend = attention.attention_backend("cuda:0", torch.half, *heads)
            decode = attention.decode_backend("cuda:0", torch.half, *heads)
            kernels = f"PyTorch attention ({backend}; decode: {decode})"
        decode_path = self._decode_path(cache_mode)
        batching = "paged" if self._paged else "unpaged"
        seconds = time.perf_counter() - started
        return EngineStatus(
            state="ready",
            model_dir=str(folder),
            max_seq_len=max_seq_len,
            cache_mode=cache_mode,
            batching=batching,
            max_concurrency=self._jobs,
            load_seconds=seconds,
            vram_used_gb=used_gb,
            message=(
                f"Loaded {folder.name} in {seconds:.1f} s: "
                f"{max_seq_len:,}-token context, {cache_mode} cache, {batching} batching of up to "
                f"{self._jobs} jobs, {kernels}, {decode_path}, {used_gb:.1f} GB of VRAM."
            ),
            cache_tokens=self._cache_total,
            attention=kernels,
            decode=decode_path,
        )

    def _decode_path(self, cache_mode: str) -> str:
        """How decode steps run, for the status line."""
        graphs = self._graphs
        if graphs is not None:
            matmul = (
                graphs.matmul.summary(graphs.max_jobs)
                if graphs.matmul is not None
                else "EXL2 matmul: exllamav2's"
            )
            return (
                f"decode: CUDA graphs for 1–{graphs.max_jobs} jobs + GPU sampling "
                f"(captured in {graphs.capture_seconds:.1f} s, {graphs.vram_bytes / GB:.2f} GB), "
                f"{matmul}"
            )
        if not self._cuda_graphs:
            return "decode: eager (CUDA graphs off)"
        if not self._paged:
            return "decode: eager (unpaged)"
        return f"decode: eager (CUDA graphs need the fp16 cache, not {cache_mode})"

    def unload(self) -> None:
        """Stop the worker (ending in-flight jobs with an error), free the model, cache and VRAM."""
        if self._worker is not None:
            self._commands.put(("stop", None))
            self._worker.join()
            self._worker = None
        self._free()
        self._status = EngineStatus()

    def _free(self) -> None:
        if self._graphs is not None:
            self._graphs.release()
        if self._model is not None:
            self._model.unload()
        self._model = self._cache = self._generator = self._graphs = None
        self._generator_args = {}
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def close(self) -> None:
        """Unload and stop; the engine can be loaded again afterwards."""
        self.unload()

    # ---- jobs ----

    def submit(
        self,
        ids: Sequence[int],
        settings: SamplingSettings,
        sink: Sink,
        stop: Sequence[str] = STOP_STRINGS,
    ) -> Job:
        """Start a job; its events go to sink(event) from the worker thread. `cancel` ends it.

        It ends at the end-of-text token or at any of the `stop` strings (left out of its text).
        """
        if self._status.state != "ready":
            raise NotReady(f"The model is not ready ({self._status.state}); load one first.")
        # The web side fitted the prompt and max_new_tokens to this context (starcoder2.prompt).
        request = Job(list(ids), settings, sink, tuple(stop))
        request.worker = self._worker
        self._commands.put(("submit", request))
        return request

    def cache_pages(self) -> tuple[int, int]:
        """(pages in use, pages in all) of the paged K/V cache; (0, 0) with nothing loaded."""
        generator = self._generator
        if generator is None or not getattr(generator, "paged", False):
            return 0, 0
        return len(generator.referenced_pages), generator.max_pages

    def cancel(self, request: Job) -> None:
        """End a job early (its caller went away); the worker drops it before its next step."""
        if not request.done:
            self._commands.put(("cancel", request))

    def serving(self, request: Job) -> bool:
        """The worker that took the job still runs: its events may yet come."""
        return request.worker is not None and request.worker.is_alive()

    # ---- the worker ----

    def _run(self) -> None:
        """Own the generator: take commands, step the generator, route results to their callers."""
        active: dict[object, Job] = {}
        while True:
            block = not active
            try:
                while True:
                    command, request = self._commands.get(block=block)
                    block = False
                    if command == "stop":
                        self._end_all(
                            active, "The model is being reloaded; send the message again."
                        )
                        return
                    if command == "submit":
                        self._submit(request, active)
                    elif command == "cancel" and request.job in active:
                        del active[request.job]
                        request.done = True
                        try:
                            self._generator.cancel(request.job)
                        except Exception as error:  # keep the worker alive; start clean
                            self._recover(active, error)
            except queue.Empty:
                pass
            if not active:
                continue
            try:
                results = self._generator.iterate()
            except Exception as error:  # a failed step must not take the worker down
                self._recover(active, error)
                continue
            self._steps += 1
            for result in results:
                request = active.get(result["job"])
                if request is not None:
                    self._deliver(request, result, active)
            try:
                self._end_stuck(active)
            except Exception as error:  # the watch must not take the worker down either
                self._recover(active, error)

    def _end_stuck(self, active: dict) -> None:
        """End alone each started reply that has not moved for the stall timeout while the
        generator kept stepping (a scheduling fault must not hold its caller forever)."""
        clock, started = self._reply_clock, self._generator.active_jobs
        watched = [request for job, request in active.items() if job in started]
        clock.retain(watched)  # ended replies go; waiting ones start their clock when they start
        for request in watched:
            clock.saw(
                request, [(s.kv_position, len(s.sequence_ids)) for s in request.job.sequences]
            )
        for request in clock.stuck():
            seconds = clock.still_for(request)
            clock.forget(request)
            if active.pop(request.job, None) is None:  # ended by a recovery meanwhile
                continue
            request.done = True
            self.stuck_replies += 1
            logger.error("A reply made no progress for %.1f s; ending it alone.", seconds)
            request.deliver(
                GenerationFailed(
                    f"This reply made no progress for {seconds:.0f} s while the engine kept "
                    "working, so it was stopped; send the message again."
                )
            )
            try:
                self._generator.cancel(request.job)
            except Exception as error:  # keep the worker alive; start clean
                self._recover(active, error)

    def _submit(self, request: Job, active: dict) -> None:
        try:
            request.job = new_job(request.input_ids, request.settings, request.stop)
            self._generator.enqueue(request.job)
        except Exception as error:
            request.done = True
            request.deliver(GenerationFailed(f"The job could not start: {error}"))
            return
        active[request.job] = request

    def _deliver(self, request: Job, result: dict, active: dict) -> None:
        text = result.get("text", "")
        if text:
            request.text.append(text)
            request.deliver(TextDelta(text))
        if not result.get("eos"):
            return
        del active[request.job]
        request.done = True
        self._degraded = False
        # The first sampled token, not the first text: text can be held back (stop strings, UTF-8).
        first_token = getattr(request.job, "time_first_token", None) or time.time()
        ttft = first_token - request.submitted_at
        new_tokens = result.get("new_tokens", 0)
        generate_s = result.get("time_generate", 0.0)
        reason = str(result.get("eos_reason"))
        request.deliver(
            Finished(
                text="".join(request.text),
                prompt_tokens=result.get("prompt_tokens", len(request.input_ids)),
                new_tokens=new_tokens,
                cached_tokens=result.get("cached_tokens", 0),
                time_to_first_token_s=ttft,
                decode_tokens_per_s=(new_tokens - 1) / generate_s if generate_s > 0 else 0.0,
                stop_reason=STOP_REASONS.get(reason, reason),
            )
        )

    def _recover(self, active: dict, error: Exception) -> None:
        """A generator step raised: fail the jobs it was prefilling (else all), keep serving."""
        import torch

        self._degraded = True
        reason = "out of GPU memory" if is_oom(error) else f"{type(error).__name__}: {error}"
        message = f"Generation failed ({reason}); the engine recovered, try again."
        # Prefill runs before the batch's decode step, so jobs already streaming are untouched.
        started = getattr(self._generator, "active_jobs", [])
        prefilling = [
            request
            for job, request in active.items()
            if job in started and not job.is_prefill_done()
        ]
        try:
            if not prefilling:
                raise RuntimeError("the failed step was not a prefill")
            for request in prefilling:
                self._generator.cancel(request.job)
                del active[request.job]
                request.done = True
                request.deliver(GenerationFailed(message))
        except Exception:
            try:
                self._end_all(active, message)
            except Exception:  # the generator's state is broken: build a fresh one
                self._generator = None
        if self._generator is None and self._generator_args:
            self._generator = self._generator_class(**self._generator_args)
        torch.cuda.empty_cache()

    def _end_all(self, active: dict, message: str) -> None:
        for request in active.values():
            request.done = True
            request.deliver(GenerationFailed(message))
        active.clear()  # before clear_queue, which may raise on a broken generator
        if self._generator is not None:
            self._generator.clear_queue()

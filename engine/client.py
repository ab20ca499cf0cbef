"""The web side's handle on one engine process: status, a stream per reply, load, restart.

The engine runs in a child process (engine.process) that alone imports torch and exllamav2. If it
dies (killed, a segfault, a CUDA error), every reply in flight ends at once with a clear error,
a new process starts and the last model is loaded again. If it stops moving while replies wait
(a step that never returns, a GPU that no longer answers, a stopped process), the same happens
once --stall-timeout has passed: the process is killed and started again.

What the web side shows (health, free GPU memory, cache pages) comes from the process's beats,
so answering /health or /metrics never waits for the engine.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from engine import wire
from engine.gpu_check import no_gpu_here
from engine.process import REAL_ENGINE
from engine.process import main as process_main
from engine.stall import DEFAULT_STALL_TIMEOUT_S, ProgressClock
from engine.types import (
    ALIVE_CHECK_S,
    DEFAULT_MAX_JOBS,
    EngineClient,
    EngineStatus,
    EventStream,
    Faults,
    Finished,
    GenerationRequest,
    GpuInfo,
    LoadProgress,
)
from starcoder2.branches import DEFAULT_CACHE_MODE, DEFAULT_CONTEXT
from starcoder2.errors import NO_MODEL_LOADED, GenerationFailed, NoGPU, NotReady
from starcoder2.prompt import Segment
from starcoder2.tokens import PromptEncoder

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # importing torch and probing the GPU; a cold disk can be slow
CALL_TIMEOUT_S = 5.0
WATCH_EVERY_S = 0.1  # how often the web side checks that an engine with replies still moves
RESTART_DELAYS_S = (0.0, 1.0, 5.0, 30.0)  # after one, two, three and more deaths in a row


@contextlib.contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """Children started in here ignore Ctrl+C from their first line: it reaches the whole process
    group, and the web side stops them itself. Only the main thread may change signal handlers;
    a restart from another thread relies on the process main ignoring it as soon as it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Call:
    """A call to the engine process waiting for its reply (and, for a load, its progress)."""

    on_progress: LoadProgress | None = None
    done: threading.Event = field(default_factory=threading.Event)
    value: object = None


class EngineProcess(EngineClient):
    """One engine process (one GPU), restarted and reloaded if it dies."""

    def __init__(
        self,
        *,
        device: str | None = None,
        max_jobs: int = DEFAULT_MAX_JOBS,
        backend: str = REAL_ENGINE,
        options: dict | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        self.device = device
        self.backend = backend
        self.options = {"max_jobs": max_jobs, **(options or {})}
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self.stalls = 0
        self._clock: ProgressClock[str] = ProgressClock(stall_timeout_s)
        self._progress = 0  # the engine's progress count, from its beats
        self._pages = (0, 0)
        self._stuck_replies = (0, 0)  # (in earlier processes, in this one)
        self._stall: str | None = None  # why the process is being restarted, while it is
        self._context = multiprocessing.get_context("spawn")  # no CUDA state is ever forked
        self._send_lock = threading.Lock()
        # One thread at a time may wait for the process: two waiting at once can both miss its exit.
        self._reap_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._streams: dict[int, queue.SimpleQueue] = {}
        self._calls: dict[int, _Call] = {}
        self._status = EngineStatus(state="loading", message="Starting the engine process…")
        self._health = "loading"
        self._gpu: GpuInfo | None = None
        self._encoder: PromptEncoder | None = None
        self._last_load: dict | None = None
        self._deaths_in_a_row = 0
        self._closing = False
        self._closed = threading.Event()
        try:
            self._start()
        except BaseException:  # Ctrl+C, or no hello in time: nothing is loaded, nothing to save
            self._closing = True
            process = getattr(self, "_process", None)
            if process is not None and process.pid is not None:  # it was started
                process.kill()
                with self._reap_lock:  # the reader thread may be reaping it too
                    process.join(5)
            raise
        threading.Thread(target=self._watch, name="engine-watch", daemon=True).start()

    # ---- the process ----

    def _start(self) -> None:
        ours, theirs = self._context.Pipe()
        self._hello = threading.Event()
        self._process = self._context.Process(
            target=process_main,
            args=(theirs, self.backend, self.device, self.options),
            name=f"engine-{self.device or 'gpu'}",
            daemon=True,
        )
        with _ctrl_c_ignored():
            self._process.start()
        theirs.close()
        self._conn = ours
        threading.Thread(
            target=self._read, args=(ours, self._process), name="engine-reader", daemon=True
        ).start()
        if not self._hello.wait(self.start_timeout_s):
            raise GenerationFailed(
                f"The engine process did not start within {self.start_timeout_s:g} s; see the "
                "server log."
            )

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _send(self, message: object) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _read(self, conn, process) -> None:
        """Hand each message to its reader; when the pipe breaks, the process has died."""
        try:
            while True:
                self._dispatch(conn.recv())
        except (EOFError, OSError):
            pass
        with self._reap_lock:
            process.join(5)
            exitcode = process.exitcode
        deadline = time.monotonic() + 2  # multiprocessing may be reaping it in another thread
        while exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
            exitcode = process.exitcode
        if not self._closing:
            self._died(exitcode)

    def _dispatch(self, message: object) -> None:
        match message:
            case wire.Beat() as beat:
                self._progress, self._health = beat.progress, beat.health
                self._pages = beat.cache_pages
                self._stuck_replies = (self._stuck_replies[0], beat.stuck_replies)
                if beat.gpu is not None:
                    self._gpu = beat.gpu
            case wire.Events(events, health):
                self._health = health
                for request_id, event in events:
                    stream = self._streams.get(request_id)
                    if stream is not None:
                        stream.put(event)
            case wire.Progress(call_id, step):
                call = self._calls.get(call_id)
                if call is not None and call.on_progress is not None:
                    call.on_progress(step)
            case wire.Reply(call_id, value):
                call = self._calls.pop(call_id, None)
                if call is not None:
                    call.value = value
                    call.done.set()
            case wire.Status(status, health):
                self._status, self._health = status, health
            case wire.Hello(gpu, status, health):
                self._gpu, self._status, self._health = gpu, status, health
                self._stall = None
                self._deaths_in_a_row = 0
                self._hello.set()

    def _watch(self) -> None:
        """While replies are in flight, the engine must move: else end them and restart it."""
        while not self._closed.wait(WATCH_EVERY_S):
            if not self._streams or self._stall is not None or not self._process.is_alive():
                self._clock.forget("engine")
                continue
            self._clock.saw("engine", self._progress)  # a first sighting starts the clock
            if self._clock.stuck():
                self._stalled(self._clock.still_for("engine"))

    def _stalled(self, seconds: float) -> None:
        """End every reply in flight with the reason now, then kill the process (it restarts)."""
        self.stalls += 1
        replies = len(self._streams)
        message = (
            f"The engine made no progress for {seconds:.0f} s with {replies} "
            f"{'reply' if replies == 1 else 'replies'} in flight (stalled); it is being restarted"
            f"{self._reloading()}. Send the message again in a moment."
        )
        logger.error(message)
        self._stall = message
        self._status = EngineStatus(state="restarting", message=message)
        for stream in list(self._streams.values()):
            stream.put(wire.Failure("GenerationFailed", message))
        self._process.kill()  # the reader sees the pipe close, then _died restarts it

    def _reloading(self) -> str:
        return " and the model reloaded" if self._last_load else ""

    def _died(self, exitcode: int | None) -> None:
        """End everything in flight with the reason, then start again and reload the model."""
        message = self._stall or (
            f"The engine process stopped (exit code {exitcode}); it is being restarted"
            f"{self._reloading()}. Send the message again in a moment."
        )
        if self._stall is None:
            logger.error(message)
        self._status = EngineStatus(state="restarting", message=message)
        self._health = "restarting"
        self._stuck_replies = (sum(self._stuck_replies), 0)
        self._pages = (0, 0)
        self._encoder = None
        for stream in list(self._streams.values()):
            stream.put(wire.Failure("GenerationFailed", message))
        for call in list(self._calls.values()):
            call.value = wire.Failure("GenerationFailed", message)
            call.done.set()
        self._calls.clear()
        threading.Thread(target=self._restart, name="engine-restart", daemon=True).start()

    def _restart(self) -> None:
        delay = RESTART_DELAYS_S[min(self._deaths_in_a_row, len(RESTART_DELAYS_S) - 1)]
        self._deaths_in_a_row += 1
        time.sleep(delay)  # a process that dies at once must not spin
        if self._closing:
            return
        try:
            self._start()
            self.restarts += 1
            if self._last_load:
                self.load(**self._last_load)
        except Exception as error:  # the next death, or the log, tells the operator
            logger.exception("Restarting the engine process failed", exc_info=error)

    def _call(self, method: str, timeout_s: float | None = CALL_TIMEOUT_S, **kwargs) -> object:
        call_id = next(self._ids)
        call = _Call(on_progress=kwargs.pop("on_progress", None))
        self._calls[call_id] = call
        try:
            self._send(wire.Call(call_id, method, kwargs))
        except (OSError, EOFError):
            self._calls.pop(call_id, None)
            raise GenerationFailed("The engine process is restarting; try again.") from None
        if not call.done.wait(timeout_s):
            self._calls.pop(call_id, None)
            raise GenerationFailed(f"The engine did not answer {method} within {timeout_s:g} s.")
        if isinstance(call.value, wire.Failure):
            raise call.value.exception()
        return call.value

    # ---- EngineClient ----

    @property
    def status(self) -> EngineStatus:
        return self._status

    @property
    def health(self) -> str:
        if self._stall is not None:
            return "stalled"
        if not self._process.is_alive():
            return "restarting" if not self._closing else "failed"
        return self._health

    @property
    def faults(self) -> Faults:
        return Faults(self.stalls, sum(self._stuck_replies), self.restarts)

    def gpu_info(self) -> GpuInfo | None:
        """The GPU's name and memory, as the last beat read it (about once a second)."""
        return self._gpu

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
        """Load (or reload) in the engine process; replies in flight end with a clear error."""
        if self._gpu is None:
            raise NoGPU(no_gpu_here())
        self._encoder = None
        self._status = EngineStatus(state="loading", message=f"Loading {model_dir}…")
        arguments = {"model_dir": model_dir, "max_seq_len": max_seq_len, "cache_mode": cache_mode}
        status = self._call("load", timeout_s=None, on_progress=on_progress, **arguments)
        assert isinstance(status, EngineStatus)
        self._encoder = PromptEncoder.for_model(model_dir)
        self._last_load = arguments  # what a restart loads again
        self._status = status
        return status

    def stream(self, request: GenerationRequest) -> EventStream:
        """Send the ids and settings; yield what the engine streams; closing cancels the job."""
        status = self._status
        if status.state != "ready":  # it went down after the web side checked (a restart)
            raise NotReady(f"The model is not ready ({status.state}): {status.message}")
        request_id = next(self._ids)
        events: queue.SimpleQueue = queue.SimpleQueue()
        self._streams[request_id] = events
        try:
            self._send(wire.Submit(request_id, list(request.ids), request.settings, request.stop))
        except (OSError, EOFError):
            self._streams.pop(request_id, None)
            raise GenerationFailed("The engine process is restarting; try again.") from None
        return self._events(request_id, events, self._process)

    def _events(self, request_id: int, events: queue.SimpleQueue, process) -> EventStream:
        finished = False
        try:
            while True:
                try:
                    event = events.get(timeout=ALIVE_CHECK_S)
                except queue.Empty:
                    if process.is_alive():
                        continue
                    # Sent as the process died, after its readers were told: fail, do not hang.
                    event = wire.Failure(
                        "GenerationFailed", "The engine process stopped; send the message again."
                    )
                if isinstance(event, wire.Failure):
                    finished = True
                    raise event.exception()
                yield event
                if isinstance(event, Finished):
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                try:
                    self._send(wire.Cancel(request_id))
                except (OSError, EOFError):
                    pass  # the process is gone, and its job with it

    def cache_pages(self) -> tuple[int, int]:
        """As the last beat counted them."""
        return self._pages if self._status.state == "ready" else (0, 0)

    def close(self) -> None:
        """Stop the engine process (it unloads and frees its GPU) and wait for it."""
        self._closing = True
        self._closed.set()
        try:
            self._send(wire.Stop())
        except (OSError, EOFError):
            pass
        with self._reap_lock:
            self._process.join(30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)

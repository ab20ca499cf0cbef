"""The engine process: it alone imports torch and exllamav2 and owns its GPU; one pipe to the web.

Messages from the web side:
    ("submit", request_id, token_ids, settings, stop)   start a reply
    ("cancel", request_id)                        its reader went away
    ("call", call_id, method, kwargs)             "load", "unload", "gpu_info", "cache_pages"
    ("stop",)
Messages to the web side:
    ("hello", gpu_info, status, health)
    ("events", [(request_id, event), …], health)  a reply's next event
    ("progress", call_id, load_step)
    ("reply", call_id, value)                     a call's result, or a Failure
    ("status", status, health)
    ("beat", Beat)                                every BEAT_S, whatever the generator does

Events are the protocol's small frozen dataclasses; exceptions cross as `Failure`.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from model import errors
from model.protocol import Finished, GpuInfo

# How often the engine process checks, between messages, that its generator thread still runs.
CHECK_EVERY_S = 0.5
BEAT_S = 0.25  # how often the engine process says how far it has come
GPU_EVERY_S = 1.0  # how often a beat carries a fresh reading of free GPU memory


@dataclass(frozen=True)
class Beat:
    """What the web side shows without asking the engine (so /health and /metrics never wait)."""

    progress: int  # counts the beats at which the engine had moved since the last
    health: str
    cache_pages: tuple[int, int]
    stuck_replies: int
    gpu: GpuInfo | None = None  # only every GPU_EVERY_S: reading it asks the driver


@dataclass(frozen=True)
class Failure:
    """An exception as it crosses the process boundary: the ChatError's class name and message."""

    kind: str  # a class in model.errors, or the name of any other exception
    message: str

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        return cls(type(error).__name__, str(error))

    def exception(self) -> Exception:
        """The exception to raise on the web side (anything unexpected stays unexpected)."""
        kind = getattr(errors, self.kind, None)
        if isinstance(kind, type) and issubclass(kind, errors.ChatError):
            try:
                return kind(self.message)
            except TypeError:
                return errors.GenerationFailed(self.message)
        return RuntimeError(f"{self.kind} in the engine process: {self.message}")


def load_backend(spec: str) -> Callable[..., Any]:
    """'package.module:Name' -> the class (the real engine, or a scripted one in tests)."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class Outbox:
    """Everything the engine process sends, in order, sent by the thread that has it.

    No sender thread: a thread woken for every token would take the interpreter lock from the
    generator's own loop, which is Python too (a send is a few microseconds of pickling).
    """

    def __init__(self, conn: Connection, health: Callable[[], str]) -> None:
        self._conn = conn
        self._health = health
        self._lock = threading.Lock()
        self._closed = False

    def put(self, *message: object) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._conn.send(message)
            except (OSError, EOFError):  # the web side is gone; the main loop ends on its own
                self._closed = True

    def event(self, request_id: int, event: object) -> None:
        self.put("events", [(request_id, event)], self._health())

    def close(self) -> None:
        with self._lock:
            self._closed = True


def main(conn: Connection, backend: str, device: str | None, options: dict) -> None:
    """Run the engine until told to stop or until the web side goes away."""
    # Ctrl+C reaches the whole process group; the web side stops this process itself, cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if device is not None:  # before torch is imported: this process sees one GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    engine = load_backend(backend)(**options)
    outbox = Outbox(conn, lambda: engine.health)
    handles: dict[int, object] = {}
    outbox.put("hello", engine.gpu_info(), engine.status, engine.health)
    stopped = threading.Event()
    threading.Thread(target=_beat, args=(engine, outbox, stopped), name="beat", daemon=True).start()

    def sink_for(request_id: int) -> Callable[[object], None]:
        def sink(event: object) -> None:
            if isinstance(event, BaseException):
                event = Failure.of(event)
            if isinstance(event, (Finished, Failure)):
                handles.pop(request_id, None)
            outbox.event(request_id, event)

        return sink

    def call(call_id: int, method: str, kwargs: dict) -> None:
        try:
            if method == "load":
                kwargs["on_progress"] = lambda step: outbox.put("progress", call_id, step)
                outbox.put("status", engine.status, engine.health)
            value = getattr(engine, method)(**kwargs)
        except Exception as error:
            value = Failure.of(error)
        outbox.put("reply", call_id, value)
        outbox.put("status", engine.status, engine.health)

    try:
        while True:
            if not conn.poll(CHECK_EVERY_S):
                if handles and engine.health == "failed":  # the generator thread is gone
                    for request_id in list(handles):
                        sink_for(request_id)(errors.GenerationFailed("The engine stopped."))
                continue
            message = conn.recv()
            kind = message[0]
            if kind == "submit":
                _, request_id, ids, settings, stop = message
                sink = sink_for(request_id)
                try:
                    handles[request_id] = engine.submit(ids, settings, sink, stop)
                except Exception as error:
                    sink(error)
            elif kind == "cancel":
                handle = handles.pop(message[1], None)
                if handle is not None:
                    engine.cancel(handle)
            elif kind == "call":
                _, call_id, method, kwargs = message
                threading.Thread(
                    target=call, args=(call_id, method, kwargs), name=f"engine-{method}"
                ).start()
            elif kind == "stop":
                break
    except (EOFError, OSError):  # the web side went away: nothing is left to serve
        pass
    finally:
        stopped.set()
        engine.close()
        outbox.close()


def _beat(engine: Any, outbox: Outbox, stopped: threading.Event) -> None:
    """Send a Beat every BEAT_S from a thread of its own: a generator stuck in a step, or a GPU
    that no longer answers, shows as a progress count that stops rising."""
    count, last, gpu_at = 0, None, 0.0
    while not stopped.wait(BEAT_S):
        moved = engine.progress()
        if moved != last:
            count, last = count + 1, moved
        gpu = None
        if time.monotonic() - gpu_at >= GPU_EVERY_S:
            gpu, gpu_at = engine.gpu_info(), time.monotonic()
        beat = Beat(count, engine.health, engine.cache_pages(), engine.stuck_replies, gpu)
        outbox.put("beat", beat)

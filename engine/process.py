"""The engine process: it alone imports torch and exllamav2 and owns its GPU; one pipe to the web.

It answers the messages of engine.wire: Submit starts a reply, Cancel ends one, Call runs a
method on the backend's allow-list (its CALLS), Stop ends the process. It sends Hello, Events,
Progress, Reply, Status, and a Beat every BEAT_S whatever the generator does.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from engine import wire
from engine.types import ALIVE_CHECK_S, Finished
from starcoder2 import errors

BEAT_S = 0.25  # how often the engine process says how far it has come
GPU_EVERY_S = 1.0  # how often a beat carries a fresh reading of free GPU memory

REAL_ENGINE = "engine.gpu.engine:Engine"  # what load_backend loads outside tests


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

    def put(self, message: object) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._conn.send(message)
            except (OSError, EOFError):  # the web side is gone; the main loop ends on its own
                self._closed = True

    def event(self, request_id: int, event: object) -> None:
        self.put(wire.Events([(request_id, event)], self._health()))

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
    outbox.put(wire.Hello(engine.gpu_info(), engine.status, engine.health))
    stopped = threading.Event()
    threading.Thread(target=_beat, args=(engine, outbox, stopped), name="beat", daemon=True).start()
    try:
        EngineServer(engine, outbox).serve(conn)
    except (EOFError, OSError):  # the web side went away: nothing is left to serve
        pass
    finally:
        stopped.set()
        engine.close()
        outbox.close()


class EngineServer:
    """Answers the web side's messages with one engine backend."""

    def __init__(self, engine: Any, outbox: Outbox) -> None:
        self.engine = engine
        self.outbox = outbox
        self.allowed = getattr(type(engine), "CALLS", wire.ENGINE_CALLS)
        self.handles: dict[int, object] = {}  # the replies in flight, by request id

    def serve(self, conn: Connection) -> None:
        """Until Stop: between messages, fail every reply if the generator thread is gone."""
        while True:
            if not conn.poll(ALIVE_CHECK_S):
                if self.handles and self.engine.health == "failed":
                    for request_id in list(self.handles):
                        self.sink_for(request_id)(errors.GenerationFailed("The engine stopped."))
                continue
            match conn.recv():
                case wire.Submit(request_id, ids, settings, stop):
                    sink = self.sink_for(request_id)
                    try:
                        self.handles[request_id] = self.engine.submit(ids, settings, sink, stop)
                    except Exception as error:
                        sink(error)
                case wire.Cancel(request_id):
                    handle = self.handles.pop(request_id, None)
                    if handle is not None:
                        self.engine.cancel(handle)
                case wire.Call() as request:  # a load takes minutes: the loop goes on meanwhile
                    name = f"engine-{request.method}"
                    threading.Thread(target=self.call, args=(request,), name=name).start()
                case wire.Stop():
                    return

    def sink_for(self, request_id: int) -> Callable[[object], None]:
        """Where a reply's events go: to the web side, exceptions as Failures."""

        def sink(event: object) -> None:
            if isinstance(event, BaseException):
                event = wire.Failure.of(event)
            if isinstance(event, (Finished, wire.Failure)):
                self.handles.pop(request_id, None)
            self.outbox.event(request_id, event)

        return sink

    def call(self, request: wire.Call) -> None:
        """Run a call on the allow-list; a load reports its steps as Progress."""
        engine, outbox = self.engine, self.outbox
        kwargs = dict(request.kwargs)
        try:
            if request.method not in self.allowed:
                raise errors.GenerationFailed(f"The engine has no call {request.method!r}.")
            if request.method == "load":
                call_id = request.call_id
                kwargs["on_progress"] = lambda step: outbox.put(wire.Progress(call_id, step))
                outbox.put(wire.Status(engine.status, engine.health))
            value = getattr(engine, request.method)(**kwargs)
        except Exception as error:
            value = wire.Failure.of(error)
        outbox.put(wire.Reply(request.call_id, value))
        outbox.put(wire.Status(engine.status, engine.health))


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
        beat = wire.Beat(count, engine.health, engine.cache_pages(), engine.stuck_replies, gpu)
        outbox.put(beat)

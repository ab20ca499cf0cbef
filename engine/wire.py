"""The messages on the pipe between the web side (engine.client) and an engine process
(engine.process): one frozen dataclass each, matched by type on arrival.

To the engine: Submit, Cancel, Call (a method on the backend's allow-list), Stop.
From the engine: Hello, Events, Progress, Reply, Status, Beat. Exceptions cross as Failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.types import EngineStatus, GpuInfo, LoadStep
from starcoder2 import errors
from starcoder2.settings import SamplingSettings

# What the web side may call on an engine backend by name (the rest comes in beats); a backend
# adds only what it lists in its own CALLS (the scripted test backends add read-outs of state).
ENGINE_CALLS = ("load",)


# ---- to the engine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    """Start a reply: the prompt's ids, fitted to the context by the web side."""

    request_id: int
    ids: Sequence[int]
    settings: SamplingSettings
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Cancel:
    """The reply's reader went away."""

    request_id: int


@dataclass(frozen=True)
class Call:
    """Run one of the backend's CALLS with these arguments; the answer comes as a Reply."""

    call_id: int
    method: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Stop:
    """Unload, free the GPU and end the process."""


# ---- from the engine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The process is up (again): what it found."""

    gpu: GpuInfo | None
    status: EngineStatus
    health: str


@dataclass(frozen=True)
class Events:
    """Replies' next events, (request_id, event) in order, and the engine's health then."""

    events: list[tuple[int, Any]]
    health: str


@dataclass(frozen=True)
class Progress:
    """A step of a load in progress."""

    call_id: int
    step: LoadStep


@dataclass(frozen=True)
class Reply:
    """A call's result, or its Failure."""

    call_id: int
    value: Any


@dataclass(frozen=True)
class Status:
    status: EngineStatus
    health: str


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

    kind: str  # a class in starcoder2.errors, or the name of any other exception
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

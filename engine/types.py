"""The types that cross between the web side and an engine: status, events and its interface."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

from starcoder2.branches import DEFAULT_CACHE_MODE, DEFAULT_CONTEXT
from starcoder2.errors import NO_MODEL_LOADED
from starcoder2.prompt import STOP_STRINGS, Segment
from starcoder2.settings import SamplingSettings

# How often a wait for the next message or event looks whether what sends it still runs.
ALIVE_CHECK_S = 0.5
HEALTH_STATES = ("empty", "loading", "ready", "degraded", "failed", "restarting", "stalled")
# Why a reply ended: "eos" | "stop_string" | "max_new_tokens" | "cancelled"
STOP_REASONS = ("eos", "stop_string", "max_new_tokens", "cancelled")

DEFAULT_MAX_JOBS = 8  # jobs batched together on each GPU; the cache holds this many contexts


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_gb: float
    free_gb: float  # on the whole GPU, whoever holds the rest
    engine_gb: float = 0.0  # what the engine's own allocator holds (torch's reserved memory)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    prompt_tokens: int
    new_tokens: int
    cached_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    stop_reason: str  # one of STOP_REASONS


StreamEvent = TextDelta | Finished
# What `stream` returns: closing it (Stop, a closed tab) cancels the job.
EventStream = Generator[StreamEvent, None, None]


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to write: checked, rendered, tokenized and fitted to the context at the edge.

    Nothing downstream checks or tokenizes it again; an engine needs only `ids` and `settings`
    (the other fields say what the ids are, for the page and for tests).
    """

    ids: tuple[int, ...]
    settings: SamplingSettings
    segments: tuple[Segment, ...] = ()
    dropped_turns: int = 0
    stop: tuple[str, ...] = STOP_STRINGS  # besides end-of-text; left out of the reply's text

    def __post_init__(self) -> None:
        if not self.ids:  # exllamav2 asserts on an empty prompt: the edge must not build one
            raise ValueError("A generation request needs at least one prompt token.")

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class EngineStatus:
    state: str = "empty"  # "empty" | "loading" | "ready" | "failed" | "restarting"
    model_dir: str | None = None
    max_seq_len: int = 0
    cache_mode: str = DEFAULT_CACHE_MODE
    batching: str = "unpaged"  # "paged" (continuous batching) | "unpaged" (one job at a time)
    max_concurrency: int = 1
    load_seconds: float = 0.0
    vram_used_gb: float = 0.0
    message: str = NO_MODEL_LOADED
    cache_tokens: int = 0
    attention: str = ""  # which attention kernel serves the model
    decode: str = ""  # how decode steps run: CUDA graphs or eager


@dataclass(frozen=True)
class Faults:
    """What went wrong and was recovered from, counted since the server started."""

    stalls: int = 0  # an engine made no progress for --stall-timeout and was restarted
    stuck_replies: int = 0  # replies ended alone: they stopped moving while others went on
    restarts: int = 0  # engine processes started again after dying or stalling


@dataclass(frozen=True)
class LoadStep:
    """How far a load has come: "compiling" the extension (objects of sources), "layers", or
    "graphs" (CUDA graphs captured)."""

    stage: str  # "compiling" | "layers" | "graphs"
    done: int
    total: int


LoadProgress = Callable[[LoadStep], None]


class EngineClient(Protocol):
    """What the web side may ask of an engine; the real one and the tests' fake both provide it."""

    @property
    def status(self) -> EngineStatus: ...

    @property
    def health(self) -> str: ...

    @property
    def faults(self) -> Faults: ...

    def gpu_info(self) -> GpuInfo | None: ...

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """The loaded model's token ids for a prompt (NotReady without a model)."""
        ...

    def load(
        self,
        model_dir: str,
        *,
        max_seq_len: int = DEFAULT_CONTEXT,
        cache_mode: str = DEFAULT_CACHE_MODE,
        on_progress: LoadProgress | None = None,
    ) -> EngineStatus: ...

    def stream(self, request: GenerationRequest) -> EventStream:
        """TextDelta events, then one Finished; closing the iterator cancels the job."""
        ...

    def cache_pages(self) -> tuple[int, int]:
        """(pages in use, pages in all) of the K/V cache, for /metrics."""
        ...

    def close(self) -> None: ...

"""The one way onto the GPU for the chat, `/generate` and the OpenAI routes.

In order: the request was validated by its caller; then there must be a GPU and a loaded model;
the client's rate limit counts it; the prompt is fitted to the context; the client must be
listening; and the reply waits for a free place (`web.guard.admission`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from gradio.context import LocalContext

from engine.api import (
    EngineClient,
    EngineStatus,
    Finished,
    GenerationRequest,
    TextDelta,
    no_gpu_here,
)
from starcoder2.errors import NoGPU, NoListener, NotReady
from starcoder2.prompt import STOP_STRINGS, Segment, check_fits, fit_to_context
from starcoder2.settings import SamplingSettings
from web.errors import http_status
from web.guard.admission import Admission, Ticket
from web.guard.guards import StreamWatch
from web.guard.limits import Message, RateLimiter, client_address
from web.metrics import Metrics

# How long a reply waits for its client to open the stream that reads it.
CONNECT_GRACE_S = 5.0


@dataclass(frozen=True)
class Waiting:
    """The reply still waits for a place on the GPU, behind `ahead` others."""

    ahead: int


@dataclass(frozen=True)
class Running:
    """The reply has its place on the GPU; the engine's events follow."""


class GpuGate:
    """Readiness, rate limit, context fitting, listener and queue, in that order."""

    def __init__(
        self,
        engine: EngineClient,
        *,
        limiter: RateLimiter,
        admission: Admission,
        streams: StreamWatch,
        metrics: Metrics | None = None,
        proxy_hops: int = 0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.limiter = limiter
        self.admission = admission
        self.streams = streams
        self.proxy_hops = proxy_hops

    @property
    def context_tokens(self) -> int:
        return self.engine.status.max_seq_len

    def ready(self) -> EngineStatus:
        """The engine's status if it can take a job; NoGPU or NotReady (with the remedy) if not."""
        if self.engine.gpu_info() is None:
            raise NoGPU(no_gpu_here())
        status = self.engine.status
        if status.state != "ready":
            raise NotReady(
                f"The model is not ready ({status.state}): {status.message} Load one in the "
                "Model panel, or wait for the current load to finish.",
                lasting=status.state in ("empty", "failed"),
            )
        return status

    def fit(
        self,
        messages: Sequence[Message],
        settings: SamplingSettings,
        *,
        system: str = "",
        prefix: str = "",
        client: str | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationRequest:
        """Count the request against its client's limit, fit it to the context and encode it.

        The reply stops at the template's own stop strings and at `stop`.
        """
        status = self.ready()
        self.limiter.check(client if client is not None else self._gradio_client())
        fitted = fit_to_context(
            messages,
            encode=self.engine.encode,
            context_tokens=status.max_seq_len,
            max_new_tokens=settings.max_new_tokens,
            system=system or None,
            response_prefix=prefix,
        )
        return GenerationRequest(
            tuple(fitted.ids),
            settings,
            tuple(fitted.segments),
            fitted.dropped_turns,
            stop=(*STOP_STRINGS, *stop),
        )

    def fit_raw(
        self,
        segments: Sequence[Segment],
        settings: SamplingSettings,
        *,
        client: str | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationRequest:
        """The same for a prompt that is the model's raw text (no template, no turns to drop)."""
        status = self.ready()
        self.limiter.check(client)
        ids = self.engine.encode(segments)
        check_fits(
            len(ids),
            settings.max_new_tokens,
            status.max_seq_len,
            text="the prompt",
            limit="max tokens",
        )
        return GenerationRequest(tuple(ids), settings, tuple(segments), stop=tuple(stop))

    def enter(
        self, client: str | None = None, listening: Callable[[], bool] | None = None
    ) -> Ticket:
        """A place in the queue (QueueFull at once if there is none); by default for the Gradio
        request being handled, whose client must open its stream within a few seconds."""
        if listening is not None:
            return self.admission.enter(client, listening)
        keys = self._gradio_stream_keys()
        ticket = self.admission.enter(
            self._gradio_client(), lambda: not keys or self.streams.is_open(keys)
        )
        if keys and not self.streams.wait_open(keys, CONNECT_GRACE_S):
            ticket.release()
            raise NoListener(
                f"No client opened this reply's stream within {CONNECT_GRACE_S:g} s, so it "
                "was not run. Read the stream your request returns (gradio_client and the page "
                "do this for you)."
            )
        return ticket

    def run(
        self, request: GenerationRequest, ticket: Ticket, endpoint: str
    ) -> Generator[Waiting | Running | TextDelta | Finished, None, None]:
        """An admitted reply's way to its end: Waiting while others hold the GPU's places, then
        Running and the engine's events. Closing it cancels the wait or the job. It counts the
        reply's outcome for /metrics: 200 answered, 499 left before its end, else the error's.
        The caller holds the ticket (`with ticket`), so its place is freed even when the run is
        closed before it started."""
        finished = False
        try:
            for ahead in ticket.wait():
                yield Waiting(ahead)
            yield Running()
            with contextlib.closing(self.engine.stream(request)) as events:
                for event in events:
                    if isinstance(event, Finished):
                        self.metrics.finished(event)
                        finished = True
                    yield event
        except GeneratorExit:
            self.metrics.request(endpoint, 200 if finished else 499)
            raise
        except Exception as error:
            self.metrics.request(endpoint, http_status(error))
            raise
        self.metrics.request(endpoint, 200)

    def _gradio_client(self) -> str | None:
        return client_address(LocalContext.request.get(None), self.proxy_hops)

    @staticmethod
    def _gradio_stream_keys() -> list[str]:
        """The ids the Gradio request's stream is opened under (none for a direct call)."""
        request = LocalContext.request.get(None)
        keys = [getattr(request, "session_hash", None), LocalContext.event_id.get(None)]
        return [key for key in keys if key]

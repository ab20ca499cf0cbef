"""OpenAI-compatible routes for editors and scripts: /v1/models, /v1/chat/completions,
/v1/completions (with `suffix`: StarCoder2's fill-in-the-middle), streamed as server-sent events.

They share the chat's engine, queue (web.guard.admission), rate limit and input limits. Errors come
in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and name the field, the value
and the range. Unknown fields are ignored, as OpenAI's own API does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.api import Finished, GenerationRequest, TextDelta
from starcoder2.errors import ChatError
from starcoder2.settings import FIELDS
from web.errors import http_status
from web.gate import GpuGate, Running, Waiting
from web.guard.guards import LoginThrottle
from web.guard.limits import client_address
from web.metrics import Metrics
from web.openai.requests import ApiError, ApiRequest, read_body, read_chat, read_completion

MODEL_ID = "starcoder2-15b-instruct-v0.1"
MAX_NEW_TOKENS = int(next(spec for spec in FIELDS if spec.name == "max_new_tokens").maximum)
FINISH_REASONS = {"max_new_tokens": "length"}  # everything else ended at a stop: "stop"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_DONE = object()
DISCONNECT_CHECK_S = 0.5  # how often a reply waiting for the GPU or a token looks for its client


# ---- the routes ---------------------------------------------------------------------------------


class OpenAIRoutes:
    """The /v1 routes around one GpuGate."""

    def __init__(
        self,
        gate: GpuGate,
        metrics: Metrics,
        *,
        api_keys: Sequence[str] = (),
        login_required: bool = False,
        proxy_hops: int = 0,
    ) -> None:
        self.gate = gate
        self.metrics = metrics
        self.api_keys = [key.encode() for key in api_keys]
        self.failed_keys = LoginThrottle()
        self.login_required = login_required
        self.proxy_hops = proxy_hops

    def routes(self) -> list[Route]:
        """The routes, and under /v1 a 405 or 404 in OpenAI's shape for anything else."""
        served = {
            "/v1/models": ("GET", self.models),
            "/v1/chat/completions": ("POST", self.chat),
            "/v1/completions": ("POST", self.completions),
        }
        routes = [
            Route(path, _only(method, endpoint), methods=ALL_METHODS)
            for path, (method, endpoint) in served.items()
        ]
        return [*routes, Route("/v1/{rest:path}", _not_found, methods=ALL_METHODS)]

    def refusal(self, request: Request) -> ApiError | None:
        """Why the request may not use the API (None: it may). With keys set, wrong keys are
        counted per client address and, past a few, even the right one waits, as logins do."""
        if not self.api_keys:
            if not self.login_required:
                return None
            return ApiError(
                401,
                "This server requires a login; its operator can allow the API with an API key "
                "(--api-key or SC2_API_KEY).",
                code="invalid_api_key",
            )
        client = client_address(request, self.proxy_hops) or "unknown"
        wait = self.failed_keys.wait_s(client)
        if wait:
            return ApiError(
                429,
                f"Too many wrong API keys from this address; try again in {wait} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        if scheme.lower() == "bearer" and any(hmac.compare_digest(given, k) for k in self.api_keys):
            return None
        if header:
            self.failed_keys.failed(client)  # a guess; a request without a key is not one
        return ApiError(
            401,
            "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )

    def _authorize(self, request: Request) -> None:
        refusal = self.refusal(request)
        if refusal is not None:
            raise refusal

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self.gate.ready()  # no GPU, or no model: say why instead of listing what cannot serve
        except Exception as error:
            return ApiError.of(error).response()
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "bigcode"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat_completions", read_chat)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions", read_completion)

    def _prepared(
        self, read: Callable[[dict], ApiRequest], body: dict, client: str | None
    ) -> tuple[ApiRequest, GenerationRequest]:
        asked = read(body)
        return asked, self._fitted(asked, client)

    def _fitted(self, asked: ApiRequest, client: str | None) -> GenerationRequest:
        """Fit the prompt, keeping room for at least min(max_tokens, half the context); the
        reply may then take max_tokens (if absent, its default; without one, MAX_NEW_TOKENS), at
        most the room the prompt leaves (finish_reason "length" when it runs out)."""
        context = self.gate.context_tokens
        given = asked.settings.max_new_tokens if asked.max_tokens_given else None
        wanted = given or asked.default_max or MAX_NEW_TOKENS
        reserve = dataclasses.replace(
            asked.settings, max_new_tokens=max(1, min(wanted, context // 2))
        )
        try:
            if asked.segments:
                request = self.gate.fit_raw(
                    asked.segments, reserve, client=client, stop=asked.stops
                )
            else:
                request = self.gate.fit(
                    asked.turns, reserve, system=asked.system, prefix=asked.prefix, client=client,
                    stop=asked.stops,
                )  # fmt: skip
        except ChatError as error:
            status = http_status(error)
            raise ApiError.of(error, param=asked.param if status == 400 else None) from None
        room = context - request.prompt_tokens
        chosen = dataclasses.replace(asked.settings, max_new_tokens=max(1, min(wanted, room)))
        return dataclasses.replace(request, settings=chosen)

    async def _serve(
        self,
        request: Request,
        endpoint: str,
        read: Callable[[dict], ApiRequest],
    ) -> Response:
        """Check, queue and run one request; stream it or answer it whole."""
        try:
            self._authorize(request)
            body = await read_body(request)
            client = client_address(request, self.proxy_hops)
            # Reading long texts and tokenizing them takes a while: not on the event loop.
            asked, generation = await asyncio.to_thread(self._prepared, read, body, client)
            job = Job(self.gate, generation, client, endpoint)
            await job.start()  # a full queue answers 503 here, before any stream starts
        except Exception as error:
            failure = ApiError.of(error)
            self.metrics.request(endpoint, failure.status)
            return failure.response()
        reply = Reply(endpoint, generation, job, asked.include_usage)
        if asked.stream:
            return StreamingResponse(
                self._streamed(reply, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(reply, request)

    async def _streamed(self, reply: Reply, request: Request) -> AsyncIterator[str]:
        """The reply as server-sent events (the run counts its outcome for /metrics)."""
        try:
            async for event in reply.job.events(request):
                if isinstance(event, Waiting):  # a comment keeps proxies from cutting the wait
                    yield f": waiting for the GPU, {event.ahead} ahead\n\n"
                    continue
                for chunk in reply.chunks(event):
                    yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as error:  # after the first byte: the error goes down the stream
            yield f"data: {json.dumps(ApiError.of(error).body())}\n\n"
        finally:
            reply.job.cancel()

    async def _whole(self, reply: Reply, request: Request) -> Response:
        """The reply in one JSON body (the run counts its outcome for /metrics)."""
        finished = None
        # Tokens keep coming while the client is gone: listen for its hang-up beside them.
        hang_up = asyncio.create_task(_cancel_on_disconnect(request, reply.job))
        try:
            async for event in reply.job.events(request):
                if isinstance(event, Finished):
                    finished = event
        except Exception as error:
            return ApiError.of(error).response()
        finally:
            hang_up.cancel()
            reply.job.cancel()
        if finished is None:  # the client went away; nobody reads this answer
            return Response(status_code=499)
        return JSONResponse(reply.whole(finished))


def _only(method: str, endpoint: Callable[[Request], Awaitable[Response]]):
    async def serve(request: Request) -> Response:
        if request.method not in (method, "HEAD" if method == "GET" else method):
            return ApiError(
                405,
                f"{request.url.path} takes {method} only (got {request.method}).",
                code="method_not_allowed",
                headers={"Allow": method},
            ).response()
        return await endpoint(request)

    return serve


async def _not_found(request: Request) -> Response:
    return ApiError(
        404,
        f"There is no {request.url.path} on this server; it serves /v1/models, "
        "/v1/chat/completions and /v1/completions.",
        code="not_found",
    ).response()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client hangs up (its body is read: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class Job:
    """One request run in a thread (queue wait, then the engine's stream) feeding an asyncio queue.

    Closing it (the client went away) stops the thread within one token, or within a second
    while it waits for the GPU; the engine's job is cancelled with it.
    """

    def __init__(
        self, gate: GpuGate, generation: GenerationRequest, client: str | None, endpoint: str
    ) -> None:
        self.gate, self.generation, self.client = gate, generation, client
        self.endpoint = endpoint
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Take a place in the queue now (QueueFull raises here), then run in a thread."""
        self._loop = asyncio.get_running_loop()
        ticket = self.gate.enter(self.client, lambda: not self.cancelled.is_set())
        threading.Thread(target=self._run, args=(ticket,), name="openai-job", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody reads any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self, ticket) -> None:
        try:
            run = self.gate.run(self.generation, ticket, self.endpoint)
            with ticket, contextlib.closing(run):
                for event in run:
                    if self.cancelled.is_set():
                        return  # closing the run cancels the engine's job, and counts a 499
                    if not isinstance(event, Running):
                        self._put(event)
        except Exception as error:
            self._put(error)
        finally:
            self._put(_DONE)

    async def events(self, request: Request) -> AsyncIterator[Any]:
        """Waiting markers, then the engine's events; checks every DISCONNECT_CHECK_S that the
        client is still there."""
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclasses.dataclass
class Reply:
    """Turns a request's events into OpenAI's chunks and answers."""

    endpoint: str
    generation: GenerationRequest
    job: Job
    include_usage: bool
    id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(12))
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    started: bool = False

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat_completions"

    def _envelope(self, choices: list, chunk: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
            prefix = "chatcmpl-"
        else:
            kind, prefix = "text_completion", "cmpl-"
        return {
            "id": prefix + self.id,
            "object": kind,
            "created": self.created,
            "model": MODEL_ID,
            "choices": choices,
        }

    def _choice(self, text: str, finish: str | None, *, whole: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if whole:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "finish_reason": finish}
        delta: dict = {"content": text} if text else {}
        if not self.started:
            delta = {"role": "assistant", **delta}
            self.started = True
        return {"index": 0, "delta": delta, "finish_reason": finish}

    @staticmethod
    def usage(finished: Finished) -> dict:
        return {
            "prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.new_tokens,
            "total_tokens": finished.prompt_tokens + finished.new_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
        }

    def chunks(self, event: object) -> list[dict]:
        if isinstance(event, TextDelta):
            return [self._envelope([self._choice(event.text, None)], chunk=True)]
        assert isinstance(event, Finished)
        finish = FINISH_REASONS.get(event.stop_reason, "stop")
        chunks = [self._envelope([self._choice("", finish)], chunk=True)]
        if self.include_usage:
            chunks.append({**self._envelope([], chunk=True), "usage": self.usage(event)})
        return chunks

    def whole(self, finished: Finished) -> dict:
        finish = FINISH_REASONS.get(finished.stop_reason, "stop")
        body = self._envelope([self._choice(finished.text, finish, whole=True)], chunk=False)
        return {**body, "usage": self.usage(finished)}

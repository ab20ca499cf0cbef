"""What the open internet may do to the server: HTTP rules around Gradio's app, as ASGI middleware.

- Every page forbids loading anything from other origins (a reply's image or CSS `url()` must not
  make a visitor's browser call a third party, carrying the conversation in its address).
- Routes the app does not use are not served: uploads, recordings, Gradio's monitoring pages.
- A call naming an event the app does not have (by number or API name) gets a 404, and named
  arguments that do not fit the event a 400, not a 500 with a traceback in the log;
  a body past the size limit gets a 413 before it is read (or as soon as it passes the limit),
  and JSON nesting too deep to parse a 400.
- Failed logins are slowed per client address; with a login set, the login page does not carry
  the API's description.
- Open reply streams are counted, so a reply nobody reads is never run (see `StreamWatch`).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from web.guard.limits import (
    MAX_BODY_BYTES,
    MAX_LOGIN_BYTES,
    NESTS_TOO_DEEP,
    body_too_large,
    forwarded_client,
    too_many_values,
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval'",  # Gradio's page starts inline
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
    )
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
# Gradio routes this app has no use for; anything that writes files is among them.
REFUSED_ROUTES = re.compile(
    r"^/(gradio_api/)?("
    r"upload|upload_progress|process_recording|stream/|vibe-|undo-vibe-edit|run-history|runs"
    r"|monitoring|dev/reload|proxy=|custom_component/|deep_link|component_server"
    r")"
)
# Bodies naming an event (fn_index) by number; a bad number makes Gradio raise a KeyError.
EVENT_ROUTES = re.compile(r"^/gradio_api/(queue/join|run/[^/]+|api/[^/]+)/?$")
# Calls naming an event by its API name (`predict` takes a number); `v2/` calls take named
# arguments. An unknown name, or an argument that does not fit, makes Gradio raise.
NAMED_ROUTES = re.compile(r"^/gradio_api/(?:(?:run|api)/(?!predict/?$)|call/)(v2/)?([^/]+)/?$")
LOGIN_ROUTE = re.compile(r"^/login/?$")
PAGE_ROUTE = re.compile(r"^/$")
API_INFO_SCRIPT = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)
NO_SUCH_STREAM = "No reply is waiting under this session or event id; send the request first."
QUEUE_STREAM = re.compile(r"^/gradio_api/queue/data/?$")
CALL_STREAM = re.compile(r"^/gradio_api/call/(?:v2/)?[^/]+/([0-9a-f]+)/?$")


class StreamWatch:
    """Counts open reply streams by session (or event) id; replies check theirs before running."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._changed = threading.Condition()

    def opened(self, key: str) -> None:
        with self._changed:
            self._open[key] += 1
            self._changed.notify_all()

    def closed(self, key: str) -> None:
        with self._changed:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]

    def is_open(self, keys: Iterable[str | None]) -> bool:
        with self._changed:
            return any(key is not None and self._open[key] > 0 for key in keys)

    def wait_open(self, keys: Iterable[str | None], timeout_s: float) -> bool:
        """True once a stream for one of the keys is open; False after timeout_s without one."""
        keys = list(keys)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not any(key is not None and self._open[key] > 0 for key in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


class LoginThrottle:
    """After `max_failures` failed logins in `window_s`, a client waits until the oldest expires."""

    MAX_CLIENTS = 10_000

    def __init__(
        self, max_failures: int = 5, window_s: float = 300.0, clock=time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> int:
        """Seconds this client must wait before trying again (0: it may try now)."""
        now = self._clock()
        with self._lock:
            times = self._failures.get(client)
            if not times:
                return 0
            while times and now - times[0] >= self.window_s:
                times.popleft()
            if len(times) < self.max_failures:
                return 0
            return max(1, math.ceil(self.window_s - (now - times[0])))

    def failed(self, client: str) -> None:
        with self._lock:
            times = self._failures.pop(client, None) or deque()
            self._failures[client] = times
            if len(self._failures) > self.MAX_CLIENTS:
                self._failures.popitem(last=False)
            times.append(self._clock())


def _client(scope: Scope, proxy_hops: int) -> str:
    lines = [value for name, value in scope.get("headers", []) if name == b"x-forwarded-for"]
    forwarded = b",".join(lines).decode("latin-1") or None  # several lines are one list, in order
    peer = scope.get("client")
    return forwarded_client(forwarded, peer[0] if peer else None, proxy_hops) or "unknown"


async def _bounded_body(
    scope: Scope, receive: Receive, send: Send, limit: int, remedy: str = "Send less history."
) -> bytes | None:
    """The whole body, read no further than `limit` bytes (an announced larger length is refused
    before reading); None once a 413 is sent or the client has gone."""
    announced = dict(scope.get("headers", [])).get(b"content-length", b"")
    if announced.isdigit() and int(announced) > limit:
        await _answer(send, 413, {"detail": body_too_large(int(announced), limit, remedy)})
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            await _answer(send, 413, {"detail": body_too_large(size, limit, remedy)})
            return None
        if not message.get("more_body"):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body already read, then whatever comes next."""
    replayed = [False]

    async def replay() -> dict:
        if not replayed[0]:
            replayed[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, body: dict, headers: Iterable = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *SECURITY_HEADERS,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class Guards:
    """One ASGI middleware holding the rules above; `event_ids()` names the app's events,
    `named_misfit(name, arguments)` checks a call by API name (web.guard.events), and
    `stream_exists(key)` says whether a reply waits under a session hash or event id."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        event_ids: Callable[[], Iterable[int]],
        named_misfit: Callable[[str, Any], tuple[int, str] | None],
        stream_exists: Callable[[str], bool],
        streams: StreamWatch,
        logins: LoginThrottle,
        proxy_hops: int = 0,
        hide_api_info: bool = False,
    ) -> None:
        self.app = app
        self.event_ids = event_ids
        self.named_misfit = named_misfit
        self.stream_exists = stream_exists
        self.streams = streams
        self.logins = logins
        self.proxy_hops = proxy_hops
        self.hide_api_info = hide_api_info

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        send = self._with_headers(send)
        if REFUSED_ROUTES.match(path):
            await _answer(send, 404, {"detail": "Not Found"})
            return
        if method == "POST" and LOGIN_ROUTE.match(path):
            await self._throttled_login(scope, receive, send)
            return
        if method == "POST" and not path.startswith("/v1/"):  # /v1 reads its own, in its shape
            await self._checked_post(scope, receive, send, path)
            return
        if method == "GET" and self.hide_api_info and PAGE_ROUTE.match(path):
            await self._login_page_without_api(scope, receive, send)
            return
        key = self._stream_key(scope, path)
        if key is None:
            await self.app(scope, receive, send)
            return
        if not self.stream_exists(key):
            await _answer(send, 404, {"detail": NO_SUCH_STREAM})
            return
        self.streams.opened(key)
        try:
            await self.app(scope, receive, send)
        finally:
            self.streams.closed(key)

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [header for header in SECURITY_HEADERS if header[0] not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return sending

    @staticmethod
    def _stream_key(scope: Scope, path: str) -> str | None:
        if scope.get("method") != "GET":
            return None
        if QUEUE_STREAM.match(path):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            return (query.get("session_hash") or [None])[0]
        match = CALL_STREAM.match(path)
        return match.group(1) if match else None

    async def _checked_post(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Read a body no further than the limit, refuse JSON with too many values or nested too
        deep for Gradio to parse and an event (fn_index) the app does not have; pass the rest on."""
        body = await _bounded_body(scope, receive, send, MAX_BODY_BYTES)
        if body is None:
            return
        if why := too_many_values(body):
            await _answer(send, 413, {"detail": why})
            return
        try:
            parsed = json.loads(body) if body else None
        except RecursionError:
            await _answer(send, 400, {"detail": NESTS_TOO_DEEP})
            return
        except ValueError:
            parsed = None  # not JSON: Gradio answers it with a 4xx itself
        fn_index = parsed.get("fn_index") if isinstance(parsed, dict) else None
        known = isinstance(fn_index, int) and not isinstance(fn_index, bool)
        if EVENT_ROUTES.match(path) and fn_index is not None:
            if not (known and fn_index in set(self.event_ids())):
                await _answer(send, 404, {"detail": f"There is no event {fn_index!r} in this app."})
                return
        if named := NAMED_ROUTES.match(path):
            arguments = parsed if named[1] else None
            if refused := self.named_misfit(named[2], arguments):
                await _answer(send, refused[0], {"detail": refused[1]})
                return
        await self.app(scope, _replaying(body, receive), send)

    async def _login_page_without_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The login page (Gradio's page before a login) with its API description left out."""
        start: dict = {}
        chunks: list[bytes] = []

        async def holding(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if b'"auth_required":true' in body:
                body = API_INFO_SCRIPT.sub(b"window.gradio_api_info = null;</script>", body)
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, holding)

    async def _throttled_login(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = _client(scope, self.proxy_hops)
        wait = self.logins.wait_s(client)
        if wait:
            await _answer(
                send,
                429,
                {"detail": f"Too many failed logins; try again in {wait} s."},
                [(b"retry-after", str(wait).encode())],
            )
            return
        remedy = "Send only a name and a password."
        body = await _bounded_body(scope, receive, send, MAX_LOGIN_BYTES, remedy)
        if body is None:
            return

        async def watching(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] in (400, 401):
                self.logins.failed(client)
            await send(message)

        await self.app(scope, _replaying(body, receive), watching)

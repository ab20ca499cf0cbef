"""Limits on untrusted input: text size and characters, history shape, requests per minute."""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from starcoder2.branches import MAX_CONTEXT
from starcoder2.errors import InvalidMessages, TooManyRequests
from starcoder2.prompt import ROLES

# The context holds at most 32,768 tokens and StarCoder2's tokenizer averages 3-4 characters per
# token on code and prose (long runs of spaces reach ~12), so 400,000 characters can never fit:
# refusing them up front keeps megabytes away from the tokenizer. The Textbox limit is browser-only.
MAX_PROMPT_CHARS = 400_000
TOO_LONG_FOR_ANY_CONTEXT = f"more than the largest context, {MAX_CONTEXT:,} tokens, can hold"
# A request body: far more than the largest prompt, as JSON, with a conversation to trim; read no
# further than this (an announced larger length is refused before reading).
MAX_BODY_BYTES = 16 * 1024 * 1024


# A login form: a name and a password (Gradio's page sends them as multipart form data).
MAX_LOGIN_BYTES = 16 * 1024


def body_too_large(
    size: int, limit: int = MAX_BODY_BYTES, remedy: str = "Send less history."
) -> str:
    """What a 413 says, with the size reached (announced, or read so far)."""
    shown = f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit // 1024} KB"
    return f"The request body is {size:,} bytes or more; the limit is {shown}. {remedy}"


NESTS_TOO_DEEP = "The JSON body nests too deeply to read; send a plain request object."
# Values in a JSON body: a long chat history as Gradio sends it holds some tens of thousands. Each
# value costs memory and work in whatever parses and validates it (megabytes of `{},` become
# gigabytes), so a body with more is refused before it is parsed.
MAX_JSON_VALUES = 100_000
JSON_STRING = re.compile(rb'"[^"]*"')  # once escaped quotes and backslashes are taken out


def json_values(body: bytes) -> int:
    """About how many values a JSON text holds (never fewer), counted at C speed without parsing:
    its strings, and the commas, objects and arrays outside them."""
    flat = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = flat.count(b'"') // 2
    rough = flat.count(b",") + flat.count(b"[") + flat.count(b"{") + 1
    if strings > MAX_JSON_VALUES or rough <= MAX_JSON_VALUES:
        return max(strings, rough)
    bare = JSON_STRING.sub(b"", flat)  # at most MAX_JSON_VALUES strings: quick
    return max(strings, bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1)


def too_many_values(body: bytes) -> str | None:
    """Why a JSON body holds too many values to parse (None: it does not)."""
    if (count := json_values(body)) <= MAX_JSON_VALUES:
        return None
    return (
        f"The JSON body holds about {count:,} values; the limit is {MAX_JSON_VALUES:,}. "
        "Send less history."
    )


# Tab, newline and carriage return are text; other C0/C1 controls (NUL, ESC, …) mean binary or
# terminal junk and are refused; lone UTF-16 surrogates cannot be encoded and are refused too.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
LONE_SURROGATES = re.compile("[\ud800-\udfff]")

Message = dict[str, str]


def check_text(what: str, text: object, *, limit: int = MAX_PROMPT_CHARS) -> str:
    """Return text if it is a str within `limit` characters and free of refused characters."""
    if not isinstance(text, str):
        raise InvalidMessages(f"{what} must be text (got {type(text).__name__}).")
    if len(text) > limit:
        raise InvalidMessages(
            f"{what} is {len(text):,} characters; the limit is {limit:,} "
            f"({TOO_LONG_FOR_ANY_CONTEXT}). Shorten it or send the relevant part."
        )
    if found := LONE_SURROGATES.search(text):
        raise InvalidMessages(
            f"{what} holds an invalid character (a lone UTF-16 surrogate, "
            f"U+{ord(found.group()):04X}) at position {found.start():,}; it cannot be encoded as "
            "text. Remove it and send again."
        )
    if found := CONTROL_CHARACTERS.search(text):
        raise InvalidMessages(
            f"{what} holds the control character U+{ord(found.group()):04X} at position "
            f"{found.start():,}; remove it (tabs and newlines are fine)."
        )
    return text


def check_history(history: object) -> list[Message]:
    """Return the chat history if it is a list of role/content text dicts, else raise."""
    if not isinstance(history, list):
        raise InvalidMessages(
            f"The conversation is not a list of messages (got {type(history).__name__}); "
            "press Clear and start again."
        )
    for index, message in enumerate(history):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidMessages(
                f"Message {index + 1} of the conversation is malformed (each must have a role, "
                "user or assistant, and text content); press Clear and start again."
            )
    return history


def within_chars(history: list[Message], system: str, prefix: str) -> tuple[list[Message], int]:
    """Before any tokenizing: refuse what no context can hold (the system text, the last message
    and the response prefix together past MAX_PROMPT_CHARS), then drop the oldest turns beyond
    it. Returns the turns kept and how many were dropped."""
    fixed = len(system) + len(prefix) + (len(history[-1]["content"]) if history else 0)
    if fixed > MAX_PROMPT_CHARS:
        raise InvalidMessages(
            f"The system text, the last message and the response prefix hold {fixed:,} "
            f"characters together; the limit is {MAX_PROMPT_CHARS:,} "
            f"({TOO_LONG_FOR_ANY_CONTEXT}). Shorten them."
        )
    return trim_history(history, MAX_PROMPT_CHARS - len(system) - len(prefix))


def trim_history(history: list[Message], budget_chars: int) -> tuple[list[Message], int]:
    """Drop the oldest whole turns beyond budget_chars (they could never fit the context)."""
    total = sum(len(message["content"]) for message in history)
    dropped = 0
    while total > budget_chars and len(history) - 2 * dropped > 2:
        total -= sum(len(m["content"]) for m in history[2 * dropped : 2 * dropped + 2])
        dropped += 1
    return history[2 * dropped :], dropped


class RateLimiter:
    """At most `per_minute` requests per client in any 60-second window; 0 means no limit.

    The table keeps the MAX_CLIENTS most recently seen clients (least recently seen go first), so
    forged addresses cannot grow it, and each check costs the same however many clients there are.
    """

    WINDOW_S = 60.0
    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, client: str | None) -> None:
        """Count one request from client, or raise TooManyRequests if it is over the limit."""
        if not self.per_minute or client is None:
            return
        now = self._clock()
        with self._lock:
            times = self._seen.pop(client, None) or deque()
            self._seen[client] = times  # now the most recently seen
            if len(self._seen) > self.MAX_CLIENTS:
                self._seen.popitem(last=False)
            while times and now - times[0] >= self.WINDOW_S:
                times.popleft()
            if len(times) >= self.per_minute:
                wait = max(1, math.ceil(self.WINDOW_S - (now - times[0])))
                raise TooManyRequests(
                    f"Too many requests: the limit is {self.per_minute} per minute; try again in "
                    f"{wait} s.",
                    retry_after_s=wait,
                )
            times.append(now)


def forwarded_client(forwarded_for: str | None, peer: str | None, proxy_hops: int) -> str | None:
    """Who sent a request that came through `proxy_hops` trusted proxies, each of which appends
    the address it was called from to X-Forwarded-For: the entry that many from the right. The
    entries left of it are whatever the client wrote, so they count for nothing. With no proxy
    (0), or fewer entries than proxies, the connection's own peer."""
    if proxy_hops > 0:
        entries = [entry.strip() for entry in (forwarded_for or "").split(",")]
        if len(entries) >= proxy_hops and entries[-proxy_hops]:
            return entries[-proxy_hops]
    return peer


def client_address(request: Any, proxy_hops: int) -> str | None:
    """forwarded_client for a gr.Request or a Starlette request; None for a direct call."""
    if request is None:
        return None
    peer = getattr(getattr(request, "client", None), "host", None)
    headers = request.headers
    if hasattr(headers, "getlist"):  # several lines are one list, in order
        forwarded = ",".join(headers.getlist("x-forwarded-for")) or None
    else:  # a queued event's copy, which kept the last line (its rightmost entries)
        forwarded = headers.get("x-forwarded-for")
    return forwarded_client(forwarded, peer, proxy_hops)

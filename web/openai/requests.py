"""OpenAI API requests read and checked at the edge: errors in OpenAI's shape name the field,
the value and the range. Unknown fields are ignored, as OpenAI's own API does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse

from starcoder2.errors import ChatError, InvalidSetting, NoGPU, NotReady, TooManyRequests
from starcoder2.prompt import BOS, Segment, fim_prompt
from starcoder2.settings import FIELDS, SamplingSettings, validate_settings
from web.errors import http_status, user_message
from web.guard.limits import (
    MAX_BODY_BYTES,
    NESTS_TOO_DEEP,
    Message,
    body_too_large,
    check_text,
    too_many_values,
    within_chars,
)

JSON_TYPE = "application/json"
MAX_STOPS = 16  # OpenAI allows 4; Continue's autocomplete sends up to 12
MAX_STOP_CHARS = 256
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: the rest of the context)
# OpenAI's names for our settings, where they differ.
API_NAMES = {"max_new_tokens": "max_tokens"}
ERROR_TYPES = {401: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error"}


class ApiError(Exception):
    """A refusal in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @classmethod
    def of(cls, error: Exception, param: str | None = None) -> ApiError:
        """A domain error (or anything else) as an ApiError with its status."""
        if isinstance(error, ApiError):
            return error
        status = http_status(error)
        headers = {}
        if isinstance(error, TooManyRequests):
            headers["Retry-After"] = str(error.retry_after_s)
        elif isinstance(error, NoGPU) or (isinstance(error, NotReady) and error.lasting):
            headers["x-should-retry"] = "false"  # waiting will not help: clients give up at once
        elif status == 503:
            headers["Retry-After"] = "10"
        code = {429: "rate_limit_exceeded", 503: "unavailable"}.get(status)
        return cls(status, user_message(error), param=param, code=code, headers=headers)

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "")
        return {
            "error": {
                "message": self.message,
                "type": kind or "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- reading the request ------------------------------------------------------------------------

_KINDS = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    dict: "an object",
}


def field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """body[name] if it has one of the kinds (None counts as absent), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        fits = bool in kinds
    elif isinstance(value, int):
        fits = int in kinds or float in kinds
    else:
        fits = isinstance(value, kinds)
    if fits:
        return value
    wanted = " or ".join(_KINDS.get(kind, kind.__name__) for kind in kinds)
    raise ApiError(
        400,
        f"Invalid type for '{name}': expected {wanted}, but got {shown(value)}.",
        param=name,
        code="invalid_type",
    )


def shown(value: Any) -> str:
    """A value for a message: a container by its size (it may nest deep), else its JSON."""
    if isinstance(value, (list, dict)):
        kind = "a list" if isinstance(value, list) else "an object"
        return f"{kind} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"{type(value).__name__} ({json.dumps(value)[:80]})"


def too_large(size: int) -> ApiError:
    return ApiError(413, body_too_large(size), code="request_too_large")


async def read_body(request: Request) -> dict:
    """The JSON object a request sends: 415 unless it says it is JSON (no web page can send
    that to another site unasked), 403 from a browser on another site, 413 past the limit
    (an announced length before reading, a chunked body while reading), 400 if not an object."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != JSON_TYPE:
        raise ApiError(
            415,
            f"Send the body as JSON with 'Content-Type: application/json' (got {kind or 'none'}).",
            code="unsupported_media_type",
        )
    if not same_origin(request):
        raise ApiError(
            403,
            f"This request came from a page on another site ({request.headers['origin']}); the "
            "API answers programs and this server's own page only.",
            code="cross_origin",
        )
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_BODY_BYTES:
        raise too_large(int(announced))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large(size)
        chunks.append(chunk)
    return parse_object(b"".join(chunks))


def parse_object(raw: bytes) -> dict:
    if why := too_many_values(raw):
        raise ApiError(413, why, code="request_too_large")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, NESTS_TOO_DEEP) from None
    except ValueError:
        raise ApiError(
            400, "We could not parse the JSON body of your request; send a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object (got {type(body).__name__}).")
    return body


def same_origin(request: Request) -> bool:
    """False only for a browser's request from a page of another site (its Origin names it)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # editors, scripts and curl send none
    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.split(",")[0].strip().lower()


def read_settings(body: dict) -> SamplingSettings:
    """Sampling settings from OpenAI's names (and top_k, min_p, repetition_penalty as extras)."""
    raw: dict[str, object] = {}
    for spec in FIELDS:
        name = API_NAMES.get(spec.name, spec.name)
        value = body.get(name)
        if spec.name == "max_new_tokens" and value is None:
            value = body.get("max_completion_tokens")  # OpenAI's newer name
        if value is not None:
            raw[spec.name] = value
    seed = body.get("seed")
    if seed is not None:
        raw["seed"] = seed
    try:
        return validate_settings(raw)
    except InvalidSetting as error:
        message = str(error)
        name = message.split(" ", 1)[0]
        api_name = API_NAMES.get(name, name)
        raise ApiError(
            400, message.replace(name, api_name, 1) + ".", param=api_name, code="invalid_value"
        ) from None


def read_stops(body: dict) -> tuple[str, ...]:
    """`stop`: a string or a list of up to MAX_STOPS, each 1 to MAX_STOP_CHARS characters."""
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(item, str) for item in stops):
        raise ApiError(
            400,
            f"Invalid type for 'stop': expected a string or a list of strings, but got "
            f"{json.dumps(stop)[:80]}.",
            param="stop",
            code="invalid_type",
        )
    if len(stops) > MAX_STOPS:
        raise ApiError(
            400, f"stop takes at most {MAX_STOPS} strings (got {len(stops)}).", param="stop"
        )
    for item in stops:
        if not 1 <= len(item) <= MAX_STOP_CHARS:
            raise ApiError(
                400,
                f"Each stop string must have 1 to {MAX_STOP_CHARS} characters (got {len(item)}).",
                param="stop",
            )
        checked("stop", item)
    return tuple(stops)


def read_common(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage), after refusing what this server does not do."""
    field(body, "model", (str,))
    field(body, "user", (str,))
    n = field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(
            400, f"n must be 1: this server writes one choice per request (got {n}).", param="n"
        )
    for name in ("logprobs", "echo"):
        if field(body, name, (bool, int), False):
            raise ApiError(400, f"{name} is not supported by this server.", param=name)
    if field(body, "best_of", (int,), 1) != 1:
        raise ApiError(400, "best_of must be 1 on this server.", param="best_of")
    refuse_unsupported(body)
    stream = field(body, "stream", (bool,), False)
    options = field(body, "stream_options", (dict,), {})
    include_usage = bool(field(options, "include_usage", (bool,), False))
    return stream, include_usage


def refuse_unsupported(body: dict) -> None:
    """Refuse, naming the field, what this server would otherwise answer with plain prose: a
    required or named tool or function call, JSON output. Tools offered with "auto" (editors
    send them) are ignored, as a model that calls none is free to."""
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise ApiError(
            400,
            f"tool_choice {tool_choice!r} is not supported: this server calls no tools "
            "(send 'auto' or 'none', or leave it out)."
            if isinstance(tool_choice, str)
            else "tool_choice naming a tool is not supported: this server calls no tools "
            "(send 'auto' or 'none', or leave it out).",
            param="tool_choice",
        )
    function_call = body.get("function_call")
    if function_call not in (None, "auto", "none"):
        raise ApiError(
            400,
            "function_call is not supported: this server calls no functions.",
            param="function_call",
        )
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if response_format is not None and kind != "text":
        raise ApiError(
            400,
            f"response_format of type {kind if isinstance(kind, str) else shown(kind)!r} is not "
            "supported: this server writes plain text "
            "(leave it out, or send {'type': 'text'}).",
            param="response_format",
        )


def checked(param: str, text: str) -> str:
    try:
        return check_text(f"'{param}'", text)
    except ChatError as error:
        raise ApiError(400, str(error), param=param, code="invalid_value") from None


def _content(index: int, message: dict) -> str:
    """A message's text: a string, or a list of text parts (checked later, if it is kept)."""
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(
                    400,
                    f"{param} may hold only text parts ({{'type': 'text', 'text': …}}); this "
                    "model reads no images or files.",
                    param=param,
                )
            parts.append(field(part, "text", (str,), ""))
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(
            400,
            f"{param} must be a string or a list of text parts.",
            param=param,
            code="invalid_type",
        )
    return content


def read_messages(body: dict) -> tuple[list[Message], str, str]:
    """(turns, system text, response prefix): system messages fold into the first instruction
    as the chat does; a last assistant message is the start of the answer. What no context can
    hold is refused, and the oldest turns beyond it dropped, before any text is scanned."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of messages.", param="messages")
    system, turns, where = [], [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}] must be an object.", param=f"messages[{index}]")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append((index, _content(index, message)))
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": _content(index, message)})
            where.append(index)
        else:
            raise ApiError(
                400,
                f"messages[{index}].role is {role!r}; this server takes system, user and "
                "assistant messages (no tools).",
                param=f"messages[{index}].role",
            )
    prefix = ""
    if turns and turns[-1]["role"] == "assistant":
        prefix = turns.pop()["content"]
        where.pop()
    if turns and not turns[-1]["content"].strip():
        param = f"messages[{where[-1]}].content"
        raise ApiError(400, f"{param} is empty; send an instruction to answer.", param=param)
    joined = "\n\n".join(text for _, text in system)
    try:
        kept, dropped = within_chars(turns, joined, prefix)
    except ChatError as error:
        raise ApiError(400, str(error), param="messages", code="context_length_exceeded") from None
    for index, text in system:
        checked(f"messages[{index}].content", text)
    for index, turn in zip(where[2 * dropped :], kept, strict=True):
        checked(f"messages[{index}].content", turn["content"])
    if prefix:
        checked(f"messages[{len(messages) - 1}].content", prefix)
    return kept, joined, prefix


@dataclass(frozen=True)
class ApiRequest:
    """An OpenAI request read and checked once, at the edge: what to fit and how to answer.

    A chat request has `turns` (with its system text and response prefix), a completion has
    the prompt's `segments`; `default_max` is the reply's length when max_tokens is absent
    (None: the most max_tokens may ask)."""

    settings: SamplingSettings
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    max_tokens_given: bool
    default_max: int | None
    turns: list[Message] = dataclass_field(default_factory=list)
    system: str = ""
    prefix: str = ""
    segments: list[Segment] = dataclass_field(default_factory=list)

    @property
    def param(self) -> str:
        """The field a prompt that does not fit is blamed on."""
        return "prompt" if self.segments else "messages"


def read_chat(body: dict) -> ApiRequest:
    """A /v1/chat/completions body as one checked request."""
    stream, include_usage = read_common(body)
    turns, system, prefix = read_messages(body)
    return ApiRequest(
        read_settings(body), read_stops(body), stream, include_usage, _max_given(body), None,
        turns=turns, system=system, prefix=prefix,
    )  # fmt: skip


def read_completion(body: dict) -> ApiRequest:
    """A /v1/completions body as one checked request: the prompt is the model's own text (its
    special tokens count), an empty one asks for text from the start of a document (BOS), and
    `suffix` makes it StarCoder2's fill-in-the-middle prompt."""
    stream, include_usage = read_common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(
            400, "prompt must be a string (or a list of one string).", param="prompt",
            code="invalid_type",
        )  # fmt: skip
    prompt = checked("prompt", prompt)
    suffix = field(body, "suffix", (str,))
    if suffix is None:
        text = prompt or BOS
    else:
        text = fim_prompt(prompt, checked("suffix", suffix))
    return ApiRequest(
        read_settings(body), read_stops(body), stream, include_usage, _max_given(body),
        COMPLETION_MAX_TOKENS, segments=[Segment(text, trusted=True)],
    )  # fmt: skip


def _max_given(body: dict) -> bool:
    return body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None

"""The one place exceptions become what users see: domain messages as they are, others generic."""

from __future__ import annotations

import logging

import gradio as gr

from starcoder2.errors import (
    ChatError,
    ContextTooLong,
    InvalidMessages,
    InvalidSetting,
    LoadingOff,
    NoGPU,
    NoListener,
    NotReady,
    QueueFull,
    TooManyRequests,
    UnknownBranch,
)

logger = logging.getLogger(__name__)

GENERIC_ERROR = "Something went wrong on the server (the details are in its log); please try again."


def user_message(error: Exception) -> str:
    """The text a user may see for an error; anything unexpected is logged and kept generic."""
    if isinstance(error, gr.Error):
        return error.message
    if isinstance(error, ChatError):
        return str(error)
    logger.exception("Unexpected error while handling a request", exc_info=error)
    return GENERIC_ERROR


def user_error(error: Exception) -> gr.Error:
    """The gr.Error to raise for an error (Gradio shows its message once, as a toast)."""
    if isinstance(error, gr.Error):
        return error
    return gr.Error(user_message(error), print_exception=False)


# HTTP statuses of the domain errors (the OpenAI routes answer with them; /metrics counts them).
HTTP_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidSetting, 400),
    (InvalidMessages, 400),
    (ContextTooLong, 400),
    (UnknownBranch, 400),
    (LoadingOff, 403),
    (TooManyRequests, 429),
    (NoListener, 499),
    (QueueFull, 503),
    (NoGPU, 503),
    (NotReady, 503),
    (gr.Error, 400),
)


def http_status(error: BaseException) -> int:
    """The HTTP status for an error: 4xx for the client's, 503 when the server cannot serve now."""
    return next((status for kind, status in HTTP_STATUS if isinstance(error, kind)), 500)

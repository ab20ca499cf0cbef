"""The one place exceptions become what users see: domain messages as they are, others generic."""

from __future__ import annotations

import logging

import gradio as gr

from model.errors import ChatError

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

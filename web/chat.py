"""The chat: sending, a streamed answer, Stop, Retry, Undo, and the line under the chat."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import gradio as gr

from engine.api import Finished, GenerationRequest, TextDelta
from starcoder2.errors import ChatError, InvalidMessages, InvalidSetting, NoGPU
from starcoder2.settings import FIELDS, SamplingSettings, validate_settings
from web.errors import http_status, user_message
from web.gate import GpuGate, Waiting
from web.guard.limits import Message, check_history, check_text, within_chars

CONTROLS = ("busy", "send", "retry", "undo", "clear", "stop")  # the order chat_controls gives
BUSY_MESSAGE = "A reply is still being written: press Stop, or wait for it to finish."
SETTING_NAMES = tuple(spec.name for spec in FIELDS)
# Why a reply ended, in the words the page uses.
STOP_WORDS = {
    "eos": "finished",
    "stop_string": "finished",
    "max_new_tokens": "hit max new tokens",
    "cancelled": "stopped",
}
# Clickable in the empty chat: one click sends it.
EXAMPLES = (
    "Write a Python function that checks whether a string is a palindrome, with tests.",
    "Explain what this does: `sorted(set(words), key=words.index)`",
    "Write a SQL query for the 5 customers with the highest total order value.",
    "Convert this JavaScript to TypeScript with types: `const add = (a, b) => a + b;`",
)


# ---- history edits (pure functions, tested directly) --------------------------------------------


def add_user_message(
    message: str, history: list[Message], busy: bool = False
) -> tuple[str, list[Message]]:
    """Append the typed message as a user turn; clear the box. A blank message changes nothing.

    While this chat's reply streams (`busy`), the message is refused and stays in the box: a second
    job would write into the same conversation.
    """
    if not message or not message.strip():
        return message, history
    if busy:
        raise gr.Error(BUSY_MESSAGE, print_exception=False)
    try:
        check_text("The message", message)
        history = plain_history(history)
    except ChatError as error:
        raise gr.Error(str(error), print_exception=False) from None  # the text stays to be fixed
    if history and history[-1]["role"] == "user":
        # The last question was never answered (stopped or failed): replace it, keep turns paired.
        history = history[:-1]
    return "", [*history, {"role": "user", "content": message}]


def chat_controls(busy: bool) -> tuple:
    """The CONTROLS' updates: edits wait while a reply streams; Stop works only then."""
    edit = gr.Button(interactive=not busy)
    return busy, edit, edit, edit, edit, gr.Button(interactive=busy)


def stop_pressed(busy: bool) -> tuple:
    """Stop: say so only if a reply was streaming; unlock the chat either way."""
    return ("**Stopped.**" if busy else gr.skip()), *chat_controls(False)


def retry_history(chat: list[Message]) -> list[Message]:
    """Drop the last answer so its question is asked again."""
    history = plain_history(chat)
    if history and history[-1]["role"] == "assistant":
        return history[:-1]
    return history


def undo_history(chat: list[Message]) -> tuple[list[Message], str]:
    """Remove the last question and its answer; return the question so it can be edited."""
    history = plain_history(chat)
    if not history:
        return history, ""
    if history[-1]["role"] == "assistant":
        history = history[:-1]
    if history and history[-1]["role"] == "user":
        return history[:-1], history[-1]["content"]
    return history, ""


def plain_history(chat: object) -> list[Message]:
    """The chatbot's messages as role/content text pairs (the page may send extra fields)."""
    if not isinstance(chat, list):
        return check_history(chat)
    plain = []
    for message in chat:
        if is_failure(message):
            continue
        if isinstance(message, dict) and "role" in message and "content" in message:
            content = message["content"]
            if isinstance(content, list):  # Gradio 6 may send [{"type": "text", "text": …}]
                texts = [part.get("text") for part in content if isinstance(part, dict)]
                content = "".join(t for t in texts if isinstance(t, str)) if texts else content
            message = {"role": message["role"], "content": content}
        plain.append(message)
    return check_history(plain)


def read_seed(seed: object) -> object:
    """The seed box's text as an int; blank means None (a random seed)."""
    if seed is None:
        return None
    if isinstance(seed, str):
        text = seed.strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise InvalidSetting(
                f"seed must be a whole number, or blank for a random seed (got {text!r})"
            ) from None
    return seed


def read_settings(values: Sequence[object], seed: object) -> SamplingSettings:
    """Validate the sliders (in FIELDS order) and the seed box; blank seed means random."""
    raw: dict[str, object] = dict(zip(SETTING_NAMES, values, strict=True))
    raw["seed"] = read_seed(seed)
    return validate_settings(raw)


# ---- the line under the chat --------------------------------------------------------------------


def format_stats(finished: Finished) -> str:
    """One line of numbers for a finished reply."""
    cached = f", {finished.cached_tokens:,} of them cached" if finished.cached_tokens else ""
    ended = STOP_WORDS.get(finished.stop_reason, finished.stop_reason)
    return (
        f"**Last reply:** {finished.time_to_first_token_s:.2f} s to first token · "
        f"{finished.decode_tokens_per_s:.1f} tok/s · {finished.prompt_tokens:,} prompt tokens"
        f"{cached} · {finished.new_tokens:,} new tokens · {ended}"
    )


def waiting_line(ahead: int) -> str:
    """The line while a reply waits for the GPU."""
    if ahead == 0:
        return "⏳ **Waiting for the GPU:** yours is next."
    replies = "reply is" if ahead == 1 else "replies are"
    return f"⏳ **Waiting for the GPU:** {ahead:,} {replies} ahead of yours."


# A reply that could not be written shows why in its own bubble, marked so that it never
# becomes part of the conversation the model sees (plain_history drops it).
FAILED_ID = "not-answered"
FAILED_MARK = "⚠️ **Not answered:**"
NO_GPU_SHORT = "there is no GPU here to run the model (the note at the top says what to do)."


def failure_bubble(error: Exception) -> dict:
    """Where the answer would be: why there is none, in one short line."""
    message = NO_GPU_SHORT if isinstance(error, NoGPU) else user_message(error)
    return {
        "role": "assistant",
        "content": f"{FAILED_MARK} {message}",
        "metadata": {"id": FAILED_ID},
    }


def is_failure(message: object) -> bool:
    """A bubble that failure_bubble made (the page sends it back with the chat)."""
    if not isinstance(message, dict):
        return False
    metadata = message.get("metadata")
    return isinstance(metadata, dict) and metadata.get("id") == FAILED_ID


def context_meter(request: GenerationRequest, context_tokens: int) -> str:
    """An HTML bar: prompt plus max new tokens against the context, and a note on dropped turns."""
    fitted, max_new_tokens = request, request.settings.max_new_tokens
    used = fitted.prompt_tokens + max_new_tokens
    share = min(100.0, 100.0 * used / context_tokens) if context_tokens else 100.0
    dropped = ""
    if fitted.dropped_turns:
        turns = "turn was" if fitted.dropped_turns == 1 else "turns were"
        dropped = (
            f"<div style='color:#b45309'>The {fitted.dropped_turns} oldest {turns} left out to "
            "fit the context.</div>"
        )
    bar = (
        "<div style='height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden;"
        f"margin-bottom:4px'><div style='height:100%;width:{share:.1f}%;background:#f97316'>"
        "</div></div>"
    )
    return (
        f"<div style='font-size:0.9em'>{bar}<div>Context: {fitted.prompt_tokens:,} prompt + "
        f"{max_new_tokens:,} max new = {used:,} of {context_tokens:,} tokens ({share:.0f}%)</div>"
        f"{dropped}</div>"
    )


# ---- answering ----------------------------------------------------------------------------------


class Chat:
    """The chat's server side: validate, fit to the context, wait for the GPU, stream."""

    def __init__(self, gate: GpuGate) -> None:
        self.gate = gate

    def respond(self, chat: list[Message], system: str | None, prefix: str | None, *values):
        """Stream an answer to the last user message: (chat, stats, meter, prompt, *controls)
        per update, the controls as chat_controls gives them.

        The last update unlocks the chat in the same stream, so the busy state ends with it.
        Failures end the stream with their message in the answer's place (the chat stays usable);
        they are not raised, so the page unlocks the chat the same way as after an answer.
        """
        shown: list[Message] = chat if isinstance(chat, list) else []
        try:
            history = plain_history(chat)
            if not history or history[-1]["role"] != "user":
                # Nothing to answer (a blank message, or Retry with no question): unlock.
                yield *_unchanged(4), *chat_controls(False)
                return
            request, prefix = self._request(history, system, prefix, values)
            ticket = self.gate.enter()
        except Exception as error:  # refused before it had a place: counted here
            self.gate.metrics.request("chat", http_status(error))
            yield [*shown, failure_bubble(error)], "", *_unchanged(2), *chat_controls(False)
            return
        prompt = "".join(segment.text for segment in request.segments)
        label = f"Prompt sent to the model: {request.prompt_tokens:,} tokens"
        shown_prompt = gr.Textbox(prompt, label=label)
        meter = context_meter(request, self.gate.context_tokens)
        text = ""
        try:
            # Stop or a closed tab closes this generator, which closes the run (and the job).
            with ticket, contextlib.closing(self.gate.run(request, ticket, "chat")) as events:
                for event in events:
                    if isinstance(event, Finished):
                        shown = [*history, _answer(prefix + event.text)]
                        yield shown, format_stats(event), *_unchanged(2), *chat_controls(False)
                    elif isinstance(event, TextDelta):
                        text += event.text
                        shown = [*history, _answer(prefix + text)]
                        yield shown, *_unchanged(3 + len(CONTROLS))
                    else:  # Waiting for a place on the GPU, or Running on it
                        ahead = event.ahead if isinstance(event, Waiting) else None
                        line = "Generating…" if ahead is None else waiting_line(ahead)
                        yield history, line, meter, shown_prompt, *_unchanged(len(CONTROLS))
        except Exception as error:  # the run counted it
            shown = shown if shown[-1:] and shown[-1]["role"] == "assistant" else history
            yield [*shown, failure_bubble(error)], "", *_unchanged(2), *chat_controls(False)

    def _request(
        self, history: list[Message], system: str | None, prefix: str | None, values: tuple
    ) -> tuple[GenerationRequest, str]:
        """The checked texts and settings fitted to the context, and the response prefix."""
        system = check_text("The system text", system or "").strip()
        prefix = check_text("The response prefix", prefix or "")
        question = check_text("The message", history[-1]["content"])
        if not question.strip():
            raise InvalidMessages("The message is empty; write an instruction to answer.")
        settings = read_settings(values[:-1], values[-1])
        kept, pre_dropped = within_chars(history, system, prefix)
        request = self.gate.fit(kept, settings, system=system, prefix=prefix)
        if pre_dropped:
            request = dataclasses.replace(
                request, dropped_turns=request.dropped_turns + pre_dropped
            )
        return request, prefix


def _unchanged(count: int) -> tuple:
    return tuple(gr.skip() for _ in range(count))


def _answer(text: str) -> Message:
    return {"role": "assistant", "content": text}

"""The page's events: which handler (web.chat, web.panel) each control calls, with what."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from web.chat import (
    Chat,
    add_user_message,
    chat_controls,
    retry_history,
    stop_pressed,
    undo_history,
)
from web.panel import ModelPanel

PRIVATE = "private"  # hidden from the API page (the handlers still check everything)


@dataclass
class ChatParts:
    """The chat column's components, with the sampling and prompt options that shape a reply."""

    chatbot: gr.Chatbot
    stats: gr.Markdown
    meter: gr.HTML
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    undo: gr.Button
    clear: gr.Button
    busy: gr.State
    sliders: list[gr.Slider]
    seed: gr.Textbox
    system: gr.Textbox
    prefix: gr.Textbox
    show_prompt: gr.Checkbox
    prompt_view: gr.Textbox

    @property
    def controls(self) -> list:
        """In the order of web.chat.CONTROLS, as chat_controls updates them."""
        return [self.busy, self.send, self.retry, self.undo, self.clear, self.stop]


@dataclass
class PanelParts:
    gpu_line: gr.Markdown
    model_line: gr.Markdown
    branch: gr.Dropdown
    context: gr.Slider
    cache_mode: gr.Radio
    token: gr.Textbox
    load: gr.Button
    timer: gr.Timer


def wire_chat(parts: ChatParts, chat: Chat) -> None:
    """Send, an example, Retry: lock, stream the reply, unlock. Stop cancels; Undo, Clear edit."""
    replies = wire_replies(parts, chat)
    parts.stop.click(
        stop_pressed,
        parts.busy,
        [parts.stats, *parts.controls],
        cancels=replies,
        api_visibility=PRIVATE,
    )
    parts.undo.click(
        undo_history,
        parts.chatbot,
        [parts.chatbot, parts.message],
        queue=False,
        api_visibility=PRIVATE,
    )
    parts.clear.click(
        lambda: ([], "", ""),
        None,
        [parts.chatbot, parts.stats, parts.meter],
        queue=False,
        api_visibility=PRIVATE,
    )
    parts.show_prompt.change(
        lambda visible: gr.Textbox(visible=visible),
        parts.show_prompt,
        parts.prompt_view,
        queue=False,
        api_visibility=PRIVATE,
    )


def wire_replies(parts: ChatParts, chat: Chat) -> list:
    """The events that write a reply (what Stop cancels): Enter, Send, an example, Retry."""
    controls = parts.controls
    outputs = [parts.chatbot, parts.stats, parts.meter, parts.prompt_view, *controls]
    inputs = [parts.chatbot, parts.system, parts.prefix, *parts.sliders, parts.seed]

    def answer(event):
        """Lock the chat, stream the reply (its last update unlocks it), unlock if it failed."""
        locked = event.success(
            lambda: chat_controls(True), None, controls, queue=False, api_visibility=PRIVATE
        )
        # Every reply starts at once and waits for the GPU inside (web.guard.admission), so the
        # chat, /generate and the OpenAI routes share one queue and the page shows its place.
        streamed = locked.then(
            chat.respond,
            inputs,
            outputs,
            concurrency_limit=None,
            show_progress="hidden",
            api_visibility=PRIVATE,
        )
        # The reply's own last update unlocks the chat: nothing may follow it in this chain, or
        # Gradio would ignore a new message until that ran. Stop unlocks by itself; a failure in
        # Gradio itself (the last update never came) unlocks here.
        streamed.failure(
            lambda: chat_controls(False), None, controls, queue=False, api_visibility=PRIVATE
        )
        return streamed

    def example_chosen(picked: gr.SelectData, history: list, is_busy: bool) -> list:
        return add_user_message(picked.value.get("text", ""), history, is_busy)[1]

    typed, shown = [parts.message, parts.chatbot, parts.busy], [parts.message, parts.chatbot]
    chatbot, busy = parts.chatbot, parts.busy
    return [
        # A refused message stops at add_user_message (.success).
        answer(parts.message.submit(add_user_message, typed, shown, api_visibility=PRIVATE)),
        answer(parts.send.click(add_user_message, typed, shown, api_visibility=PRIVATE)),
        answer(
            chatbot.example_select(example_chosen, [chatbot, busy], chatbot, api_visibility=PRIVATE)
        ),
        answer(
            parts.retry.click(retry_history, chatbot, chatbot, queue=False, api_visibility=PRIVATE)
        ),
    ]


def wire_panel(parts: PanelParts, panel: ModelPanel, demo: gr.Blocks) -> None:
    """Estimates follow the context and cache; Load starts a load; a new page shows what is
    loaded; the timer shows a load's progress."""
    for control in (parts.context, parts.cache_mode):
        control.change(
            panel.refresh,
            [parts.branch, parts.context, parts.cache_mode],
            [parts.gpu_line, parts.branch, parts.model_line],
            queue=False,
            api_visibility=PRIVATE,
        )
    parts.load.click(
        panel.load_clicked,
        [parts.branch, parts.context, parts.cache_mode, parts.token],
        [parts.model_line, parts.timer],
        queue=False,
        show_progress="hidden",
        api_visibility=PRIVATE,
    )
    shown = [parts.gpu_line, parts.branch, parts.context, parts.cache_mode, parts.model_line]
    demo.load(
        panel.page_opened,
        None,
        [*shown, parts.timer],
        queue=False,
        show_progress="hidden",
        api_visibility=PRIVATE,
    )
    parts.timer.tick(
        panel.tick,
        None,
        [parts.gpu_line, parts.model_line, parts.timer],
        queue=False,
        show_progress="hidden",
        api_visibility=PRIVATE,
    )

"""The page's layout: the chat column and the settings beside it (web.wiring connects their
events to the handlers in web.chat and web.panel)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from engine.api import no_gpu_here
from starcoder2.branches import (
    CACHE_MODES,
    CONTEXT_STEP,
    MAX_CONTEXT,
    MIN_CONTEXT,
    TRAINED_CONTEXT,
)
from starcoder2.settings import FIELDS
from web.chat import EXAMPLES, Chat
from web.gradio_api import GenerateApi
from web.guard.limits import MAX_PROMPT_CHARS
from web.panel import IDLE_TICK_S, ModelPanel, branch_choices, gpu_markdown
from web.wiring import ChatParts, PanelParts, wire_chat, wire_panel

BANNER_STYLE = (
    "background:#fee2e2;color:#7f1d1d;border:1px solid #fca5a5;border-radius:8px;"
    "padding:8px 12px;font-weight:600"
)
# One face for every weight, served by the app: Gradio's own theme asks for a SemiBold (600) file
# that holds only a few glyphs, so bold headings drew other letters from a fallback font. With
# Regular and Bold only, every bold text takes the whole Bold file.
THEME = gr.themes.Default(
    font=[gr.themes.LocalFont("Source Sans Pro", weights=(400, 700)), "ui-sans-serif", "sans-serif"]
)
PAGE = Path(__file__).resolve().parent
CSS = (PAGE / "page.css").read_text(encoding="utf-8")
JS = (PAGE / "page.js").read_text(encoding="utf-8")  # runs once, when the page has loaded


def build_demo(
    chat: Chat, api: GenerateApi, panel: ModelPanel, *, initial_gpu, model_dir: str | None
) -> gr.Blocks:
    """Lay out the chat and the model panel and wire their events to the handlers."""
    with gr.Blocks(
        title="StarCoder2-15B-Instruct (EXL2)", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as demo:
        gr.Markdown("# StarCoder2-15B-Instruct · EXL2 chat", elem_id="title")
        gr.HTML(
            f"<div class='banner' style='{BANNER_STYLE}'>{no_gpu_here()}</div>",
            visible=initial_gpu is None,
            elem_id="no-gpu",
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_id="chat-column"):
                chat_parts = chat_column()
            with gr.Column(scale=2):
                panel_parts = model_panel(panel, initial_gpu, model_dir)
                sampling = sampling_panel()
                prompt_parts = prompt_options()
        timer = gr.Timer(IDLE_TICK_S, active=False)  # page_opened starts it
        wire_chat(ChatParts(**chat_parts, **sampling, **prompt_parts), chat)
        wire_panel(PanelParts(**panel_parts, timer=timer), panel, demo)
        gr.api(api.generate, api_name="generate", concurrency_limit=None)
    return demo


def chat_column() -> dict:
    """The chat, the lines under it, the message box with Send and Stop, and the edit buttons."""
    chatbot = gr.Chatbot(
        label="Chat",
        buttons=["copy", "copy_all"],
        render_markdown=True,
        allow_tags=False,
        feedback_options=None,
        placeholder="Ask for code: a function, a fix, an explanation.",
        examples=[{"text": text} for text in EXAMPLES],
        elem_id="chatbot",
    )
    stats = gr.Markdown("", elem_id="reply-stats")
    meter = gr.HTML("", elem_id="context-meter")
    with gr.Row(elem_id="input-row"):
        message = gr.Textbox(
            label="Message to the model",
            show_label=False,
            placeholder=(
                "Write an instruction (Enter sends, Shift+Enter adds a line, Escape stops a reply)"
            ),
            lines=1,
            max_lines=12,
            max_length=MAX_PROMPT_CHARS,
            scale=5,
            elem_id="message",
        )
        with gr.Column(scale=1, min_width=120, elem_id="send-stop"):
            send = gr.Button("Send", variant="primary", elem_id="send")
            stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
    with gr.Row(elem_id="edit-row"):
        retry = gr.Button("Retry", size="sm", elem_id="retry")
        undo = gr.Button("Undo", size="sm", elem_id="undo")
        clear = gr.Button("Clear", size="sm", elem_id="clear")
    busy = gr.State(False)  # this chat has a reply streaming
    return dict(
        chatbot=chatbot, stats=stats, meter=meter, message=message, send=send, stop=stop,
        retry=retry, undo=undo, clear=clear, busy=busy,
    )  # fmt: skip


def model_panel(panel: ModelPanel, initial_gpu, model_dir: str | None) -> dict:
    """The GPU, what is loaded, and the branch, context and cache that Load applies."""
    has_gpu = initial_gpu is not None
    branch_value, context_value, cache_value = panel.shown_settings()
    with gr.Accordion("Model", open=True):
        gpu_line = gr.Markdown(gpu_markdown(initial_gpu), elem_id="gpu-line")
        model_line = gr.Markdown(panel.model_line(), elem_id="model-line")
        free_gb = initial_gpu.free_gb if initial_gpu else None
        branch = gr.Dropdown(
            label="Branch (bits per weight; VRAM estimate at this context and cache)",
            choices=branch_choices(free_gb, context_value, cache_value),
            value=branch_value,
            interactive=not model_dir,
            info=f"Local folder {model_dir}" if model_dir else None,
            elem_id="branch",
        )
        context = gr.Slider(
            MIN_CONTEXT,
            MAX_CONTEXT,
            value=context_value,
            step=CONTEXT_STEP,
            label="Context (tokens)",
            info=f"Past {TRAINED_CONTEXT:,}, the length the model was trained on, its answers' "
            "quality is unmeasured (see the README).",
            elem_id="context",
        )
        cache_mode = gr.Radio(
            list(CACHE_MODES),
            value=cache_value,
            label="K/V cache",
            info="q4/q6/q8 quantize the cache: less VRAM, nearly the same answers.",
            elem_id="cache-mode",
        )
        token = gr.Textbox(
            label="Admin token",
            type="password",
            visible=panel.needs_token,
            info="This server is public: loading needs the operator's token.",
            elem_id="admin-token",
        )
        load = gr.Button(
            "Load", variant="primary", interactive=has_gpu and panel.can_load, elem_id="load"
        )
        gr.Markdown(panel.load_note(has_gpu), elem_id="load-note")
    return dict(
        gpu_line=gpu_line, model_line=model_line, branch=branch, context=context,
        cache_mode=cache_mode, token=token, load=load,
    )  # fmt: skip


def sampling_panel() -> dict:
    """One slider per sampling setting (starcoder2.settings.FIELDS), and the seed."""
    with gr.Accordion("Sampling", open=False):
        sliders = [
            gr.Slider(
                spec.minimum,
                spec.maximum,
                value=spec.default,
                step=spec.step,
                label=spec.label,
                info=spec.info,
            )
            for spec in FIELDS
        ]
        # A textbox, not gr.Number: a number field cannot show "blank = random".
        seed = gr.Textbox(
            label="Seed",
            placeholder="random",
            info="Blank for a random seed; a number repeats the sampling.",
            elem_id="seed",
        )
    return dict(sliders=sliders, seed=seed)


def prompt_options() -> dict:
    """System text, a response prefix, and the exact prompt of the last reply."""
    with gr.Accordion("Prompt options", open=False):
        system = gr.Textbox(
            label="System text", info="Optional; placed before your first instruction.", lines=2
        )
        prefix = gr.Textbox(
            label="Response prefix", info="The answer starts with this text, e.g. ```python"
        )
        show_prompt = gr.Checkbox(
            label="Show the exact prompt of the last reply", elem_id="show-prompt"
        )
        # A textbox keeps the prompt's trailing newline, which gr.Code strips.
        prompt_view = gr.Textbox(
            label="Prompt sent to the model",
            lines=6,
            max_lines=30,
            visible=False,
            interactive=False,
            buttons=["copy"],
            autoscroll=False,
            elem_id="prompt-view",
        )
    return dict(system=system, prefix=prefix, show_prompt=show_prompt, prompt_view=prompt_view)

"""Gradio UI: chat with StarCoder2-15B-Instruct (EXL2) on one NVIDIA GPU, plus a /generate API."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import gradio as gr
from gradio.context import LocalContext

from model.branches import (
    AUTO,
    BRANCHES,
    CACHE_MODES,
    CONTEXT_STEP,
    MAX_CONTEXT,
    MIN_CONTEXT,
    estimate_vram_gb,
    pick_branch,
)
from model.config import AppConfig, parse_config
from model.engine import EngineStatus, Finished, GpuInfo
from model.errors import NO_GPU_MESSAGE, ChatError, InvalidMessages, InvalidSetting, NotReady
from model.health import health_route
from model.limits import (
    MAX_PROMPT_CHARS,
    Message,
    RateLimiter,
    check_history,
    check_text,
    client_address,
    trim_history,
)
from model.loader import ModelLoader, available_vram_gb
from model.prompt import FittedPrompt, build_prompt, fit_to_context
from model.settings import FIELDS, SamplingSettings, validate_settings

logger = logging.getLogger(__name__)

GENERIC_ERROR = "Something went wrong on the server (the details are in its log); please try again."
# Every event that runs a GPU job shares this group, so the limit covers chat and API together.
GPU_GROUP = "gpu"
SETTING_NAMES = tuple(spec.name for spec in FIELDS)
DEFAULTS = {spec.name: spec.default for spec in FIELDS}


# ---- errors at the edge -------------------------------------------------------------------------


def user_error(error: Exception) -> gr.Error:
    """The one place exceptions become what users see: domain messages as is, others generic."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, ChatError):
        return gr.Error(str(error))
    logger.exception("Unexpected error while handling a request", exc_info=error)
    return gr.Error(GENERIC_ERROR)


# ---- chat history (pure functions, tested directly) ---------------------------------------------


BUSY_MESSAGE = "A reply is still being written: press Stop, or wait for it to finish."


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
        raise gr.Error(BUSY_MESSAGE)
    try:
        check_text("The message", message)
        check_history(history)
    except ChatError as error:
        raise gr.Error(str(error)) from None  # the text stays in the box to be fixed
    if history and history[-1]["role"] == "user":
        # The last question was never answered (stopped or failed): replace it, keep turns paired.
        history = history[:-1]
    return "", [*history, {"role": "user", "content": message}]


def chat_controls(busy: bool) -> tuple:
    """(busy, Send, Retry, Undo, Clear): the edit buttons wait while a reply streams."""
    button = gr.Button(interactive=not busy)
    return busy, button, button, button, button


def stop_pressed(busy: bool) -> tuple:
    """Stop: say so only if a reply was streaming; unlock the chat either way."""
    return ("**Stopped.**" if busy else gr.skip()), *chat_controls(False)


def retry_history(history: list[Message]) -> list[Message]:
    """Drop the last answer so its question is asked again."""
    if history and history[-1]["role"] == "assistant":
        return history[:-1]
    return history


def undo_history(history: list[Message]) -> tuple[list[Message], str]:
    """Remove the last question and its answer; return the question so it can be edited."""
    if not history:
        return history, ""
    if history[-1]["role"] == "assistant":
        history = history[:-1]
    if history and history[-1]["role"] == "user":
        return history[:-1], history[-1]["content"]
    return history, ""


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


# ---- rendering ----------------------------------------------------------------------------------


def format_stats(finished: Finished) -> str:
    """One line of numbers for a finished reply."""
    cached = f", {finished.cached_tokens:,} of them cached" if finished.cached_tokens else ""
    return (
        f"**Last reply:** {finished.time_to_first_token_s:.2f} s to first token · "
        f"{finished.decode_tokens_per_s:.1f} tok/s · {finished.prompt_tokens:,} prompt tokens"
        f"{cached} · {finished.new_tokens:,} new tokens · stopped by: {finished.stop_reason}"
    )


def context_meter(fitted: FittedPrompt, max_new_tokens: int, context_tokens: int) -> str:
    """An HTML bar: prompt plus max new tokens against the context, and a note on dropped turns."""
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


def gpu_markdown(gpu: GpuInfo | None) -> str:
    """The GPU line of the model panel."""
    if gpu is None:
        return "**GPU:** none found"
    return f"**GPU:** {gpu.name} · {gpu.free_gb:.1f} GB free of {gpu.total_gb:.1f} GB"


def status_markdown(status: EngineStatus) -> str:
    """The model line of the model panel, from an EngineStatus."""
    if status.state == "ready":
        return (
            f"**Model:** ready · {status.message} Loaded in {status.load_seconds:.1f} s, "
            f"{status.vram_used_gb:.1f} GB of VRAM, up to {status.max_concurrency} "
            f"concurrent replies ({status.batching})."
        )
    return f"**Model:** {status.state} · {status.message}"


def branch_choices(
    free_gb: float | None, context_tokens: int, cache_mode: str
) -> list[tuple[str, str]]:
    """Dropdown entries: each branch's VRAM estimate and whether it fits; auto names its pick."""
    names = list(BRANCHES)
    picked = None if free_gb is None else pick_branch(free_gb, context_tokens, cache_mode)
    if free_gb is None:
        auto = f"{AUTO} (no GPU found)"
    elif picked is None:
        auto = f"{AUTO} (none fits in {free_gb:.1f} GB)"
    else:
        auto = f"{AUTO} → {picked}"
    choices = [(auto, AUTO)]
    for name in names:
        need = estimate_vram_gb(name, context_tokens, cache_mode)
        if free_gb is None:
            verdict = ""
        elif picked is not None and names.index(name) <= names.index(picked):
            verdict = " · fits"
        else:
            verdict = " · too big"
        choices.append((f"{name} · {BRANCHES[name].bits:g} bits · ~{need:.1f} GB{verdict}", name))
    return choices


# ---- the GPU job limit ---------------------------------------------------------------------------


def set_gpu_concurrency(demo: gr.Blocks, limit: int) -> None:
    """Let `limit` GPU jobs run at once, also on a running queue (the limit is set per event)."""
    limit = max(1, int(limit))
    for block_fn in demo.fns.values():
        if block_fn.concurrency_id == GPU_GROUP:
            block_fn.concurrency_limit = limit
    # Gradio reads the limit when an event group is first used; update the live group too.
    running = getattr(demo, "_queue", None)
    groups = running.event_queue_per_concurrency_id if running is not None else {}
    group = groups.get(GPU_GROUP)
    if group is not None:
        group.concurrency_limit = limit


# ---- the UI -------------------------------------------------------------------------------------

BANNER_STYLE = (
    "background:#fee2e2;color:#7f1d1d;border:1px solid #fca5a5;border-radius:8px;"
    "padding:10px 14px;font-weight:600"
)


def build_demo(engine, config: AppConfig | None = None, loader: ModelLoader | None = None):
    """Build the Blocks app around an engine (the real one or a test fake)."""
    config = config or AppConfig()
    loader = loader or ModelLoader(engine, config)
    gpu = engine.gpu_info()
    has_gpu = gpu is not None
    initial_status = engine.status
    initial_limit = initial_status.max_concurrency if initial_status.state == "ready" else 1
    free_gb = available_vram_gb(engine)
    limiter = RateLimiter(config.rate_limit)

    def admit() -> None:
        """Count this request against its client's rate limit (gr.Error when over it)."""
        limiter.check(client_address(LocalContext.request.get(None), config.behind_proxy))

    def require_gpu() -> None:
        if not has_gpu:
            raise gr.Error(NO_GPU_MESSAGE)

    def fit(messages: list[Message], settings: SamplingSettings, system: str, prefix: str):
        """Check the model is ready and trim the history to the context."""
        status = engine.status
        if status.state != "ready":
            raise NotReady(
                f"The model is not ready ({status.state}): {status.message} Load one in the "
                "Model panel, or wait for the current load to finish."
            )
        return fit_to_context(
            messages,
            count_tokens=engine.count_tokens,
            context_tokens=status.max_seq_len,
            max_new_tokens=settings.max_new_tokens,
            system=system or None,
            response_prefix=prefix,
        )

    def respond(history: list[Message], system: str | None, prefix: str | None, *values):
        """Stream an answer to the last user message: (chat, history, stats, meter, prompt)."""
        require_gpu()
        try:
            history = check_history(history)
            if not history or history[-1]["role"] != "user":
                return  # nothing to answer (blank message, or Retry with no question)
            admit()
            system = check_text("The system text", system or "").strip()
            prefix = check_text("The response prefix", prefix or "")
            question = check_text("The message", history[-1]["content"])
            if not question.strip():
                raise InvalidMessages("The message is empty; write an instruction to answer.")
            settings = read_settings(values[:-1], values[-1])
            budget = MAX_PROMPT_CHARS - len(system) - len(prefix)
            kept, pre_dropped = trim_history(history, max(budget, len(question)))
            fitted = fit(kept, settings, system, prefix)
            if pre_dropped:
                fitted = dataclasses.replace(
                    fitted, dropped_turns=fitted.dropped_turns + pre_dropped
                )
            prompt = build_prompt(fitted.messages, system=system or None, response_prefix=prefix)
            shown_prompt = gr.Textbox(
                prompt, label=f"Prompt sent to the model: {fitted.prompt_tokens:,} tokens"
            )
            meter = context_meter(fitted, settings.max_new_tokens, engine.status.max_seq_len)
            # closing(): Stop closes this generator, and that must close the engine's (the GPU job).
            with contextlib.closing(engine.stream(fitted.segments, settings)) as events:
                yield history, history, "Generating…", meter, shown_prompt
                text = ""
                for event in events:
                    if isinstance(event, Finished):
                        answer = [*history, {"role": "assistant", "content": prefix + event.text}]
                        yield answer, answer, format_stats(event), gr.skip(), gr.skip()
                    else:
                        text += event.text
                        answer = [*history, {"role": "assistant", "content": prefix + text}]
                        yield answer, answer, gr.skip(), gr.skip(), gr.skip()
        except Exception as error:
            raise user_error(error) from None

    def generate(
        prompt: str,
        temperature: float = DEFAULTS["temperature"],
        top_p: float = DEFAULTS["top_p"],
        top_k: int = DEFAULTS["top_k"],
        min_p: float = DEFAULTS["min_p"],
        repetition_penalty: float = DEFAULTS["repetition_penalty"],
        max_new_tokens: int = DEFAULTS["max_new_tokens"],
        seed: int | None = None,
    ) -> Iterator[str]:
        """Answer one instruction; each streamed value is the whole answer so far."""
        require_gpu()
        try:
            admit()
            check_text("The prompt", prompt)
            settings = validate_settings(
                {
                    "temperature": temperature,
                    "top_p": top_p,
                    "top_k": top_k,
                    "min_p": min_p,
                    "repetition_penalty": repetition_penalty,
                    "max_new_tokens": max_new_tokens,
                    "seed": seed,
                }
            )
            if not isinstance(prompt, str) or not prompt.strip():
                raise gr.Error("The prompt is empty; send an instruction to answer.")
            fitted = fit([{"role": "user", "content": prompt}], settings, "", "")
            text = ""
            with contextlib.closing(engine.stream(fitted.segments, settings)) as events:
                for event in events:
                    if isinstance(event, Finished):
                        if event.text != text:
                            yield event.text
                    else:
                        text += event.text
                        yield text
        except Exception as error:
            raise user_error(error) from None

    def refresh_model_panel(branch: str, context_tokens: float, cache_mode: str):
        """GPU line, branch estimates at the chosen context and cache, and the model status."""
        context_tokens = int(context_tokens)
        free = available_vram_gb(engine)
        text = loader.progress_text if loader.busy else ""
        status = f"**Model:** {text}" if text else status_markdown(engine.status)
        return (
            gpu_markdown(engine.gpu_info()),
            gr.Dropdown(choices=branch_choices(free, context_tokens, cache_mode), value=branch),
            status,
        )

    def load_clicked(branch: str, context_tokens: float, cache_mode: str, progress=gr.Progress()):  # noqa: B008 (Gradio's API)
        """Download (if needed) and load the chosen branch; reloads replace the current model."""
        require_gpu()
        try:
            loader.load(
                branch,
                int(context_tokens),
                cache_mode,
                lambda fraction, text: progress(fraction, desc=text),
            )
        except Exception as error:
            raise user_error(error) from None
        return refresh_model_panel(branch, context_tokens, cache_mode)

    def show_prompt(visible: bool):
        return gr.Textbox(visible=visible)

    with gr.Blocks(title="StarCoder2-15B-Instruct (EXL2)", analytics_enabled=False) as demo:
        gr.Markdown("# StarCoder2-15B-Instruct · EXL2 chat")
        gr.HTML(f"<div style='{BANNER_STYLE}'>{NO_GPU_MESSAGE}</div>", visible=not has_gpu)
        history = gr.State([])
        busy = gr.State(False)  # this chat has a reply streaming
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Chat",
                    height=520,
                    buttons=["copy", "copy_all"],
                    render_markdown=True,
                    feedback_options=None,
                    placeholder="Ask for code: a function, a fix, an explanation.",
                    elem_id="chatbot",
                )
                stats = gr.Markdown("", elem_id="reply-stats")
                meter = gr.HTML("", elem_id="context-meter")
                with gr.Row():
                    message = gr.Textbox(
                        show_label=False,
                        placeholder="Write an instruction (Enter sends, Shift+Enter adds a line)",
                        lines=1,
                        max_lines=12,
                        max_length=MAX_PROMPT_CHARS,
                        scale=5,
                        elem_id="message",
                    )
                    with gr.Column(scale=1, min_width=120):
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Row():
                    retry = gr.Button("Retry", size="sm", elem_id="retry")
                    undo = gr.Button("Undo", size="sm", elem_id="undo")
                    clear = gr.Button("Clear", size="sm", elem_id="clear")
                with gr.Accordion("Prompt options", open=False):
                    system = gr.Textbox(
                        label="System text",
                        info="Optional; placed before your first instruction.",
                        lines=2,
                    )
                    prefix = gr.Textbox(
                        label="Response prefix",
                        info="The answer starts with this text, e.g. ```python",
                    )
                    show_prompt_box = gr.Checkbox(
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
            with gr.Column(scale=2):
                with gr.Accordion("Model", open=True):
                    gpu_line = gr.Markdown(gpu_markdown(gpu))
                    model_line = gr.Markdown(status_markdown(initial_status))
                    initial_branch = config.branch if config.branch in BRANCHES else AUTO
                    branch = gr.Dropdown(
                        label="Branch (bits per weight; VRAM estimate at this context and cache)",
                        choices=branch_choices(free_gb, config.context, config.cache_mode),
                        value=initial_branch,
                        interactive=not config.model_dir,
                        info=f"Local folder {config.model_dir}" if config.model_dir else None,
                    )
                    context = gr.Slider(
                        MIN_CONTEXT,
                        MAX_CONTEXT,
                        value=config.context,
                        step=CONTEXT_STEP,
                        label="Context (tokens)",
                    )
                    cache_mode = gr.Radio(
                        list(CACHE_MODES),
                        value=config.cache_mode,
                        label="K/V cache",
                        info="q4/q6/q8 quantize the cache: less VRAM, nearly the same answers.",
                    )
                    load = gr.Button("Load", variant="primary", elem_id="load")
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
                        info="Blank for a random seed; a number repeats an answer.",
                        elem_id="seed",
                    )
        timer = gr.Timer(1.0, active=False)

        private = {"api_visibility": "private"}
        chat_outputs = [chatbot, history, stats, meter, prompt_view]
        respond_inputs = [history, system, prefix, *sliders, seed]
        gpu_job = {
            "concurrency_id": GPU_GROUP,
            "concurrency_limit": initial_limit,
            # Queue position and errors show on the stats line, so the conversation stays readable.
            "show_progress_on": [stats],
            **private,
        }

        controls = [busy, send, retry, undo, clear]

        def show_and_lock(chat: list[Message]) -> tuple:
            return chat, *chat_controls(True)

        def answer(event):
            """Show the history, lock the chat, stream the reply, unlock (also after an error)."""
            shown = event.success(
                show_and_lock, history, [chatbot, *controls], queue=False, **private
            )
            streamed = shown.then(respond, respond_inputs, chat_outputs, **gpu_job)
            streamed.then(lambda: chat_controls(False), None, controls, queue=False, **private)
            return streamed  # what Stop cancels

        sent = [
            answer(
                trigger(add_user_message, [message, history, busy], [message, history], **private)
            )
            for trigger in (message.submit, send.click)
        ]  # a refused message stops at add_user_message (.success)
        retried = answer(retry.click(retry_history, history, history, queue=False, **private))
        stop.click(stop_pressed, busy, [stats, *controls], cancels=[*sent, retried], **private)
        undo.click(undo_history, history, [history, message], queue=False, **private).then(
            lambda h: h, history, chatbot, queue=False, **private
        )
        clear.click(
            lambda: ([], [], "", ""), None, [history, chatbot, stats, meter], queue=False, **private
        )
        show_prompt_box.change(show_prompt, show_prompt_box, prompt_view, queue=False, **private)

        panel = [gpu_line, branch, model_line]
        for control in (context, cache_mode):
            control.change(
                refresh_model_panel, [branch, context, cache_mode], panel, queue=False, **private
            )
        load.click(
            load_clicked,
            [branch, context, cache_mode],
            panel,
            concurrency_id="load",
            concurrency_limit=1,
            **private,
        )

        def page_opened(branch_value: str, context_tokens: float, cache: str):
            return (
                *refresh_model_panel(branch_value, context_tokens, cache),
                gr.Timer(active=True),
            )

        def tick(branch_value: str, context_tokens: float, cache: str):
            keep = loader.busy or engine.status.state == "loading"
            return (
                *refresh_model_panel(branch_value, context_tokens, cache),
                gr.Timer(active=keep),
            )

        demo.load(page_opened, [branch, context, cache_mode], [*panel, timer], **private)
        timer.tick(tick, [branch, context, cache_mode], [*panel, timer], queue=False, **private)

        gr.api(
            generate,
            api_name="generate",
            concurrency_id=GPU_GROUP,
            concurrency_limit=initial_limit,
        )

    loader.on_loaded(lambda status: set_gpu_concurrency(demo, status.max_concurrency))
    demo.queue(max_size=config.queue_size, default_concurrency_limit=1)
    return demo


def launch_options(engine, config: AppConfig) -> dict:
    """Keyword arguments for demo.launch(): address, login, no share link, and the /health route."""
    auth = tuple(config.auth.split(":", 1)) if config.auth else None
    return {
        "server_name": config.host,
        "server_port": config.port,
        "auth": auth,
        "share": False,  # never open a public tunnel to this machine
        # Routes given to the FastAPI app come before Gradio's own, and skip its login check.
        "app_kwargs": {"routes": [health_route(engine)]},
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the configuration, build the real engine and serve the app."""
    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from model.engine import Engine

    engine = Engine(max_jobs=config.max_jobs)
    loader = ModelLoader(engine, config)
    demo = build_demo(engine, config, loader)
    if config.load_at_start and engine.gpu_info() is not None:
        loader.load_in_background()
    try:
        demo.launch(**launch_options(engine, config))
    finally:
        engine.close()


if __name__ == "__main__":
    main()

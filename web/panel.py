"""The model panel: the GPU, what is loaded (or loading), branch estimates, and Load."""

from __future__ import annotations

import hmac
import threading

import gradio as gr
from gradio.context import LocalContext

from engine.api import (
    EngineClient,
    EngineStatus,
    GpuInfo,
    LoadProgressState,
    ModelLoader,
    available_vram_gb,
)
from starcoder2.branches import AUTO, BRANCHES, estimate_vram_gb, pick_branch
from starcoder2.errors import LoadingOff
from web.config import AppConfig
from web.errors import user_message
from web.guard.guards import LoginThrottle
from web.guard.limits import client_address

# How often an open page asks what the model is doing: while loading, and otherwise.
LOADING_TICK_S = 1.0
IDLE_TICK_S = 5.0
LOAD_NOTE = "Branch, context and cache take effect when you press **Load**."
LOAD_NEEDS_GPU = "**Load** is off: there is no GPU here (the note at the top says why)."
LOADING_OFF = (
    "Loading from this page is off: the app is public (a Space, or listening beyond this "
    "machine). The operator can set SC2_ADMIN_TOKEN to allow it with that token."
)


def gpu_markdown(gpu: GpuInfo | None) -> str:
    """The GPU line of the model panel."""
    if gpu is None:
        return "**GPU:** none found"
    return f"**GPU:** {gpu.name} · {gpu.free_gb:.1f} GB free of {gpu.total_gb:.1f} GB"


def status_markdown(status: EngineStatus, label: str | None = None) -> str:
    """The model line: what is loaded and how it serves, or the engine's state."""
    if status.state != "ready":
        return f"**Model:** {status.state} · {status.message}"
    name = label or status.model_dir or "a model"
    replies = "reply" if status.max_concurrency == 1 else "replies"
    return (
        f"**Model:** ready · {name} · {status.max_seq_len:,}-token context · "
        f"{status.cache_mode} cache · {status.batching} batching of up to "
        f"{status.max_concurrency} {replies} · {status.attention or 'default attention'} · "
        f"{status.decode or 'decode: eager'} · {status.vram_used_gb:.1f} GB of VRAM · "
        f"loaded in {status.load_seconds:.1f} s"
    )


def progress_markdown(progress: LoadProgressState) -> str:
    """The model line while loading: a bar (when the fraction is known) and the step."""
    bar = ""
    if progress.fraction is not None:
        share = max(0.0, min(1.0, progress.fraction)) * 100
        bar = (
            "<div style='height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden;"
            f"margin:4px 0'><div style='height:100%;width:{share:.1f}%;background:#6366f1'>"
            "</div></div>"
        )
    return f"**Model:** loading · {progress.text}{bar}"


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


class ModelPanel:
    """The panel's handlers; a load runs in the background and the page's timer shows it."""

    def __init__(
        self, engine: EngineClient, loader: ModelLoader, config: AppConfig, tokens: LoginThrottle
    ) -> None:
        self.engine = engine
        self.loader = loader
        self.config = config
        self.tokens = tokens  # failed admin tokens count like failed logins
        self.last_load: threading.Thread | None = None

    @property
    def needs_token(self) -> bool:
        return not self.config.loading_open and self.config.admin_token is not None

    @property
    def can_load(self) -> bool:
        return self.config.loading_open or self.config.admin_token is not None

    def load_note(self, has_gpu: bool) -> str:
        """The line under Load: when it applies the settings, or why it is off."""
        if not has_gpu:
            return LOAD_NEEDS_GPU
        return LOAD_NOTE if self.can_load else LOADING_OFF

    def model_line(self) -> str:
        """Loading progress, else the loaded model (with the last load's error, if it failed)."""
        progress = self.loader.progress
        if progress is not None:
            return progress_markdown(progress)
        status = self.engine.status
        if self.loader.error and status.state != "ready":
            return f"**Model:** ⚠️ **load failed** · {self.loader.error}"
        label = self.loader.loaded.label if self.loader.loaded else None
        line = status_markdown(status, label)
        if self.loader.error:  # the download failed; the model loaded before still serves
            line += f"\n\n⚠️ **Load failed:** {self.loader.error}"
        return line

    def refresh(self, branch: str, context_tokens: float, cache_mode: str) -> tuple:
        """(GPU line, branch dropdown, model line) for the chosen context and cache. The branch
        keeps the value the page has: a new page's first context change may carry the branch
        from before the page showed the loaded one."""
        return self._lines(None, int(context_tokens), cache_mode)

    def _lines(self, branch: str | None, context_tokens: int, cache_mode: str) -> tuple:
        choices = branch_choices(available_vram_gb(self.engine), context_tokens, cache_mode)
        dropdown = (
            gr.Dropdown(choices=choices) if branch is None else gr.Dropdown(choices, value=branch)
        )
        return gpu_markdown(self.engine.gpu_info()), dropdown, self.model_line()

    def shown_settings(self) -> tuple[str, int, str]:
        """(branch, context, cache) to show: what is loaded, else what the app was started with."""
        status = self.engine.status
        loaded = self.loader.loaded
        if status.state == "ready":
            branch = loaded.branch if loaded and loaded.branch else self.config.branch
            return branch, status.max_seq_len, status.cache_mode
        return self.config.branch, self.config.context, self.config.cache_mode

    def page_opened(self) -> tuple:
        """A new page shows what is loaded: (GPU, branch, context, cache, model line, timer)."""
        branch, context_tokens, cache_mode = self.shown_settings()
        gpu_line, dropdown, model_line = self._lines(branch, context_tokens, cache_mode)
        return gpu_line, dropdown, context_tokens, cache_mode, model_line, self._timer()

    def tick(self) -> tuple:
        """(GPU line, model line, timer): every second while a load runs, else every few seconds,
        so every open page sees a load that another one started."""
        return gpu_markdown(self.engine.gpu_info()), self.model_line(), self._timer()

    def load_clicked(self, branch: str, context_tokens: float, cache_mode: str, token: str):
        """Start a download-and-load in the background: (model line, timer)."""
        try:
            self._check_token(token)
            if not self.loader.busy:
                self.last_load = self.loader.load_in_background(
                    branch, int(context_tokens), cache_mode
                )
        except Exception as error:
            return self.model_line() + f"\n\n⚠️ {user_message(error)}", self._timer()
        return self.model_line(), gr.Timer(value=LOADING_TICK_S, active=True)

    def _timer(self) -> gr.Timer:
        if self.engine.gpu_info() is None:
            return gr.Timer(active=False)  # nothing can load here
        busy = self.loader.busy or self.engine.status.state == "loading"
        return gr.Timer(value=LOADING_TICK_S if busy else IDLE_TICK_S, active=True)

    def _check_token(self, token: str | None) -> None:
        """Loading is open locally; on a public server it needs the admin token, or is off."""
        if self.config.loading_open:
            return
        if self.config.admin_token is None:
            raise LoadingOff(LOADING_OFF)
        client = client_address(LocalContext.request.get(None), self.config.proxy_hops) or "?"
        wait = self.tokens.wait_s(client)
        if wait:
            raise LoadingOff(f"Too many wrong admin tokens; try again in {wait} s.")
        given = (token or "").encode()
        if not hmac.compare_digest(given, self.config.admin_token.encode()):
            self.tokens.failed(client)
            raise LoadingOff("That admin token is not the one this server was started with.")

"""The web app around one engine: its parts, the page, and how Gradio serves them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from engine.api import EngineClient, ModelLoader
from web.chat import Chat
from web.config import AppConfig
from web.gate import GpuGate
from web.gradio_api import GenerateApi
from web.guard.admission import Admission
from web.guard.events import call_by_name_misfit, check_inputs, server_events
from web.guard.guards import Guards, LoginThrottle, StreamWatch
from web.guard.limits import RateLimiter
from web.guard.sessions import LeanSessions, SessionSweeper
from web.health import health_route
from web.metrics import Metrics, metrics_route
from web.openai.routes import OpenAIRoutes
from web.panel import ModelPanel
from web.ui import CSS, JS, THEME, build_demo

# Worker threads beyond the GPU's places and the queue: page events (panel, send, stop) need some.
SPARE_THREADS = 16
# Gradio keeps a copy of the page's state per browser session (~85 KB each); the app's own state
# is only the busy flag, so old sessions can go once this many newer ones exist.
SESSIONS_PER_PLACE = 4
ANALYTICS_EVENTS = 100


@dataclass
class WebApp:
    """Everything one server holds; `demo` is the page, `launch_options()` how to serve it."""

    config: AppConfig
    engine: EngineClient
    loader: ModelLoader
    admission: Admission
    limiter: RateLimiter
    streams: StreamWatch
    logins: LoginThrottle
    panel: ModelPanel
    metrics: Metrics
    openai: OpenAIRoutes
    demo: gr.Blocks

    def fn(self, name: str):
        """The Python function behind one of the page's events (tests call handlers directly)."""
        return next(fn.fn for fn in self.demo.fns.values() if fn.name == name)

    def _stream_exists(self, key: str) -> bool:
        """Whether Gradio's queue holds messages for this session hash or event id, found as its
        stream routes find them (for an unknown one they answer 404 after starting the reply)."""
        queue = self.demo._queue
        event = queue.event_ids_to_events.get(key)
        if event is not None:
            key = event.session_hash
        else:
            pending = queue.pending_event_ids_session.items()
            key = next((session for session, ids in pending if key in ids), key)
        return key in queue.pending_messages_per_session

    def launch_options(self) -> dict[str, Any]:
        """Keyword arguments for demo.launch(), the same for main() and the tests."""
        config = self.config
        auth = tuple(config.auth.split(":", 1)) if config.auth else None
        places = config.places
        guards = Middleware(
            Guards,
            event_ids=lambda: server_events(self.demo),
            named_misfit=lambda name, arguments: call_by_name_misfit(self.demo, name, arguments),
            stream_exists=self._stream_exists,
            streams=self.streams,
            logins=self.logins,
            proxy_hops=config.proxy_hops,
            hide_api_info=auth is not None,
        )
        return {
            "server_name": config.host,
            "server_port": config.port,
            "auth": auth,
            "share": False,  # never open a public tunnel to this machine
            "max_threads": places + SPARE_THREADS,
            "state_session_capacity": max(64, SESSIONS_PER_PLACE * places),
            "run_history": False,  # Gradio would keep every prompt and answer for replay
            "css": CSS,
            "js": JS,
            "theme": THEME,
            "app_kwargs": {
                # Routes and middleware given here come before Gradio's own.
                "routes": [
                    health_route(self.engine),
                    *self.openai.routes(),
                    metrics_route(self.metrics, self.openai.refusal),
                ],
                "middleware": [guards],
                "openapi_url": None,
                "docs_url": None,
                "redoc_url": None,
            },
        }


def build_app(
    engine: EngineClient, config: AppConfig | None = None, loader: ModelLoader | None = None
) -> WebApp:
    """Wire one engine to the chat, the API and the model panel."""
    config = config or AppConfig()
    loader = loader or ModelLoader(engine, repo=config.repo, model_dir=config.model_dir)
    status = engine.status
    admission = Admission(
        status.max_concurrency if status.state == "ready" else 1, config.queue_size
    )
    loader.on_loaded(lambda loaded: admission.set_slots(loaded.max_concurrency))
    limiter = RateLimiter(config.rate_limit)
    streams = StreamWatch()
    logins = LoginThrottle()
    metrics = serving_metrics(engine, admission)
    gate = GpuGate(
        engine,
        limiter=limiter,
        admission=admission,
        streams=streams,
        metrics=metrics,
        proxy_hops=config.proxy_hops,
    )
    openai = OpenAIRoutes(
        gate,
        metrics,
        api_keys=config.api_keys,
        login_required=config.auth is not None,
        proxy_hops=config.proxy_hops,
    )
    panel = ModelPanel(engine, loader, config, logins)
    demo = build_demo(
        Chat(gate),
        GenerateApi(gate),
        panel,
        initial_gpu=engine.gpu_info(),
        model_dir=config.model_dir,
    )
    # Replies wait in `admission`; Gradio's own queue only hands them to a worker thread, so it
    # takes a burst as large as all the places at once. Its per-event statistics (recomputed with
    # pandas after every event) are kept short.
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", str(ANALYTICS_EVENTS))
    demo.queue(max_size=config.places, default_concurrency_limit=1)
    SessionSweeper(demo, streams.is_open).start()
    LeanSessions.install(demo)
    check_inputs(demo)
    return WebApp(
        config, engine, loader, admission, limiter, streams, logins, panel, metrics, openai, demo
    )


def serving_metrics(engine: EngineClient, admission: Admission) -> Metrics:
    """/metrics: the queue and the GPU's places, the K/V cache, and the engine's faults."""
    metrics = Metrics()
    metrics.gauge("queue_waiting", "Replies waiting for the GPU.", lambda: admission.waiting)
    metrics.gauge("replies_running", "Replies being written.", lambda: admission.running)
    metrics.gauge("gpu_places", "Replies that may run at once.", lambda: admission.slots)
    metrics.gauge("kv_cache_pages_used", "K/V cache pages in use.", lambda: engine.cache_pages()[0])
    metrics.gauge("kv_cache_pages", "K/V cache pages in all.", lambda: engine.cache_pages()[1])
    metrics.counter(
        "engine_stalls_total",
        "Times an engine made no progress for --stall-timeout with replies in flight (each was "
        "restarted).",
        lambda: engine.faults.stalls,
    )
    metrics.counter(
        "stuck_replies_total",
        "Replies ended alone: they stopped moving while the engine went on.",
        lambda: engine.faults.stuck_replies,
    )
    metrics.counter(
        "engine_restarts_total",
        "Engine processes started again after dying or stalling.",
        lambda: engine.faults.restarts,
    )
    return metrics

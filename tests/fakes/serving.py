"""Serve the app as main() does (same launch options) on a free local port, for tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from engine.api import EngineClient
from engine.loading import ModelLoader
from web.config import AppConfig
from web.server import WebApp, build_app


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(
    engine: EngineClient,
    config: AppConfig | None = None,
    loader: ModelLoader | None = None,
    **config_fields,
) -> Iterator[tuple[str, WebApp]]:
    """Launch the app on a free port (rate limit off unless given); yield its URL and parts."""
    if config is None:
        config = AppConfig(port=free_port(), **{"rate_limit": 0, **config_fields})
    web = build_app(engine, config, loader)
    options = {**web.launch_options(), "server_port": free_port(), "server_name": "127.0.0.1"}
    _, url, _ = web.demo.launch(**options, prevent_thread_lock=True, quiet=True)
    try:
        yield url, web
    finally:
        web.demo.close()

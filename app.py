"""Chat with StarCoder2-15B-Instruct (EXL2) on one NVIDIA GPU: `python app.py --help`.

The web server (this process) never imports torch or exllamav2: the engine runs in a process of
its own per GPU (engine.client). An engine process re-imports this module, so it imports only
what it needs at the top.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.api import EngineClient
    from web.config import AppConfig
    from web.server import WebApp

logger = logging.getLogger("app")


def port_problem(host: str, port: int) -> str | None:
    """Why the app cannot listen on host:port (one line naming the remedy), or None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return (
                    f"Port {port} on {host} is already in use (another app.py?); stop that "
                    f"server or start this one with --port {port + 1} (or SC2_PORT)."
                )
            return f"Cannot listen on {host}:{port} ({error.strerror}); check --host and --port."
    return None


def start_engines(config: AppConfig) -> EngineClient:
    """One engine process per GPU, or replicas on a Ray cluster, behind one client."""
    from engine.api import engine_processes, ray_engines

    if config.ray_address:
        return ray_engines(
            config.ray_address,
            replicas=config.ray_replicas,
            model_dir=config.model_dir,
            repo=config.repo,
            branch=config.branch,
            max_seq_len=config.context,
            cache_mode=config.cache_mode,
            max_jobs=config.max_jobs,
            cuda_graphs=config.cuda_graphs,
            custom_matmul=config.custom_matmul,
            stall_timeout_s=config.stall_timeout,
        )
    return engine_processes(
        config.gpus,
        max_jobs=config.max_jobs,
        cuda_graphs=config.cuda_graphs,
        custom_matmul=config.custom_matmul,
        stall_timeout_s=config.stall_timeout,
    )


def start(web: WebApp, config: AppConfig) -> None:
    """Say what will happen with the GPU and the model, and start loading it if asked."""
    from engine.api import no_gpu_here

    gpu = web.engine.gpu_info()
    if gpu is None:
        logger.warning("%s The page says so too.", no_gpu_here())
    elif config.ray_address:
        logger.info("Serving from %d Ray Serve replicas: %s.", config.ray_replicas, gpu.name)
    elif not config.load_at_start:
        logger.info("GPU: %s. --no-load: the page waits for Load.", gpu.name)
    else:
        what = config.model_dir or f"{config.repo} @ {config.branch}"
        logger.info("GPU: %s. Downloading (if needed) and loading %s.", gpu.name, what)
        web.loader.load_in_background(config.branch, config.context, config.cache_mode)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the configuration, start the engine, serve the page and load the model."""
    from web.config import parse_config
    from web.server import build_app

    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up checks, line by line
    problem = port_problem(config.host, config.port)
    if problem:
        sys.exit(problem)
    engine = start_engines(config)
    try:
        web = build_app(engine, config)
        try:
            # quiet: Gradio's own banner suggests share=True, which this app never uses.
            web.demo.launch(**web.launch_options(), quiet=True, prevent_thread_lock=True)
        except OSError as error:  # lost a race for the port since the check above
            sys.exit(f"Cannot start the server on {config.host}:{config.port}: {error}")
        start(web, config)
        shown_host = "127.0.0.1" if config.host == "0.0.0.0" else config.host
        logger.info(
            "The page is at http://%s:%d (Ctrl+C stops the server).", shown_host, config.port
        )
        web.demo.block_thread()  # returns on Ctrl+C, after closing the server
    finally:
        engine.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl+C while starting: stop as quietly as once serving
        sys.exit(130)

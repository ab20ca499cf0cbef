"""The app's configuration: flags, then environment variables (for Spaces), then defaults."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from model.branches import (
    AUTO,
    BRANCHES,
    CACHE_MODES,
    CONTEXT_STEP,
    DEFAULT_REPO,
    MAX_CONTEXT,
    MIN_CONTEXT,
    validate_context,
)
from model.errors import ChatError
from model.stall import DEFAULT_STALL_TIMEOUT_S

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TRUE_WORDS = ("1", "true", "yes", "on")
SPACE_PROXY_HOPS = 1  # a Space's proxy appends the caller's address (docs/RELIABILITY.md)


@dataclass(frozen=True)
class AppConfig:
    """Everything main() reads from flags and environment variables."""

    model_dir: str | None = None
    repo: str = DEFAULT_REPO
    branch: str = AUTO
    context: int = 4096
    cache_mode: str = "fp16"
    host: str = "127.0.0.1"
    port: int = 7860
    queue_size: int = 32
    auth: str | None = None
    rate_limit: int = 30  # requests per minute per client for chat and /generate; 0 = no limit
    max_jobs: int = 8  # jobs batched together on each GPU; the cache holds this many contexts
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # seconds without progress before a restart
    gpus: tuple[str, ...] | None = None  # one engine process per GPU; None: the first GPU
    admin_token: str | None = None  # lets the page's Load button work on a public server
    api_keys: tuple[str, ...] = ()  # Bearer keys for the OpenAI routes and /metrics; () = open
    load_at_start: bool = True  # with a GPU, download and load the model while serving
    cuda_graphs: bool = True  # decode steps as CUDA graphs with GPU sampling (fp16 cache)
    # Trusted proxies in front, each appending to X-Forwarded-For: the client address is the
    # entry this many from the right (0: the connection's peer). A Space's proxy is one.
    proxy_hops: int = 0
    on_space: bool = False

    @property
    def places(self) -> int:
        """Replies the server holds at once: running on every GPU's engine, plus waiting."""
        return self.max_jobs * len(self.gpus or (None,)) + self.queue_size

    @property
    def public(self) -> bool:
        """Reachable by others: on a Space, or listening beyond this machine."""
        return self.on_space or self.host not in LOOPBACK_HOSTS

    @property
    def loading_open(self) -> bool:
        """Anyone with the page may (re)load the model: only a local run."""
        return not self.public


def parse_gpus(parser: argparse.ArgumentParser, text: str | None) -> tuple[str, ...] | None:
    """'0,1' -> ('0', '1'): distinct GPU indices; None or blank: the first GPU."""
    if not text or not text.strip():
        return None
    gpus = tuple(part.strip() for part in text.split(","))
    if not all(gpu.isdigit() for gpu in gpus) or len(set(gpus)) != len(gpus):
        parser.error(
            f"--gpus must be distinct GPU numbers separated by commas, e.g. 0,1 (got {text!r})"
        )
    return gpus


def parse_api_keys(parser: argparse.ArgumentParser, text: str | None) -> tuple[str, ...]:
    """'k1,k2' -> ('k1', 'k2'); each at least 16 characters (they guard the GPU)."""
    if not text or not text.strip():
        return ()
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    short = [key for key in keys if len(key) < 16]
    if short:
        parser.error(
            f"--api-key: each key must be at least 16 characters ({len(short)} is shorter)"
        )
    return keys


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AppConfig:
    """Read flags, falling back to environment variables, then to defaults."""
    env = os.environ if environ is None else environ
    base = AppConfig()
    host_default = "0.0.0.0" if env.get("SPACE_ID") else base.host
    hops_default = SPACE_PROXY_HOPS if env.get("SPACE_ID") else base.proxy_hops
    options = (
        ("--model-dir", ("SC2_MODEL_DIR",), base.model_dir, str,
         "a local model folder (skips the download)"),
        ("--repo", ("SC2_REPO",), base.repo, str, "Hugging Face repo with EXL2 branches"),
        ("--branch", ("SC2_BRANCH",), base.branch, str,
         f"quant branch: {', '.join(BRANCHES)} or auto (the largest that fits the GPU)"),
        ("--context", ("SC2_CONTEXT",), base.context, int,
         f"context size in tokens ({MIN_CONTEXT}-{MAX_CONTEXT}, multiple of {CONTEXT_STEP})"),
        ("--cache-mode", ("SC2_CACHE_MODE",), base.cache_mode, str,
         f"K/V cache precision: {', '.join(CACHE_MODES)}"),
        ("--host", ("SC2_HOST",), host_default, str,
         "address to listen on (0.0.0.0 on a Space)"),
        ("--port", ("SC2_PORT", "GRADIO_SERVER_PORT"), base.port, int, "port to listen on"),
        ("--queue-size", ("SC2_QUEUE_SIZE",), base.queue_size, int,
         "requests that may wait in the queue before new ones are turned away"),
        ("--auth", ("SC2_AUTH",), base.auth, str, 'require a login, given as "user:password"'),
        ("--rate-limit", ("SC2_RATE_LIMIT",), base.rate_limit, int,
         "requests per minute per client for chat and /generate (0: no limit)"),
        ("--max-jobs", ("SC2_MAX_JOBS",), base.max_jobs, int,
         "jobs that run together on the GPU; the cache is sized for this many full contexts, "
         "capped by free VRAM"),
        ("--stall-timeout", ("SC2_STALL_TIMEOUT",), base.stall_timeout, float,
         "seconds an engine may go without progress while replies wait before they end with an "
         "error and the engine restarts; a reply that alone stops moving ends after as long"),
        ("--gpus", ("SC2_GPUS",), None, str,
         "GPUs to serve from, one engine process each, e.g. 0,1 (replies go to the least "
         "loaded; follow-up turns to the GPU holding their conversation)"),
        ("--api-key", ("SC2_API_KEY",), None, str,
         "key(s) the OpenAI routes (/v1) and /metrics require as 'Authorization: Bearer <key>'; "
         "several separated by commas"),
        ("--proxy-hops", ("SC2_PROXY_HOPS",), hops_default, int,
         "trusted proxies in front of the app that append the caller's address to "
         "X-Forwarded-For; the client is the entry this many from the right, and what a client "
         "writes there itself counts for nothing (0: no proxy; 1 on a Space)"),
        ("--admin-token", ("SC2_ADMIN_TOKEN",), base.admin_token, str,
         "a secret that lets the page's Load button work when the app is public (a Space, or "
         "--host other than 127.0.0.1); without it, loading from the page is off there"),
    )  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Chat with StarCoder2-15B-Instruct (EXL2) on one NVIDIA GPU.",
    )
    for flag, env_names, default, kind, text in options:
        from_env = next((env[name] for name in env_names if env.get(name)), None)
        value = default if from_env is None else from_env
        shown = "none" if default is None else default
        # argparse converts string defaults with `type`, so a bad env value gets a clean error.
        parser.add_argument(
            flag,
            type=kind,
            default=value,
            help=f"{text} (env {' / '.join(env_names)}; default: {shown})",
        )
    switches = (
        ("--no-load", "SC2_NO_LOAD",
         "do not load a model at start; the page waits for Load",
         "load --branch at start when a GPU is present"),
        ("--no-cuda-graphs", "SC2_NO_CUDA_GRAPHS",
         "run every decode step eagerly, sampling on the CPU, instead of replaying a CUDA "
         "graph per batch size", "graphs with the fp16 cache"),
    )  # fmt: skip
    for flag, env_name, text, otherwise in switches:
        parser.add_argument(
            flag,
            action="store_true",
            default=(env.get(env_name) or "").strip().lower() in TRUE_WORDS,
            help=f"{text} (env {env_name}=1; default: {otherwise})",
        )
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    if args.cache_mode not in CACHE_MODES:
        parser.error(f"--cache-mode must be one of {', '.join(CACHE_MODES)}")
    if args.branch != AUTO and args.branch not in BRANCHES:
        parser.error(f"--branch must be auto or one of {', '.join(BRANCHES)}")
    try:
        validate_context(args.context)
    except ChatError as error:
        parser.error(str(error))
    if args.auth is not None and ":" not in args.auth:
        parser.error('--auth must look like "user:password"')
    if not 1 <= args.max_jobs <= 64:
        parser.error(f"--max-jobs must be between 1 and 64 (got {args.max_jobs})")
    if not 1 <= args.stall_timeout <= 600:  # also refuses nan
        parser.error(
            f"--stall-timeout must be between 1 and 600 seconds (got {args.stall_timeout:g})"
        )
    if not 0 <= args.proxy_hops <= 8:
        parser.error(f"--proxy-hops must be between 0 and 8 (got {args.proxy_hops})")
    if args.rate_limit < 0:
        parser.error("--rate-limit must be 0 (no limit) or a positive number of requests")
    if args.admin_token is not None and len(args.admin_token) < 12:
        parser.error("--admin-token must be at least 12 characters (it guards model reloads)")
    values = vars(args)
    load_at_start = not values.pop("no_load")
    cuda_graphs = not values.pop("no_cuda_graphs")
    values["gpus"] = parse_gpus(parser, values["gpus"])
    values["api_keys"] = parse_api_keys(parser, values.pop("api_key"))
    on_space = bool(env.get("SPACE_ID"))
    return AppConfig(
        **values,
        load_at_start=load_at_start,
        cuda_graphs=cuda_graphs,
        on_space=on_space,
    )

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
    max_jobs: int = 8  # jobs batched together on the GPU; the cache holds this many contexts
    behind_proxy: bool = False  # on a Space: the client address is in X-Forwarded-For
    load_at_start: bool = False  # a folder, repo or branch was named: load it while serving


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AppConfig:
    """Read flags, falling back to environment variables, then to defaults."""
    env = os.environ if environ is None else environ
    base = AppConfig()
    host_default = "0.0.0.0" if env.get("SPACE_ID") else base.host
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
    if args.rate_limit < 0:
        parser.error("--rate-limit must be 0 (no limit) or a positive number of requests")
    load_at_start = (
        bool(args.model_dir)
        or any(arg.startswith(("--repo", "--branch")) for arg in arguments)
        or any(env.get(name) for name in ("SC2_REPO", "SC2_BRANCH"))
    )
    behind_proxy = bool(env.get("SPACE_ID"))
    return AppConfig(**vars(args), load_at_start=load_at_start, behind_proxy=behind_proxy)

"""The app's configuration: flags, then environment variables (for Spaces), then defaults."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.api import DEFAULT_MAX_JOBS, DEFAULT_STALL_TIMEOUT_S
from starcoder2.branches import (
    AUTO,
    BRANCHES,
    CACHE_MODES,
    CONTEXT_STEP,
    DEFAULT_CACHE_MODE,
    DEFAULT_CONTEXT,
    DEFAULT_REPO,
    MAX_CONTEXT,
    MIN_CONTEXT,
    validate_context,
)
from starcoder2.errors import ChatError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TRUE_WORDS = ("1", "true", "yes", "on")
SPACE_PROXY_HOPS = 1  # a Space's proxy appends the caller's address (docs/RELIABILITY.md)


@dataclass(frozen=True)
class AppConfig:
    """Everything main() reads from flags and environment variables."""

    model_dir: str | None = None
    repo: str = DEFAULT_REPO
    branch: str = AUTO
    context: int = DEFAULT_CONTEXT
    cache_mode: str = DEFAULT_CACHE_MODE
    host: str = "127.0.0.1"
    port: int = 7860
    queue_size: int = 32
    auth: str | None = None
    rate_limit: int = 30  # requests a minute per client: chat, /generate, /v1; 0 = none
    max_jobs: int = DEFAULT_MAX_JOBS
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # seconds without progress before a restart
    gpus: tuple[str, ...] | None = None  # one engine process per GPU; None: the first GPU
    admin_token: str | None = None  # lets the page's Load button work on a public server
    api_keys: tuple[str, ...] = ()  # Bearer keys for the OpenAI routes and /metrics; () = open
    load_at_start: bool = True  # with a GPU, download and load the model while serving
    cuda_graphs: bool = True  # decode steps as CUDA graphs with GPU sampling (fp16 cache)
    custom_matmul: bool = True  # our EXL2 matmul in those graphs, per layer where right and faster
    # Trusted proxies in front, each appending to X-Forwarded-For: the client address is the
    # entry this many from the right (0: the connection's peer). A Space's proxy is one.
    proxy_hops: int = 0
    ray_address: str | None = None  # serve from Ray Serve replicas on this cluster instead
    ray_replicas: int = 1  # engine replicas, one GPU each
    on_space: bool = False

    @property
    def places(self) -> int:
        """Replies the server holds at once: running on every GPU's engine, plus waiting."""
        engines = self.ray_replicas if self.ray_address else len(self.gpus or (None,))
        return self.max_jobs * engines + self.queue_size

    @property
    def public(self) -> bool:
        """Reachable by others: on a Space, or listening beyond this machine."""
        return self.on_space or self.host not in LOOPBACK_HOSTS

    @property
    def loading_open(self) -> bool:
        """Anyone with the page may (re)load the model: only a local run."""
        return not self.public


@dataclass(frozen=True)
class Option:
    """One flag of `python app.py`, as --help and the README's Settings table both show it."""

    flag: str
    env_names: tuple[str, ...]
    kind: type  # str, int or float: what its text becomes; bool: a switch (--flag, or NAME=1)
    default: object
    meaning: str  # markdown: --help shows it without the `code` and **bold** marks
    shown: str | None = None  # the default in words, where its value alone would not say it
    on_space: object = None  # the default on a Hugging Face Space, where it differs

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def default_here(self, on_space: bool) -> object:
        return self.on_space if on_space and self.on_space is not None else self.default

    def markdown(self) -> tuple[str, str, str, str]:
        """The row's cells: flag, environment variables, default, meaning."""
        if self.kind is bool:
            env, default = f"`{self.env_names[0]}=1`", "off"
        else:
            env, default = ", ".join(f"`{name}`" for name in self.env_names), _shown(self.default)
        if self.shown is not None:
            default = self.shown
        if self.on_space is not None:
            default = f"{default}; {_shown(self.on_space)} on a Space"
        return f"`{self.flag}`", env, default, self.meaning

    def help(self) -> str:
        _, env, default, meaning = (_plain(cell) for cell in self.markdown())
        env = env.replace(", ", " / ")
        return f"{meaning} (env {env}; default: {default})".replace("%", "%%")


def _shown(value: object) -> str:
    if value is None:
        return "none"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def _plain(markdown: str) -> str:
    return re.sub(r"`|\*\*", "", markdown)


_BASE = AppConfig()
# The one table behind --help and the README's Settings table (tests/docs/test_readme.py keeps them
# equal). Its order is theirs.
OPTIONS = (
    Option("--model-dir", ("SC2_MODEL_DIR",), str, _BASE.model_dir,
           "a local model folder (skips the download)"),
    Option("--repo", ("SC2_REPO",), str, _BASE.repo, "Hugging Face repo with EXL2 branches"),
    Option("--branch", ("SC2_BRANCH",), str, _BASE.branch,
           f"quant branch: {', '.join(f'`{branch}`' for branch in BRANCHES)} or `{AUTO}` (the "
           "largest that fits the GPU); downloaded and loaded at start when a GPU is present"),
    Option("--no-load", ("SC2_NO_LOAD",), bool, False,
           "load nothing at start; the page waits for **Load**"),
    Option("--no-cuda-graphs", ("SC2_NO_CUDA_GRAPHS",), bool, False,
           "decode eagerly, sampling on the CPU, instead of replaying a CUDA graph per batch size "
           "(graphs need the `fp16` cache)"),
    Option("--no-custom-matmul", ("SC2_NO_CUSTOM_MATMUL",), bool, False,
           "keep exllamav2's EXL2 matmul in the decode graphs instead of ours (ours is used per "
           "layer shape where, checked at load, it matches exllamav2's and is faster; the first "
           "load compiles it with Triton, a kernel per bit width and launch variant, which "
           "Triton keeps in its cache, `~/.triton`, for the next)"),
    Option("--context", ("SC2_CONTEXT",), int, _BASE.context,
           f"context size in tokens ({MIN_CONTEXT}–{MAX_CONTEXT}, multiple of {CONTEXT_STEP})"),
    Option("--cache-mode", ("SC2_CACHE_MODE",), str, _BASE.cache_mode,
           f"K/V cache precision: {', '.join(f'`{mode}`' for mode in CACHE_MODES)}"),
    Option("--host", ("SC2_HOST",), str, _BASE.host, "address to listen on", on_space="0.0.0.0"),
    Option("--port", ("SC2_PORT", "GRADIO_SERVER_PORT"), int, _BASE.port,
           "port to listen on (1–65535)"),
    Option("--queue-size", ("SC2_QUEUE_SIZE",), int, _BASE.queue_size,
           "requests that may wait in the queue before new ones are turned away"),
    Option("--auth", ("SC2_AUTH",), str, _BASE.auth, "require a login, given as `user:password`"),
    Option("--rate-limit", ("SC2_RATE_LIMIT",), int, _BASE.rate_limit,
           "requests per minute per client for chat, `/generate` and the `/v1` routes; "
           "`0` turns it off"),
    Option("--max-jobs", ("SC2_MAX_JOBS",), int, _BASE.max_jobs,
           "jobs batched together on each GPU (1–64); the cache holds this many full contexts, "
           "capped by free VRAM"),
    Option("--stall-timeout", ("SC2_STALL_TIMEOUT",), float, _BASE.stall_timeout,
           "seconds an engine may go without progress while replies wait (1–600); then each "
           "reply ends with an error saying so, `/health` says `stalled` (503) and the engine "
           "process is restarted with the same model. A reply that alone stops moving while "
           "others go on ends by itself after as long"),
    Option("--gpus", ("SC2_GPUS",), str, None,
           "GPUs to serve from, e.g. `0,1`: one engine process per GPU, each with a whole copy "
           "of the model; new conversations go to the least loaded, follow-up turns to the GPU "
           "that holds their conversation", shown="the first GPU"),
    Option("--api-key", ("SC2_API_KEY",), str, None,
           "key(s), 16+ characters each and separated by commas, that the OpenAI routes "
           "(`/v1`) and `/metrics` require as `Authorization: Bearer <key>`; without one they "
           "are open, or closed behind `--auth`"),
    Option("--proxy-hops", ("SC2_PROXY_HOPS",), int, _BASE.proxy_hops,
           "trusted proxies in front of the app (0–8), each appending the caller's address to "
           "`X-Forwarded-For`: the client (for the rate limit, the queue's share per client, "
           "the login, admin-token and API-key throttles) is the entry this many from the "
           "right; what a client writes there itself counts for nothing",
           on_space=SPACE_PROXY_HOPS),
    Option("--ray-address", ("SC2_RAY_ADDRESS",), str, None,
           "serve from engine replicas on this Ray cluster (`auto`: the one this machine "
           "belongs to) instead of engine processes here; needs `requirements-ray.txt` (the "
           "README's Several machines section)"),
    Option("--ray-replicas", ("SC2_RAY_REPLICAS",), int, _BASE.ray_replicas,
           "engine replicas on the Ray cluster, one GPU each (1–64)"),
    Option("--admin-token", ("SC2_ADMIN_TOKEN",), str, _BASE.admin_token,
           "on a public server (a Space, or a `--host` other than `127.0.0.1`, `localhost` or "
           "`::1`) the page's **Load** works only with this secret (12+ characters); without it, "
           "loading from the page is off there"),
)  # fmt: skip
KIND_WORDS = {int: "a whole number", float: "a number"}


def settings_table() -> str:
    """The README's Settings table (markdown), made from OPTIONS as --help is."""
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    rows += ["| " + " | ".join(option.markdown()) + " |" for option in OPTIONS]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The flags, each defaulting to None: a value's source is known only after parsing."""
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Chat with StarCoder2-15B-Instruct (EXL2) on one NVIDIA GPU.",
    )
    for option in OPTIONS:
        if option.kind is bool:
            parser.add_argument(option.flag, action="store_true", default=None, help=option.help())
        else:
            parser.add_argument(option.flag, default=None, help=option.help())
    return parser


def read_values(
    parser: argparse.ArgumentParser, args: argparse.Namespace, env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each option's value (flag, else environment variable, else default) and where it came
    from (the flag or the variable's name), so an error names what to change."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        given = getattr(args, option.dest)
        source, text = option.flag, given
        if given is None:
            source, text = next(
                ((name, env[name]) for name in option.env_names if env.get(name)), (source, None)
            )
        sources[option.dest] = source
        if option.kind is bool:
            values[option.dest] = given or (text or "").strip().lower() in TRUE_WORDS
        elif text is None:
            values[option.dest] = option.default_here(bool(env.get("SPACE_ID")))
        else:
            try:
                values[option.dest] = option.kind(text)
            except ValueError:
                parser.error(f"{source} must be {KIND_WORDS[option.kind]} (got {text!r})")
    return values, sources


def parse_gpus(
    parser: argparse.ArgumentParser, text: str | None, source: str = "--gpus"
) -> tuple[str, ...] | None:
    """'0,1' -> ('0', '1'): distinct GPU indices; None or blank: the first GPU."""
    if not text or not text.strip():
        return None
    gpus = tuple(part.strip() for part in text.split(","))
    if not all(gpu.isdigit() for gpu in gpus) or len(set(gpus)) != len(gpus):
        parser.error(
            f"{source} must be distinct GPU numbers separated by commas, e.g. 0,1 (got {text!r})"
        )
    return gpus


def parse_api_keys(
    parser: argparse.ArgumentParser, text: str | None, source: str = "--api-key"
) -> tuple[str, ...]:
    """'k1,k2' -> ('k1', 'k2'); each at least 16 characters (they guard the GPU)."""
    if not text or not text.strip():
        return ()
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    short = [key for key in keys if len(key) < 16]
    if short:
        parser.error(
            f"{source}: each key must be at least 16 characters ({len(short)} of {len(keys)} "
            "is shorter)"
        )
    return keys


def check_config(
    parser: argparse.ArgumentParser, config: AppConfig, sources: Mapping[str, str]
) -> None:
    """Refuse a bad value in one line that names its flag or variable, the range and the value."""
    checks = (
        ("cache_mode", config.cache_mode not in CACHE_MODES,
         f"must be one of {', '.join(CACHE_MODES)} (got {config.cache_mode!r})"),
        ("branch", config.branch != AUTO and config.branch not in BRANCHES,
         f"must be {AUTO} or one of {', '.join(BRANCHES)} (got {config.branch!r})"),
        ("context", not _valid_context(config.context),
         f"must be a multiple of {CONTEXT_STEP} from {MIN_CONTEXT:,} to {MAX_CONTEXT:,} tokens "
         f"(got {config.context:,})"),
        ("port", not 1 <= config.port <= 65535,
         f"must be between 1 and 65535 (got {config.port})"),
        ("queue_size", config.queue_size < 0, f"must be 0 or more (got {config.queue_size})"),
        ("auth", config.auth is not None and ":" not in config.auth,
         'must look like "user:password"'),
        ("max_jobs", not 1 <= config.max_jobs <= 64,
         f"must be between 1 and 64 (got {config.max_jobs})"),
        ("stall_timeout", not 1 <= config.stall_timeout <= 600,  # also refuses nan
         f"must be between 1 and 600 seconds (got {config.stall_timeout:g})"),
        ("ray_replicas", not 1 <= config.ray_replicas <= 64,
         f"must be between 1 and 64 (got {config.ray_replicas})"),
        ("proxy_hops", not 0 <= config.proxy_hops <= 8,
         f"must be between 0 and 8 (got {config.proxy_hops})"),
        ("rate_limit", config.rate_limit < 0,
         f"must be 0 (no limit) or a positive number of requests (got {config.rate_limit})"),
        ("admin_token", config.admin_token is not None and len(config.admin_token) < 12,
         "must be at least 12 characters (it guards model reloads)"),
    )  # fmt: skip
    for dest, bad, problem in checks:
        if bad:
            parser.error(f"{sources[dest]} {problem}")


def _valid_context(tokens: int) -> bool:
    try:
        validate_context(tokens)
    except ChatError:
        return False
    return True


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AppConfig:
    """Read flags, falling back to environment variables, then to defaults."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    values, sources = read_values(parser, args, env)
    load_at_start = not values.pop("no_load")
    cuda_graphs = not values.pop("no_cuda_graphs")
    custom_matmul = not values.pop("no_custom_matmul")
    values["gpus"] = parse_gpus(parser, values["gpus"], sources["gpus"])
    values["api_keys"] = parse_api_keys(parser, values.pop("api_key"), sources["api_key"])
    config = AppConfig(
        **values,
        load_at_start=load_at_start,
        cuda_graphs=cuda_graphs,
        custom_matmul=custom_matmul,
        on_space=bool(env.get("SPACE_ID")),
    )
    check_config(parser, config, sources)
    return config

"""Engines as Ray Serve replicas, one per GPU, behind the same EngineClient as engine processes.

Each replica (EngineReplica) owns one engine backend exactly as an engine process does: it loads
the configured model when it starts and streams a reply's typed events. Ray places one replica
per GPU (num_gpus=1), restarts a replica whose health check fails (a failed engine, or one that
made no progress for the stall timeout while replies waited) and routes each reply. A reply whose
prompt starts with a whole cache page carries that page's key as Ray Serve's multiplexed model
id, so a follow-up turn goes to the replica whose prefix cache holds its conversation.

RayEngines is the web side's client: the chat, /generate and the OpenAI routes run unchanged in
front of it. Only this module imports ray (requirements-ray.txt).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.hub import resolve_model_dir
from engine.process import load_backend
from engine.stall import DEFAULT_STALL_TIMEOUT_S, ProgressClock
from engine.types import (
    EngineStatus,
    EventStream,
    Faults,
    Finished,
    GenerationRequest,
    GpuInfo,
    LoadProgress,
)
from engine.wire import ENGINE_CALLS, Failure
from starcoder2.branches import (
    AUTO,
    DEFAULT_CACHE_MODE,
    DEFAULT_CONTEXT,
    DEFAULT_REPO,
    PAGE_TOKENS,
)
from starcoder2.errors import GenerationFailed, LoadingOff
from starcoder2.prompt import Segment
from starcoder2.settings import SamplingSettings
from starcoder2.tokens import PromptEncoder

APP_NAME = "starcoder2-engines"
DEPLOYMENT = "EngineReplica"
REAL_ENGINE = "engine.gpu.engine:Engine"
CONVERSATIONS_PER_REPLICA = 4096  # page keys a replica is preferred for (least recent go first)
HEALTH_CHECK_S = 2.0  # how often Ray asks each replica whether it still moves
REPLICA_LOST = "The replica serving this reply stopped; send the message again in a moment."


class EngineReplica:
    """One engine on one GPU, loaded at start; Ray Serve runs one such replica per GPU."""

    def __init__(self, backend: str, options: dict, model: dict, stall_timeout_s: float) -> None:
        self.engine = load_backend(backend)(**options)
        model_dir = model["model_dir"] or self._download(model)
        self.engine.load(
            model_dir, max_seq_len=model["max_seq_len"], cache_mode=model["cache_mode"]
        )
        self.encoder = PromptEncoder.for_model(model_dir)
        self.allowed = getattr(type(self.engine), "CALLS", ENGINE_CALLS)
        self.clock: ProgressClock[str] = ProgressClock(stall_timeout_s)
        self.replies = 0  # in flight here

    def _download(self, model: dict) -> str:
        """The branch from the Hub into this node's cache (`auto`: what fits this GPU)."""
        gpu = self.engine.gpu_info()
        source = resolve_model_dir(
            model_dir=None,
            repo=model["repo"],
            branch=model["branch"],
            context_tokens=model["max_seq_len"],
            cache_mode=model["cache_mode"],
            free_vram_gb=gpu.free_gb if gpu else None,
        )
        return str(source.folder)

    @serve.multiplexed(max_num_models_per_replica=CONVERSATIONS_PER_REPLICA)
    async def conversation(self, key: str) -> str:
        """Marks this replica as the one holding `key`'s prefix pages (Ray routes by it)."""
        return key

    async def generate(self, ids: Sequence[int], settings: SamplingSettings, stop: Sequence[str]):
        """The reply's events; failures come as a Failure event. Cancelled: the job ends."""
        key = serve.get_multiplexed_model_id()
        if key:
            await self.conversation(key)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = None
        self.replies += 1
        try:
            handle = self.engine.submit(
                ids,
                settings,
                lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                stop,
            )
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    handle = None  # it ended the job
                    yield Failure.of(event)
                    return
                yield event
                if isinstance(event, Finished):
                    handle = None
                    return
        except Exception as error:  # refused at submit
            yield Failure.of(error)
        finally:  # a cancel from the web side arrives here as CancelledError
            self.replies -= 1
            if handle is not None:
                self.engine.cancel(handle)

    def encode_prompt(self, segments: list[Segment]) -> list[int]:
        return self.encoder.encode(segments)

    def report(self) -> tuple[EngineStatus, str, GpuInfo | None, tuple[int, int], int]:
        """(status, health, GPU, cache pages, stuck replies), for the web side's poll."""
        engine = self.engine
        return (
            engine.status,
            engine.health,
            engine.gpu_info(),
            engine.cache_pages(),
            getattr(engine, "stuck_replies", 0),
        )

    def call(self, method: str) -> Any:
        """A read-out on the backend's allow-list (the scripted test backends add some)."""
        if method not in self.allowed:
            raise GenerationFailed(f"The engine has no call {method!r}.")
        return getattr(self.engine, method)()

    def check_health(self) -> None:
        """Ray restarts a replica whose engine failed or stopped moving while replies waited."""
        health = self.engine.health
        if health in ("failed", "stalled"):
            raise RuntimeError(f"The engine is {health}.")
        if not self.replies:
            self.clock.forget("engine")
            return
        self.clock.saw("engine", self.engine.progress())
        if self.clock.stuck():
            raise RuntimeError(
                f"The engine made no progress for {self.clock.still_for('engine'):.0f} s with "
                f"{self.replies} replies in flight."
            )


def deploy(
    *,
    model_dir: str | None = None,
    repo: str = DEFAULT_REPO,
    branch: str = AUTO,
    max_seq_len: int = DEFAULT_CONTEXT,
    cache_mode: str = DEFAULT_CACHE_MODE,
    replicas: int = 1,
    max_jobs: int = 8,
    backend: str | None = None,
    options: dict | None = None,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    health_check_s: float = HEALTH_CHECK_S,
) -> DeploymentHandle:
    """Start (or update) the engine replicas on the connected Ray cluster: one GPU each."""
    options = {"max_jobs": max_jobs, **(options or {})}
    model = {
        "model_dir": model_dir,
        "repo": repo,
        "branch": branch,
        "max_seq_len": max_seq_len,
        "cache_mode": cache_mode,
    }
    deployment = serve.deployment(
        name=DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_gpus": 1, "num_cpus": 1},
        max_ongoing_requests=max(max_jobs * 4, 16),  # beyond the GPU's places, replies wait
        health_check_period_s=health_check_s,
        health_check_timeout_s=max(health_check_s * 2, 5.0),
        # A replica that failed its check is stuck: its replies are not waited for.
        graceful_shutdown_timeout_s=1.0,
    )(EngineReplica)
    app = deployment.bind(backend or REAL_ENGINE, options, model, stall_timeout_s)
    return serve.run(app, name=APP_NAME, route_prefix=None)


def conversation_key(ids: Sequence[int]) -> str:
    """The first whole page's key ('' for a prompt shorter than a page: nothing to reuse)."""
    if len(ids) < PAGE_TOKENS:
        return ""
    return f"{hash(tuple(ids[:PAGE_TOKENS])) & (2**64 - 1):016x}"


class RayEngines:
    """The EngineClient protocol over the engine replicas of a Ray Serve deployment."""

    def __init__(self, handle: DeploymentHandle, *, poll_s: float = 1.0) -> None:
        self.handle = handle
        self.poll_s = poll_s
        self._report: tuple = (EngineStatus(state="loading"), "loading", None, (0, 0), 0)
        self._replicas = 0
        self._restarts = 0
        self._closed = threading.Event()
        self._poll()
        threading.Thread(target=self._watch, name="ray-engines", daemon=True).start()

    # ---- what the replicas report ----

    def _poll(self) -> None:
        try:
            self._report = self.handle.report.remote().result(timeout_s=10)
        except Exception:  # a replica going away: the next poll asks another
            return
        running = _running_replicas()
        if running < self._replicas:
            self._restarts += self._replicas - running
        self._replicas = running

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            self._poll()

    @property
    def status(self) -> EngineStatus:
        status = self._report[0]
        if status.state != "ready":
            return status
        places = status.max_concurrency * max(1, self._replicas)
        message = f"{status.message} On {self._replicas} Ray Serve replicas."
        return dataclasses.replace(status, max_concurrency=places, message=message)

    @property
    def health(self) -> str:
        if self._replicas == 0:
            return "restarting"
        return self._report[1]

    @property
    def faults(self) -> Faults:
        return Faults(0, self._report[4], self._restarts)

    def gpu_info(self) -> GpuInfo | None:
        return self._report[2]

    def cache_pages(self) -> tuple[int, int]:
        used, total = self._report[3]
        replicas = max(1, self._replicas)
        return used * replicas, total * replicas  # one replica's reading, for each of them

    # ---- requests ----

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        return self.handle.encode_prompt.remote(list(segments)).result(timeout_s=30)

    def load(
        self,
        model_dir: str,
        *,
        max_seq_len: int = DEFAULT_CONTEXT,
        cache_mode: str = DEFAULT_CACHE_MODE,
        on_progress: LoadProgress | None = None,
    ) -> EngineStatus:
        raise LoadingOff(
            "On a Ray cluster the replicas load the model they were deployed with; start the "
            "app again with another --branch, --context or --cache-mode to change it."
        )

    def stream(self, request: GenerationRequest) -> EventStream:
        """The reply from one replica (its conversation's, if any); closing it cancels the job."""
        handle = self.handle.options(
            stream=True, multiplexed_model_id=conversation_key(request.ids)
        )
        response = handle.generate.remote(list(request.ids), request.settings, request.stop)
        return self._events(response)

    def _events(self, response) -> EventStream:
        finished = False
        try:
            for event in _until_lost(response):
                if isinstance(event, Failure):
                    finished = True
                    raise event.exception()
                yield event
                if isinstance(event, Finished):
                    finished = True
                    return
        finally:
            if not finished:
                response.cancel()

    def close(self) -> None:
        self._closed.set()


def _until_lost(response):
    """The response's items; a replica that died mid-reply raises GenerationFailed at once."""
    try:
        yield from response
    except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as error:
        raise GenerationFailed(REPLICA_LOST) from error


def _running_replicas() -> int:
    try:
        app = serve.status().applications[APP_NAME]
        states = app.deployments[DEPLOYMENT].replica_states
    except (KeyError, AttributeError):
        return 0
    return sum(count for state, count in states.items() if str(state).endswith("RUNNING"))

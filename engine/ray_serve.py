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
import hashlib
import threading
import time
from collections.abc import Sequence

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from engine.hub import resolve_model_dir
from engine.pool import page_keys
from engine.process import REAL_ENGINE, load_backend
from engine.stall import DEFAULT_STALL_TIMEOUT_S, ProgressClock
from engine.types import (
    DEFAULT_MAX_JOBS,
    EngineStatus,
    EventStream,
    Faults,
    Finished,
    GenerationRequest,
    GpuInfo,
    LoadProgress,
)
from engine.wire import Failure
from starcoder2.branches import (
    AUTO,
    DEFAULT_CACHE_MODE,
    DEFAULT_CONTEXT,
    DEFAULT_REPO,
    PAGE_TOKENS,
)
from starcoder2.errors import GenerationFailed, LoadingOff, NotReady
from starcoder2.prompt import Segment
from starcoder2.settings import SamplingSettings
from starcoder2.tokens import PromptEncoder

APP_NAME = "starcoder2-engines"
DEPLOYMENT = "EngineReplica"
CONVERSATIONS_PER_REPLICA = 4096  # page keys a replica is preferred for (least recent go first)
HEALTH_CHECK_S = 2.0  # how often Ray asks each replica whether it still moves
REPLICA_LOST = "The replica serving this reply stopped; send the message again in a moment."
# Ray Serve's control calls (serve.status, serve.deployment, serve.run) swap a module-wide pickle
# setting as they build deployment configs, which two threads at once break: one at a time.
SERVE_CONTROL = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Report:
    """What one replica says of itself, for the web side's health, status and /metrics."""

    replica: str
    status: EngineStatus
    health: str
    gpu: GpuInfo | None
    cache_pages: tuple[int, int]
    stuck_replies: int


class EngineReplica:
    """One engine on one GPU, loaded at start; Ray Serve runs one such replica per GPU."""

    def __init__(
        self, backend: str, options: dict, model: dict, stall_timeout_s: float, key: str = ""
    ) -> None:
        self.key = key  # the settings it was deployed with (deploy keeps it when they match)
        self.engine = load_backend(backend)(**options)
        model_dir = model["model_dir"] or self._download(model)
        self.engine.load(
            model_dir, max_seq_len=model["max_seq_len"], cache_mode=model["cache_mode"]
        )
        self.encoder = PromptEncoder.for_model(model_dir)
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

    def settings(self) -> str:
        return self.key

    def report(self) -> Report:
        engine = self.engine
        return Report(
            serve.get_replica_context().replica_id.unique_id,
            engine.status,
            engine.health,
            engine.gpu_info(),
            engine.cache_pages(),
            engine.stuck_replies,
        )

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
    max_jobs: int = DEFAULT_MAX_JOBS,
    backend: str | None = None,
    options: dict | None = None,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    health_check_s: float = HEALTH_CHECK_S,
) -> DeploymentHandle:
    """Start (or update) the engine replicas on the connected Ray cluster: one GPU each."""
    backend = backend or REAL_ENGINE
    options = {"max_jobs": max_jobs, **(options or {})}
    model = {
        "model_dir": model_dir,
        "repo": repo,
        "branch": branch,
        "max_seq_len": max_seq_len,
        "cache_mode": cache_mode,
    }
    key = _settings_key(backend, options, model, stall_timeout_s)
    with SERVE_CONTROL:
        # The same settings keep the running replicas: a restarted front does not reload them.
        running = _running_app()
        if running is not None and _settings_of(running) == key:
            return running
        deployment = serve.deployment(
            name=DEPLOYMENT,
            num_replicas=replicas,
            ray_actor_options={"num_gpus": 1, "num_cpus": 1},
            # A replica takes no more than its GPU's places: a conversation's replica being
            # full, Ray routes the reply elsewhere rather than queue it there.
            max_ongoing_requests=max_jobs,
            health_check_period_s=health_check_s,
            health_check_timeout_s=max(health_check_s * 2, 5.0),
            # A replica that failed its check is stuck: its replies are not waited for.
            graceful_shutdown_timeout_s=1.0,
        )(EngineReplica)
        app = deployment.bind(backend, options, model, stall_timeout_s, key)
        return serve.run(app, name=APP_NAME, route_prefix=None)


def _running_app() -> DeploymentHandle | None:
    try:
        return serve.get_app_handle(APP_NAME)
    except Exception:  # no such application (yet)
        return None


def _settings_of(handle: DeploymentHandle) -> str | None:
    try:
        return handle.settings.remote().result(timeout_s=10)
    except Exception:  # no replica answers: deploy anew
        return None


def _settings_key(*settings: object) -> str:
    """The same for the same settings, in any process."""
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:16]


def conversation_key(ids: Sequence[int]) -> str:
    """The first whole page's key, as the pool keys pages ('' for a prompt shorter than a page:
    nothing to reuse)."""
    first = page_keys(ids[:PAGE_TOKENS])
    return f"{first[0] & (2**64 - 1):016x}" if first else ""


class RayEngines:
    """The EngineClient protocol over the engine replicas of a Ray Serve deployment.

    Each replica reports itself (Report); a poll asks until every running replica has answered
    (up to three times as many asks as replicas, since Ray picks which one answers). Counters
    add up over every replica ever heard from (each counts only up); gauges add up over the
    replicas heard from lately.
    """

    def __init__(self, handle: DeploymentHandle, *, poll_s: float = 1.0) -> None:
        self.handle = handle
        self.poll_s = poll_s
        self._reports: dict[str, tuple[float, Report]] = {}  # replica id -> (when, report)
        self._replicas = 0
        self._restarts = 0
        self._closed = threading.Event()
        self._poll()
        self._watcher = threading.Thread(target=self._watch, name="ray-engines", daemon=True)
        self._watcher.start()

    # ---- what the replicas report ----

    def _poll(self) -> None:
        running = _running_replicas()  # first: it holds when no replica answers
        if running < self._replicas:
            self._restarts += self._replicas - running
        self._replicas = running
        heard: set[str] = set()
        for _ in range(3 * running):  # Ray picks the replica: ask until each has answered
            try:
                report = self.handle.report.remote().result(timeout_s=5)
            except Exception:  # a replica going away: the next poll asks again
                continue
            self._reports[report.replica] = (time.monotonic(), report)
            heard.add(report.replica)
            if len(heard) >= running:
                break

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            self._poll()

    def _live(self) -> list[Report]:
        """The replicas heard from within the last few polls, while any runs."""
        if self._replicas == 0:
            return []
        recent = time.monotonic() - 4 * self.poll_s - 5
        return [report for when, report in self._reports.values() if when >= recent]

    @property
    def status(self) -> EngineStatus:
        live = [report for report in self._live() if report.status.state == "ready"]
        if not live:
            return EngineStatus(
                state="restarting",
                message="No engine replica is running on the Ray cluster yet; Ray is starting "
                "them (a first start downloads and loads the model).",
            )
        status = live[0].status
        places = status.max_concurrency * self._replicas
        message = f"{status.message} On {self._replicas} Ray Serve replicas."
        return dataclasses.replace(status, max_concurrency=places, message=message)

    @property
    def health(self) -> str:
        """ "ready" while a replica serves ("degraded" if one just recovered from a fault)."""
        states = {report.health for report in self._live()}
        for state in ("ready", "degraded", "loading", "failed", "stalled"):
            if state in states:
                return state
        return "restarting"

    @property
    def faults(self) -> Faults:
        stuck = sum(report.stuck_replies for _, report in self._reports.values())
        return Faults(0, stuck, self._restarts)

    def gpu_info(self) -> GpuInfo | None:
        live = self._live()
        return live[0].gpu if live else None

    def cache_pages(self) -> tuple[int, int]:
        pages = [report.cache_pages for report in self._live()]
        return sum(used for used, _ in pages), sum(total for _, total in pages)

    # ---- requests ----

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        if not self._live():
            raise NotReady(self.status.message)
        try:
            return self.handle.encode_prompt.remote(list(segments)).result(timeout_s=30)
        except (TimeoutError, RayServeException, ray.exceptions.RayError) as error:
            raise GenerationFailed(f"{REPLICA_LOST} ({type(error).__name__})") from error

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
        """The reply from one replica (its conversation's, if any), sent on the first next();
        closing the stream cancels the job."""
        key = conversation_key(request.ids)
        handle = self.handle.options(stream=True, multiplexed_model_id=key)
        response = handle.generate.remote(list(request.ids), request.settings, request.stop)
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
        self._watcher.join(10)


def _until_lost(response):
    """The response's items; a replica that died mid-reply raises GenerationFailed at once."""
    try:
        yield from response
    except (ray.exceptions.RayActorError, RayServeException) as error:
        raise GenerationFailed(REPLICA_LOST) from error


def _running_replicas() -> int:
    try:
        with SERVE_CONTROL:
            app = serve.status().applications[APP_NAME]
        states = app.deployments[DEPLOYMENT].replica_states
    except (KeyError, AttributeError):
        return 0
    return sum(count for state, count in states.items() if str(state).endswith("RUNNING"))

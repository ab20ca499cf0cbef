"""The engine's one door: what the web side and app.py may use of it.

The types that cross (requests, events, status, the EngineClient protocol), the factory that
starts one engine process per GPU, the loader that downloads and loads a model through a client,
and why no GPU serves. Importing this module imports no GPU library: engine processes do that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from engine.gpu_check import no_gpu_here
from engine.loading import LoadProgressState, ModelLoader, available_vram_gb
from engine.stall import DEFAULT_STALL_TIMEOUT_S
from engine.types import (
    DEFAULT_MAX_JOBS,
    HEALTH_STATES,
    STOP_REASONS,
    EngineClient,
    EngineStatus,
    EventStream,
    Faults,
    Finished,
    GenerationRequest,
    GpuInfo,
    LoadProgress,
    LoadStep,
    TextDelta,
)

__all__ = [
    "DEFAULT_MAX_JOBS",
    "DEFAULT_STALL_TIMEOUT_S",
    "HEALTH_STATES",
    "STOP_REASONS",
    "EngineClient",
    "EngineStatus",
    "EventStream",
    "Faults",
    "Finished",
    "GenerationRequest",
    "GpuInfo",
    "LoadProgress",
    "LoadProgressState",
    "LoadStep",
    "ModelLoader",
    "TextDelta",
    "available_vram_gb",
    "device_names",
    "engine_processes",
    "no_gpu_here",
    "ray_engines",
]


def device_names(gpus: Sequence[str] | None, environ: Mapping[str, str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each engine process: --gpus counts among the GPUs this process
    may see (CUDA_VISIBLE_DEVICES, if set); None leaves the first visible GPU."""
    if not gpus:
        return [None]
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return list(gpus)
    missing = [gpu for gpu in gpus if int(gpu) >= len(visible)]
    if missing:
        raise SystemExit(
            f"--gpus {','.join(gpus)} names GPU {missing[0]}, but CUDA_VISIBLE_DEVICES shows only "
            f"{len(visible)} ({','.join(visible)}); count from 0 among those."
        )
    return [visible[int(gpu)] for gpu in gpus]


def engine_options(cuda_graphs: bool, custom_matmul: bool, stall_timeout_s: float) -> dict:
    """The engine's own settings, as every backend (process, Ray replica) is built with them."""
    return {
        "cuda_graphs": cuda_graphs,
        "custom_matmul": custom_matmul,
        "stall_timeout_s": stall_timeout_s,
    }


def ray_engines(
    address: str,
    *,
    replicas: int,
    model_dir: str | None,
    repo: str,
    branch: str,
    max_seq_len: int,
    cache_mode: str,
    max_jobs: int,
    cuda_graphs: bool,
    custom_matmul: bool,
    stall_timeout_s: float,
) -> EngineClient:
    """Engine replicas on a Ray cluster (one GPU each), deployed now, behind one client."""
    import ray

    from engine.ray_serve import RayEngines, deploy

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    handle = deploy(
        model_dir=model_dir,
        repo=repo,
        branch=branch,
        max_seq_len=max_seq_len,
        cache_mode=cache_mode,
        replicas=replicas,
        max_jobs=max_jobs,
        options=engine_options(cuda_graphs, custom_matmul, stall_timeout_s),
        stall_timeout_s=stall_timeout_s,
    )
    return RayEngines(handle)


def engine_processes(
    gpus: Sequence[str] | None,
    *,
    max_jobs: int,
    cuda_graphs: bool,
    custom_matmul: bool,
    stall_timeout_s: float,
    environ: Mapping[str, str] = os.environ,
) -> EngineClient:
    """One engine process per GPU, behind one client (a pool when there are several)."""
    from engine.client import EngineProcess
    from engine.pool import EnginePool

    options = engine_options(cuda_graphs, custom_matmul, stall_timeout_s)
    engines = [
        EngineProcess(
            device=device, max_jobs=max_jobs, options=options, stall_timeout_s=stall_timeout_s
        )
        for device in device_names(gpus, environ)
    ]
    return engines[0] if len(engines) == 1 else EnginePool(engines)

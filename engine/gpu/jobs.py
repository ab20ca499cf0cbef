"""A job as the GPU engine runs it: what it was asked, where its events go, and exllamav2's own
job built from it (fresh sampler settings each time: some samplers keep state in them)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starcoder2.prompt import EOS_TOKEN_ID, STOP_STRINGS
from starcoder2.settings import SamplingSettings

# Where the worker sends a job's events (TextDelta, Finished, or an exception that ends it).
Sink = Callable[[object], None]


@dataclass(eq=False)
class Job:
    """One job in flight: the worker hands its events to `deliver`."""

    input_ids: list[int]
    settings: SamplingSettings
    deliver: Sink
    stop: tuple[str, ...] = STOP_STRINGS
    job: object = None
    submitted_at: float = field(default_factory=time.time)  # exllamav2 stamps jobs with time.time()
    text: list[str] = field(default_factory=list)
    done: bool = False
    worker: threading.Thread | None = None  # the worker the job was handed to


STOP_REASONS = {
    "stop_token": "eos",
    "stop_string": "stop_string",
    "max_new_tokens": "max_new_tokens",
}


def new_job(ids: Sequence[int], settings: SamplingSettings, stop: Sequence[str]) -> Any:
    """exllamav2's job for one reply: it ends at end-of-text or at any of the stop strings."""
    import torch
    from exllamav2.generator import ExLlamaV2DynamicJob

    return ExLlamaV2DynamicJob(
        input_ids=torch.tensor([list(ids)], dtype=torch.long),
        max_new_tokens=settings.max_new_tokens,
        gen_settings=sampler_settings(settings),
        seed=settings.seed if settings.seed is not None else secrets.randbelow(2**31),
        stop_conditions=[EOS_TOKEN_ID, *stop],
        decode_special_tokens=False,
    )


def sampler_settings(settings: SamplingSettings):
    """A fresh exllamav2 sampler settings object per job (some samplers keep state in it)."""
    from exllamav2.generator import ExLlamaV2Sampler

    if settings.greedy:
        return ExLlamaV2Sampler.Settings.greedy(
            token_repetition_penalty=settings.repetition_penalty
        )
    return ExLlamaV2Sampler.Settings(
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        min_p=settings.min_p,
        token_repetition_penalty=settings.repetition_penalty,
    )

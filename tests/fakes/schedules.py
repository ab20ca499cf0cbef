"""Random schedules for the scheduler: jobs that arrive, share prefixes, stop and are cancelled.

A schedule says at which generator step each job arrives, its prompt, how it samples, what stops
it, and after how many steps its caller goes away. `run` drives a generator through exllamav2's
own interface (enqueue, iterate, cancel) one step at a time, so a seed replays exactly; every job
must end within a deadline. `reference` runs each job alone on another generator, with nothing
cached, and `mismatches` compares the two token by token up to the reference's first near-tie.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from engine.gpu.jobs import new_job
from starcoder2.settings import SamplingSettings

PAGE = 256
PENALTY = 1.15  # a repetition penalty: steps with such a job cannot look ahead


@dataclass(frozen=True)
class Job:
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrive: int  # the generator step at which it is enqueued
    cancel_after: int | None = None  # steps after arriving at which its caller goes away
    penalty: float = 1.0
    stop: tuple[str, ...] = ()
    wants_stop: bool = False  # a stop string is picked from its answer alone (`with_stops`)

    def settings(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=0.0,
            repetition_penalty=self.penalty,
            max_new_tokens=self.max_new_tokens,
            seed=0,
        )

    def alone(self) -> Job:
        """The same request from a caller who waits for the end, arriving at once."""
        return replace(self, arrive=0, cancel_after=None)

    def summary(self) -> str:
        extras = [f"cancel after {self.cancel_after}"] if self.cancel_after is not None else []
        extras += [f"penalty {self.penalty}"] if self.penalty != 1.0 else []
        extras += [f"stop {self.stop!r}"] if self.stop else []
        return (
            f"step {self.arrive}: {len(self.prompt)} prompt tokens (ends {self.prompt[-3:]}), "
            f"{self.max_new_tokens} new" + "".join(f", {extra}" for extra in extras)
        )


@dataclass
class Outcome:
    tokens: list[int]
    reason: str  # exllamav2's eos_reason, or "cancelled"
    text: str = ""
    steps: int = 0  # generator steps from arriving to ending
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit, as sampled


class Stalled(AssertionError):
    """A job did not end within the deadline."""


def random_schedule(seed: int, *, ids: tuple[int, int], chunk: int, max_new: int) -> list[Job]:
    """1–16 jobs over shared prefixes (256·k−1, 256·k and 256·k+1 tokens among them), repeats of
    earlier prompts, cancels, answers ending on page boundaries, a repetition penalty on some, a
    stop string on some, and at times a prompt longer than two prefill chunks arriving late.
    ids: the token ids prompts draw from, [low, high)."""
    rng = random.Random(seed)
    documents = [[rng.randrange(*ids) for _ in range(5 * PAGE + 64)] for _ in range(3)]
    edges = [PAGE * k + d for k in range(1, 6) for d in (-1, 0, 1)]
    jobs: list[Job] = []
    for index in range(rng.randint(1, 16)):
        if jobs and rng.random() < 0.25:
            prompt = rng.choice(jobs).prompt  # the same prompt again: a prefix-cache hit
        else:
            shared = rng.choice(edges) if rng.random() < 0.6 else rng.randint(1, 5 * PAGE)
            own = rng.choice([0, 0, rng.randint(1, 40)])
            prompt = tuple(rng.choice(documents)[:shared]) + tuple(
                rng.randrange(*ids) for _ in range(own)
            )
        if rng.random() < 0.3:  # end exactly at, or one either side of, a page boundary
            end = -(-(len(prompt) + 1) // PAGE) * PAGE + rng.choice((-1, 0, 1))
            new_tokens = max(1, min(end - len(prompt), 2 * max_new))
        else:
            new_tokens = rng.randint(1, max_new)
        jobs.append(
            Job(
                prompt=prompt,
                max_new_tokens=new_tokens,
                arrive=0 if index == 0 else rng.randint(0, 40),
                cancel_after=rng.randint(1, 30) if rng.random() < 0.2 else None,
                penalty=PENALTY if rng.random() < 0.25 else 1.0,
                wants_stop=rng.random() < 0.25,
            )
        )
    if rng.random() < 0.5:  # a long prompt, prefilled in several chunks among decoding jobs
        long_prompt = tuple(rng.randrange(*ids) for _ in range(2 * chunk + rng.randint(1, 300)))
        jobs.append(Job(long_prompt, rng.randint(1, max_new), arrive=rng.randint(5, 30)))
    return jobs


def describe(seed: int, jobs: Sequence[Job]) -> str:
    lines = [f"seed {seed}, {len(jobs)} jobs:"]
    lines += [f"  {i}: {job.summary()}" for i, job in enumerate(jobs)]
    return "\n".join(lines)


def deadline(jobs: Sequence[Job], chunk: int) -> int:
    """Steps enough for every job one after another, each prefill chunk a step of its own."""
    work = sum(-(-len(job.prompt) // chunk) + job.max_new_tokens + 2 for job in jobs)
    return max(job.arrive for job in jobs) + work + 10


def run(
    generator: Any,
    jobs: Sequence[Job],
    *,
    chunk: int,
    check: Callable[[Any], None] | None = None,
    keep_logits: bool = False,
) -> list[Outcome]:
    """Drive the generator step by step; each job's outcome, in order. Raises Stalled."""
    limit = deadline(jobs, chunk)
    waiting = sorted(range(len(jobs)), key=lambda i: jobs[i].arrive)
    live: dict[int, tuple[Any, int]] = {}  # index -> (exllamav2 job, step it arrived)
    index_of: dict[int, int] = {}
    margins: dict[int, list[float]] = {}
    ends: dict[int, Outcome] = {}
    step = 0
    while len(ends) < len(jobs):
        if step > limit:
            stuck = ", ".join(_state(i, job) for i, (job, _) in live.items())
            raise Stalled(f"after {step} steps these jobs had not ended: {stuck}")
        while waiting and jobs[waiting[0]].arrive <= step:
            i = waiting.pop(0)
            job = new_job(jobs[i].prompt, jobs[i].settings(), jobs[i].stop)
            job.return_logits = keep_logits
            generator.enqueue(job)
            live[i], index_of[id(job)], margins[i] = (job, step), i, []
        for i, (job, arrived) in list(live.items()):
            if jobs[i].cancel_after is not None and step - arrived >= jobs[i].cancel_after:
                generator.cancel(job)
                ends[i] = Outcome(_generated(job, jobs[i]), "cancelled", steps=step - arrived)
                del live[i]
        if live:
            for result in generator.iterate():
                i = index_of[id(result["job"])]
                margins[i] += _margins(result)
                if result["eos"]:
                    job, arrived = live.pop(i)
                    ends[i] = Outcome(
                        _generated(job, jobs[i]),
                        result["eos_reason"],
                        result["full_completion"],
                        step - arrived,
                        margins[i],
                    )
            if check is not None:
                check(generator)
        step += 1
    return [ends[i] for i in range(len(jobs))]


def _generated(job: Any, spec: Job) -> list[int]:
    return job.sequences[0].sequence_ids.torch()[0, len(spec.prompt) :].tolist()


def _state(index: int, job: Any) -> str:
    sequence = job.sequences[0]
    return (
        f"job {index} (kv_position {sequence.kv_position}, {len(sequence.sequence_ids)} ids, "
        f"prefilled {job.is_prefill_done()}, {job.new_tokens} new)"
    )


def _margins(result: dict) -> list[float]:
    """Top-1 minus top-2 logit of each token a result carries (jobs that keep their logits).

    These are the logits exllamav2 picked from: its sampler applies the repetition penalty to
    them in place before the job keeps them, so they need no penalty here.
    """
    found = [result.get("logits"), result.get("held", {}).get("logits")]
    rows = [t[0].float() for t in found if t is not None]
    if not rows:
        return []
    top = torch.cat(rows).topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


class Reference:
    """Each job alone on a generator with nothing cached, remembered per request."""

    def __init__(self, generator: Any, chunk: int) -> None:
        self._generator, self._chunk = generator, chunk
        self._seen: dict[Job, Outcome] = {}

    def __call__(self, job: Job) -> Outcome:
        alone = job.alone()
        if alone not in self._seen:
            self._generator.reset_page_table()
            self._seen[alone] = run(self._generator, [alone], chunk=self._chunk, keep_logits=True)[
                0
            ]
        return self._seen[alone]


def with_stops(jobs: Sequence[Job], reference: Reference, seed: int) -> list[Job]:
    """Jobs that want a stop string get one that their answer alone contains partway."""
    rng = random.Random(seed)
    chosen = []
    for job in jobs:
        text = reference(replace(job, wants_stop=False)).text if job.wants_stop else ""
        if len(text) >= 4:
            start = rng.randrange(1, len(text) - 2)
            job = replace(job, stop=(text[start : start + rng.choice((1, 2, 3))],))
        chosen.append(replace(job, wants_stop=False))
    return chosen


def mismatches(
    jobs: Sequence[Job], got: Sequence[Outcome], want: Sequence[Outcome], tie: float
) -> tuple[list[str], int, int]:
    """What differs, per job, before the reference's first margin under `tie`; how many tokens
    were compared, and how many there were to compare."""
    problems, compared, comparable = [], 0, 0
    for i, (job, have, expected) in enumerate(zip(jobs, got, want, strict=True)):
        close = [n for n, margin in enumerate(expected.margins) if margin < tie]
        decisive = close[0] if close else len(expected.tokens)
        cancelled = have.reason == "cancelled"
        comparable += len(have.tokens) if cancelled else len(expected.tokens)
        if cancelled:
            span = min(len(have.tokens), decisive)
            same = have.tokens[:span] == expected.tokens[:span]
        else:
            span = decisive
            same = have.tokens[:span] == expected.tokens[:span]
            if decisive == len(expected.tokens):
                same = same and (have.tokens, have.reason) == (expected.tokens, expected.reason)
        compared += span
        if not same:
            differ = next(
                (
                    n
                    for n, (a, b) in enumerate(zip(have.tokens, expected.tokens, strict=False))
                    if a != b
                ),
                None,
            )
            margin = (
                expected.margins[differ]
                if differ is not None and differ < len(expected.margins)
                else None
            )
            problems.append(
                f"job {i} ({job.summary()}): got {have.reason} {have.tokens}, alone "
                f"{expected.reason} {expected.tokens} (decisive up to {decisive}; first "
                f"difference at {differ}, where alone its margin was {margin})"
            )
    return problems, compared, comparable

"""The scheduler on random schedules, on the CPU: exllamav2's dynamic generator and our decode
steps (look-ahead and sync) over a scripted model, against each job run alone.

SC2_SCHEDULER_SEEDS="a-b" (or one seed) replays other seeds; a failure prints its seed and schedule.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from engine.gpu.jobs import new_job
from tests.fakes.schedules import (
    Job,
    Reference,
    Stalled,
    describe,
    mismatches,
    random_schedule,
    run,
    with_stops,
)
from tests.fakes.scripted_exllamav2 import VOCAB, exllamav2_on_cpu, scripted_generator

CHUNK = 512  # prefill chunk: prompts over 1,024 tokens take three
MAX_NEW = 80


def seeds() -> range:
    first, _, last = os.environ.get("SC2_SCHEDULER_SEEDS", "0-29").partition("-")
    return range(int(first), int(last or first) + 1)


@pytest.fixture
def exllamav2():
    with exllamav2_on_cpu():
        yield


def invariants(generator) -> None:
    """No job's cache runs ahead of its tokens; exllamav2's own page-table check passes."""
    for job in generator.active_jobs:
        for sequence in job.sequences:
            assert sequence.kv_position < len(sequence.sequence_ids), f"{job} ran ahead"
    generator._ExLlamaV2DynamicGenerator___validate_cache()


def schedule_failures(mode: str, seed: int, reference: Reference) -> list[str]:
    rng = random.Random(seed)
    max_jobs, pages = rng.choice((4, 8, 16)), rng.choice((24, 128))  # 24: jobs wait for pages
    generator = scripted_generator(
        graphs=mode != "stock", max_jobs=max_jobs, pages=pages, chunk=CHUNK
    )
    generator.look_ahead = mode == "look-ahead"
    jobs = random_schedule(seed, ids=(1, VOCAB), chunk=CHUNK, max_new=MAX_NEW)
    jobs = with_stops(jobs, reference, seed)
    where = f"{mode}, {max_jobs} jobs at once, {pages} pages; {describe(seed, jobs)}"
    try:
        got = run(generator, jobs, chunk=CHUNK, check=invariants)
    except AssertionError as broken:  # Stalled, or an invariant
        return [f"{where}\n{broken}"]
    problems, *_ = mismatches(jobs, got, [reference(job) for job in jobs], tie=1.0)
    return [f"{where}\n" + "\n".join(problems)] if problems else []


@pytest.mark.parametrize("mode", ["look-ahead", "sync", "stock"])
def test_random_schedules_end_every_job_with_the_tokens_it_gets_alone(exllamav2, mode):
    reference = Reference(
        scripted_generator(graphs=False, max_jobs=1, pages=16, chunk=CHUNK), CHUNK
    )
    failures = [text for seed in seeds() for text in schedule_failures(mode, seed, reference)]
    assert not failures, "\n\n".join(failures[:3]) + "\nreplay: SC2_SCHEDULER_SEEDS=<seed>"


def repeated_prompt_jobs() -> list[Job]:
    """Two callers send one 300-token prompt at once; the second finds its first page cached."""
    prompt = tuple(1 + (i * 7) % (VOCAB - 1) for i in range(300))
    return [Job(prompt, 250, arrive=0), Job(prompt, 250, arrive=0)]


def test_a_prompt_found_in_the_prefix_cache_decodes_past_page_boundaries_with_look_ahead(
    exllamav2,
):
    generator = scripted_generator(graphs=True, max_jobs=4, pages=16, chunk=CHUNK)
    first, second = run(generator, repeated_prompt_jobs(), chunk=CHUNK, check=invariants)
    assert first.reason == second.reason == "max_new_tokens"
    assert first.tokens == second.tokens and len(first.tokens) == 250
    assert generator.ahead_steps > 200


def test_without_the_prefill_fix_look_ahead_strands_a_cached_prompt_one_past_a_page_boundary():
    """exllamav2 0.3.2 alone: the cached prompt is never marked prefilled (gpu/compat.py, 6)."""
    with exllamav2_on_cpu(fixed=False):
        generator = scripted_generator(graphs=True, max_jobs=4, pages=16, chunk=CHUNK)
        with pytest.raises(Stalled, match=r"job 1 \(kv_position 513, 513 ids, prefilled False"):
            run(generator, repeated_prompt_jobs(), chunk=CHUNK)


def test_the_logits_a_job_keeps_are_those_exllamav2_picked_from_after_its_penalty(exllamav2):
    """The near-tie margins read the kept logits as they are: exllamav2's sampler penalises them
    in place, so penalising them again would make a near-tie look decisive."""

    def first_logits(prompt: list[int], penalty: float) -> torch.Tensor:
        generator = scripted_generator(graphs=False, max_jobs=1, pages=16, chunk=CHUNK)
        job = new_job(prompt, Job(tuple(prompt), 1, 0, penalty=penalty).settings(), ())
        job.return_logits = True
        generator.enqueue(job)
        results = [r for _ in range(4) for r in generator.iterate() if "logits" in r]
        return results[0]["logits"][0, 0].float()

    # A prompt that holds the token the scripted model puts first, so the penalty touches it.
    prompt, raw = next(
        (p, logits)
        for p in ([3, 7, 11, last] for last in range(1, VOCAB))
        if int((logits := first_logits(p, 1.0)).argmax()) in p
    )
    want = raw.clone()
    seen = torch.tensor(sorted(set(prompt)))
    want[seen] = torch.where(raw[seen] > 0, raw[seen] / 1.15, raw[seen] * 1.15)
    assert not torch.equal(want, raw)
    assert torch.allclose(first_logits(prompt, 1.15), want)

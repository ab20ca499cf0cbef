"""engine.gpu.sampling against a line-by-line Python port of exllamav2 0.3.2's CPU sampler."""

from __future__ import annotations

import heapq
import math
import random
import struct
from dataclasses import dataclass, field, replace

import pytest
import torch

from engine.gpu.sampling import Row, row, sample, supports

INF = math.inf


def f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


# The reference: sampler.py's order of operations and sampling.cpp's functions, in float32.
# exllamav2 compiles with -Ofast, which vectorises the plain sums (softmax, normalize_cpu): exact
# sums stand in for those. The loops that stop early (top-p, the draw) add up in order.


def rep_penalty(logits: list[float], sequence: list[int], penalty: float, sustain: int, decay: int):
    rep_p = f32(penalty)
    step = f32(f32(1.0 - rep_p) / decay) if decay else 0.0
    sust = len(sequence) if sustain == -1 else sustain
    begin = max(len(sequence) - sust - decay, 0)
    seen = set()
    for i in range(len(sequence) - 1, begin - 1, -1):
        t = sequence[i]
        if 0 <= t < len(logits) and t not in seen:
            logits[t] = f32(logits[t] / rep_p) if logits[t] > 0 else f32(logits[t] * rep_p)
            seen.add(t)
        sust -= 1
        if sust < 0:
            rep_p = f32(rep_p + step)


def softmax(logits: list[float], temperature: float) -> tuple[list[float], int]:
    inverse = f32(1.0 / temperature)
    top, top_index = -1e38, 0
    for i, logit in enumerate(logits):
        if logit > top:
            top, top_index = logit, i
    exps = [f32(math.exp(f32(f32(logit - top) * inverse))) for logit in logits]
    scale = f32(1.0 / f32(math.fsum(exps)))
    return [f32(e * scale) for e in exps], top_index


def normalize(n: int, probs: list[float]) -> None:
    scale = f32(1.0 / f32(math.fsum(probs[:n])))
    for i in range(n):
        probs[i] = f32(probs[i] * scale)


def top_k_cpu(n: int, probs: list[float], ids: list[int], k: int, top_index: int) -> int:
    if k == 1:
        probs[0], probs[top_index] = probs[top_index], probs[0]
        ids[0], ids[top_index] = ids[top_index], ids[0]
        return 1
    heap = [(probs[i], ids[i]) for i in range(k)]
    heapq.heapify(heap)
    for i in range(k, n):
        if probs[i] > heap[0][0]:
            heapq.heapreplace(heap, (probs[i], ids[i]))
    for j in reversed(range(k)):
        probs[j], ids[j] = heapq.heappop(heap)
    return k


def top_p_cpu(n: int, probs: list[float], ids: list[int], top_p: float) -> int:
    heap: list[tuple[float, int]] = []
    total = 0.0
    for i in range(n):
        if probs[i] < f32(1e-6):
            continue
        if total > top_p and probs[i] < heap[0][0]:
            continue
        heapq.heappush(heap, (probs[i], ids[i]))
        total = f32(total + probs[i])
        while total > top_p and len(heap) > 1:
            total = f32(total - heapq.heappop(heap)[0])
    kept = len(heap)
    for j in reversed(range(kept)):
        probs[j], ids[j] = heapq.heappop(heap)
    return kept


def min_p_cpu(n: int, probs: list[float], ids: list[int], min_p: float) -> int:
    threshold = f32(max(probs[:n]) * min_p)
    i, j = 0, n - 1  # keep_threshold, with its overshoot when it meets a kept token
    while j >= i:
        while probs[i] >= threshold and j >= i:
            i += 1
        if probs[j] >= threshold:
            probs[i], probs[j] = probs[j], probs[i]
            ids[i], ids[j] = ids[j], ids[i]
            i += 1
        j -= 1
    return i


def multinomial(n: int, probs: list[float], point: float) -> int:
    index, total = 0, probs[0]
    while total < point:
        if index == n - 1:
            while index > 0 and probs[index] == 0.0:
                index -= 1
            break
        index += 1
        total = f32(total + probs[index])
    return index


@dataclass
class Drawn:
    token: int
    prob: float
    candidates: list[float]  # the final list, in the order the draw walks it
    point: float

    def near_boundary(self, margin: float = 1e-5) -> bool:
        total = 0.0
        for p in self.candidates:
            total += p
            if abs(total - self.point) < margin:
                return True
        return False


def reference(logits: torch.Tensor, spec: Row, vocab_size: int) -> Drawn:
    values = [f32(v) for v in logits.tolist()]
    if spec.repetition_penalty != 1.0:
        assert spec.history is not None
        history = spec.history.tolist()
        rep_penalty(
            values, history, spec.repetition_penalty, spec.repetition_range, spec.repetition_decay
        )
    width = len(values)
    for i in range(vocab_size, width):
        values[i] = -INF
    temperature, top_k = f32(spec.temperature), spec.top_k
    if temperature < 0.01:
        temperature, top_k = 1.0, 1
    probs, top_index = softmax(values, temperature)
    ids = list(range(width))
    n = width
    if 0 < top_k < width:
        n = top_k_cpu(n, probs, ids, top_k, top_index)
        normalize(n, probs)
    top_p, min_p = f32(spec.top_p), f32(spec.min_p)
    if n > 1 and 0.0 < top_p < 1.0:
        n = top_p_cpu(n, probs, ids, top_p)
        normalize(n, probs)
    if n > 1 and 0.0 < min_p < 1.0:
        n = min_p_cpu(n, probs, ids, min_p)
        normalize(n, probs)
    point = f32(f32(spec.random) * 0.9998)
    index = multinomial(n, probs, point)
    return Drawn(ids[index], probs[index], probs[:n], point)


# Helpers


def make_row(**changes) -> Row:
    base = Row(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        repetition_range=-1,
        repetition_decay=0,
        random=0.5,
        history=None,
    )
    return replace(base, **changes)


def random_logits(generator: torch.Generator, width: int, scale: float, ties: bool) -> torch.Tensor:
    logits = torch.randn(width, generator=generator) * scale
    return (logits * 2).round() / 2 if ties else logits


def compare(logits: torch.Tensor, rows: list[Row], vocab_size: int) -> tuple[int, int]:
    """Sample the batch and check each row against the reference; (rows compared, rows skipped)."""
    tokens, probs = sample(logits, rows, vocab_size)
    assert tokens.dtype == torch.int64 and probs.dtype == torch.float32
    compared = skipped = 0
    for i, spec in enumerate(rows):
        drawn = reference(logits[i], spec, vocab_size)
        if drawn.near_boundary():
            skipped += 1
            continue
        assert tokens[i].item() == drawn.token, (i, spec, drawn)
        assert probs[i].item() == pytest.approx(drawn.prob, rel=1e-5, abs=1e-7), (i, spec)
        compared += 1
    return compared, skipped


def draws(count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(count)]


# Greedy


def test_greedy_takes_the_lowest_id_among_tied_maxima():
    logits = torch.zeros(3, 64)
    logits[:, [7, 30, 41]] = 2.5
    logits[1, 7] = 1.0  # row 1: the tie is between 30 and 41
    rows = [
        make_row(top_k=1, temperature=0.7, random=0.99),
        make_row(temperature=0.0, top_k=50, top_p=0.5, random=0.99),
        make_row(temperature=0.0, random=0.0),
    ]
    tokens, probs = sample(logits, rows, 64)
    assert tokens.tolist() == [7, 30, 7]
    assert probs.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-7)
    assert [reference(logits[i], r, 64).token for i, r in enumerate(rows)] == [7, 30, 7]


def test_a_temperature_of_exactly_0_01_is_greedy_because_float32_rounds_it_down():
    logits = torch.zeros(1, 64)
    logits[0, 5] = 0.001  # nearly uniform: a non-greedy draw of 0.9 lands far from token 5
    greedy = [sample(logits, [make_row(temperature=0.01, random=0.9)], 64)[0].item()]
    warmer = [sample(logits, [make_row(temperature=0.0101, random=0.9)], 64)[0].item()]
    assert greedy == [5]
    assert warmer != [5]
    assert warmer == [reference(logits[0], make_row(temperature=0.0101, random=0.9), 64).token]


def test_greedy_ties_with_a_repetition_penalty_match_the_reference():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 512, generator=generator).round()  # many exact ties
    history = torch.randint(0, 512, (200,), generator=generator)
    rows = [
        make_row(temperature=0.0, repetition_penalty=1.3, history=history, random=r)
        for r in draws(8, 1)
    ]
    compared, skipped = compare(logits, rows, 512)
    assert (compared, skipped) == (8, 0)


# Filters


def test_top_k_keeps_and_orders_tied_tokens_as_the_heap_does():
    generator = torch.Generator().manual_seed(0)
    compared = 0
    for k in (2, 3, 7, 50, 200):
        logits = torch.stack([random_logits(generator, 1024, 2.0, ties=True) for _ in range(4)])
        for chunk in range(4):
            rows = [make_row(top_k=k, random=r) for r in draws(4, k * 10 + chunk)]
            done, _ = compare(logits, rows, 1024)
            compared += done
    assert compared >= 75


def test_top_p_after_top_k_lets_smaller_tokens_fill_the_room_left_under_top_p():
    # Normalised over the top 4: 0.4, 1/3, 2/15, 2/15 (ids 0..3). With top_p 0.6, 1/3 does not
    # fit after 0.4, but 2/15 does: the list is [0.4, 2/15] and excludes the second-likeliest.
    logits = torch.full((1, 64), -30.0)
    logits[0, :4] = torch.tensor([0.3, 0.25, 0.1, 0.1]).log()
    spec = make_row(top_k=4, top_p=0.6, random=0.9)
    tokens, probs = sample(logits, [spec], 64)
    assert tokens.item() == 3
    assert probs.item() == pytest.approx(0.25, rel=1e-5)
    assert reference(logits[0], spec, 64).token == 3


def test_top_p_after_top_k_matches_the_reference_on_many_draws():
    generator = torch.Generator().manual_seed(1)
    compared = skipped = 0
    for top_k, top_p in [(50, 0.8), (200, 0.9), (200, 0.95), (20, 0.5), (500, 0.99)]:
        logits = torch.stack(
            [random_logits(generator, 2048, 3.0, ties=i % 2 == 0) for i in range(6)]
        )
        rows = [
            make_row(top_k=top_k, top_p=top_p, temperature=0.8, random=r) for r in draws(6, top_k)
        ]
        done, missed = compare(logits, rows, 2048)
        compared, skipped = compared + done, skipped + missed
    assert compared >= 28 and skipped <= 2


def test_min_p_after_top_k_also_draws_the_token_just_past_the_list_when_every_candidate_passes():
    # keep_threshold walks one past the list when all of it passes, swapping in what the buffer
    # holds there: after top_k 3 that is softmax's entry for token id 3, ranked or not.
    logits = torch.zeros(1, 64)
    logits[0, [10, 20, 30]] = 5.0
    logits[0, 3] = 4.0
    spec = make_row(top_k=3, min_p=0.01, random=0.5)
    drawn = reference(logits[0], spec, 64)
    share = drawn.candidates  # [30, 20, 3, 10] in walk order
    landing = (share[0] + share[1] + share[2] / 2) / 0.9998
    tokens, _ = sample(logits, [replace(spec, random=landing)], 64)
    assert tokens.item() == 3
    assert reference(logits[0], replace(spec, random=landing), 64).token == 3
    assert sample(logits, [replace(spec, min_p=0.0, random=landing)], 64)[0].item() == 20


def test_min_p_over_the_whole_vocabulary_includes_the_token_its_partition_swaps_back_in():
    # Kept ids 0, 2, 3 (count 3); ids 2 and 3 are both kept, so the partition's last swap brings
    # id 1 (below the threshold) into the list: [0, 3, 1, 2].
    logits = torch.full((1, 32), -2.0)
    logits[0, [0, 2, 3]] = 3.0
    logits[0, 1] = 0.0
    spec = make_row(min_p=0.1, random=0.5)
    share = reference(logits[0], spec, 32).candidates
    assert len(share) == 4
    landing = (share[0] + share[1] + share[2] / 2) / 0.9998
    assert sample(logits, [replace(spec, random=landing)], 32)[0].item() == 1
    assert reference(logits[0], replace(spec, random=landing), 32).token == 1


def test_min_p_over_the_whole_vocabulary_matches_the_reference_on_many_draws():
    generator = torch.Generator().manual_seed(2)
    compared = 0
    for min_p, temperature in [(0.05, 1.0), (0.1, 1.5), (0.3, 2.0), (0.01, 0.7), (0.5, 1.0)]:
        logits = torch.stack(
            [random_logits(generator, 1000, 1.5, ties=i % 2 == 1) for i in range(8)]
        )
        rows = [
            make_row(min_p=min_p, temperature=temperature, random=r)
            for r in draws(8, int(min_p * 100))
        ]
        compared += compare(logits, rows, 1000 - 8)[0]
    assert compared >= 38


def test_top_k_top_p_and_min_p_together_match_the_reference():
    generator = torch.Generator().manual_seed(4)
    compared = 0
    for top_k, top_p, min_p, temperature in [
        (50, 0.9, 0.05, 1.5),
        (3, 0.99, 0.01, 2.0),
        (200, 0.8, 0.02, 1.0),
        (40, 0.95, 0.3, 0.6),
    ]:
        logits = torch.stack(
            [random_logits(generator, 1024, 2.0, ties=i % 2 == 0) for i in range(8)]
        )
        rows = [
            make_row(top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature, random=r)
            for r in draws(8, top_k)
        ]
        compared += compare(logits, rows, 1024)[0]
    assert compared >= 30


def test_full_softmax_sampling_walks_the_vocabulary_in_id_order():
    generator = torch.Generator().manual_seed(5)
    logits = torch.stack([random_logits(generator, 4096, 2.0, ties=False) for _ in range(8)])
    rows = [make_row(temperature=0.9, random=r) for r in draws(8, 5)]
    compared, _ = compare(logits, rows, 4096)
    assert compared >= 7


# Repetition penalty and the padded vocabulary


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_id():
    logits = torch.zeros(1, 32)
    logits[0, 4], logits[0, 6], logits[0, 8] = 4.0, 2.5, -1.0
    history = torch.tensor([4, 4, 8, 4])
    penalised = make_row(temperature=0.0, repetition_penalty=2.0, history=history)
    assert sample(logits, [penalised], 32)[0].item() == 6  # 4.0 / 2 < 2.5
    recent = replace(penalised, repetition_range=1)  # only the newest id (4) in range
    assert sample(logits, [recent], 32)[0].item() == 6
    elsewhere = replace(penalised, history=torch.tensor([4, 9, 9]), repetition_range=2)
    assert sample(logits, [elsewhere], 32)[0].item() == 4  # 4 is out of range


def test_repetition_range_and_decay_match_the_reference():
    generator = torch.Generator().manual_seed(6)
    logits = torch.stack([random_logits(generator, 300, 2.0, ties=False) for _ in range(12)])
    history = torch.cat([torch.randint(-3, 310, (400,), generator=generator), torch.arange(40)])
    rows = []
    for i, r in enumerate(draws(12, 6)):
        rows.append(
            make_row(
                temperature=[0.0, 0.7][i % 2],
                top_k=[0, 30][i // 6],
                repetition_penalty=[1.15, 1.5, 0.8][i % 3],
                repetition_range=[-1, 0, 16, 64][i % 4],
                repetition_decay=[0, 0, 8, 128][(i // 2) % 4],
                history=history[: 100 + 29 * i],
                random=r,
            )
        )
    compared, _ = compare(logits, rows, 300)
    assert compared >= 11


def test_the_padded_vocabulary_is_never_sampled():
    logits = torch.zeros(4, 96)
    logits[:, 80:] = 50.0  # the padding would win everything
    rows = [make_row(temperature=0.0), make_row(top_k=5), make_row(min_p=0.2), make_row()]
    tokens, _ = sample(logits, rows, 80)
    assert all(t < 80 for t in tokens.tolist())
    assert compare(logits, rows, 80)[0] == 4


# Batches


def test_rows_with_different_settings_in_one_batch_match_each_row_sampled_alone():
    generator = torch.Generator().manual_seed(7)
    logits = torch.stack([random_logits(generator, 2048, 3.0, ties=i % 3 == 0) for i in range(16)])
    history = torch.randint(0, 2048, (300,), generator=generator)
    kinds = [
        dict(temperature=0.0),
        dict(top_k=50, top_p=0.8, repetition_penalty=1.025, history=history),
        dict(min_p=0.05, temperature=1.3),
        dict(top_k=1, temperature=0.7),
        dict(top_k=3, min_p=0.01, temperature=2.0),
        dict(temperature=0.7),
        dict(top_k=200, top_p=0.95, min_p=0.02),
        dict(temperature=0.005, top_k=40),
    ]
    rows = [make_row(random=r, **kinds[i % len(kinds)]) for i, r in enumerate(draws(16, 7))]
    together = sample(logits, rows, 2000)
    alone = [sample(logits[i : i + 1], [spec], 2000) for i, spec in enumerate(rows)]
    assert together[0].tolist() == [t.item() for t, _ in alone]
    assert together[1].tolist() == pytest.approx([p.item() for _, p in alone], rel=1e-6)
    assert compare(logits, rows, 2000)[0] >= 15


def test_random_settings_match_the_reference():
    rng = random.Random(8)
    generator = torch.Generator().manual_seed(8)
    compared = skipped = 0
    for _ in range(40):
        width = rng.choice([64, 256, 1024])
        vocab_size = width - rng.choice([0, 5, 32])
        logits = torch.stack(
            [random_logits(generator, width, rng.choice([1.0, 4.0]), rng.random() < 0.5)]
            * rng.randint(1, 4)
        )
        rows = []
        for _ in range(logits.shape[0]):
            top_k = rng.choice([0, 1, 2, 5, 50])
            rows.append(
                make_row(
                    temperature=rng.choice([0.0, 0.3, 0.8, 1.2]),
                    top_k=top_k,
                    top_p=rng.choice([1.0, 0.5, 0.9]) if top_k > 1 else 1.0,
                    min_p=rng.choice([0.0, 0.02, 0.2]),
                    repetition_penalty=rng.choice([1.0, 1.2]),
                    repetition_range=rng.choice([-1, 20]),
                    history=torch.randint(0, width, (50,), generator=generator),
                    random=rng.random(),
                )
            )
        # Without a padding, min-p over the whole vocabulary may keep every id; exllamav2 then
        # reads past its buffer, which no reference can follow.
        if vocab_size == width:
            rows = [replace(r, min_p=0.0) if r.top_k == 0 else r for r in rows]
        done, missed = compare(logits, rows, vocab_size)
        compared, skipped = compared + done, skipped + missed
    assert compared >= 0.95 * (compared + skipped) and compared >= 60


def test_an_all_greedy_batch_sorts_nothing_and_a_mixed_one_sorts_once(monkeypatch):
    calls = []
    original = torch.sort

    def counting_sort(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "sort", counting_sort)
    logits = torch.randn(4, 256)
    sample(logits, [make_row(temperature=0.0)] * 2 + [make_row(top_k=1)] * 2, 256)
    assert calls == []
    sample(logits, [make_row(top_k=5), make_row(top_k=50, top_p=0.9), make_row(), make_row()], 256)
    assert calls == [1]


def test_sample_returns_int64_tokens_and_float32_probs_for_half_logits():
    logits = torch.randn(3, 128).half()
    tokens, probs = sample(logits, [make_row(top_k=10)] * 3, 128)
    assert tokens.shape == (3,) and tokens.dtype == torch.int64
    assert probs.shape == (3,) and probs.dtype == torch.float32
    assert logits.dtype == torch.float16  # the input is left alone


def test_sample_leaves_float32_logits_unchanged():
    logits = torch.randn(2, 64)
    before = logits.clone()
    history = torch.arange(20)
    sample(logits, [make_row(repetition_penalty=1.5, history=history)] * 2, 60)
    assert torch.equal(logits, before)


def test_sample_refuses_rows_it_does_not_reproduce():
    logits = torch.randn(1, 1024)
    with pytest.raises(ValueError, match="top_p 0.9 without top_k"):
        sample(logits, [make_row(top_p=0.9)], 1024)
    with pytest.raises(ValueError, match="top_k is 501"):
        sample(logits, [make_row(top_k=501)], 1024)
    with pytest.raises(ValueError, match="expected"):
        sample(logits, [make_row(), make_row()], 1024)


# Settings


@dataclass
class Settings:
    """exllamav2 0.3.2's ExLlamaV2Sampler.Settings fields, with its defaults."""

    token_repetition_penalty: float = 1.025
    token_repetition_range: int = -1
    token_repetition_decay: int = 0
    token_frequency_penalty: float = 0.0
    token_presence_penalty: float = 0.0
    temperature: float = 0.8
    smoothing_factor: float = 0.0
    min_temp: float = 0
    max_temp: float = 0.0
    temp_exponent: float = 1.0
    top_k: int = 50
    top_p: float = 0.8
    top_a: float = 0.0
    min_p: float = 0
    tfs: float = 0
    typical: float = 0
    skew: float = 0
    temperature_last: bool = False
    mirostat: bool = False
    token_bias: torch.Tensor | None = None
    cfg_scale: float | None = None
    post_sampling_hooks: list = field(default_factory=list)
    dry_multiplier: float = 0.0
    xtc_probability: float = 0.0


def test_supports_accepts_the_settings_the_app_builds():
    assert supports(Settings())
    assert supports(Settings(temperature=1.0, token_repetition_penalty=1.0, top_p=0.0, top_k=1))
    assert supports(Settings(temperature=0.0, top_k=0, top_p=0.5))  # greedy: top_p unused
    assert supports(Settings(top_k=0, top_p=1.0, min_p=0.1, temperature=1.2))
    assert supports(Settings(top_k=200, top_p=0.95, min_p=0.05, token_repetition_decay=64))
    assert supports(Settings(tfs=1.0, typical=1.0))  # 1 is off, like 0


@pytest.mark.parametrize(
    "change",
    [
        dict(token_frequency_penalty=0.1),
        dict(token_presence_penalty=0.1),
        dict(temperature_last=True),
        dict(mirostat=True),
        dict(top_a=0.1),
        dict(tfs=0.9),
        dict(typical=0.9),
        dict(min_temp=0.5, max_temp=1.5),
        dict(smoothing_factor=0.3),
        dict(skew=0.5),
        dict(xtc_probability=0.5),
        dict(dry_multiplier=0.8),
        dict(token_bias=torch.zeros(8)),
        dict(cfg_scale=1.5),
        dict(post_sampling_hooks=[object()]),
        dict(top_k=0, top_p=0.9),
        dict(top_k=501),
        dict(token_repetition_penalty=0.0),
        dict(token_repetition_range=-2),
        dict(token_repetition_decay=-1),
        dict(temperature=math.nan),
    ],
)
def test_supports_refuses_settings_it_does_not_reproduce(change):
    assert not supports(Settings(**change))


def test_row_copies_the_settings_and_keeps_history_only_for_a_penalty():
    history = torch.arange(5)
    penalised = row(Settings(), 0.25, history)
    assert penalised == Row(0.8, 50, 0.8, 0.0, 1.025, -1, 0, 0.25, history)
    assert row(Settings(token_repetition_penalty=1.0), 0.5, history).history is None

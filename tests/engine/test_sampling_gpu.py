"""engine.gpu.sampling on CUDA against exllamav2's own ExLlamaV2Sampler.sample (`pytest -m gpu`)."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from engine.gpu.sampling import row, sample, supports  # noqa: E402

pytestmark = pytest.mark.gpu

WIDTH = 49152  # StarCoder2's vocabulary; exllamav2's AVX2 softmax needs a multiple of 32
MARGIN = 1e-4  # draws this close to a cumulative boundary may fall either side


class Tokenizer:
    """All ExLlamaV2Sampler.sample asks of a tokenizer under these settings."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def get_vocab_size(self) -> int:
        return self.vocab_size


@pytest.fixture(scope="module")
def sampler():
    from exllamav2.generator import ExLlamaV2Sampler

    return ExLlamaV2Sampler


def exllamav2(sampler, logits, settings, history, draw: float, vocab_size: int):
    """exllamav2's token and probability for one row (it edits its logits, so give it a copy)."""
    tokens, _, _, probs, _ = sampler.sample(
        logits.float().cpu().clone().view(1, 1, -1),
        settings,
        history.view(1, -1),
        draw,
        Tokenizer(vocab_size),
    )
    return tokens.item(), probs.item()


def realistic_logits(generator: torch.Generator, rows: int, flat: bool = False) -> torch.Tensor:
    """fp16-rounded logits (so with ties), with a few strong candidates unless flat."""
    logits = torch.randn(rows, WIDTH, generator=generator) * (2.5 if flat else 1.5)
    if not flat:
        strong = torch.randint(0, WIDTH, (rows, 6), generator=generator)
        lift = 6 + torch.rand(rows, 6, generator=generator) * 8
        logits = logits.scatter_add(1, strong, lift)
    return logits.half()


def check_batch(sampler, logits, settings, histories, draws, vocab_size) -> list[bool]:
    """One CUDA batch against exllamav2 row by row: which rows were compared (not skipped)."""
    rows = [row(s, d, h) for s, d, h in zip(settings, draws, histories, strict=True)]
    tokens, probs = sample(logits.cuda(), rows, vocab_size)
    assert tokens.device.type == "cuda" and probs.device.type == "cuda"
    tokens, probs = tokens.tolist(), probs.tolist()
    compared = []
    for i, (s, d, h) in enumerate(zip(settings, draws, histories, strict=True)):
        expected, prob = exllamav2(sampler, logits[i], s, h, d, vocab_size)
        low = exllamav2(sampler, logits[i], s, h, max(d - MARGIN, 0.0), vocab_size)[0]
        high = exllamav2(sampler, logits[i], s, h, min(d + MARGIN, 1 - 1e-9), vocab_size)[0]
        if low != expected or high != expected:  # near a boundary: either side is right
            compared.append(False)
            continue
        assert tokens[i] == expected, (i, s, d)
        assert probs[i] == pytest.approx(prob, rel=1e-4, abs=1e-6), (i, s, d)
        compared.append(True)
    return compared


def test_greedy_matches_exllamav2_exactly_with_planted_ties(sampler):
    Settings = sampler.Settings
    generator = torch.Generator().manual_seed(0)
    logits = realistic_logits(generator, 16).float()
    for i in range(16):  # three equal maxima per row, at random ids
        ids = torch.randint(0, WIDTH, (3,), generator=generator)
        logits[i, ids] = logits[i].max() + 1.0
    choices = [
        Settings.greedy(),
        Settings.greedy(token_repetition_penalty=1.15),
        Settings(temperature=0.005),
        Settings(top_k=1, temperature=0.9, top_p=0.5),
        Settings(temperature=0.01, top_k=0, top_p=0.9),  # 0.01 is below 0.01 in float32
    ]
    settings = [choices[i % len(choices)] for i in range(16)]
    assert all(supports(s) for s in settings)
    histories = [torch.randint(0, WIDTH, (400,), generator=generator) for _ in range(16)]
    draws = [random.Random(i).random() for i in range(16)]
    for vocab_size in (WIDTH, WIDTH - 77):
        assert check_batch(sampler, logits, settings, histories, draws, vocab_size) == [True] * 16


def test_sampling_matches_exllamav2_token_for_token(sampler):
    Settings = sampler.Settings
    choices = [
        Settings(),  # exllamav2's defaults: top_k 50, top_p 0.8, penalty 1.025
        Settings(temperature=1.5, top_k=3, top_p=1.0, min_p=0.01, token_repetition_penalty=1.0),
        Settings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05, token_repetition_penalty=1.1),
        Settings(temperature=0.7, top_k=200, top_p=0.95, min_p=0.02, token_repetition_penalty=1.0),
        Settings(temperature=1.2, top_k=0, top_p=1.0, token_repetition_penalty=1.0),
        Settings(
            temperature=0.9,
            top_k=40,
            top_p=0.9,
            token_repetition_penalty=1.2,
            token_repetition_range=64,
            token_repetition_decay=32,
        ),
        Settings(temperature=2.0, top_k=100, top_p=0.99, min_p=0.1),
        Settings(temperature=0.3, top_k=500, top_p=0.6),
    ]
    assert all(supports(s) for s in choices)
    generator = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    compared = {i: 0 for i in range(len(choices))}
    rows = 0
    for batch in range(12):
        logits = realistic_logits(generator, 16, flat=batch % 3 == 0)
        picks = [(batch + i) % len(choices) for i in range(16)]
        history = torch.randint(0, WIDTH, (rng.randint(1, 2000),), generator=generator)
        draws = [rng.random() for _ in range(16)]
        vocab_size = WIDTH if batch % 2 else WIDTH - 100
        settings = [choices[p] for p in picks]
        done = check_batch(sampler, logits, settings, [history] * 16, draws, vocab_size)
        for pick, ok in zip(picks, done, strict=True):
            compared[pick] += ok
        rows += 16
    assert all(count >= 4 for count in compared.values()), compared
    assert sum(compared.values()) >= 0.75 * rows, compared


# Hand-built rows for exllamav2's quirks: (width, base logit, {ids: logit}, settings, draw, token).
QUIRKS = [
    # Walk order [30, 20, 3, 10]: a draw of 0.65 lands on id 3, which is not in the top 3.
    pytest.param(
        64, 0.0, {(10, 20, 30): 5.0, (3,): 4.0}, dict(top_k=3, min_p=0.01), 0.65, 3,
        id="min-p-draws-the-token-past-the-top-k-list-when-every-candidate-passes",
    ),
    # Walk order [0, 3, 1, 2]: id 1 is below the threshold yet takes the third slot.
    pytest.param(
        32, -2.0, {(0, 2, 3): 3.0, (1,): 0.0}, dict(top_k=0, min_p=0.1), 0.664, 1,
        id="min-p-partition-swaps-a-dropped-token-back-in",
    ),
    pytest.param(
        64, -30.0, {(0,): math.log(0.3), (1,): math.log(0.25), (2, 3): math.log(0.1)},
        dict(top_k=4, top_p=0.6), 0.9, 3,
        id="top-p-lets-a-smaller-token-fill-the-room-left",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("width", "base", "values", "chosen", "draw", "token"), QUIRKS)
def test_exllamav2_quirks_are_reproduced(sampler, width, base, values, chosen, draw, token):
    logits = torch.full((1, width), base)
    for ids, value in values.items():
        logits[0, list(ids)] = value
    settings = sampler.Settings(
        **{"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "token_repetition_penalty": 1.0} | chosen
    )
    history = torch.zeros(1, dtype=torch.int64)
    assert exllamav2(sampler, logits[0], settings, history, draw, width)[0] == token
    assert check_batch(sampler, logits, [settings], [history], [draw], width) == [True]


def test_supports_reads_exllamav2s_own_settings(sampler):
    Settings = sampler.Settings
    assert supports(Settings())
    assert supports(Settings.greedy(token_repetition_penalty=1.1))
    assert not supports(Settings(top_k=0))  # top_p 0.8 over the whole vocabulary
    assert not supports(Settings(mirostat=True))
    assert not supports(Settings(dry_multiplier=0.8))
    assert not supports(Settings(xtc_probability=0.5))
    assert not supports(Settings(temperature_last=True))


def test_sample_does_not_synchronise_with_the_host(sampler):
    generator = torch.Generator().manual_seed(2)
    logits = realistic_logits(generator, 8).cuda()
    history = torch.randint(0, WIDTH, (500,), generator=generator)
    Settings = sampler.Settings
    choices = [
        Settings(),
        Settings.greedy(),
        Settings(top_k=0, top_p=1.0, min_p=0.05),
        Settings(top_k=3, top_p=1.0, min_p=0.01),
    ]
    rows = [row(choices[i % 4], 0.5, history) for i in range(8)]
    sample(logits, rows, WIDTH)  # warm up: first calls allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, _ = sample(logits, rows, WIDTH)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (8,)

"""exllamav2's real dynamic generator and our Generator on the CPU, over a scripted model.

exllamav2 imports a module named `exllamav2_ext` before it would compile its CUDA extension, so
Python ports of the few functions its scheduling calls (prefix matching, stop strings, page
rotation, greedy sampling, the repetition penalty) let the real generator run here: page table,
prefix cache, chunked prefill, joins, cancels, defragmentation and our look-ahead decode.

The scripted model keeps one number per cache position, a hash of its token and of the number
before it as read through the page table, as attention reads keys. The next token depends on
every number the sequence can see, so a page read in the wrong place, a position skipped or
written twice, or a page reused while in use changes the tokens. Logits are one-hot with a wide
margin: greedy picks are never near a tie.
"""

from __future__ import annotations

import string
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from tests.engine.test_sampling import rep_penalty

PAGE = 256
VOCAB = 64
EOS = 0
PIECES = [
    "<|endoftext|>",
    *(string.ascii_lowercase + string.digits + " \n.,:;()[]{}=+-*#_<>!?@$%&|"),
]
assert len(PIECES) == VOCAB
_MIX = 1_000_003
_MODULUS = 2**31 - 1
_WEIGHTS = torch.randint(1, 1000, (1 << 16,), generator=torch.Generator().manual_seed(7))


# ---- the extension's functions the scheduler calls, ported from exllamav2_ext 0.3.2 ----


def count_match(a: torch.Tensor, b: torch.Tensor, max_a: int) -> int:
    """ext_cache.cpp: how many leading ids of the (1, n) tensors agree, up to max_a."""
    limit = min(max_a, b.shape[1])
    left, right = a.flatten()[:limit].tolist(), b.flatten()[:limit].tolist()
    match = 0
    while match < limit and left[match] == right[match]:
        match += 1
    return match


def partial_strings_match(match: Any, offsets: Any, strings: Any) -> int:
    """generator.cpp: where the first stop string starts in the text, -2 if the text ends with
    the start of one, else -1 (strings are tried one after another)."""
    text = np.asarray(match).view(np.uint32)
    ends = np.asarray(offsets).view(np.int32) // 4
    utf32 = np.asarray(strings).view(np.uint32)
    for begin, end in zip(ends[:-1], ends[1:], strict=True):
        wanted = utf32[begin:end]
        for start in range(len(text)):
            at, matched = start, 0
            while text[at] == wanted[matched]:
                at, matched = at + 1, matched + 1
                if matched == len(wanted):
                    return start
                if at == len(text):
                    return -2
    return -1


def cache_rotate(cache: torch.Tensor, order: torch.Tensor, temp: torch.Tensor) -> None:
    """cache.cu: page[order[0]] <- page[order[1]] <- … <- page[order[-1]] <- page[order[0]]."""
    pages = order.tolist()
    first = cache[pages[0]].clone()
    for target, source in zip(pages[:-1], pages[1:], strict=True):
        cache[target].copy_(cache[source])
    cache[pages[-1]].copy_(first)


def apply_rep_penalty(ids, penalty, sustain, decay, frequency, presence, logits) -> None:
    """ext_sampling.cpp's repetition penalty (the only kind this harness's settings use)."""
    assert frequency == 0.0 and presence == 0.0
    row = logits.view(-1).tolist()
    rep_penalty(row, ids.view(-1).tolist(), penalty, sustain, decay)
    logits.view(-1).copy_(torch.tensor(row))


def sample_basic(logits: torch.Tensor, temperature: float, top_k: int, *args: Any) -> list:
    """sampling.cpp for greedy settings (top_k 1): the first maximum, probability 1."""
    if top_k != 1:
        raise NotImplementedError("the scripted extension samples greedily only")
    tokens, probs, logit_filter = args[6], args[7], args[10]
    scores = logits.view(logits.shape[0], -1).clone()
    if logit_filter.device.type != "meta":
        scores[~logit_filter.view_as(scores)] = -torch.inf
    tokens.view(-1).copy_(scores.argmax(dim=-1))
    probs.fill_(1.0)
    return []


def fake_extension() -> types.ModuleType:
    module = types.ModuleType("exllamav2_ext")
    for function in (count_match, partial_strings_match, cache_rotate, apply_rep_penalty):
        setattr(module, function.__name__, function)
    module.sample_basic = sample_basic
    module.fast_fill_cpu_ones_bool = lambda tensor: tensor.fill_(True)
    return module


@contextmanager
def exllamav2_on_cpu(fixed: bool = True) -> Iterator[None]:
    """Import exllamav2 over the ported extension, with our scheduling fix unless told not to;
    forget it all afterwards."""
    before = set(sys.modules)
    sys.modules["exllamav2_ext"] = fake_extension()
    try:
        from exllamav2.generator import dynamic

        from engine.gpu import compat

        dynamic.assert_paged_attn = lambda: None  # our paged attention stands in for flash-attn
        if fixed:
            compat.fix_prefill_complete()
        yield
    finally:
        for name in set(sys.modules) - before:
            if name.startswith(("exllamav2", "engine.gpu.generator", "engine.gpu.graphs")):
                del sys.modules[name]


# ---- the scripted model ----


def _slots(table: torch.Tensor, row: int, start: int, stop: int) -> torch.Tensor:
    """Where positions start … stop - 1 of a row live in the cache, through its page table."""
    positions = torch.arange(start, stop)
    return table[row, positions // PAGE].long() * PAGE + positions % PAGE


def forward(cache: ScriptedCache, ids: torch.Tensor, table: torch.Tensor, seqlens: torch.Tensor):
    """Write each row's ids at its positions; logits (B, q, VOCAB) for its last position."""
    values = cache.values.view(-1)
    rows, q_len = ids.shape
    logits = torch.zeros((rows, q_len, VOCAB), dtype=torch.float32)
    for row in range(rows):
        start = int(seqlens[row])
        before = int(values[_slots(table, row, start - 1, start)]) if start else 0
        hashes = []
        for token in ids[row].tolist():
            before = (before * _MIX + token * 7919 + 1) % _MODULUS
            hashes.append(before)
        values[_slots(table, row, start, start + q_len)] = torch.tensor(hashes)
        seen = values[_slots(table, row, 0, start + q_len)]
        mixed = (hashes[-1] + int(((seen % _MIX) * _WEIGHTS[: len(seen)]).sum())) % _MODULUS
        token = EOS if mixed % 499 == 0 else 1 + mixed % (VOCAB - 1)
        logits[row, -1, token] = 10.0
    return logits


class ScriptedCache:
    """The K/V cache: one int64 per position (exllamav2 asks for batch size 1)."""

    batch_size = 1

    def __init__(self, pages: int) -> None:
        self.max_seq_len = pages * PAGE
        self.values = torch.zeros((1, self.max_seq_len, 1, 1), dtype=torch.int64)

    def all_tensors(self) -> list[torch.Tensor]:
        return [self.values]

    def copy_states(self, target, src, columns, dst, to_columns, *rows: int) -> None:
        assert target is self and columns == to_columns and rows == (0, 1, 0, 1)
        self.values[:, dst : dst + columns] = self.values[:, src : src + columns].clone()


class ScriptedModel:
    def __init__(self, max_seq_len: int, chunk: int, max_jobs: int) -> None:
        self.config = SimpleNamespace(
            vocab_size=VOCAB,
            max_seq_len=max_seq_len,
            max_input_len=chunk,
            max_batch_size=max_jobs,
            no_flash_attn=False,
            arch=SimpleNamespace(lm=SimpleNamespace(mrope=False)),
        )

    def forward_chunk(self, input_ids, attn_params, cache, preprocess_only=False, **_) -> dict:
        logits = forward(cache, input_ids, attn_params.block_index, attn_params.cache_seqlens)
        return {"logits": logits}


class ScriptedTokenizer:
    eos_token_id = EOS

    def get_vocab_size(self) -> int:
        return VOCAB

    def get_id_to_piece_list(self, decode_special_tokens: bool = False) -> list[str]:
        return PIECES if decode_special_tokens else ["", *PIECES[1:]]

    def decode(self, ids: torch.Tensor, decode_special_tokens: bool = False) -> list[str]:
        pieces = self.get_id_to_piece_list(decode_special_tokens)
        return ["".join(pieces[i] for i in ids.view(-1).tolist())]


class _Copied:
    """The host copies are made at once: nothing to wait for."""

    def synchronize(self) -> None:
        pass


class ScriptedGraphs:
    """DecodeGraphs' surface over the scripted forward: every batch size up to max_jobs."""

    stream = None

    def __init__(self, cache: ScriptedCache, max_jobs: int) -> None:
        self._cache, self.max_jobs = cache, max_jobs

    def covers(self, batch: int) -> bool:
        return 1 <= batch <= self.max_jobs

    def run(self, ids: torch.Tensor, table: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        return forward(self._cache, ids.view(-1, 1), table, seqlens)

    def to_host(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], _Copied]:
        return [tensor.clone() for tensor in tensors], _Copied()


def scripted_generator(*, graphs: bool, max_jobs: int, pages: int, chunk: int) -> Any:
    """A paged generator over the scripted model: ours (decode steps as "graphs") or stock."""
    from exllamav2.generator import ExLlamaV2DynamicGenerator

    cache = ScriptedCache(pages)
    arguments = dict(
        model=ScriptedModel(cache.max_seq_len, chunk, max_jobs),
        cache=cache,
        tokenizer=ScriptedTokenizer(),
        max_batch_size=max_jobs,
        max_seq_len=cache.max_seq_len,
        paged=True,
    )
    if not graphs:
        return ExLlamaV2DynamicGenerator(**arguments)
    from engine.gpu.generator import Generator

    return Generator(**arguments, graphs=ScriptedGraphs(cache, max_jobs))

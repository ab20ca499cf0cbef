"""Batched token sampling on the GPU that picks the tokens exllamav2 0.3.2's CPU sampler picks.

exllamav2 (sampler.py, then ext_sampling.cpp/sampling.cpp) does, per row: repetition penalty on the
logits, -inf beyond the tokenizer's vocabulary, softmax at the temperature, then top-k (a heap),
top-p (a streaming heap), min-p (an in-place partition), renormalising after each filter that ran,
and walks the candidates in their array order until the running sum reaches 0.9998 * random. The
candidate order is part of the result, so this module rebuilds it exactly, quirks included.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch

from engine.gpu.graph_cache import bucket, replay

# exllamav2 picks the top k with a heap up to here and with an unstable partial quicksort above.
HEAP_TOP_K = 500
GREEDY_BELOW_TEMPERATURE = 0.01
RANDOM_SCALE = 0.9998  # allows for float32 probabilities that sum to slightly less than 1
# Per row on the device: 1/temperature, k, top_p, min_p, draw, then for the repetition penalty the
# sustained range, where the row's penalty ramp starts and its length, and how many ids it sends.
_PARAMS = 9


def _f32(value: float) -> float:
    """value rounded to float32, as pybind11 hands a Python float to exllamav2's C++."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


# top_p_cpu never admits a probability below this (a float constant in sampling.cpp).
TOP_P_FLOOR = _f32(1e-6)
# After the leading run, each run of top-p admissions at least halves the room left under top_p,
# and nothing below TOP_P_FLOOR is admitted: 2**-20 < 1e-6, so 20 more runs reach the fixed point.
_TOP_P_RUNS = 20


@dataclass(frozen=True)
class Row:
    """One sequence's sampling for one step."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    repetition_range: int
    repetition_decay: int
    random: float  # the job's draw in [0, 1), as exllamav2's job.rng.random() gives
    history: torch.Tensor | None  # 1-D CPU int64 ids seen so far; read only when penalised


@dataclass(frozen=True)
class _Plan:
    """A Row resolved the way sample_basic resolves it, before anything reaches the device."""

    kind: str  # "greedy", "top_k" or "full" (no top-k)
    inverse_temperature: float
    top_k: int
    top_p: float  # 0 when off
    min_p: float  # 0 when off
    point: float  # where the walk over the candidates stops


def _active(value: float) -> bool:
    """exllamav2's test for top_p and min_p (and tfs, typical): on strictly between 0 and 1."""
    return 0.0 < _f32(value) < 1.0


def _greedy(temperature: float, top_k: int) -> bool:
    # The float32 temperature is compared with the double 0.01: 0.01 itself is greedy.
    return _f32(temperature) < GREEDY_BELOW_TEMPERATURE or top_k == 1


def supports(settings: Any) -> bool:
    """True when an ExLlamaV2Sampler.Settings uses only what `sample` reproduces exactly."""

    def get(name: str, default: Any) -> Any:
        return getattr(settings, name, default)

    floats = ("temperature", "top_p", "min_p", "token_repetition_penalty")
    ints = ("top_k", "token_repetition_range", "token_repetition_decay")
    values = {name: get(name, None) for name in floats + ints}
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values.values()):
        return False
    if any(not math.isfinite(values[name]) for name in floats):
        return False
    if any(not isinstance(values[name], int) for name in ints):
        return False
    unused = (
        get("token_frequency_penalty", 0.0) == 0.0
        and get("token_presence_penalty", 0.0) == 0.0
        and not get("temperature_last", False)
        and not get("mirostat", False)
        and _f32(get("top_a", 0.0)) <= 0.0
        and not _active(get("tfs", 0.0))
        and not _active(get("typical", 0.0))
        and not (_f32(get("max_temp", 0.0)) > _f32(get("min_temp", 0.0)))
        and _f32(get("smoothing_factor", 0.0)) <= 0.0
        and get("skew", 0.0) == 0.0
        and get("xtc_probability", 0.0) <= 0.0
        and get("dry_multiplier", 0.0) <= 0.0
        and get("token_bias", None) is None
        and get("cfg_scale", None) is None
        and not get("post_sampling_hooks", None)
    )
    penalty_ok = (
        values["token_repetition_penalty"] > 0.0
        and values["token_repetition_range"] >= -1
        and values["token_repetition_decay"] >= 0
    )
    if not (unused and penalty_ok):
        return False
    top_k = values["top_k"]
    if _greedy(values["temperature"], top_k):
        return True
    # Without top-k, exllamav2's top-p streams the whole vocabulary in token-id order through a
    # heap, and what it keeps depends on that order; only the sorted case (after top-k) is rebuilt.
    return 0 <= top_k <= HEAP_TOP_K and (top_k > 0 or not _active(values["top_p"]))


def row(settings: Any, random: float, history: torch.Tensor) -> Row:
    """The Row for one job's step: its settings, its draw and its whole sequence so far."""
    penalty = float(settings.token_repetition_penalty)
    return Row(
        temperature=float(settings.temperature),
        top_k=int(settings.top_k),
        top_p=float(settings.top_p),
        min_p=float(settings.min_p),
        repetition_penalty=penalty,
        repetition_range=int(settings.token_repetition_range),
        repetition_decay=int(settings.token_repetition_decay),
        random=float(random),
        history=history if penalty != 1.0 else None,
    )


def _plan(spec: Row, width: int) -> _Plan:
    point = _f32(_f32(spec.random) * RANDOM_SCALE)
    if _f32(spec.temperature) < GREEDY_BELOW_TEMPERATURE:
        return _Plan("greedy", 1.0, 1, 0.0, 0.0, point)
    inverse = _f32(1.0 / _f32(spec.temperature))
    top_p = _f32(spec.top_p) if _active(spec.top_p) else 0.0
    min_p = _f32(spec.min_p) if _active(spec.min_p) else 0.0
    if spec.top_k == 1:
        return _Plan("greedy", inverse, 1, 0.0, 0.0, point)
    if 0 < spec.top_k < width:
        if spec.top_k > HEAP_TOP_K:
            raise ValueError(
                f"top_k is {spec.top_k}; this sampler reproduces top_k up to {HEAP_TOP_K}."
            )
        return _Plan("top_k", inverse, spec.top_k, top_p, min_p, point)
    if top_p:
        raise ValueError(
            f"top_p {spec.top_p} without top_k is not reproduced here; set top_k (2 to "
            f"{HEAP_TOP_K}) or leave this row to exllamav2's own sampler."
        )
    return _Plan("full", inverse, 0, 0.0, min_p, point)


@lru_cache(maxsize=64)
def _penalty_ramp(penalty: float, decay: int) -> torch.Tensor:
    """The penalty at each step past the sustained range, accumulated in float32 like the C++."""
    value = _f32(penalty)
    step = _f32(_f32(1.0 - value) / _f32(decay)) if decay else 0.0
    ramp = [value]
    for _ in range(decay - 1):
        value = _f32(value + step)
        ramp.append(value)
    return torch.tensor(ramp, dtype=torch.float32)


def _window(spec: Row) -> tuple[torch.Tensor, int, torch.Tensor] | None:
    """The ids apply_rep_penalty_cpu visits (oldest first), its sustained range and its ramp."""
    if spec.repetition_penalty == 1.0 or spec.history is None:
        return None
    history = spec.history.reshape(-1)
    length = history.numel()
    sustain = length if spec.repetition_range == -1 else spec.repetition_range
    begin = max(length - sustain - spec.repetition_decay, 0)
    ramp = _penalty_ramp(spec.repetition_penalty, spec.repetition_decay)
    return history[begin:].to(torch.float32), sustain, ramp


def _penalise(x: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, ramps: torch.Tensor) -> None:
    """apply_rep_penalty_cpu for every row at once: each id once, at its most recent position."""
    batch, width = x.shape
    device = x.device
    lengths = table[:, 8].long()
    owner = torch.repeat_interleave(
        torch.arange(batch, device=device), lengths, output_size=ids.numel()
    )
    ends = lengths.cumsum(0) - 1
    distance = ends[owner] - torch.arange(ids.numel(), device=device)  # 0 for the newest
    ids = ids.long()
    column = torch.where((ids >= 0) & (ids < width), ids, width)  # the C++ compares as uint64
    never = ids.numel() + 1
    nearest = torch.full((batch * (width + 1),), never, dtype=torch.int64, device=device)
    nearest.scatter_reduce_(0, owner * (width + 1) + column, distance, reduce="amin")
    nearest = nearest.view(batch, width + 1)[:, :width]
    # The penalty holds over the sustained range, then follows the ramp back towards 1.
    step = (nearest - table[:, 5:6].long()).clamp(min=0)
    step = torch.minimum(step, (table[:, 7:8].long() - 1).clamp(min=0))
    factor = ramps[(table[:, 6:7].long() + step).clamp(max=ramps.numel() - 1)]
    penalised = torch.where(x > 0, x / factor, x * factor)
    x.copy_(torch.where(nearest < never, penalised, x))


def _walk(probs: torch.Tensor, valid: torch.Tensor | None, point: torch.Tensor) -> torch.Tensor:
    """multinomial_cpu: the first candidate whose running sum reaches point, else the last > 0."""
    slots = torch.arange(probs.shape[1], device=probs.device)
    reached = probs.cumsum(1) >= point
    nonzero = probs > 0
    if valid is not None:
        reached &= valid
        nonzero &= valid
    first = torch.where(reached, slots, probs.shape[1]).amin(1, keepdim=True)
    last = torch.where(nonzero, slots, 0).amax(1, keepdim=True)
    return torch.where(first < probs.shape[1], first, last)


def _nucleus(probs: torch.Tensor, valid: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p_cpu on candidates sorted by descending probability: which of them it keeps.

    Its heap keeps the first candidate, then each later one whose addition keeps the sum within
    top_p (one that would overflow is popped straight back out), so once one does not fit, smaller
    candidates further down fill the room left. Each run of them starts at the first candidate
    that fits the room and goes on while their sum does.
    """
    width = probs.shape[1]
    eligible = valid & (probs >= TOP_P_FLOOR)
    probs = probs * eligible
    count = eligible.sum(1, keepdim=True)
    running = probs.cumsum(1)
    before = torch.cat([torch.zeros_like(running[:, :1]), running], 1)  # mass ahead of each slot
    descending = -probs  # ascending, for searchsorted
    end = ((running <= top_p) & eligible).sum(1, keepdim=True).clamp(min=1)
    room = top_p - before.gather(1, end)
    starts, ends = [torch.zeros_like(end)], [end]
    for _ in range(_TOP_P_RUNS):
        start = torch.searchsorted(descending, -room).clamp(min=end)
        base = before.gather(1, start)
        end = torch.minimum(torch.searchsorted(running, room + base, right=True), count)
        end = torch.maximum(end, start)
        room = room - (before.gather(1, end) - base)
        starts.append(start)
        ends.append(end)
    slots = torch.arange(width, device=probs.device).view(1, 1, width)
    first, last = torch.stack(starts, 1), torch.stack(ends, 1)  # (rows, runs, 1)
    return ((slots >= first) & (slots < last)).any(1)


def _top_k_rows(
    probs: torch.Tensor, params: torch.Tensor, k_max: int, use_top_p: bool, use_min_p: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with 2 <= top_k <= 500: top-k, then top-p and min-p as sampling.cpp runs them."""
    rows, width = probs.shape
    device = probs.device
    k = params[:, 1:2].long()
    top_p, min_p, point = params[:, 2:3], params[:, 3:4], params[:, 4:5]
    # The heap emits equal probabilities by descending id: a stable sort of the reversed row.
    sorted_probs, order = torch.sort(probs.flip(1), dim=1, descending=True, stable=True)
    sorted_ids = (width - 1) - order
    # Which of the tokens tied at the k-th probability the heap keeps: of those up to the k-th
    # id (in id order) at or above it, the highest ids (lower ones were evicted first).
    kth = sorted_probs.gather(1, k - 1)
    above = (probs > kth).sum(1, keepdim=True)
    ids = torch.arange(width, device=device)
    kth_id = ((probs >= kth).cumsum(1) < k).sum(1, keepdim=True)
    passed = ((probs == kth) & (ids > kth_id)).sum(1, keepdim=True)
    slots = torch.arange(k_max, device=device)
    source = (slots + torch.where(slots >= above, passed, 0)).clamp(max=width - 1)
    in_top = slots < k
    listed = sorted_probs.gather(1, source) * in_top
    listed = listed * (1.0 / listed.sum(1, keepdim=True))
    listed_ids = sorted_ids.gather(1, source)
    probs_now, ids_now, count = listed, listed_ids, k
    if use_top_p:
        kept = torch.where(top_p > 0, _nucleus(listed, in_top, top_p), in_top)
        count = kept.sum(1, keepdim=True)
        slot = torch.where(kept, kept.cumsum(1) - 1, k_max)  # k_max: a dump slot, dropped
        probs_now = torch.zeros(rows, k_max + 1, device=device).scatter_(1, slot, listed)
        ids_now = torch.zeros(rows, k_max + 1, dtype=torch.int64, device=device)
        ids_now = ids_now.scatter_(1, slot, listed_ids)
        probs_now, ids_now = probs_now[:, :k_max], ids_now[:, :k_max]
        renormalised = probs_now * (1.0 / probs_now.sum(1, keepdim=True))
        probs_now = torch.where(top_p > 0, renormalised, probs_now)
    slots = torch.arange(k_max + 1, device=device)
    probs_now = torch.cat([probs_now, torch.zeros(rows, 1, device=device)], 1)
    ids_now = torch.cat([ids_now, torch.zeros(rows, 1, dtype=ids_now.dtype, device=device)], 1)
    length = count
    if use_min_p:
        active = (min_p > 0) & (count > 1)
        listed_now = slots < count
        threshold = probs_now[:, :1] * min_p
        passing = ((probs_now >= threshold) & listed_now).sum(1, keepdim=True)
        # keep_threshold overshoots by one when every candidate passes: it swaps in whatever the
        # buffer holds just past the list, the earlier stage's entry there or softmax's (p_k, k).
        overshoot = active & (passing == count)
        at = count.clamp(max=k_max - 1)
        in_list = count < k
        stale_prob = torch.where(in_list, listed.gather(1, at), probs.gather(1, k))
        stale_id = torch.where(in_list, listed_ids.gather(1, at), k)
        last_prob, last_id = probs_now.gather(1, count - 1), ids_now.gather(1, count - 1)
        stale_slot, moved_slot = overshoot & (slots == count - 1), overshoot & (slots == count)
        probs_now = torch.where(
            stale_slot, stale_prob, torch.where(moved_slot, last_prob, probs_now)
        )
        ids_now = torch.where(stale_slot, stale_id, torch.where(moved_slot, last_id, ids_now))
        length = torch.where(active, passing + overshoot.long(), count)
        probs_now = probs_now * (slots < length)
        renormalised = probs_now * (1.0 / probs_now.sum(1, keepdim=True))
        probs_now = torch.where(active, renormalised, probs_now)
    at = _walk(probs_now, slots < length, point)
    return ids_now.gather(1, at).squeeze(1), probs_now.gather(1, at).squeeze(1)


def _full_rows(
    probs: torch.Tensor, params: torch.Tensor, use_min_p: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows without top-k: the whole vocabulary in id order, after min-p's partition if on."""
    min_p, point = params[:, 3:4], params[:, 4:5]
    if not use_min_p:
        at = _walk(probs, None, point)
        return at.squeeze(1), probs.gather(1, at).squeeze(1)
    width = probs.shape[1]
    ids = torch.arange(width, device=probs.device)
    active = min_p > 0
    threshold = torch.where(active, probs.amax(1, keepdim=True) * min_p, -1.0)
    keep = probs >= threshold
    count = keep.sum(1, keepdim=True)
    # keep_threshold's two pointers fill the gaps below `count`, left to right, with the kept
    # tokens beyond it taken right to left.
    gap = (ids < count) & ~keep
    stray = (ids >= count) & keep
    strays_so_far = stray.cumsum(1)
    wanted = strays_so_far[:, -1:] - (gap.cumsum(1) - 1)
    source = torch.searchsorted(strays_so_far, wanted).clamp(max=width - 1)
    order = torch.where(gap, source, ids)
    # When the tokens at count - 1 and count are both kept, its last step swaps the final gap's
    # old occupant back into the list at count - 1 and reports count + 1 candidates.
    after = keep.gather(1, count.clamp(max=width - 1)) & (count < width)
    overshoot = active & after & keep.gather(1, count - 1)
    last_gap = torch.where(gap, ids, -1).amax(1, keepdim=True)
    order = torch.where(overshoot & (ids == count - 1), last_gap, order)
    order = torch.where(overshoot & (ids == count), count - 1, order)
    listed = ids < count + overshoot.long()
    listed_probs = probs.gather(1, order) * listed
    renormalised = listed_probs * (1.0 / listed_probs.sum(1, keepdim=True))
    listed_probs = torch.where(active, renormalised, listed_probs)
    at = _walk(listed_probs, listed, point)
    return order.gather(1, at).squeeze(1), listed_probs.gather(1, at).squeeze(1)


def sample(
    logits: torch.Tensor, rows: Sequence[Row], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) of any float dtype on any device -> (tokens (B,) int64, probs (B,) float32).

    vocab_size is the tokenizer's: logits from there to V are masked, as exllamav2 does.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits are {tuple(logits.shape)}; expected ({len(rows)}, vocab).")
    batch, width = logits.shape
    device = logits.device
    plans = [_plan(r, width) for r in rows]
    table: list[list[float]] = []
    seen: list[torch.Tensor] = []
    ramps: list[torch.Tensor] = []
    ramp_at = 0
    for plan, spec in zip(plans, rows, strict=True):
        entry = [plan.inverse_temperature, plan.top_k, plan.top_p, plan.min_p, plan.point]
        window = _window(spec)
        if window is None:
            entry += [0, 0, 0, 0]
        else:
            ids, sustain, ramp = window
            entry += [sustain, ramp_at, ramp.numel(), ids.numel()]
            seen.append(ids)
            ramps.append(ramp)
            ramp_at += ramp.numel()
        table.append(entry)
    top_k = [i for i, p in enumerate(plans) if p.kind == "top_k"]
    full = [i for i, p in enumerate(plans) if p.kind == "full"]
    host = [torch.tensor(table, dtype=torch.float32).flatten()]
    host += [torch.tensor(top_k + full, dtype=torch.float32), *seen, *ramps]
    packed = torch.cat(host)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)  # the one host-to-device copy
    params = packed[: batch * _PARAMS].view(batch, _PARAMS)
    cursor = batch * _PARAMS
    top_k_rows = packed[cursor : cursor + len(top_k)].long()
    full_rows = packed[cursor + len(top_k) : cursor + len(top_k) + len(full)].long()
    cursor += len(top_k) + len(full)
    x = logits.to(torch.float32, copy=True)
    visited = sum(ids.numel() for ids in seen)
    if visited:
        _penalise(x, params, packed[cursor : cursor + visited], packed[cursor + visited :])
    if vocab_size < width:
        x[:, vocab_size:] = -math.inf
    top, out_tokens = x.max(dim=1, keepdim=True)  # the first maximum, as softmax_cpu finds it
    exp = torch.exp((x - top) * params[:, 0:1])
    probs = exp * (1.0 / exp.sum(1, keepdim=True))
    greedy = probs.gather(1, out_tokens)
    out_probs = (greedy * (1.0 / greedy)).squeeze(1)  # normalize_cpu over the one candidate
    out_tokens = out_tokens.squeeze(1)
    if top_k:
        k_max = bucket(max(plans[i].top_k for i in top_k), 8)
        use_top_p = any(plans[i].top_p for i in top_k)
        use_min_p = any(plans[i].min_p for i in top_k)
        fn = partial(_top_k_rows, k_max=k_max, use_top_p=use_top_p, use_min_p=use_min_p)
        key = ("top_k", k_max, use_top_p, use_min_p)
        chosen = replay(key, fn, probs[top_k_rows], params[top_k_rows])
        out_tokens.index_copy_(0, top_k_rows, chosen[0])
        out_probs.index_copy_(0, top_k_rows, chosen[1])
    if full:
        if any(plans[i].min_p for i in full):
            chosen = replay(("full",), _full_rows, probs[full_rows], params[full_rows])
        else:
            chosen = _full_rows(probs[full_rows], params[full_rows], use_min_p=False)
        out_tokens.index_copy_(0, full_rows, chosen[0])
        out_probs.index_copy_(0, full_rows, chosen[1])
    return out_tokens, out_probs

"""The EXL2 branch catalogue, a VRAM estimate computed from the model shape, and a picker."""

from __future__ import annotations

import math
from dataclasses import dataclass

from starcoder2.errors import InvalidSetting, UnknownBranch

DEFAULT_REPO = "bartowski/starcoder2-15b-instruct-v0.1-exl2"
PAGE_TOKENS = 256  # exllamav2's cache page: prefixes are cached and reused in whole pages
# StarCoder2 was trained on 16,384 positions, but every layer attends through a 4,096-token sliding
# window and rotary attention depends only on the distance between positions, so no query past
# 16,384 sees a distance it was not trained on. The model card's VRAM table goes to 32k too.
TRAINED_CONTEXT = 16384
MAX_CONTEXT = 32768
MIN_CONTEXT = PAGE_TOKENS
CONTEXT_STEP = PAGE_TOKENS  # a context is whole pages
DEFAULT_CONTEXT = 4096
CACHE_MODES = ("fp16", "q8", "q6", "q4")
DEFAULT_CACHE_MODE = "fp16"
AUTO = "auto"  # the branch value that picks the largest branch that fits the GPU


@dataclass(frozen=True)
class Branch:
    """One quantization branch of the repo, with the VRAM the model card quotes for it at 4k, 16k
    and 32k of context."""

    name: str
    bits: float
    head_bits: int
    card_vram_gb_4k: float
    card_vram_gb_16k: float
    card_vram_gb_32k: float


# The card's 32k figures of 3_5, 4_25 and 5_0 are taken as their 16k figures plus 1.3 GB, the step
# from 16k to 32k in its 6_5 and 8_0 rows.
BRANCHES: dict[str, Branch] = {
    branch.name: branch
    for branch in (
        Branch("3_5", 3.5, 6, 8.1, 9.1, 10.4),
        Branch("4_25", 4.25, 6, 9.5, 10.5, 11.8),
        Branch("5_0", 5.0, 6, 11.0, 12.0, 13.3),
        Branch("6_5", 6.5, 8, 13.9, 14.9, 16.2),
        Branch("8_0", 8.0, 8, 15.8, 16.8, 18.1),
    )
}

# StarCoder2-15B's shape (config.json of bigcode/starcoder2-15b-instruct-v0.1).
LAYERS = 40
HIDDEN = 6144
KV_HEADS = 4
HEAD_DIM = 128
FFN = 24576
VOCAB = 49152

GB = 1e9
# A CUDA context plus PyTorch's allocator bookkeeping, measured at roughly half a gigabyte.
CUDA_CONTEXT_BYTES = 0.5 * GB
# exllamav2 prefills in chunks of at most this many tokens (its default max_input_len).
CHUNK_TOKENS = 2048
# Scratch per chunk token, fp16: the MLP's up and activation rows (2 x FFN) plus about four
# hidden-size rows for the residual, norm output, attention input and attention output.
SCRATCH_BYTES_PER_CHUNK_TOKEN = 2 * (2 * FFN + 4 * HIDDEN)
# Quantized caches store one fp16 scale per 32 elements, and dequantize one layer at a time into
# an fp16 K/V working copy of full length.
Q_CACHE_GROUP = 32
CACHE_BYTES_PER_ELEMENT = {
    "fp16": 2.0,
    "q8": 1.0 + 2 / Q_CACHE_GROUP,
    "q6": 0.75 + 2 / Q_CACHE_GROUP,
    "q4": 0.5 + 2 / Q_CACHE_GROUP,
}
# Headroom when picking a branch: allocator fragmentation and whatever else shares the GPU.
SAFETY_MARGIN_GB = 0.5
SAFETY_MARGIN_FRACTION = 0.05


def get_branch(name: str) -> Branch:
    """Return the catalogue entry for a branch name such as '4_25'."""
    if name not in BRANCHES:
        raise UnknownBranch(
            f"Unknown branch {name!r}; choose one of {', '.join(BRANCHES)} "
            "(bits per weight, e.g. 4_25 is 4.25 bits)."
        )
    return BRANCHES[name]


def validate_context(context_tokens: object) -> int:
    """Return the context size if it is a multiple of 256 from 256 to 32768, else raise."""
    allowed = f"a multiple of {CONTEXT_STEP} between {MIN_CONTEXT:,} and {MAX_CONTEXT:,}"
    value = context_tokens
    if isinstance(value, float) and math.isfinite(value) and float.is_integer(value):
        value = int(value)  # sliders may send 4096.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSetting(f"The context size must be {allowed} (got {context_tokens!r}).")
    if not MIN_CONTEXT <= value <= MAX_CONTEXT or value % CONTEXT_STEP:
        raise InvalidSetting(f"The context size must be {allowed} (got {value:,}).")
    return value


def check_cache_mode(cache_mode: str) -> str:
    """Return the cache mode if the catalogue knows it, else raise InvalidSetting."""
    if cache_mode not in CACHE_MODES:
        raise InvalidSetting(
            f"Unknown cache mode {cache_mode!r}; choose one of {', '.join(CACHE_MODES)}."
        )
    return cache_mode


def check_load_settings(context_tokens: object, cache_mode: str) -> tuple[int, str]:
    """A load's context and cache mode, checked once where a load is asked for."""
    return validate_context(context_tokens), check_cache_mode(cache_mode)


def weight_bytes(branch: str) -> float:
    """Bytes of weights on the GPU: decoder layers at `bits`, lm_head at `head_bits`."""
    spec = get_branch(branch)
    kv_width = KV_HEADS * HEAD_DIM
    linear_params = HIDDEN * HIDDEN * 2 + HIDDEN * kv_width * 2 + HIDDEN * FFN * 2
    # Biases (q, k, v, o, fc, proj) and the two LayerNorms' weight and bias stay fp16.
    fp16_params = HIDDEN * 3 + kv_width * 2 + FFN + HIDDEN * 4
    layers = LAYERS * (linear_params * spec.bits / 8 + fp16_params * 2)
    lm_head = VOCAB * HIDDEN * spec.head_bits / 8
    final_norm = HIDDEN * 2 * 2
    # exllamav2 keeps the fp16 embedding table (VOCAB x HIDDEN, ~0.6 GB) in system RAM, not VRAM.
    return layers + lm_head + final_norm


def cache_bytes_per_token(
    cache_mode: str, layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM
) -> float:
    """Bytes of K/V cache per token for all layers (StarCoder2-15B's shape unless given)."""
    elements = 2 * layers * kv_heads * head_dim  # K and V
    return elements * CACHE_BYTES_PER_ELEMENT[check_cache_mode(cache_mode)]


def estimate_vram_gb(
    branch: str, context_tokens: int, cache_mode: str = DEFAULT_CACHE_MODE
) -> float:
    """Estimated GPU memory (GB = 1e9 bytes) to load a branch with a cache of context_tokens."""
    context_tokens = validate_context(context_tokens)
    cache = context_tokens * cache_bytes_per_token(cache_mode)
    if cache_mode != "fp16":
        cache += context_tokens * 2 * KV_HEADS * HEAD_DIM * 2  # one layer's fp16 working copy
    scratch = min(CHUNK_TOKENS, context_tokens) * SCRATCH_BYTES_PER_CHUNK_TOKEN
    return (weight_bytes(branch) + cache + scratch + CUDA_CONTEXT_BYTES) / GB


def pick_branch(
    free_vram_gb: float, context_tokens: int, cache_mode: str = DEFAULT_CACHE_MODE
) -> str | None:
    """The largest branch whose estimate plus a safety margin fits into free_vram_gb, or None."""
    best = None
    for name in BRANCHES:
        need = estimate_vram_gb(name, context_tokens, cache_mode)
        margin = max(SAFETY_MARGIN_GB, need * SAFETY_MARGIN_FRACTION)
        if need + margin <= free_vram_gb:
            best = name
    return best

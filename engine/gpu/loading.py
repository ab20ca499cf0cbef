"""Loading a model onto the GPU: exllamav2 imported (its extension built on a first start), the
cache sized to the VRAM left, and out-of-memory told apart. The context and cache mode come
checked (starcoder2.branches.check_load_settings, where a load is asked for)."""

from __future__ import annotations

from engine.types import LoadProgress, LoadStep
from starcoder2.branches import GB, PAGE_TOKENS, cache_bytes_per_token
from starcoder2.errors import DoesNotFit

# Kept free after weights and cache: scratch buffers, logits, CUDA context growth.
RESERVE_BYTES = 1_200_000_000


def cache_tokens(
    folder, config, max_seq_len: int, cache_mode: str, jobs: int, free_gb: float
) -> int:
    """Cache tokens: room for `jobs` full contexts, capped by the VRAM left after weights."""
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    per_token = cache_bytes_per_token(
        cache_mode, config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    )
    free = free_gb * GB
    budget = free - weights - RESERVE_BYTES
    fits = int(budget // per_token) // PAGE_TOKENS * PAGE_TOKENS if budget > 0 else 0
    if fits < max_seq_len:
        needed = weights + RESERVE_BYTES + max_seq_len * per_token
        raise DoesNotFit(
            f"The weights ({weights / GB:.1f} GB) and a {max_seq_len:,}-token {cache_mode} "
            f"cache need about {needed / GB:.1f} GB but {free / GB:.1f} GB is free; lower the "
            "context, use a q4 cache or a smaller branch."
        )
    return min(fits, jobs * max_seq_len)


def import_exllamav2(report: LoadProgress) -> None:
    """Import exllamav2, reporting the first start's compile of its extension as it goes."""
    from engine.gpu import toolchain

    # exllamav2 compiles its extension on first import: give it PyPI's nvcc if no toolkit.
    toolchain.ensure_cuda_home()
    build_dir = toolchain.extension_build_dir()
    if not toolchain.extension_needs_build(build_dir):
        import exllamav2  # noqa: F401

        return
    stop = toolchain.watch_extension_build(
        build_dir, lambda done, total: report(LoadStep("compiling", done, total))
    )
    try:
        import exllamav2  # noqa: F401
    finally:
        stop()


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"

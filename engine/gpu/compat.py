"""Fixes for exllamav2 0.3.2 defects that break StarCoder2, one function per defect.

`apply_all()` runs them once, when the engine first imports exllamav2. Nothing here edits
installed files or fakes a `flash_attn` module: each fix replaces attributes of exllamav2 at run
time.

Defects (measured against transformers' Starcoder2ForCausalLM, see tests/engine/test_engine_gpu.py):
1. Configs carry `norm_epsilon`, exllamav2 reads `layer_norm_epsilon`: loading fails.
2. Without flash-attn, exllamav2's SDPA path passes no causal mask on multi-token prefill.
3. StarCoder2's sliding window is never applied (layers get none), the torch path ignores it,
   and exllamav2 passes `window_size=(w, w)`, which admits w + 1 keys; the model attends to exactly
   w keys, itself included.
4. Paged mode (continuous batching) needs flash-attn >= 2.5.7. engine.gpu.attention implements
   the same `flash_attn_with_kvcache` contract in PyTorch so batching works everywhere.
5. A broken xformers (importable, no kernel for the GPU) makes every forward raise.
6. A prompt found in the prefix cache (whole or in part), or prefilled in more than one chunk, is
   never marked prefilled: the job counts only the tokens of its last prefill call. Its prefill then
   runs again at every step for the rest of the reply; once the page holding the token being fed
   looks full, that prefill skips the sequence one position past its last token, and the job stops
   forever (no step includes it again). Look-ahead decode books that token a step early, so it hit
   this at every page boundary.
7. EXL2 MLPs (since exllamav2 0.1.9): the load reorders the up projection's output columns (its
   q_weight and q_scale, `output_map`) into the order of the down projection's sorted input rows,
   so the down projection needs no input permutation, but leaves the up projection's bias in the
   file's order. StarCoder2's c_fc has a bias: every intermediate feature gets another feature's
   bias. (Found by reading linear.py's load and ext_stloader.cpp's tensor_remap; models without an
   MLP bias, which exllamav2 is mostly used with, never show it.)
Not exllamav2's, but in its way: torch's SDPA picks cuDNN by default on Hopper, which builds a plan
for every new shape (tens of ms; decoding makes a new shape each step). Our attention never lets
SDPA choose it (bench/attention_bench.py).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention import sdpa_kernel

from engine.gpu import attention

_applied = False


def apply_all() -> None:
    """Apply every fix once (idempotent). Must run before a model is loaded."""
    global _applied
    if _applied:
        return
    fix_norm_epsilon_key()
    fix_sliding_window_flag()
    fix_unpaged_attention()
    fix_paged_attention()
    ignore_xformers()
    fix_prefill_complete()
    fix_remapped_bias()
    _applied = True


def has_real_flash_attn() -> bool:
    """True when flash-attn >= 2.5.7 (what exllamav2's paged mode was written for) imports."""
    from exllamav2 import attn

    return getattr(attn, "_real_flash_attn_with_kvcache", None) is not None


# 1. norm_epsilon ----


def _patch_starcoder2_arch(change) -> None:
    """Run `change(lm)` on exllamav2's architecture parameters for every Starcoder2 config."""
    from exllamav2.architecture import ExLlamaV2ArchParams

    original = ExLlamaV2ArchParams.__init__

    def __init__(self, arch_string, read_config):
        original(self, arch_string, read_config)
        if arch_string == "Starcoder2ForCausalLM":
            change(self.lm)

    ExLlamaV2ArchParams.__init__ = __init__  # type: ignore[method-assign]  # the fix itself


def fix_norm_epsilon_key() -> None:
    """Let Starcoder2 configs load with `norm_epsilon` (the real key) or `layer_norm_epsilon`."""
    _patch_starcoder2_arch(
        lambda lm: lm.keys.update(norm_eps=["norm_epsilon", "layer_norm_epsilon"])
    )


def fix_sliding_window_flag() -> None:
    """exllamav2 gives layers the config's sliding window only for architectures flagged `swa`."""
    _patch_starcoder2_arch(lambda lm: setattr(lm, "swa", True))


# 2 + 3. the causal mask and the sliding window on the unpaged path ----


def fix_unpaged_attention() -> None:
    """Replace the torch attention of the unpaged path with a causal, windowed, GQA-aware one."""
    from exllamav2.attn import ExLlamaV2Attention

    def _attn_torch(
        self, batch_size, q_len, q_states, k_states, v_states, attn_params, cfg, causal=True
    ):
        # q (B, Q, H, D); k/v (B, K, Hk, D): the cache up to and including this step's tokens.
        window = self.sliding_window or 0
        heads, kv_heads, dim = q_states.shape[2], k_states.shape[2], q_states.shape[3]
        backend = attention.attention_backend(q_states.device, q_states.dtype, heads, kv_heads, dim)
        if backend != "sdpa":
            out = attention.flash_forward(
                q_states, k_states, v_states, None, None, q_len, k_states.shape[1], 0.0, True,
                False, scale=self.scaling, window_size_left=window - 1 if window else None,
            )  # fmt: skip
            return out[0].reshape(batch_size, q_len, heads * dim)
        with sdpa_kernel(attention.SDPA_BACKENDS):
            return _unpaged_sdpa(self, batch_size, q_len, q_states, k_states, v_states, window)

    def _unpaged_sdpa(self, batch_size, q_len, q_states, k_states, v_states, window):
        if q_len == 1:
            if window and k_states.shape[1] > window:
                k_states, v_states = k_states[:, -window:], v_states[:, -window:]
            return attention.dense_decode(q_states, k_states, v_states, self.scaling, None)
        outputs = [
            attention.dense_prefill(
                q_states[b : b + 1], k_states[b : b + 1], v_states[b : b + 1], self.scaling, window
            )
            for b in range(batch_size)
        ]
        return torch.cat(outputs, dim=0)

    ExLlamaV2Attention._attn_torch = _attn_torch  # type: ignore[method-assign]  # the fix itself


# 4. paged attention ----


def _starcoder2_window(flash_fn):
    """exllamav2 passes window_size=(w, w), w + 1 keys; the model sees w, itself included."""

    def call(*args, window_size=None, **kwargs):
        if window_size is not None and window_size[0] > 0:
            window_size = (window_size[0] - 1, window_size[1] - 1)
            kwargs["window_size"] = window_size
        return flash_fn(*args, **kwargs)

    return call


def fix_paged_attention() -> None:
    """Paged mode: flash-attn if installed, else engine.gpu.attention; windows fixed in both."""
    from exllamav2 import attn

    real = (
        getattr(attn, "flash_attn_with_kvcache", None) if attn.has_flash_attn_with_paged else None
    )
    setattr(attn, "_real_flash_attn_with_kvcache", real)  # noqa: B010 (ours, not exllamav2's)
    attn.flash_attn_with_kvcache = _starcoder2_window(real or attention.paged_attention)
    attn.has_flash_attn_with_paged = True
    attn.has_flash_attn_with_window = True


# 5. xformers ----


def ignore_xformers() -> None:
    """Never route attention through xformers: our torch paths are correct (window, mask)."""
    from exllamav2 import attn, model

    attn.has_xformers = False
    model.has_xformers = False


# 6. prefill_complete ----


def fix_prefill_complete() -> None:
    """Mark a sequence prefilled as soon as its cache holds every prompt token but the last."""
    from exllamav2.generator.dynamic import ExLlamaV2DynamicJob

    original = ExLlamaV2DynamicJob.prefill

    @functools.wraps(original)
    def prefill(self, results: list) -> None:
        original(self, results)
        for sequence in self.sequences:
            if sequence.kv_position == len(sequence.sequence_ids) - 1:
                sequence.prefill_complete = True

    ExLlamaV2DynamicJob.prefill = prefill  # type: ignore[method-assign]  # the fix itself


# 7. the up projection's bias after the output remap ----


def fix_remapped_bias() -> None:
    """Reorder a loaded EXL2 layer's bias as the load reordered its output columns: column c
    became the file's column output_map[c] (tensor_remap: new[:, c] = old[:, map[c]])."""
    from exllamav2.linear import ExLlamaV2Linear

    original = ExLlamaV2Linear.load

    @functools.wraps(original)
    def load(self, w=None, device_context=True, unmap=False, output_map=None):
        result = original(self, w, device_context, unmap, output_map)
        tensors = self.q_tensors
        if output_map is not None and isinstance(tensors, dict) and "bias" in tensors:
            bias = tensors["bias"]  # the QMatrix adds this very tensor: reorder it in place
            with torch.inference_mode():  # where the load made it
                bias.copy_(bias[output_map.to(bias.device, torch.long)])
        return result

    ExLlamaV2Linear.load = load  # type: ignore[method-assign, assignment]  # the fix itself

"""The paged attention backends against a plain reference, on random pages (CPU; GPU with -m gpu).

exllamav2 itself needs CUDA, so only the attention math runs here; the fixes' end-to-end effect is
checked against transformers in test_engine_gpu.py.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine.gpu import attention  # noqa: E402

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = [("cpu", backend) for backend in attention.BACKENDS] + [
    pytest.param("cuda", backend, marks=[pytest.mark.gpu, NO_CUDA])
    for backend in attention.BACKENDS
]


def plain_attention(q, k, v, scale, window):
    """Reference: one sequence, fp32, explicit positions. q (Q, H, D), k/v (K, Hk, D)."""
    q_len, heads, _ = q.shape
    k_len, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=1).float()
    v = v.repeat_interleave(heads // kv_heads, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
    keys = torch.arange(k_len, device=q.device)[None, :]
    visible = keys <= pos
    if window:
        visible &= keys > pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def dtype_for(device):
    return torch.half if device == "cuda" else torch.float32


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("q_len", [1, 5, 300])
@pytest.mark.parametrize("window", [0, 40])
def test_paged_attention_writes_new_keys_and_equals_plain_attention(device, backend, q_len, window):
    dtype = dtype_for(device)
    if backend != "sdpa" and not attention._passes_check(
        backend, torch.device(device), dtype, 8, 2, 64
    ):
        chosen = attention.attention_backend(device, dtype, 8, 2, 64)
        pytest.skip(f"{backend!r} does not run here; {chosen!r} serves")
    torch.manual_seed(q_len * 100 + window)
    page, pages, heads, kv_heads, dim = 256, 64, 8, 2, 64
    lengths = [0, 700] if q_len > 1 else [0, 3, 255, 256, 700, 1500]
    batch = len(lengths)
    k_cache = torch.randn(pages, page, kv_heads, dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(pages, device=device)[: batch * 8].view(batch, 8).int()
    seqlens = torch.tensor(lengths, device=device, dtype=torch.int32)
    q = torch.randn(batch, q_len, heads, dim, device=device, dtype=dtype)
    k_new = torch.randn(batch, q_len, kv_heads, dim, device=device, dtype=dtype)
    v_new = torch.randn_like(k_new)
    out = attention.paged_attention(
        q,
        k_cache,
        v_cache,
        k=k_new,
        v=v_new,
        cache_seqlens=seqlens,
        block_table=table,
        softmax_scale=dim**-0.5,
        causal=True,
        window_size=(window - 1, window - 1) if window else (-1, -1),
        backend=backend,
    )
    for b, length in enumerate(lengths):
        flat_k = k_cache[table[b].long()].flatten(0, 1)[: length + q_len]
        flat_v = v_cache[table[b].long()].flatten(0, 1)[: length + q_len]
        assert torch.equal(flat_k[length:], k_new[b]) and torch.equal(flat_v[length:], v_new[b])
        expected = plain_attention(q[b], flat_k, flat_v, dim**-0.5, window)
        error = (out[b].float() - expected).norm() / expected.norm()
        assert error < 2e-3, (b, length, error.item())


def test_the_plan_is_computed_once_per_forward_and_renewed_for_the_next():
    k_cache = torch.randn(4, 256, 1, 8)
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    q = torch.randn(1, 1, 2, 8)
    calls = []
    for seqlens in (torch.tensor([5], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)):
        for _layer in range(3):
            attention.paged_attention(
                q, k_cache, k_cache, None, None, seqlens, table, backend="sdpa"
            )
            calls.append(attention._last_plan[0])
    assert calls[0] is calls[1] is calls[2]
    assert calls[3] is not calls[2] and calls[3] is calls[5]
    assert calls[3].totals.tolist() == [6]


def test_without_a_flash_kernel_the_check_falls_back_to_sdpa():
    assert attention.attention_backend("cpu", torch.float32, 8, 2, 64) == "sdpa"
    assert not attention._passes_check("flash, paged", torch.device("cpu"), torch.float32, 8, 2, 64)


def varlen_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale,
                 window_size_left=None, seqused_k=None, block_table=None, **unused):  # fmt: skip
    """What torch's varlen flash kernel computes, written plainly: out (total_q, H, D) and the
    log-sum-exp (H, total_q); a query with no keys gets zeros and +inf, as the kernel writes."""
    heads = q.shape[1]
    out = torch.zeros_like(q, dtype=torch.float32)
    lse = torch.full((heads, q.shape[0]), float("inf"))
    for b in range(cu_q.shape[0] - 1):
        q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
        used = int(seqused_k[b]) if seqused_k is not None else int(cu_k[b + 1] - cu_k[b])
        if block_table is not None:
            keys, values = (x[block_table[b].long()].flatten(0, 1)[:used] for x in (k, v))
        else:
            keys, values = (
                k[int(cu_k[b]) : int(cu_k[b]) + used],
                v[int(cu_k[b]) : int(cu_k[b]) + used],
            )
        if used == 0:
            continue
        keys = keys.repeat_interleave(heads // k.shape[-2], dim=1).float()
        values = values.repeat_interleave(heads // k.shape[-2], dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), keys) * scale
        pos = torch.arange(used - (q1 - q0), used)[:, None]
        keys_at = torch.arange(used)[None, :]
        visible = keys_at <= pos if causal else torch.ones_like(keys_at <= pos)
        if window_size_left is not None:
            visible &= keys_at >= pos - window_size_left
        scores = scores.masked_fill(~visible, float("-inf"))
        lse[:, q0:q1] = scores.logsumexp(-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out.to(q.dtype), lse


@pytest.mark.parametrize("backend", ["flash, paged", "flash, gathered"])
@pytest.mark.parametrize(("q_len", "window"), [(1, 0), (1, 40), (5, 0), (5, 40)])
def test_flash_backends_pass_the_kernel_the_right_ranges(monkeypatch, backend, q_len, window):
    """The flash paths' index bookkeeping, with the kernel replaced by varlen_flash (CPU)."""
    monkeypatch.setattr(attention, "flash_forward", varlen_flash)
    torch.manual_seed(q_len + window)
    page, pages, heads, kv_heads, dim = 256, 40, 6, 2, 16
    lengths = [0, 1, 39, 300, 700] if q_len == 1 else [0, 300]
    batch = len(lengths)
    k_cache, v_cache = torch.randn(2, pages, page, kv_heads, dim)
    table = torch.randperm(pages)[: batch * 4].view(batch, 4).int()
    q = torch.randn(batch, q_len, heads, dim)
    k_new, v_new = torch.randn(2, batch, q_len, kv_heads, dim)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    size = (window - 1, window - 1) if window else (-1, -1)
    out = attention.paged_attention(
        q, k_cache, v_cache, k_new, v_new, seqlens, table, dim**-0.5, window_size=size,
        backend=backend,
    )  # fmt: skip
    for b, length in enumerate(lengths):
        flat_k = k_cache[table[b].long()].flatten(0, 1)[: length + q_len]
        flat_v = v_cache[table[b].long()].flatten(0, 1)[: length + q_len]
        expected = plain_attention(q[b], flat_k, flat_v, dim**-0.5, window)
        assert torch.allclose(out[b], expected, atol=1e-5), (b, length)

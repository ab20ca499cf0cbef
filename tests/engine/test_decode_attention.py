"""The Triton split-KV decode kernel against plain attention, on random pages.

On the CPU, Triton's interpreter runs the kernel's own code; `pytest -m gpu` runs it compiled on
the GPU with longer sequences and every batch size up to 16.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from engine.gpu import attention  # noqa: E402
from engine.gpu.decode_attention import decode_attention, grid_for  # noqa: E402
from tests.engine.test_compat import plain_attention  # noqa: E402

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAGE = 256


def plain(q, keys, values, scale, window):
    """One query, fp32: q (H, D) over keys/values (K, Hk, D), the last `window` keys (0: all)."""
    return plain_attention(q[None], keys, values, scale, window)[0]


def check(device, dtype, lengths, window, heads=8, kv_heads=2, dim=64, seed=0):
    """Random pages in random order; pages no sequence owns, and rows past each end, are NaN."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    width = max(-(-n // PAGE) for n in lengths)
    pages = batch * width + 3
    k_cache = torch.full((pages, PAGE, kv_heads, dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    table = torch.randperm(pages, generator=generator)[: batch * width].view(batch, width)
    for b, n in enumerate(lengths):
        rows = k_cache[table[b]].flatten(0, 1)
        rows[:n] = torch.randn(n, kv_heads, dim, generator=generator).to(dtype)
        k_cache[table[b]] = rows.view(width, PAGE, kv_heads, dim)
        rows = v_cache[table[b]].flatten(0, 1)
        rows[:n] = torch.randn(n, kv_heads, dim, generator=generator).to(dtype)
        v_cache[table[b]] = rows.view(width, PAGE, kv_heads, dim)
    q = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    k_cache, v_cache, q = k_cache.to(device), v_cache.to(device), q.to(device)
    table = table.to(device=device, dtype=torch.int32)
    totals = torch.tensor(lengths, dtype=torch.int32, device=device)
    scale = dim**-0.5
    out = decode_attention(q, k_cache, v_cache, table, totals, scale, window)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any()
    for b, n in enumerate(lengths):
        keys = k_cache[table[b].long()].flatten(0, 1)[:n]
        values = v_cache[table[b].long()].flatten(0, 1)[:n]
        expected = plain(q[b], keys, values, scale, window)
        error = (out[b].float() - expected).norm() / expected.norm()
        assert error < 2e-3, (b, n, window, error.item())


@pytest.mark.parametrize("window", [0, 255, 256, 257])
def test_kernel_equals_plain_attention_at_page_edges(window):
    check("cpu", torch.float16, [1, 255, 256, 257, 513], window)


def test_kernel_equals_plain_attention_past_four_thousand_keys():
    check("cpu", torch.float16, [4095, 4097], 4096, heads=4, kv_heads=1, dim=32)
    check("cpu", torch.float16, [4096], 0, heads=4, kv_heads=1, dim=32)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(12, 1, 128), (6, 6, 32), (48, 4, 16)])
def test_kernel_packs_any_group_of_query_heads_per_key_value_head(heads, kv_heads, dim):
    check("cpu", torch.float16, [70, 300], 48, heads=heads, kv_heads=kv_heads, dim=dim)


def test_a_split_with_no_keys_idles_and_the_merge_ignores_it():
    # 16 splits for a one-tile sequence: fifteen find nothing.
    assert grid_for(1, 1, 16 * PAGE, 8)[0] == 16
    check("cpu", torch.float16, [3], 0, heads=2, kv_heads=1, dim=16)


def test_the_grid_depends_on_the_table_not_on_the_lengths():
    assert grid_for(4, 4, 64 * PAGE, 132) == (17, 16)  # 272 programs; 17 * 16 >= 256 tiles
    assert grid_for(16, 4, 64 * PAGE, 132) == (5, 52)
    assert grid_for(1, 4, PAGE, 132) == (4, 1)  # never more splits than tiles


def test_paged_attention_appends_then_runs_the_kernel_for_one_token_steps():
    torch.manual_seed(3)
    kv_heads, heads, dim = 2, 8, 32
    k_cache = torch.randn(8, PAGE, kv_heads, dim).half()
    v_cache = torch.randn_like(k_cache)
    table = torch.tensor([[5, 2], [0, 7]], dtype=torch.int32)
    seqlens = torch.tensor([256, 40], dtype=torch.int32)
    q = torch.randn(2, 1, heads, dim).half()
    k_new, v_new = torch.randn(2, 1, kv_heads, dim).half(), torch.randn(2, 1, kv_heads, dim).half()
    args = (q, k_cache, v_cache, k_new, v_new, seqlens, table, dim**-0.5)
    out = attention.paged_attention(*args, window_size=(99, 99), backend=attention.DECODE_KERNEL)
    assert torch.equal(k_cache[2, 0], k_new[0, 0]) and torch.equal(v_cache[0, 40], v_new[1, 0])
    for b, n in enumerate((257, 41)):
        keys = k_cache[table[b].long()].flatten(0, 1)[:n]
        values = v_cache[table[b].long()].flatten(0, 1)[:n]
        expected = plain(q[b, 0], keys, values, dim**-0.5, 100)
        assert (out[b, 0].float() - expected).norm() / expected.norm() < 2e-3


def test_without_a_gpu_one_token_steps_use_the_checked_backend():
    assert attention.decode_backend("cpu", torch.float32, 8, 2, 64) == "sdpa"


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("window", [0, 4096])
def test_on_the_gpu_the_kernel_equals_plain_attention_at_page_and_window_edges(batch, window):
    edges = [1, 255, 256, 257, 4095, 4096, 4097, 9000]
    lengths = [edges[(i * 3) % len(edges)] for i in range(batch)]
    check("cuda", torch.float16, lengths, window, heads=48, kv_heads=4, dim=128, seed=batch)


@pytest.mark.gpu
@NO_CUDA
def test_on_the_gpu_the_kernel_passes_the_start_up_check():
    assert attention.decode_backend("cuda", torch.half, 48, 4, 128) == attention.DECODE_KERNEL


@pytest.mark.parametrize(
    ("pages", "for_graphs", "expected"),
    [(8, False, "sdpa"), (9, False, attention.DECODE_KERNEL), (8, True, attention.DECODE_KERNEL)],
)
def test_eager_steps_over_few_keys_take_the_prefill_backend_but_graph_steps_never(
    monkeypatch, pages, for_graphs, expected
):
    attention.attention_backend("cpu", torch.float32, 8, 2, 32)  # its check runs once, first
    chosen = []
    monkeypatch.setattr(attention, "decode_backend", lambda *args: attention.DECODE_KERNEL)
    monkeypatch.setattr(attention, "_attend", lambda backend, *args: chosen.append(backend))
    q = torch.zeros(1, 1, 8, 32)
    cache = torch.zeros(pages, PAGE, 2, 32)
    table = torch.arange(pages, dtype=torch.int32)[None]
    seqlens = torch.tensor([5], dtype=torch.int32)
    if for_graphs:
        with attention.graph_steps():
            attention.paged_attention(q, cache, cache, None, None, seqlens, table, 1.0)
    else:
        attention.paged_attention(q, cache, cache, None, None, seqlens, table, 1.0)
    assert attention.EAGER_KERNEL_MIN_KEYS == 8 * PAGE and chosen == [expected]
    assert not attention._for_graphs[0]

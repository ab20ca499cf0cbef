"""Graph-cached kernel groups: rows padded to a power of two, results trimmed back (CPU path)."""

import pytest

torch = pytest.importorskip("torch")

from engine.gpu.graph_cache import bucket, replay  # noqa: E402


def test_rows_round_up_to_a_power_of_two_and_never_below_the_smallest():
    assert [bucket(n, 1) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(3, 8) == 8 and bucket(20, 8) == 32


def test_replay_pads_the_rows_with_copies_of_the_first_and_trims_the_results():
    seen = []

    def double(x, y):
        seen.append(x.shape[0])
        return (x * 2, y + x)

    x = torch.arange(3.0)[:, None]
    y = torch.ones(3, 1)
    doubled, summed = replay(("test",), double, x, y)
    assert seen == [4]  # 3 rows padded to 4
    assert torch.equal(doubled, x * 2) and torch.equal(summed, y + x)

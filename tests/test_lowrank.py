"""SVD compression: Eckart–Young, rank selection, capping."""

from __future__ import annotations

import pytest
import torch

from cdtool.delta.lowrank import factors_are_larger, rank_for_energy, rank_for_fro, truncate


def _matrix(seed=0, out=40, inp=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("k", [1, 3, 10, 24])
def test_error_equals_discarded_singular_values(k):
    m = _matrix()
    t = truncate(m, rank=k)
    s = torch.linalg.svdvals(m.double())
    err = torch.linalg.norm(m.double() - t.up.double() @ t.down.double())
    assert abs(float(err) - float(s[k:].pow(2).sum().sqrt())) < 1e-4
    assert t.rank == k and t.up.shape == (40, k) and t.down.shape == (k, 24)


def test_rank_above_size_is_capped():
    t = truncate(_matrix(), rank=100)
    assert t.rank == 24 and t.capped
    assert torch.allclose(t.up @ t.down, _matrix(), atol=1e-5)


def test_energy_one_reproduces_input():
    m = _matrix(1)
    t = truncate(m, energy=1.0)
    assert t.rank == 24 and torch.allclose(t.up @ t.down, m, atol=1e-5)


def test_share_selection_is_the_smallest_rank_reaching_it():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert rank_for_energy(s, 0.6) == 2  # 0.4, 0.7 -> the official off-by-one would keep 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 0.71) == 3
    assert rank_for_fro(s, (16 / 30) ** 0.5) == 1
    m = _matrix(2)
    t = truncate(m, fro=0.9)
    assert t.fro >= 0.9
    assert truncate(m, rank=t.rank - 1).fro < 0.9


def test_compressing_a_compressed_matrix():
    m = _matrix(3)
    t = truncate(m, rank=8)
    again = truncate(t.up @ t.down, rank=8)
    assert torch.allclose(again.up @ again.down, t.up @ t.down, atol=1e-4)
    assert abs(again.fro - 1.0) < 1e-6


def test_randomized_matches_exact_on_low_rank_input():
    g = torch.Generator().manual_seed(4)
    low = torch.randn(64, 5, generator=g) @ torch.randn(5, 48, generator=g)
    t = truncate(low, rank=5, method="randomized")
    assert torch.allclose(t.up @ t.down, low, atol=1e-3)


def test_factors_are_larger_from_the_break_even_rank():
    # a 320x768 layer holds 245760 numbers; rank-k factors hold k * 1088: break-even at k = 225.88
    assert [factors_are_larger((320, 768), k) for k in (1, 225, 226, 320)] == [False, False, True, True]
    assert factors_are_larger((32, 32), 16) and not factors_are_larger((32, 32), 15)

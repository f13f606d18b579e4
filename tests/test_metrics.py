"""The scoring mathematics against direct computations."""

from __future__ import annotations

import itertools

import torch

from cdtool.scoring.metrics import (
    clip_score,
    kid,
    mean_cosine_per_row,
    mmd2_unbiased,
    pairwise_mean_cosine,
    strip_tokens,
)


def test_strip_tokens():
    assert strip_tokens("a <new1> cat on the beach") == "a cat on the beach"
    assert strip_tokens("<new1> cat and a <new2> dog") == "cat and a dog"
    assert strip_tokens("plain prompt") == "plain prompt"


def test_clip_i_of_a_set_with_itself():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 16, generator=g, dtype=torch.float64)
    direct = []
    for i, j in itertools.product(range(7), range(7)):
        direct.append(float(torch.dot(a[i], a[j]) / (a[i].norm() * a[j].norm())))
    assert abs(pairwise_mean_cosine(a, a) - sum(direct) / len(direct)) < 1e-9
    per_row = mean_cosine_per_row(a, a)
    assert abs(float(per_row[2]) - sum(direct[14:21]) / 7) < 1e-9  # row 2's cosines with all 7
    assert abs(float(per_row.mean()) - pairwise_mean_cosine(a, a)) < 1e-12
    assert torch.allclose(clip_score(torch.tensor([-0.2, 0.3])), torch.tensor([0.0, 0.75]))


def test_mmd_against_direct_loops():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 5 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert abs(mmd2_unbiased(x, y) - (xx + yy - 2 * xy)) < 1e-9


def test_kid_is_zero_in_expectation_and_positive_for_shifted():
    g = torch.Generator().manual_seed(2)
    same = [
        kid(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g), subsets=20, subset_size=100, seed=s)[0]
        for s in range(5)
    ]
    shifted = kid(
        torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 1.0, subsets=20, subset_size=100
    )[0]
    assert abs(sum(same) / len(same)) < 0.01
    assert shifted > 0.1
    # a full-size single subset equals the direct estimate
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    assert abs(kid(x, y, subsets=1, subset_size=30)[0] - mmd2_unbiased(x, y)) < 1e-12

"""The mathematics of the least-squares merge, on random matrices."""

from __future__ import annotations

import itertools

import pytest
import torch

from cdtool.merge.gram_norms import sizes_on
from cdtool.merge.least_squares import (
    gram_factor,
    least_squares_merge,
    mean_gram,
    own_errors,
    prepare_lsq,
    solve_lsq_layer,
)


def _problem(seed: int, concepts: int = 2, out: int = 20, dim: int = 16, rows: int = 10, n_reg: int = 300):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, dim, generator=g, dtype=torch.float64)
    ws = [w0 + 0.3 * torch.randn(out, dim, generator=g, dtype=torch.float64) for _ in range(concepts)]
    xs = [torch.randn(rows, dim, generator=g, dtype=torch.float64) for _ in range(concepts)]
    reg = torch.randn(n_reg, dim, generator=g, dtype=torch.float64)
    return w0, ws, xs, reg


@pytest.mark.parametrize(("alphas", "lam"), [((1.0, 1.0), 0.1), ((2.0, 0.5), 1.0), ((1.0, 3.0, 0.2), 0.01)])
def test_normal_equations_hold(alphas, lam):
    w0, ws, xs, reg = _problem(len(alphas), concepts=len(alphas))
    w = least_squares_merge(w0, ws, xs, reg, alphas, lam)
    h = sum(a * mean_gram(x) for a, x in zip(alphas, xs, strict=True)) + lam * mean_gram(reg)
    rhs = sum(a * wi @ mean_gram(x) for a, wi, x in zip(alphas, ws, xs, strict=True)) + lam * w0 @ mean_gram(reg)
    assert torch.linalg.norm(w @ h - rhs) / torch.linalg.norm(rhs) < 1e-10


def test_equals_a_direct_dense_least_squares_solve():
    alphas, lam = (1.5, 0.7), 0.2
    w0, ws, xs, reg = _problem(7)
    blocks_a, blocks_b = [], []
    for a, wi, x in zip(alphas, ws, xs, strict=True):
        s = (a / x.shape[0]) ** 0.5
        blocks_a.append(s * x)
        blocks_b.append(s * x @ wi.T)
    s = (lam / reg.shape[0]) ** 0.5
    blocks_a.append(s * reg)
    blocks_b.append(s * reg @ w0.T)
    direct = torch.linalg.lstsq(torch.cat(blocks_a), torch.cat(blocks_b)).solution.T
    w = least_squares_merge(w0, ws, xs, reg, alphas, lam)
    assert torch.allclose(w, direct, atol=1e-9)


def test_optimal_against_perturbations():
    alphas, lam = (1.0, 1.0), 0.1
    w0, ws, xs, reg = _problem(3)
    w = least_squares_merge(w0, ws, xs, reg, alphas, lam)

    def objective(x: torch.Tensor) -> float:
        terms = [
            a * torch.linalg.norm((x - wi) @ xi.T) ** 2 / xi.shape[0] for a, wi, xi in zip(alphas, ws, xs, strict=False)
        ]
        return float(sum(terms) + lam * torch.linalg.norm((x - w0) @ reg.T) ** 2 / reg.shape[0])

    g = torch.Generator().manual_seed(11)
    best = objective(w)
    for _ in range(20):
        p = 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        assert objective(w + p) > best


def test_one_concept_without_base_weight_reproduces_it_on_its_rows():
    # 10 rows in 16 dimensions: W is only determined on the rows' span, and there it must be W_1
    w0, ws, xs, reg = _problem(4, concepts=1)
    w = least_squares_merge(w0, ws, xs, reg, (1.0,), 0.0)
    err = torch.linalg.norm((w - ws[0]) @ xs[0].T) / torch.linalg.norm(ws[0] @ xs[0].T)
    assert err < 1e-6
    # off the span it is not W_1 (the fit says nothing there)
    assert torch.linalg.norm(w - ws[0]) / torch.linalg.norm(ws[0]) > 1e-3


def test_growing_base_weight_returns_the_base():
    w0, ws, xs, reg = _problem(5)
    dists = [
        float(torch.linalg.norm(least_squares_merge(w0, ws, xs, reg, (1.0, 1.0), lam) - w0))
        for lam in (1e-2, 1.0, 1e2, 1e4, 1e6)
    ]
    assert all(b < a for a, b in itertools.pairwise(dists))
    assert dists[-1] / float(torch.linalg.norm(ws[0] - w0)) < 1e-5


def test_identical_concepts_merge_to_that_concept():
    w0, ws, xs, reg = _problem(6, concepts=1)
    w = least_squares_merge(w0, [ws[0], ws[0]], [xs[0], xs[0]], reg, (1.0, 1.0), 0.0)
    assert torch.linalg.norm((w - ws[0]) @ xs[0].T) / torch.linalg.norm(ws[0] @ xs[0].T) < 1e-6


def test_layer_solve_and_report_agree_with_the_objective():
    alphas, lam = (1.0, 2.0), 0.5
    w0, ws, xs, reg = _problem(8)
    system = prepare_lsq([gram_factor(x) for x in xs], alphas, mean_gram(reg), lam)
    deltas = [wi - w0 for wi in ws]
    dw = solve_lsq_layer(system, deltas)
    assert torch.allclose(w0 + dw, least_squares_merge(w0, ws, xs, reg, alphas, lam), atol=1e-10)
    for err, wi, x in zip(own_errors(system, w0, dw, deltas), ws, xs, strict=True):
        direct = torch.linalg.norm((w0 + dw - wi) @ x.T) / torch.linalg.norm(wi @ x.T)
        assert err == pytest.approx(float(direct), rel=1e-9)
    # the drift the merge reports, sized on G_reg in float32
    merged, base = sizes_on(system.reg_gram, [dw, w0])
    drift = torch.linalg.norm(dw @ reg.T) / torch.linalg.norm(w0 @ reg.T)
    assert merged / base == pytest.approx(float(drift), rel=1e-5)


@pytest.mark.parametrize("rows", [5, 16, 40])
def test_gram_factor_reproduces_the_mean_gram_matrix(rows):
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    f = gram_factor(x)
    assert f.shape[0] <= min(rows, 16)
    assert torch.allclose(f.T @ f, mean_gram(x), atol=1e-12)


def test_an_input_that_leaves_a_layer_pulls_it_toward_the_base():
    w0, ws, xs, reg = _problem(9)
    system = prepare_lsq([gram_factor(x) for x in xs], (1.0, 1.0), mean_gram(reg), 0.1)
    both = solve_lsq_layer(system, [ws[0] - w0, ws[1] - w0])
    one = solve_lsq_layer(system, [ws[0] - w0, None])
    direct = least_squares_merge(w0, [ws[0], w0], xs, reg, (1.0, 1.0), 0.1) - w0
    assert torch.allclose(one, direct, atol=1e-10)
    assert not torch.allclose(one, both)


def test_bad_weights_are_refused():
    _w0, _ws, xs, reg = _problem(10)
    with pytest.raises(ValueError, match="negative"):
        prepare_lsq([gram_factor(x) for x in xs], (1.0, -1.0), mean_gram(reg), 0.1)
    with pytest.raises(ValueError, match="2 Gram factors for 1 weights"):
        prepare_lsq([gram_factor(x) for x in xs], (1.0,), mean_gram(reg), 0.1)

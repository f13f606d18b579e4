"""The mathematics of the closed-form merge, on random matrices."""

from __future__ import annotations

import pytest
import torch

from cdtool.merge.closed_form import closed_form, coefficients, constraint_residual, drift_squared, prepare, solve_layer
from cdtool.merge.gram_norms import sizes_on


def _problem(seed: int, out: int = 24, dim: int = 16, n_reg: int = 200, m: int = 6):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, dim, generator=g, dtype=torch.float64)
    reg = torch.randn(n_reg, dim, generator=g, dtype=torch.float64)
    c = torch.randn(m, dim, generator=g, dtype=torch.float64)
    v = torch.randn(m, out, generator=g, dtype=torch.float64)
    return w0, reg, c, v


@pytest.mark.parametrize("concepts", [2, 3, 10])
def test_constraints_hold(concepts):
    # each concept contributes 6 target rows, as the merge command builds them
    w0, reg, c, v = _problem(concepts, out=40, dim=96, n_reg=600, m=6 * concepts)
    w = closed_form(w0, reg, c, v)
    residual = torch.linalg.norm(w @ c.T - v.T) / torch.linalg.norm(v)
    assert residual < 1e-5


def test_optimal_against_feasible_perturbations():
    w0, reg, c, v = _problem(1)
    w = closed_form(w0, reg, c, v)

    def objective(x):
        return torch.linalg.norm((x - w0) @ reg.T)

    # Any other feasible W differs by P with P Cᵀ = 0: rows of P in the null space of C.
    q, _ = torch.linalg.qr(c.T, mode="complete")
    null = q[:, c.shape[0] :]  # [dim, dim - m], orthogonal to the rows of C
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        p = torch.randn(w.shape[0], null.shape[1], generator=g, dtype=torch.float64) @ null.T
        p *= 10 ** float(torch.empty(1).uniform_(-3, 0, generator=g))
        other = w + p
        assert torch.linalg.norm(other @ c.T - v.T) / torch.linalg.norm(v) < 1e-6  # still feasible
        assert objective(other) >= objective(w) - 1e-9


def test_equals_direct_formula():
    w0, reg, c, v = _problem(2)
    a = reg.T @ reg
    d = c @ torch.linalg.inv(a)
    direct = w0 + (v.T - w0 @ c.T) @ torch.linalg.inv(d @ c.T) @ d
    assert torch.allclose(closed_form(w0, reg, c, v), direct, atol=1e-8)


def test_one_concept_reproduces_its_target_rows():
    w0, reg, c, _ = _problem(3, m=3)
    g = torch.Generator().manual_seed(9)
    w1 = w0 + 0.1 * torch.randn(w0.shape, generator=g, dtype=torch.float64)  # the concept's own weights
    w = closed_form(w0, reg, c, (w1 @ c.T).T)
    assert torch.allclose(w @ c.T, w1 @ c.T, atol=1e-8)


def test_duplicate_rows_are_removed_and_reported():
    w0, reg, c, v = _problem(4, m=3)
    c2 = torch.cat([c, c[:1]])
    v2 = torch.cat([v, v[:1]])
    system = prepare(reg.T @ reg, c2)
    assert system.kept_rows == [0, 1, 2] and system.ridge_targets == 0.0
    w = solve_layer(system, w0, v2)
    assert torch.allclose(w, closed_form(w0, reg, c, v), atol=1e-10)
    assert constraint_residual(system, w, v2) < 1e-8


@pytest.mark.parametrize("ridge", [False, True])
def test_drift_from_the_coefficients_equals_the_direct_one(ridge):
    # the merge reports tr(ΔW A ΔWᵀ) from X [m, out] alone (ΔW = Xᵀ d); with or without a ridge on A
    w0, reg, c, v = _problem(12, m=4)
    reg = reg[:10] if ridge else reg  # 10 rows in 16 dimensions: A needs a ridge
    system = prepare(reg.T @ reg, c)
    assert (system.ridge_gram > 0) == ridge
    x = coefficients(system, w0, v)
    dw = solve_layer(system, w0, v) - w0
    direct = torch.linalg.norm(dw @ reg.T) ** 2
    assert drift_squared(system, x) == pytest.approx(float(direct), rel=1e-9)
    # and the float32 sizes the merge divides it by
    (base,) = sizes_on(system.gram, [w0])
    assert base == pytest.approx(float(torch.linalg.norm(w0 @ reg.T)), rel=1e-5)


def test_rank_deficient_regularisation_uses_a_reported_ridge():
    w0, _, c, v = _problem(6, m=2)
    reg = torch.randn(5, 16, dtype=torch.float64)  # 5 rows in 16 dimensions: A is singular
    system = prepare(reg.T @ reg, c)
    assert system.ridge_gram > 0
    w = solve_layer(system, w0, v)
    assert torch.linalg.norm(w @ c.T - v.T) / torch.linalg.norm(v) < 1e-5


def test_features_in_a_subspace_give_no_huge_weights():
    # LayerNorm outputs with zero bias all sum to zero: C_regᵀ C_reg is singular along the ones
    # vector, up to float32 noise. The update must not blow up along that direction.
    g = torch.Generator().manual_seed(7)

    def centred(n):
        x = torch.randn(n, 16, generator=g)
        return (x - x.mean(1, keepdim=True)).double()

    reg, c = centred(300), centred(3)
    w0 = torch.randn(8, 16, generator=g, dtype=torch.float64)
    w1 = w0 + 0.1 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    system = prepare(reg.T @ reg, c)
    assert system.ridge_gram > 0
    w = solve_layer(system, w0, (w1 @ c.T).T)
    assert torch.linalg.norm(w @ c.T - w1 @ c.T) / torch.linalg.norm(w1 @ c.T) < 1e-5
    assert torch.linalg.norm(w - w0) < 10 * torch.linalg.norm(w1 - w0)

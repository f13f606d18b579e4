"""The closed-form multi-concept merge of Custom Diffusion (Kumari et al. 2023, Sec. 3.2).

For each key/value weight W0 [out, in]: minimise ||(W - W0) C_regᵀ||_F subject to W Cᵀ = Vᵀ, where
C_reg [N, in] are text features of regularisation captions, C [m, in] the concepts' target
features and V [m, out] the outputs each concept's own fine-tuned weights give on them. With
A = C_regᵀ C_reg and d = C A⁻¹ the solution is W = W0 + (Vᵀ - W0 Cᵀ)(d Cᵀ)⁻¹ d.

A, d and d Cᵀ do not depend on the layer, so they are factorised once (in float64, by Cholesky;
never an explicit inverse) and every layer costs two small matrix products and one triangular solve.
The update is ΔW = Xᵀ d with X [m, out] the layer's coefficients, so its drift on the
regularisation features, tr(ΔW A ΔWᵀ) = tr(Xᵀ (d A dᵀ) X), needs only the small d A dᵀ [m, m]: the
per-layer [out, in] x [in, in] product a direct computation costs is left to the layer's base size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Largest condition numbers accepted without a ridge. Features come from float32 encoders (about
# 7 significant digits), so directions of C_regᵀ C_reg weaker than 1e-8 of the strongest are noise:
# solving along them would put huge, meaningless weights into ΔW (e.g. the direction every
# LayerNorm output is orthogonal to). d Cᵀ is allowed more before its constraints are relaxed.
MAX_COND_GRAM = 1e8
MAX_COND_TARGETS = 1e12


@dataclass
class MergeSystem:
    """The layer-independent part of the solution."""

    gram: torch.Tensor  # A = C_regᵀ C_reg [in, in], float64
    targets: torch.Tensor  # C [m, in], float64, duplicates removed
    d: torch.Tensor  # C A⁻¹ [m, in]
    m_chol: torch.Tensor  # Cholesky factor of d Cᵀ [m, m]
    ridge_gram: float  # ridge added to A (relative to its largest eigenvalue); 0 when none was needed
    ridge_targets: float  # likewise for d Cᵀ
    kept_rows: list[int]  # indices of the rows of the original C that were kept
    drift_form: torch.Tensor  # d A dᵀ [m, m]: tr(Xᵀ (d A dᵀ) X) is the drift² of ΔW = Xᵀ d


def cholesky_with_ridge(mat: torch.Tensor, max_cond: float) -> tuple[torch.Tensor, float]:
    """Cholesky factor of `mat`, with a ridge (relative to its largest eigenvalue) added only when
    its condition number exceeds `max_cond`; returns the relative ridge used (0 if none)."""
    eig = torch.linalg.eigvalsh(mat)
    top = float(eig[-1])
    if top <= 0:
        raise ValueError("the system is zero")
    ridge = 0.0
    if float(eig[0]) < top / max_cond:
        ridge = 1.0 / max_cond
    eye = torch.eye(mat.shape[0], dtype=mat.dtype)
    chol, info = torch.linalg.cholesky_ex(mat + ridge * top * eye)
    if int(info) != 0:
        raise ValueError("the system is not positive definite")
    return chol, ridge


def unique_rows(c: torch.Tensor) -> list[int]:
    """Indices of the first occurrence of each distinct row (identical rows are removed, as the
    official code does: they would make d Cᵀ singular)."""
    kept: list[int] = []
    for i in range(c.shape[0]):
        if not any(torch.equal(c[i], c[j]) for j in kept):
            kept.append(i)
    return kept


def prepare(reg_gram: torch.Tensor, targets: torch.Tensor) -> MergeSystem:
    """Factorise A = C_regᵀ C_reg and d Cᵀ once for all layers."""
    a = reg_gram.double()
    kept = unique_rows(targets)
    c = targets[kept].double()
    a_chol, ridge_a = cholesky_with_ridge(a, MAX_COND_GRAM)
    d = torch.cholesky_solve(c.T, a_chol).T  # (A⁻¹ Cᵀ)ᵀ = C A⁻¹, A symmetric
    m = d @ c.T
    m = (m + m.T) / 2
    m_chol, ridge_m = cholesky_with_ridge(m, MAX_COND_TARGETS)
    drift_form = d @ a @ d.T
    return MergeSystem(a, c, d, m_chol, ridge_a, ridge_m, kept, (drift_form + drift_form.T) / 2)


def coefficients(system: MergeSystem, w0: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """X [m, out] with the layer's update ΔW = Xᵀ d; `values` [m_original, out] are the concepts'
    outputs on the original (not de-duplicated) target rows."""
    v = values[system.kept_rows].double()
    e = v.T - w0.double() @ system.targets.T  # [out, m]
    return torch.cholesky_solve(e.T, system.m_chol)  # (d Cᵀ)⁻¹ Eᵀ


def solve_layer(system: MergeSystem, w0: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The merged weight W for one layer (see `coefficients` for `values`)."""
    return w0.double() + coefficients(system, w0, values).T @ system.d


def drift_squared(system: MergeSystem, x: torch.Tensor) -> float:
    """tr(ΔW A ΔWᵀ) of the update ΔW = Xᵀ d, from the [m, m] form alone."""
    xd = x.double()
    return float(torch.einsum("ko,kl,lo->", xd, system.drift_form, xd).clamp_min(0))


def closed_form(
    w0: torch.Tensor, reg_features: torch.Tensor, targets: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """One-layer convenience: W from W0, C_reg [N, in], C [m, in] and V [m, out]."""
    reg = reg_features.double()
    return solve_layer(prepare(reg.T @ reg, targets), w0, values)


def constraint_residual(system: MergeSystem, w: torch.Tensor, values: torch.Tensor) -> float:
    """||W Cᵀ - Vᵀ||_F / ||Vᵀ||_F over the kept target rows."""
    v = values[system.kept_rows].double()
    res = torch.linalg.norm(w.double() @ system.targets.T - v.T) / torch.linalg.norm(v).clamp_min(1e-30)
    return float(res)

"""A least-squares multi-concept merge of key/value weights: cdtool's own, beside the paper's.

The paper's closed form (closed_form.py) holds each concept's outputs *exactly* on the rows of two
target prompts and keeps everything else near the base. Where a concept also lives in other rows
(padding after end-of-text, the token in other contexts), holding only those rows loses it. This
merge asks instead for a weighted least-squares fit over every row the UNet sees:

    minimise  Σ_i α_i ||(W - W_i) X_iᵀ||² / n_i  +  λ ||(W - W0) X_regᵀ||² / n_reg

with X_i [n_i, in] all rows of concept i's prompts (its recorded training captions and the paper's
target prompts, padded as the pipeline pads them), X_reg those of the regularisation captions, and
W_i = W0 + ΔW_i the concept's own weights. With the mean Gram matrices G_i = X_iᵀ X_i / n_i and
G_reg, the normal equations are W H = Σ_i α_i W_i G_i + λ W0 G_reg, H = Σ_i α_i G_i + λ G_reg, so

    ΔW = W - W0 = (Σ_i α_i ΔW_i G_i) H⁻¹.

This is RegMean (Jin et al. 2023) with the base model as one more "model" to agree with; Mix-of-Show's
gradient fusion (Gu et al. 2023) solves a similar problem iteratively. The paper's closed form is the
limit where the target rows' weights grow without bound.

H does not depend on the layer (every key/value projection reads the same text features), so it is
factorised once (float64 Cholesky). Each G_i is kept as a factor F_i [r_i, in] with F_iᵀ F_i = G_i
(its rows scaled, r_i ≤ min(n_i, in)), and Q_i = α_i F_i H⁻¹ is solved once too; a layer then costs
ΔW = Σ_i (ΔW_i F_iᵀ) Q_i, two [out, in] x [in, r_i] products per input instead of a solve with H.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cdtool.merge.closed_form import MAX_COND_GRAM, cholesky_with_ridge


@dataclass
class LsqSystem:
    """The layer-independent part: each input's Gram factor and its solved weight, and G_reg."""

    factors: list[torch.Tensor]  # F_i [r_i, in], F_iᵀ F_i = G_i, float64, per input
    solved: list[torch.Tensor]  # Q_i = α_i F_i H⁻¹ [r_i, in], H = Σ α_i G_i + λ G_reg
    reg_gram: torch.Tensor  # G_reg [in, in], float64 (unweighted)
    ridge: float  # relative ridge added to H (0 when none was needed)


def gram_factor(rows: torch.Tensor) -> torch.Tensor:
    """F (float64) with Fᵀ F = Xᵀ X / n for rows X [n, in]: the rows scaled when n ≤ in, else the
    eigenvectors of the mean Gram matrix scaled by the roots of its positive eigenvalues."""
    x = rows.double()
    if x.shape[0] <= x.shape[1]:
        return x / max(1, x.shape[0]) ** 0.5
    eig, vec = torch.linalg.eigh(mean_gram(x))
    keep = eig > eig[-1].clamp_min(0) * 1e-15
    return (vec[:, keep] * eig[keep].sqrt()).T


def prepare_lsq(
    factors: Sequence[torch.Tensor], weights: Sequence[float], reg_gram: torch.Tensor, base_weight: float
) -> LsqSystem:
    """H = Σ α_i F_iᵀ F_i + λ G_reg, factorised once, and each input's α_i F_i H⁻¹."""
    if len(factors) != len(weights):
        raise ValueError(f"{len(factors)} Gram factors for {len(weights)} weights")
    if any(w < 0 for w in weights) or base_weight < 0:
        raise ValueError("weights must not be negative")
    fs = [f.double() for f in factors]
    reg = reg_gram.double()
    h = float(base_weight) * reg
    for w, f in zip(weights, fs, strict=True):
        h = h + float(w) * (f.T @ f)
    chol, ridge = cholesky_with_ridge((h + h.T) / 2, MAX_COND_GRAM)
    # Q_i = α_i F_i H⁻¹  <=>  H Q_iᵀ = α_i F_iᵀ (H symmetric)
    solved = [torch.cholesky_solve(float(w) * f.T, chol).T for w, f in zip(weights, fs, strict=True)]
    return LsqSystem(fs, solved, reg, ridge)


def solve_lsq_layer(system: LsqSystem, deltas: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """ΔW [out, in] (float64) for one layer from each input's ΔW_i (None: the input leaves the layer
    at the base, ΔW_i = 0): ΔW = Σ_i ΔW_i α_i G_i H⁻¹ = Σ_i (ΔW_i F_iᵀ) Q_i."""
    total = None
    for dw, f, q in zip(deltas, system.factors, system.solved, strict=True):
        if dw is None:
            continue
        term = (dw.double() @ f.T) @ q
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no input changes this layer")
    return total


def least_squares_merge(
    w0: torch.Tensor,
    weights_i: Sequence[torch.Tensor],
    rows_i: Sequence[torch.Tensor],
    reg_rows: torch.Tensor,
    alphas: Sequence[float],
    base_weight: float,
) -> torch.Tensor:
    """One-layer convenience: the merged W from W0, each input's W_i and rows X_i, and X_reg."""
    system = prepare_lsq([gram_factor(x) for x in rows_i], alphas, mean_gram(reg_rows), base_weight)
    w0d = w0.double()
    return w0d + solve_lsq_layer(system, [w.double() - w0d for w in weights_i])


def mean_gram(rows: torch.Tensor) -> torch.Tensor:
    """Xᵀ X / n in float64 for rows X [n, in]."""
    x = rows.double()
    return x.T @ x / max(1, x.shape[0])


def own_errors(
    system: LsqSystem, w0: torch.Tensor, dw: torch.Tensor, deltas: Sequence[torch.Tensor | None]
) -> list[float]:
    """Per input, how far the merged layer is from that input on its own rows:
    ||(W - W_i) X_iᵀ|| / ||W_i X_iᵀ||, from its Gram factor (the weights cancel in the ratio)."""
    w0d, dwd = w0.double(), dw.double()
    errors = []
    for d_i, f in zip(deltas, system.factors, strict=True):
        own = (w0d if d_i is None else w0d + d_i.double()) @ f.T
        miss = (dwd if d_i is None else dwd - d_i.double()) @ f.T
        errors.append(float(torch.linalg.norm(miss) / torch.linalg.norm(own).clamp_min(1e-30)))
    return errors

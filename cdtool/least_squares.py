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
factorised once (float64 Cholesky) and a layer costs a few [out, in] x [in, in] products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cdtool.closed_form import MAX_COND_GRAM, cholesky_with_ridge


@dataclass
class LsqSystem:
    """The layer-independent part: the weighted Gram matrices and the factor of H."""

    grams: list[torch.Tensor]  # α_i G_i [in, in], float64, per input
    reg_gram: torch.Tensor  # λ G_reg [in, in], float64
    chol: torch.Tensor  # Cholesky factor of H = Σ α_i G_i + λ G_reg
    ridge: float  # relative ridge added to H (0 when none was needed)


def prepare_lsq(
    grams: Sequence[torch.Tensor], weights: Sequence[float], reg_gram: torch.Tensor, base_weight: float
) -> LsqSystem:
    """Weigh the mean Gram matrices (G_i by α_i, G_reg by λ) and factorise their sum H once."""
    if len(grams) != len(weights):
        raise ValueError(f"{len(grams)} Gram matrices for {len(weights)} weights")
    if any(w < 0 for w in weights) or base_weight < 0:
        raise ValueError("weights must not be negative")
    weighted = [float(w) * g.double() for w, g in zip(weights, grams, strict=True)]
    reg = float(base_weight) * reg_gram.double()
    h = reg + sum(weighted, torch.zeros_like(reg))
    h = (h + h.T) / 2
    chol, ridge = cholesky_with_ridge(h, MAX_COND_GRAM)
    return LsqSystem(weighted, reg, chol, ridge)


def solve_lsq_layer(system: LsqSystem, deltas: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """ΔW [out, in] (float64) for one layer from each input's ΔW_i (None: the input leaves the layer
    at the base, ΔW_i = 0)."""
    rhs = None
    for dw, g in zip(deltas, system.grams, strict=True):
        if dw is None:
            continue
        term = dw.double() @ g
        rhs = term if rhs is None else rhs + term
    if rhs is None:
        raise ValueError("no input changes this layer")
    # ΔW H = R  <=>  H ΔWᵀ = Rᵀ (H symmetric)
    return torch.cholesky_solve(rhs.T, system.chol).T


def least_squares_merge(
    w0: torch.Tensor,
    weights_i: Sequence[torch.Tensor],
    rows_i: Sequence[torch.Tensor],
    reg_rows: torch.Tensor,
    alphas: Sequence[float],
    base_weight: float,
) -> torch.Tensor:
    """One-layer convenience: the merged W from W0, each input's W_i and rows X_i, and X_reg."""
    grams = [mean_gram(x) for x in rows_i]
    system = prepare_lsq(grams, alphas, mean_gram(reg_rows), base_weight)
    w0d = w0.double()
    return w0d + solve_lsq_layer(system, [w.double() - w0d for w in weights_i])


def mean_gram(rows: torch.Tensor) -> torch.Tensor:
    """Xᵀ X / n in float64 for rows X [n, in]."""
    x = rows.double()
    return x.T @ x / max(1, x.shape[0])


@dataclass
class LsqReport:
    own_error: list[float]  # per input: ||(W - W_i) X_iᵀ|| / ||W_i X_iᵀ||, from G_i
    reg_drift: float  # ||(W - W0) X_regᵀ|| / ||W0 X_regᵀ||, from G_reg


def report_lsq(
    system: LsqSystem, w0: torch.Tensor, dw: torch.Tensor, deltas: Sequence[torch.Tensor | None]
) -> LsqReport:
    """How far the merged layer is from each input on that input's own rows, and from the base on the
    regularisation rows (the weights cancel in each ratio)."""
    w0d, dwd = w0.double(), dw.double()
    errors = []
    for d_i, g in zip(deltas, system.grams, strict=True):
        w_i = w0d if d_i is None else w0d + d_i.double()
        errors.append(_ratio(dwd - (w_i - w0d), w_i, g))
    return LsqReport(errors, _ratio(dwd, w0d, system.reg_gram))


def _ratio(diff: torch.Tensor, ref: torch.Tensor, gram: torch.Tensor) -> float:
    """sqrt(tr(D G Dᵀ) / tr(R G Rᵀ)): the relative size of D's outputs to R's on G's rows."""
    num = torch.einsum("oi,ij,oj->", diff, gram, diff).clamp_min(0)
    den = torch.einsum("oi,ij,oj->", ref, gram, ref).clamp_min(1e-30)
    return float((num / den).sqrt())

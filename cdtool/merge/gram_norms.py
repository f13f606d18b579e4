"""How much weight matrices change the outputs on a set of text rows, from the rows' Gram matrix.

The size of M [out, in] on rows X [n, in] is ||M Xᵀ||_F = sqrt(tr(M G Mᵀ)) with G = Xᵀ X. A merge
reports it per layer for the base weights, the merged update and each input (its drift, and the
growth warning). On SDXL that is an [out, 2048] x [2048, 2048] product per matrix and layer, the
bulk of a merge's time in float64; these are diagnostics printed to three digits, so they are
computed here in float32 (relative error about 1e-6), with the sums in float64. The solves stay in
float64.

The inputs' sizes serve only the growth warning (a merged update many times its inputs' size), so
they are estimated (SizeSketch): with L Lᵀ = G and S [in, k] Gaussian with variance 1/k,
E ||M L S||² = ||M L||² = tr(M G Mᵀ), with a relative standard deviation of at most sqrt(2/k)
(8.8 % at k = 256) on the squared size, for k/in of the cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


def sizes_on(gram: torch.Tensor, mats: Sequence[torch.Tensor]) -> list[float]:
    """sqrt(tr(M G Mᵀ)) for each M in `mats` (all [*, in]), from one float32 product."""
    if not mats:
        return []
    stacked = torch.cat([m.float() for m in mats])
    products = stacked @ gram.float()
    sizes, start = [], 0
    for m in mats:
        rows = slice(start, start + m.shape[0])
        total = (stacked[rows] * products[rows]).sum(dtype=torch.float64)
        sizes.append(float(total.clamp_min(0).sqrt()))
        start += m.shape[0]
    return sizes


SKETCH_COLUMNS = 256


class SizeSketch:
    """Unbiased estimates of sqrt(tr(M G Mᵀ)) at k/in of the cost of `sizes_on` (see above)."""

    def __init__(self, gram: torch.Tensor, columns: int = SKETCH_COLUMNS, seed: int = 0) -> None:
        g = gram.double()
        dim = g.shape[0]
        draws = torch.randn(dim, columns, generator=torch.Generator().manual_seed(seed), dtype=g.dtype)
        self.projection = (gram_root(g) @ draws / columns**0.5).float()  # L S [in, k]

    def sizes(self, mats: Sequence[torch.Tensor]) -> list[float]:
        return [float(torch.linalg.norm((m.float() @ self.projection).double())) for m in mats]


def gram_root(gram: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = G (float64): its Cholesky factor, after a jitter of 1e-12 of its mean diagonal
    (enough for a G of fewer rows than columns); from its eigenvectors where even that fails."""
    g = gram.double()
    jitter = 1e-12 * float(torch.diagonal(g).mean().clamp_min(1e-30))
    chol, info = torch.linalg.cholesky_ex(g + jitter * torch.eye(g.shape[0], dtype=g.dtype))
    if int(info) == 0:
        return chol
    eig, vec = torch.linalg.eigh(g)
    return vec * eig.clamp_min(0).sqrt()


@dataclass
class LayerSizes:
    """A merged layer's update and each of its inputs' updates, sized on the regularisation rows."""

    merged: float
    inputs: list[float] = field(default_factory=list)  # estimated (SizeSketch)


def largest_growth(layers: Mapping[str, LayerSizes]) -> tuple[float, str | None]:
    """The largest ratio, over layers, of the merged update's size to its largest input's, and the
    layer: far above 1, the merge makes something new of ordinary prompts."""
    worst, where = 0.0, None
    for name, sizes in layers.items():
        largest = max(sizes.inputs, default=0.0)
        if largest <= 0:
            continue
        if sizes.merged / largest > worst:
            worst, where = sizes.merged / largest, name
    return worst, where

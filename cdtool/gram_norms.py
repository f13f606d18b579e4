"""How much weight matrices change the outputs on a set of text rows, from the rows' Gram matrix.

The size of M [out, in] on rows X [n, in] is ||M Xᵀ||_F = sqrt(tr(M G Mᵀ)) with G = Xᵀ X. A merge
reports it per layer for the base weights, the merged update and each input (its drift, and the
growth warning). On SDXL that is an [out, 2048] x [2048, 2048] product per matrix and layer, the
bulk of a merge's time in float64; these are diagnostics printed to three digits, so they are
computed here in float32 (relative error about 1e-6), with the sums in float64. The solves stay in
float64.
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
        total = torch.einsum("oi,oi->", stacked[rows].double(), products[rows].double())
        sizes.append(float(total.clamp_min(0).sqrt()))
        start += m.shape[0]
    return sizes


@dataclass
class LayerSizes:
    """A merged layer's update and each of its inputs' updates, sized on the regularisation rows."""

    merged: float
    inputs: list[float] = field(default_factory=list)


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

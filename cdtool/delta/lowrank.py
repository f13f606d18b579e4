"""Low-rank compression of ΔW by truncated SVD (the official compress.py, made exact).

The official tool keeps singular values until their cumulative share of the sum exceeds 0.6, but
slices one too few (`u[:, :i]` at the first i that crosses the threshold). Here the rank is the
smallest k whose kept share reaches the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cdtool.delta.file import FORMAT, Delta, LayerDelta


@dataclass
class Truncation:
    up: torch.Tensor  # U_k diag(s_k) [out, k]
    down: torch.Tensor  # V_kᵀ [k, in]
    rank: int
    energy: float  # kept share of the sum of singular values
    fro: float  # kept share of the Frobenius norm
    capped: bool  # the requested rank exceeded min(out, in)


def rank_for_energy(s: torch.Tensor, share: float) -> int:
    """Smallest k with sum(s[:k]) / sum(s) >= share."""
    total = float(s.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(s.double(), 0) / total
    return int(torch.searchsorted(cum, torch.tensor([share - 1e-12], dtype=cum.dtype)).item()) + 1


def rank_for_fro(s: torch.Tensor, share: float) -> int:
    """Smallest k with ||ΔW_k||_F / ||ΔW||_F >= share."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0:
        return 1
    cum = (torch.cumsum(sq, 0) / total).sqrt()
    return int(torch.searchsorted(cum, torch.tensor([share - 1e-12], dtype=cum.dtype)).item()) + 1


def truncate(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    fro: float | None = None,
    method: str = "exact",
    seed: int = 0,
) -> Truncation:
    """Best rank-k approximation of `delta` (Eckart–Young), k from exactly one of rank/energy/fro."""
    if sum(x is not None for x in (rank, energy, fro)) != 1:
        raise ValueError("give exactly one of rank, energy, fro")
    m = delta.double()
    full_rank = min(m.shape)
    if method == "exact" or rank is None:
        s_all = torch.linalg.svdvals(m)
    if rank is not None:
        k = min(rank, full_rank)
    elif energy is not None:
        k = rank_for_energy(s_all, energy)
    else:
        assert fro is not None
        k = rank_for_fro(s_all, fro)
    if method == "exact":
        u, s, vt = torch.linalg.svd(m, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(m, q=min(k + 10, full_rank), niter=4)
        vt = v.T
    if rank is not None and method != "exact":
        s_all = s  # only the leading values are known; shares below are relative to those
    up = u[:, :k] * s[:k]
    down = vt[:k]
    total = float(s_all.sum()) or 1.0
    total_sq = float((s_all.double() ** 2).sum()) or 1.0
    return Truncation(
        up=up.float(),
        down=down.float(),
        rank=k,
        energy=float(s[:k].sum()) / total,
        fro=(float((s[:k].double() ** 2).sum()) / total_sq) ** 0.5,
        capped=rank is not None and rank > full_rank,
    )


def factors_are_larger(shape: tuple[int, int], rank: int) -> bool:
    """Whether rank-`rank` factors of an [out, in] matrix (r·(out + in) numbers) hold at least as
    many numbers as the matrix itself (out·in): then the matrix is the smaller way to store it."""
    out, inp = shape
    return rank * (out + inp) >= out * inp


@dataclass
class Compressed:
    """A delta with each layer truncated, and what was kept of each layer."""

    delta: Delta
    # per layer: rank, energy, fro (kept shares), shape, was_rank, stored (dense or factors), bytes
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)  # layers smaller than the rank asked for


def compress_delta(
    delta: Delta,
    *,
    rank: int | None = None,
    energy: float | None = None,
    fro: float | None = None,
    dtype: torch.dtype = torch.float32,
    method: str = "exact",
    seed: int = 0,
) -> Compressed:
    """Every layer of a relative delta truncated by `truncate` (one of rank/energy/fro) and stored in
    `dtype`: as up/down factors, or as one dense matrix where the factors would not be smaller (the
    whole ΔW where nothing was cut, else the rank-k approximation). Tokens, concepts, the base and
    the provenance are kept (the caller adds its own entry)."""
    out = replace(delta, layers={}, provenance=dict(delta.provenance), created_by="", source_format=FORMAT, origin="")
    result = Compressed(out)
    for name, layer in sorted(delta.layers.items()):
        t = truncate(layer.dense(), rank=rank, energy=energy, fro=fro, method=method, seed=seed)
        if t.capped:
            result.capped.append(name)
        dense = factors_are_larger(layer.shape, t.rank)
        if dense:
            full = layer.dense() if t.rank == min(layer.shape) else t.up @ t.down
            out.layers[name] = LayerDelta(full=full.to(dtype), bias=layer.bias)
        else:
            out.layers[name] = LayerDelta(up=t.up.to(dtype), down=t.down.to(dtype), bias=layer.bias)
        result.layers[name] = {
            "rank": t.rank,
            "energy": t.energy,
            "fro": t.fro,
            "shape": list(layer.shape),
            "was_rank": layer.rank,
            "stored": "dense" if dense else "factors",
            "bytes": stored_bytes(out.layers[name]),
        }
    return result


def stored_bytes(layer: LayerDelta) -> int:
    """The bytes a layer's tensors take in the file (factors or the dense ΔW, and its bias)."""
    tensors = [t for t in (layer.full, layer.up, layer.down, layer.bias) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)

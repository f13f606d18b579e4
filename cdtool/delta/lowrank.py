"""Low-rank compression of ΔW by truncated SVD (the official compress.py, made exact).

The official tool keeps singular values until their cumulative share of the sum exceeds 0.6, but
slices one too few (`u[:, :i]` at the first i that crosses the threshold). Here the rank is the
smallest k whose kept share reaches the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

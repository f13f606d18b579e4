"""The metrics of the customisation papers, as pure functions on embeddings and features.

- CLIP-T (prompt fidelity): cosine of an image's and its prompt's CLIP embeddings, the modifier
  tokens removed from the prompt; also on the CLIPScore scale 2.5·max(cos, 0).
- CLIP-I and DINO (subject fidelity): the mean cosine over all (generated, reference) pairs.
- KID: the unbiased MMD² estimate with the cubic polynomial kernel k(x, y) = (x·y/d + 1)³,
  averaged over random subsets (mean and standard deviation).
"""

from __future__ import annotations

import re

import torch

_TOKEN = re.compile(r"<[^<>\s]+>")


def strip_tokens(prompt: str) -> str:
    """ "a <new1> cat on the beach" -> "a cat on the beach" (every <...> modifier token removed)."""
    return re.sub(r"\s+", " ", _TOKEN.sub(" ", prompt)).strip()


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of a[i] and b[i] for every row i."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a * b).sum(-1)


def clip_score(cos: torch.Tensor) -> torch.Tensor:
    """CLIPScore (Hessel et al. 2021): 2.5·max(cos, 0)."""
    return 2.5 * cos.clamp_min(0)


def pairwise_mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return float((a @ b.T).mean())


def mean_cosine_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row a_i, its mean cosine similarity to all rows of b (averaging these gives
    pairwise_mean_cosine)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a @ b.T).mean(1)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / d + 1)³."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² between samples x [m, d] and y [n, d] under the cubic polynomial kernel."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def kid(
    x: torch.Tensor, y: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD² over `subsets` random subsets of
    min(subset_size, len(x), len(y)) rows drawn without replacement from each set."""
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            mmd2_unbiased(
                x[torch.randperm(x.shape[0], generator=g)[:size]], y[torch.randperm(y.shape[0], generator=g)[:size]]
            )
            for _ in range(subsets)
        ],
        dtype=torch.float64,
    )
    return float(values.mean()), float(values.std(unbiased=True)) if subsets > 1 else 0.0


def summary(values: list[float]) -> dict[str, float | int]:
    """mean, std (sample) and n."""
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "mean": float(t.mean()) if len(values) else float("nan"),
        "std": float(t.std(unbiased=True)) if len(values) > 1 else 0.0,
        "n": len(values),
    }

"""Training losses and the DVAR early-stopping statistic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's masked loss: Σ over channels and pixels of mask·(pred − target)² divided by
    Σ of the [B, 1, h, w] mask, averaged over the batch.

    Kept as the reference has it: the mask has one channel and the latents C (4), so this is C
    times the per-element mean over the masked region. The paper's learning rates were tuned with
    this factor, so dropping it would silently change the recipe."""
    if mask.dim() == 3:
        mask = mask[:, None]
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    return ((err * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-8)).mean()


def custom_diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, prior_weight: float = 1.0
) -> torch.Tensor:
    """Custom Diffusion's loss on a batch of B instance views (first) and, when `pred` holds more
    rows, as many regularisation images: masked_mse over the instance views (their augmentation
    masks [B, h, w]) plus `prior_weight` times the same loss with a full mask over the rest.

    Deliberate difference from diffusers' script and the official repo's diffusers port, which add a
    plain mean for the prior: that weighs each regularisation image 1/C (1/4) as much as an instance
    view, where the paper's own code (src/model.py, p_losses) passes both through the same masked
    loss, so its results were made with equal weights."""
    n = mask.shape[0]
    loss = masked_mse(pred[:n], target[:n], mask)
    if pred.shape[0] > n:
        full = torch.ones(pred.shape[0] - n, *mask.shape[-2:], device=mask.device, dtype=mask.dtype)
        loss = loss + prior_weight * masked_mse(pred[n:], target[n:], full)
    return loss


def dvar(history: Sequence[float], window: int) -> float | None:
    """DVAR (Voronov et al. 2023): var(last `window` eval losses) / var(all eval losses).
    None until `window` values exist; 0 when every loss is identical (no NaN)."""
    if len(history) < window or window < 2:
        return None
    t = torch.tensor(list(history), dtype=torch.float64)
    total = float(t.var(unbiased=True))
    recent = float(t[-window:].var(unbiased=True))
    if total == 0.0:
        return 0.0
    return recent / total

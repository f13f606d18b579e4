"""The image backbones of InstantBooth's encoders: what turns a photo into a global feature and a grid
of patch features.

- An open_clip vision tower (`--backbone ViT-B-32:openai`, a tag open_clip downloads once, or
  `NAME:/path/to/weights` for a local copy; `cdtool-tiny` is cdtool's 2-layer random CLIP for tests).
  InstantBooth's encoders are CLIP image encoders; their global feature is the tower's pooled and
  projected embedding, their patch features the tower's output tokens.
- `toy-cnn`: a small convolutional network trained from scratch, for the built-in toy model, whose
  32 px world no pretrained CLIP has seen. It is not the toy world's oracle: the oracle judges.

Both take images in [-1, 1] at their `image_size` and return (pooled [B, P], tokens [B, L, W]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdtool.errors import CdtoolError, UsageError

TOY_CNN = "toy-cnn"


class ToyCNN(nn.Module):
    """32 px in; an 8 x 8 grid of 128-wide features (with a learned position embedding, so the
    adapters know where a feature sits) and their mean."""

    image_size = 32
    width = 128

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GroupNorm(8, 64),
            nn.GELU(),
            nn.Conv2d(64, self.width, 3, stride=2, padding=1),
            nn.GroupNorm(8, self.width),
            nn.GELU(),
            nn.Conv2d(self.width, self.width, 3, padding=1),
        )
        self.position = nn.Parameter(0.02 * torch.randn(64, self.width))
        self.pooled_dim = self.token_dim = self.width

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.convs(images)
        tokens = grid.flatten(2).transpose(1, 2) + self.position
        return tokens.mean(dim=1), tokens


class ClipTower(nn.Module):
    """An open_clip ViT's vision tower: images in [-1, 1] at its input size, normalised as CLIP
    expects; the pooled and projected embedding and the output tokens."""

    def __init__(self, visual: nn.Module, tokens_only: bool = False) -> None:
        super().__init__()
        if not hasattr(visual, "output_tokens") or not hasattr(visual, "transformer"):
            raise CdtoolError(
                f"the open_clip tower {type(visual).__name__} gives no patch tokens; choose a ViT (such as ViT-B-32)"
            )
        visual.output_tokens = True
        if tokens_only:  # the patch encoder reads the tokens: the pooled embedding's projection would not train
            visual.proj = None
        self.visual = visual
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1), False)
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple) else size)
        self.pooled_dim = int(visual.output_dim) if visual.proj is not None else int(visual.transformer.width)
        self.token_dim = int(visual.transformer.width)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        pooled, tokens = self.visual(x)
        return pooled, tokens


def split_spec(spec: str) -> tuple[str, str]:
    """`NAME[:WEIGHTS]` -> (name, weights); `toy-cnn` and `cdtool-tiny` take no weights."""
    name, _, weights = spec.partition(":")
    if not name:
        raise UsageError(f"--backbone {spec!r}: give an open_clip model, such as ViT-B-32:openai, or toy-cnn")
    return name, weights


def check_backbone(spec: str) -> None:
    """A backbone a new encoder can start from: toy-cnn, cdtool-tiny, or an open_clip model with its weights."""
    name, weights = split_spec(spec)
    if name == TOY_CNN:
        return
    import open_clip

    from cdtool.scoring.clip_models import TINY

    if name != TINY and name not in open_clip.list_models():
        raise UsageError(f"--backbone {spec}: open_clip has no model {name!r} (ViT-B-32, ViT-L-14, ... or toy-cnn)")
    if name != TINY and not weights:
        raise UsageError(f"--backbone {name}: name its weights, e.g. {name}:openai or {name}:/path/to/weights")


def load_backbone(spec: str, pretrained: bool, tokens_only: bool = False) -> nn.Module:
    """The backbone `spec` names; with `pretrained`, an open_clip tower gets its weights (a tag or a
    local file), else it is built empty for weights that follow (an encoder's own file).
    `tokens_only`: for the patch encoder, without what only the pooled embedding uses."""
    name, weights = split_spec(spec)
    if name == TOY_CNN:
        return ToyCNN()
    from cdtool.scoring.clip_models import TINY, load_clip

    if pretrained:
        check_backbone(spec)
    tag = weights if pretrained and name != TINY else "none"
    clip = load_clip(name, tag, weights_option=f"--backbone {name}:/path/to/weights")
    return ClipTower(clip.model.visual, tokens_only)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images [B, 3, s, s] resized to size x size (bicubic, antialiased when shrinking)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)

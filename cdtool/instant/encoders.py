"""InstantBooth's two image encoders and the module that holds everything an encoder trains.

- The concept encoder: a backbone's global feature, then a Linear to the width of a token embedding:
  the embedding of the identifier V-hat ("photo of a V-hat cat") for one photo. Several photos of a
  concept give the mean of their embeddings (the paper's f_c).
- The patch encoder: a second backbone's patch features, then a Linear: the visual tokens that the
  adapters (cdtool/instant/adapters.py) inject into the UNet. Several photos give their tokens one
  after another (concatenated).

The paper's linear layers are randomly initialised. cdtool's concept head starts with weights of
zero and the identifier's initial embedding as its bias (a rare vocabulary entry, as cdtool's
other methods start a new token): a random projection of a CLIP feature is many times the size of a
token embedding, and would hand the frozen text encoder a word unlike any it knows at the first
step. The encoder learns the departure from there.
"""

from __future__ import annotations

import torch
from torch import nn

from cdtool.instant.adapters import BlockShape, make_adapters


class InstantEncoder(nn.Module):
    """What an encoder folder's weights file holds: the concept encoder, the patch encoder and one
    adapter per UNet transformer block. `forward` maps encoder views (at the backbones' input size)
    to (identifier embeddings [B, text_dim], visual tokens [B, L, visual_dim])."""

    def __init__(
        self,
        concept_backbone: nn.Module,
        patch_backbone: nn.Module,
        text_dim: int,
        visual_dim: int,
        blocks: list[BlockShape],
        init_row: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.concept_backbone = concept_backbone
        self.concept_head = nn.Linear(int(concept_backbone.pooled_dim), text_dim)
        self.patch_backbone = patch_backbone
        self.patch_head = nn.Linear(int(patch_backbone.token_dim), visual_dim)
        self.adapters = make_adapters(blocks, visual_dim)
        self.image_size = int(concept_backbone.image_size)
        if init_row is not None:
            with torch.no_grad():
                self.concept_head.weight.zero_()
                self.concept_head.bias.copy_(init_row)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, _ = self.concept_backbone(views)
        _, tokens = self.patch_backbone(views)
        return self.concept_head(pooled), self.patch_head(tokens)


def combine_photos(rows: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Several photos of one concept as one: the mean of their identifier embeddings [N, D] -> [1, D],
    and their visual tokens [N, L, Dv] one photo after another -> [N * L, Dv]."""
    return rows.mean(dim=0, keepdim=True), tokens.reshape(-1, tokens.shape[-1])


def identifier_rows(ids: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor, token_id: int) -> torch.Tensor:
    """The token embeddings of a batch [B, L, D] with the identifier's id (`ids` [B, L]) replaced by
    each sample's own identifier embedding (`rows` [B, D]); every other position is left as it is."""
    at = (ids == token_id)[..., None]
    return torch.where(at, rows[:, None, :].to(embeds.dtype), embeds)

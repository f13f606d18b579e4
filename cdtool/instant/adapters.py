"""The adapter layers InstantBooth adds to a frozen UNet, and how they attach to a diffusers UNet.

InstantBooth (Shi et al. 2023) injects the visual tokens of a concept into every transformer block
of the UNet through GLIGEN's gated self-attention (Li et al. 2023), placed between the block's
self-attention and its cross-attention:

    y <- y + beta * tanh(gamma) * TS(SelfAttn(LN([y, P(v)])))

y [B, N, C] is the block's hidden state after its self-attention, v [B, M, D] the concept's visual
tokens, P a Linear D -> C, [.,.] concatenation along the tokens and TS the token selection that keeps
the first N outputs. gamma is learned and starts at 0, so that the frozen model is unchanged at the
start of training; beta is a constant, 1 in training, and at sampling the concept's strength (the
paper's balanced sampling lowers it). The paper's adapter is this attention term alone; GLIGEN's
layer also has a gated feed-forward term, which InstantBooth's equation leaves out, and so does cdtool.

The adapters attach with forward hooks (`attach`): one on each `BasicTransformerBlock` notes its
input x, one on its self-attention `attn1` adds the update to the attention's output a, where the
block forms y = a + x. The UNet's own modules and weights are never changed, and removing the hooks
restores the frozen model exactly. Rows of the batch that are not selected (the unconditional half
under classifier-free guidance, prompts without the concept's token) get an update of exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cdtool.errors import CdtoolError


def gated_update(
    y: torch.Tensor,
    visual: torch.Tensor,
    gate: torch.Tensor,
    beta: float,
    attend: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """beta * tanh(gate) * TS(attend([y, visual])): the change the adapter makes to y [B, N, C],
    `visual` [B or 1, M, C] already projected to the block's width. The token selection keeps the
    attention's outputs at y's N positions; the visual tokens are read, never written back."""
    joint = torch.cat([y, visual.to(y.dtype).expand(y.shape[0], -1, -1)], dim=1)
    return beta * torch.tanh(gate).to(y.dtype) * attend(joint)[:, : y.shape[1]]


def self_attention(x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product self-attention of x [B, T, C] (the heads concatenated, before
    the output projection)."""
    b, t, _ = x.shape

    def split(h: torch.Tensor) -> torch.Tensor:
        return h.reshape(b, t, heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q(x)), split(k(x)), split(v(x)))
    return out.transpose(1, 2).reshape(b, t, -1)


class GatedAdapter(nn.Module):
    """One block's adapter: the projection of the visual tokens, the layer norm, the self-attention
    over the block's tokens and the visual tokens (as many heads as the block's own self-attention),
    and the gate gamma (0 at the start)."""

    def __init__(self, width: int, visual_dim: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of {heads} heads")
        self.heads = heads
        self.proj = nn.Linear(visual_dim, width)
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(width, width, bias=False)
        self.to_v = nn.Linear(width, width, bias=False)
        self.to_out = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, y: torch.Tensor, visual: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """The update of y [B, N, width] from the visual tokens [B or 1, M, visual_dim]."""
        x = self.proj(visual.to(self.proj.weight.dtype))

        def attend(joint: torch.Tensor) -> torch.Tensor:
            h = self.norm(joint)
            return self.to_out(self_attention(h, self.to_q, self.to_k, self.to_v, self.heads))

        return gated_update(y, x, self.gate, beta, attend)


@dataclass(frozen=True)
class BlockShape:
    """Where an adapter goes and its size: the block's module path in the UNet, its width and its
    self-attention's heads."""

    path: str
    width: int
    heads: int


def transformer_blocks(unet: nn.Module) -> list[BlockShape]:
    """The UNet's transformer blocks an adapter attaches to, in module order. Every block must be a
    `BasicTransformerBlock` with layer norms and a self-attention (Stable Diffusion 1.x, 2.x, XL)."""
    from diffusers.models.attention import BasicTransformerBlock

    found = []
    for path, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        if module.norm_type != "layer_norm" or module.only_cross_attention or module.attn1 is None:
            raise CdtoolError(
                f"the UNet's transformer block {path} is not a Stable Diffusion block (norm {module.norm_type}); "
                "InstantBooth's adapters attach to Stable Diffusion UNets"
            )
        found.append(BlockShape(path, int(module.attn1.to_q.in_features), int(module.attn1.heads)))
    if not found:
        raise CdtoolError("the UNet has no transformer blocks for InstantBooth's adapters")
    return found


@dataclass
class Injection:
    """What the attached adapters inject now: the visual tokens [B or 1, M, D] (None: nothing),
    beta, and which rows of the UNet's batch receive them (None: every row)."""

    tokens: torch.Tensor | None = None
    beta: float = 1.0
    rows: torch.Tensor | None = None  # bool [B]


@dataclass
class Attached:
    """Adapters attached to a UNet: the hooks (`detach` removes them) and what they inject."""

    injection: Injection
    handles: list[Any] = field(default_factory=list)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach(unet: nn.Module, adapters: nn.ModuleList, blocks: list[BlockShape]) -> Attached:
    """Hook `adapters` (one per entry of `blocks`, as `transformer_blocks` lists them) into the UNet."""
    found = transformer_blocks(unet)
    if found != blocks:
        raise CdtoolError(
            f"the encoder's adapters are for a UNet with {len(blocks)} transformer blocks of other sizes; "
            f"this UNet has {len(found)}: is the encoder for another base model?"
        )
    attached = Attached(Injection())
    for shape, adapter in zip(blocks, adapters, strict=True):
        block = unet.get_submodule(shape.path)
        seen: dict[str, torch.Tensor] = {}

        def note_input(_m: Any, args: tuple, kwargs: dict, seen: dict = seen) -> None:
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        def add_update(_m: Any, _args: tuple, out: torch.Tensor, seen: dict = seen, adapter: Any = adapter) -> Any:
            return _inject(attached.injection, adapter, out, seen.pop("x"))

        attached.handles.append(block.register_forward_pre_hook(note_input, with_kwargs=True))
        attached.handles.append(block.attn1.register_forward_hook(add_update))
    return attached


def _inject(injection: Injection, adapter: GatedAdapter, attn_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The self-attention's output a plus the adapter's update of y = a + x, on the selected rows."""
    if injection.tokens is None:
        return attn_out
    y = attn_out + x
    rows = injection.rows
    if rows is None:
        return attn_out + adapter(y, injection.tokens, injection.beta).to(attn_out.dtype)
    if not bool(rows.any()):
        return attn_out
    tokens = injection.tokens if injection.tokens.shape[0] == 1 else injection.tokens[rows]
    update = torch.zeros_like(attn_out)
    update[rows] = adapter(y[rows], tokens, injection.beta).to(attn_out.dtype)
    return attn_out + update


def make_adapters(blocks: list[BlockShape], visual_dim: int) -> nn.ModuleList:
    """A fresh adapter per block (gates at 0)."""
    return nn.ModuleList(GatedAdapter(b.width, visual_dim, b.heads) for b in blocks)

"""The cross-attention used while training: SDPA, with the start-of-text key/value detached.

The start-of-text token's text feature is the same for every prompt, so letting its key and value
train would shift every prompt at once; the reference code detaches position 0 in cross-attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class DetachStartProcessor:
    """AttnProcessor2_0's computation for cross-attention, with key/value of token 0 detached."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("DetachStartProcessor is for cross-attention layers")
        residual = hidden_states
        batch, _seq, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
        value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_detaching_cross_attention(unet: Any) -> None:
    """Install DetachStartProcessor on every attn2 of the UNet (attn1 keeps its processor)."""
    procs = {
        name: (DetachStartProcessor() if ".attn2." in name else proc) for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(procs)

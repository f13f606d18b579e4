"""The training cross-attention: same outputs as diffusers' SDPA processor, no gradient via token 0."""

from __future__ import annotations

import torch

from cdtool.train.attention import use_detaching_cross_attention


def test_same_forward_and_detached_start(fresh_tiny):
    unet = fresh_tiny.unet
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([10])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ehs).sample
    use_detaching_cross_attention(unet)
    ehs.requires_grad_(True)
    out = unet(x, t, encoder_hidden_states=ehs).sample
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    # the text feature at position 0 only reaches the output through attn2's key/value: no gradient
    assert float(ehs.grad[0, 0].abs().sum()) == 0.0
    assert float(ehs.grad[0, 1].abs().sum()) > 0.0

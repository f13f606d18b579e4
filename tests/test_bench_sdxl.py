"""The SDXL-shaped benchmark model has the real model's structure (checked on the meta device)."""

from __future__ import annotations

import torch


def test_the_sdxl_shaped_model_is_the_real_ones_shape():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks.sdxl import TEXT, TEXT_2, UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
        widths = [CLIPTextModel(CLIPTextConfig(**TEXT)).config.hidden_size]
        encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))
    widths.append(encoder_2.config.hidden_size)
    kv = {n: m.weight.shape for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert len(kv) == 140 and {s[1] for s in kv.values()} == {sum(widths)} == {2048}
    assert sorted({s[0] for s in kv.values()}) == [640, 1280]
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # stable-diffusion-xl-base-1.0's UNet
    assert sum(p.numel() for p in encoder_2.parameters()) == 694_659_840

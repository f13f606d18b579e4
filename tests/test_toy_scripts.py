"""The toy-model pretraining scripts run end to end (a few steps): a separately trained text encoder,
and a UNet re-read for its width on top of the shipped toy model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(path: str, *args: object) -> None:
    cmd = [sys.executable, str(ROOT / path), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_frozen_text_encoder_then_unet_rereads_it(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from cdtool.models.loading import toy_model_folder

    text = tmp_path / "text"
    _script("research/pretrain_toy_text.py", "--width", 32, "--steps", 2, "--batch", 8, "--threads", 1, "--out", text)
    encoder = CLIPTextModel.from_pretrained(text, subfolder="text_encoder")
    assert encoder.config.hidden_size == 32 and encoder.config.vocab_size == 49408

    out = tmp_path / "model"
    _script(
        "tools/pretrain_toy.py", "--init", toy_model_folder(), "--text-encoder", text, "--minutes", 0.01,
        "--batch", 2, "--threads", 1, "--lr", 0.0, "--patterns", 1.0, "--out", out,
    )  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    shipped = UNet2DConditionModel.from_pretrained(toy_model_folder(), subfolder="unet")
    assert unet.config.cross_attention_dim == 32
    # only the cross-attention keys/values start afresh; at lr 0 every other weight is the shipped one
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert unet.get_submodule(f"{block}.to_k").weight.shape[1] == 32
    for name in ("conv_in.weight", f"{block}.to_q.weight", f"{block}.to_out.0.weight"):
        assert torch.equal(unet.state_dict()[name], shipped.state_dict()[name]), name
    saved = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    assert torch.allclose(
        saved.get_input_embeddings().weight.float(), encoder.get_input_embeddings().weight.half().float()
    ), "the text encoder must stay frozen"

"""An SDXL-shaped pipeline (the real UNet, VAE and both text-encoder configs of
stable-diffusion-xl-base-1.0) with random weights, built in code and saved as a diffusers folder in
float16 (5.1 GB of UNet), for benchmarks that must not download anything."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.sd15 import VAE as SD15_VAE

UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # 768 + 1280: both text encoders' features, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the pooled 1280
)
VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TEXT = dict(  # CLIP ViT-L/14
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
    hidden_act="quick_gelu", **_IDS,
)  # fmt: skip
TEXT_2 = dict(  # OpenCLIP ViT-bigG/14
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
    hidden_act="gelu", **_IDS,
)  # fmt: skip


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are initialised in `dtype` (float16: half the memory while building)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_sdxl(folder: Path) -> Path:
    """Write the SDXL-shaped pipeline to `folder` (once) and return it."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cdtool.models.clip_vocab import load_clip_tokenizer
    from cdtool.models.tiny import XL_SCHEDULER_CONFIG, vary_layer_norms

    torch.manual_seed(0)
    with _default_dtype(torch.float16):
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)),
            tokenizer=load_clip_tokenizer(),
            tokenizer_2=load_clip_tokenizer(pad_token="!"),
            unet=UNet2DConditionModel(**UNET),
            scheduler=EulerDiscreteScheduler(**XL_SCHEDULER_CONFIG),
            add_watermarker=False,
        )
    vary_layer_norms(pipe.text_encoder, pipe.text_encoder_2)  # trained LayerNorms are not the identity
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_xl(folder: Path) -> Path:
    """The built-in tiny-xl saved as a folder: the same benchmark in seconds, to check it runs."""
    if not (folder / "model_index.json").exists():
        from cdtool.models.tiny import build_tiny_xl_pipeline

        build_tiny_xl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder

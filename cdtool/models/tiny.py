"""The built-in tiny models: real diffusers pipelines with small components, one per kind of base.
`tiny` is Stable Diffusion 1.x's (a StableDiffusionPipeline), `tiny-sd2` 2.x's, `tiny-xl` XL's (a
StableDiffusionXLPipeline with two text encoders).

Built from configs with a fixed seed, so each is the same on every machine and needs no download.
They keep the structure Custom Diffusion relies on (cross-attention in the UNet's blocks; CLIP text
encoders with the real 49408-token vocabulary) at a size that trains in seconds on a CPU.
"""

from __future__ import annotations

import torch

from cdtool.models.clip_vocab import CLIP_VOCAB_SIZE

TINY_SEED = 0
TINY_RESOLUTION = 64

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    sample_size=TINY_RESOLUTION,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
)
TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# Stable Diffusion 1.x's noise schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_tiny_pipeline():  # -> StableDiffusionPipeline
    """Build the tiny pipeline; identical weights on every call (seeded, CPU, float32)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdtool.models.clip_vocab import load_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        # Trained LayerNorms have non-trivial gains and biases; freshly initialised ones (1 and 0)
        # put every text feature in one hyperplane through the origin, which no real model does.
        with torch.no_grad():
            for m in text_encoder.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.add_(0.1 * torch.randn_like(m.weight))
                    m.bias.add_(0.1 * torch.randn_like(m.bias))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# `tiny-xl`: Stable Diffusion XL's structure at the tiny size. Two CLIP text encoders of different
# widths (the second with a projection, whose pooled embedding enters the UNet through `text_time`
# added conditioning with the size/crop time ids), the UNet's cross-attention reading their
# concatenation (32 + 48 = 80 wide, as the real model's 768 + 1280 = 2048), no attention in the
# first block, two transformer layers in the second, linear projections. The text encoders'
# configs keep the real ones' token ids (end-of-text 2: the pooled row is the largest id's).
XL_TEXT_WIDTHS = (32, 48)
XL_TIME_EMBED = 8
XL_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=sum(XL_TEXT_WIDTHS),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=XL_TIME_EMBED,
    projection_class_embeddings_input_dim=6 * XL_TIME_EMBED + XL_TEXT_WIDTHS[1],
    norm_num_groups=8,
)
_REAL_CLIP_IDS = dict(
    vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1
)
XL_TEXT_CONFIG = dict(
    hidden_size=XL_TEXT_WIDTHS[0], intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, **_REAL_CLIP_IDS
)
XL_TEXT_2_CONFIG = dict(
    hidden_size=XL_TEXT_WIDTHS[1],
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=XL_TEXT_WIDTHS[1],
    hidden_act="gelu",
    **_REAL_CLIP_IDS,
)
# SDXL's scheduler (Euler, the SD noise schedule, leading timesteps) and VAE latent scaling
XL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)
XL_VAE_SCALING = 0.13025

# `tiny-sd2`: Stable Diffusion 2.x's structure at the tiny size: an OpenCLIP-style text encoder (gelu,
# its tokenizer padding with "!"), linear projections and per-block head counts in the UNet, and
# the v-prediction noise schedule of the 768 px models.
SD2_UNET_CONFIG = dict(UNET_CONFIG, attention_head_dim=(2, 4), use_linear_projection=True)
SD2_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    hidden_act="gelu",
    **_REAL_CLIP_IDS,
)
SD2_SCHEDULER_CONFIG = dict(SCHEDULER_CONFIG, prediction_type="v_prediction")


def vary_layer_norms(*encoders: torch.nn.Module) -> None:
    """Trained LayerNorms have non-trivial gains and biases (see build_tiny_pipeline)."""
    with torch.no_grad():
        for encoder in encoders:
            for m in encoder.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.add_(0.1 * torch.randn_like(m.weight))
                    m.bias.add_(0.1 * torch.randn_like(m.bias))


def build_tiny_xl_pipeline():  # -> StableDiffusionXLPipeline
    """The tiny SDXL pipeline; identical weights on every call (seeded, CPU, float32)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cdtool.models.clip_vocab import load_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**XL_UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=XL_VAE_SCALING)
        text_encoder = CLIPTextModel(CLIPTextConfig(**XL_TEXT_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**XL_TEXT_2_CONFIG))
        vary_layer_norms(text_encoder, text_encoder_2)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**XL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def build_tiny_sd2_pipeline():  # -> StableDiffusionPipeline
    """The tiny SD2 pipeline; identical weights on every call (seeded, CPU, float32)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdtool.models.clip_vocab import load_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_CONFIG))
        vary_layer_norms(text_encoder)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=DDIMScheduler(**SD2_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny(name: str):  # -> a diffusers pipeline
    """The built-in tiny model of that name (cdtool.choices.TINY_MODELS)."""
    from cdtool.choices import TINY, TINY_SD2, TINY_XL

    builders = {TINY: build_tiny_pipeline, TINY_XL: build_tiny_xl_pipeline, TINY_SD2: build_tiny_sd2_pipeline}
    return builders[name]()

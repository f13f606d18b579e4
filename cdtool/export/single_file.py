"""The original Stable Diffusion single-file layout, which AUTOMATIC1111, ComfyUI and diffusers'
`from_single_file` load: one state dict with the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.` and the CLIP text encoder under `cond_stage_model.transformer.`, in the
CompVis (latent-diffusion) module names.

Each component is renamed by a table of (diffusers prefix -> original prefix) built from the
model's own structure, so any SD1.x-shaped model converts (the built-in ones too); a key the table
does not cover is an error, never dropped. Another architecture's layout (SDXL: `conditioner.`
embedders, `label_emb`) is another function beside `sd1_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cdtool.errors import CdtoolError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
]
_UNET_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]
_VAE_RESNET = [(n, n) for n in ("norm1.", "conv1.", "norm2.", "conv2.")] + [("conv_shortcut.", "nin_shortcut.")]
_VAE_ATTENTION = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]
_VAE_TOP = [(n, n) for n in ("conv_in.", "conv_out.")] + [("conv_norm_out.", "norm_out.")]


def rename(state: Mapping[str, torch.Tensor], table: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    """Each key's longest matching diffusers prefix replaced by its original one; a key no prefix
    covers is an error (the model is not of the layout the table describes)."""
    ordered = sorted(table, key=lambda pair: -len(pair[0]))
    out = {}
    for key, tensor in state.items():
        match = next(((old, new) for old, new in ordered if key.startswith(old)), None)
        if match is None:
            raise CdtoolError(f"the {what} parameter {key} has no place in the original Stable Diffusion layout")
        out[match[1] + key[len(match[0]) :]] = tensor
    return out


def _has(state: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def _within(prefix: str, new: str, inner: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(prefix + a, new + b) for a, b in inner]


def unet_table(state: Mapping[str, Any], levels: int, layers_per_block: int) -> list[tuple[str, str]]:
    """diffusers -> original prefixes of an SD1.x-style UNet: `levels` resolutions with
    `layers_per_block` resnets (and attentions, where the level has them) down, one more up."""
    per = layers_per_block + 1  # input/output blocks per level: the layers, then the resampler
    table = list(_UNET_TOP)
    for i in range(levels):
        for j in range(layers_per_block):
            table += _within(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * per + j + 1}.0.", _UNET_RESNET)
            table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * per + j + 1}.1."))
        table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op."))
        for j in range(per):
            table += _within(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0.", _UNET_RESNET)
            table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1."))
        upsampler = 2 if _has(state, f"up_blocks.{i}.attentions.") else 1
        table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * per + per - 1}.{upsampler}."))
    table.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        table += _within(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", _UNET_RESNET)
    return table


def vae_table(levels: int, layers_per_block: int) -> list[tuple[str, str]]:
    """diffusers -> original prefixes of the AutoencoderKL: `layers_per_block` resnets per encoder
    level, one more per decoder level (whose levels count the other way)."""
    table = []
    for side in ("encoder", "decoder"):
        table += _within(f"{side}.", f"{side}.", _VAE_TOP)
        for j in range(2):
            table += _within(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.", _VAE_RESNET)
        table += _within(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION)
    for i in range(levels):
        up = levels - 1 - i
        for j in range(layers_per_block + 1):
            if j < layers_per_block:
                table += _within(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
            table += _within(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET)
        table.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        table.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    return table + [(n, n) for n in ("quant_conv.", "post_quant_conv.")]


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise CdtoolError("the original single-file layout needs the same number of layers in every UNet block")
    table = unet_table(state, len(config["block_out_channels"]), layers)
    return rename(state, table, "UNet")


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Renamed, with the mid-block attention's linear weights as the 1x1 convolutions the original holds."""
    out = rename(state, vae_table(len(config["block_out_channels"]), config["layers_per_block"]), "VAE")
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def text_encoder_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel keys under `text_model.`, as the original holds them (transformers
    5 names them without it)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def sd1_state(pipe: Any, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The whole SD1.x pipeline as one original-layout state dict. `vocab_size` keeps only the
    token embedding table's first rows (the base's: rows added for new tokens stay out, since the
    UIs read a checkpoint's table at its base size and take new tokens from embedding files)."""
    text = dict(pipe.text_encoder.state_dict())
    if vocab_size is not None:
        name = next(k for k in text if k.endswith("embeddings.token_embedding.weight"))
        text[name] = text[name][:vocab_size]
    parts = (
        (UNET_PREFIX, unet_to_original(pipe.unet.state_dict(), pipe.unet.config)),
        (VAE_PREFIX, vae_to_original(pipe.vae.state_dict(), pipe.vae.config)),
        (TEXT_PREFIX, text_encoder_to_original(text)),
    )
    return {prefix + k: v for prefix, state in parts for k, v in state.items()}

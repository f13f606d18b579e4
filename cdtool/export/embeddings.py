"""What an SDXL delta's exports hold beyond a Stable Diffusion 1.x one's (cdtool/export/folder.py).

- Token files: an SDXL embedding holds a token's rows in both text encoders, `clip_l` (the
  text_encoder's, 768 wide on the real model) and `clip_g` (text_encoder_2's, 1280 wide): the file
  AUTOMATIC1111 and ComfyUI read. diffusers loads it a part at a time:
  `pipe.load_textual_inversion(f["clip_l"], token=..., text_encoder=pipe.text_encoder,
  tokenizer=pipe.tokenizer)`, and `f["clip_g"]` with `pipe.text_encoder_2, pipe.tokenizer_2`.
- kohya: the module names of kohya's SDXL networks, the original (SGM) UNet's
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`), and `lora_te1_`/`lora_te2_` for
  the two text encoders; diffusers' `load_lora_weights`, AUTOMATIC1111 and ComfyUI read them.
- The diffusers LoRA needs nothing new: its keys name the component (`unet.`, `text_encoder.`,
  `text_encoder_2.`), as StableDiffusionXLPipeline.load_lora_weights reads them.
"""

from __future__ import annotations

import torch

from cdtool.choices import SDXL
from cdtool.delta.file import Delta
from cdtool.delta.naming import diffusers_to_sgm
from cdtool.errors import CdtoolError

SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # text_encoder's rows, text_encoder_2's
_KOHYA_TEXT = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def is_sdxl(delta: Delta) -> bool:
    return delta.kind == SDXL


def sdxl_embedding(delta: Delta, token: str) -> dict[str, torch.Tensor]:
    """The two-encoder embedding of one token: {clip_l: [n, dim], clip_g: [n, dim_2]}."""
    if token not in delta.tokens_2:
        raise CdtoolError(f"token {token} has no rows for SDXL's second text encoder")
    rows = (delta.tokens[token], delta.tokens_2[token])
    return {k: e.reshape(-1, e.shape[-1]).contiguous() for k, e in zip(SDXL_EMBEDDING_KEYS, rows, strict=True)}


def kohya_sdxl_state(delta: Delta, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """kohya's SDXL LoRA keys (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`); the UNet's
    names in the original layout, which counts `layers_per_block` (the UNet config's) per block."""
    from cdtool.export.folder import _check_lora, kohya_entries

    _check_lora(delta)
    out = {}
    for name, layer in sorted(delta.layers.items()):
        component, _, path = name.partition(".")
        if component == "unet":
            key = "lora_unet_" + diffusers_to_sgm(name, layers_per_block).replace(".", "_")
        else:  # transformers 5 names CLIPTextModel's modules without its `text_model.`: kohya's have it
            path = path if path.startswith("text_model.") else f"text_model.{path}"
            key = f"{_KOHYA_TEXT[component]}_{path.replace('.', '_')}"
        out |= kohya_entries(key, layer)
    return out

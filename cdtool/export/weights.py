"""The weight files of other tools' layouts: diffusers' LoRA, kohya's LoRA and diffusers' Custom
Diffusion processors, for every kind of base.

A key/value delta is exactly a LoRA on attn2.to_k/to_v: low-rank layers keep their factors, and a
full ΔW is written as up = ΔW, down = I (exact; `cdtool compress` first for small files).

- diffusers' LoRA keys name the component (`unet.`, `text_encoder.`, `text_encoder_2.`), as
  `load_lora_weights` reads them on every kind of base, SDXL's included.
- kohya's keys on SDXL are the module names of kohya's SDXL networks, the original (SGM) UNet's
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`), and `lora_te1_`/`lora_te2_` for
  the two text encoders; diffusers' `load_lora_weights`, AUTOMATIC1111 and ComfyUI read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cdtool.delta.file import Delta, LayerDelta, base_param
from cdtool.delta.naming import diffusers_to_sgm
from cdtool.errors import CdtoolError

_CD_NAMES = {
    "to_k": "to_k_custom_diffusion",
    "to_v": "to_v_custom_diffusion",
    "to_q": "to_q_custom_diffusion",
    "to_out.0": "to_out_custom_diffusion.0",
}


_KOHYA_TEXT = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def lora_factors(layer: LayerDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down = ΔW exactly."""
    if layer.up is not None and layer.down is not None:
        return layer.up.float(), layer.down.float()
    assert layer.full is not None
    return layer.full.float(), torch.eye(layer.full.shape[1])


def check_lora(delta: Delta) -> None:
    biased = [n for n, layer in delta.layers.items() if layer.bias is not None]
    if biased:
        raise CdtoolError(
            f"a LoRA cannot carry the bias change of {biased[0]}; export it as diffusers-custom-diffusion or official"
        )


def diffusers_lora_state(delta: Delta) -> dict[str, torch.Tensor]:
    """peft-style keys that `pipe.load_lora_weights` reads (alpha = rank, so scale 1)."""
    check_lora(delta)
    out = {}
    for name, layer in sorted(delta.layers.items()):
        up, down = lora_factors(layer)
        out[f"{name}.lora_A.weight"] = down.contiguous()
        out[f"{name}.lora_B.weight"] = up.contiguous()
    return out


def kohya_state(delta: Delta) -> dict[str, torch.Tensor]:
    """kohya sd-scripts keys (`lora_unet_..._attn2_to_k.lora_down.weight`, `.alpha`)."""
    check_lora(delta)
    out = {}
    for name, layer in sorted(delta.layers.items()):
        component, _, path = name.partition(".")
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te"}[component]
        out |= kohya_entries(f"{prefix}_{path.replace('.', '_')}", layer)
    return out


def kohya_entries(key: str, layer: LayerDelta) -> dict[str, torch.Tensor]:
    """One layer in kohya's keys: its factors and an alpha equal to the rank (scale 1)."""
    up, down = lora_factors(layer)
    return {
        f"{key}.lora_down.weight": down.contiguous(),
        f"{key}.lora_up.weight": up.contiguous(),
        f"{key}.alpha": torch.tensor(float(up.shape[1])),
    }


def custom_diffusion_state(delta: Delta, base: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers' Custom Diffusion processor weights (fine-tuned weights, not differences), with an
    empty entry for every other attention processor of the UNet in `base`."""
    out: dict[str, Any] = {}
    for key in base:
        if key.startswith("unet.") and key.endswith(".to_q.weight"):
            out[f"{key[len('unet.') : -len('.to_q.weight')]}.processor"] = {}
    for name, layer in sorted(delta.layers.items()):
        module = next((m for m in _CD_NAMES if name.endswith(f".attn2.{m}")), None)
        if module is None or not name.startswith("unet."):
            raise CdtoolError(f"diffusers' Custom Diffusion processors hold attn2 projections only, not {name}")
        proc = name[len("unet.") : -len(module) - 1]
        out.pop(f"{proc}.processor", None)
        w0 = base_param(base, f"{name}.weight", torch.Size(layer.shape))
        out[f"{proc}.processor.{_CD_NAMES[module]}.weight"] = (w0.float() + layer.dense().float()).contiguous()
        if layer.bias is not None or module == "to_out.0":
            b0 = base_param(base, f"{name}.bias", torch.Size([layer.shape[0]]))
            db = layer.bias if layer.bias is not None else torch.zeros_like(b0)
            out[f"{proc}.processor.{_CD_NAMES[module]}.bias"] = (b0.float() + db.float()).contiguous()
    return out


def kohya_sdxl_state(delta: Delta, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """kohya's SDXL LoRA keys (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`); the UNet's
    names in the original layout, which counts `layers_per_block` (the UNet config's) per block."""
    check_lora(delta)
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

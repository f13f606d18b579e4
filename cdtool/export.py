"""Writing deltas in other tools' layouts: diffusers LoRA, kohya LoRA, diffusers Custom Diffusion.

A key/value delta is exactly a LoRA on attn2.to_k/to_v: low-rank layers keep their factors, and a
full ΔW is written as up = ΔW, down = I (exact; `cdtool compress` first for small files).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cdtool.atomic import atomic_dir
from cdtool.delta import Delta, LayerDelta, base_param
from cdtool.errors import CdtoolError
from cdtool.export_xl import is_sdxl, kohya_sdxl_state, sdxl_embedding, sdxl_token_files

LORA_FILE = "pytorch_lora_weights.safetensors"
# diffusers' loader needs an entry for every attention processor, empty for the untouched ones,
# which safetensors cannot hold: its own .safetensors output fails to load, so cdtool writes .bin.
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.bin"
_CD_NAMES = {
    "to_k": "to_k_custom_diffusion",
    "to_v": "to_v_custom_diffusion",
    "to_q": "to_q_custom_diffusion",
    "to_out.0": "to_out_custom_diffusion.0",
}


def lora_factors(layer: LayerDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down = ΔW exactly."""
    if layer.up is not None and layer.down is not None:
        return layer.up.float(), layer.down.float()
    assert layer.full is not None
    return layer.full.float(), torch.eye(layer.full.shape[1])


def _check_lora(delta: Delta) -> None:
    biased = [n for n, layer in delta.layers.items() if layer.bias is not None]
    if biased:
        raise CdtoolError(
            f"a LoRA cannot carry the bias change of {biased[0]}; export it as diffusers-custom-diffusion or official"
        )


def diffusers_lora_state(delta: Delta) -> dict[str, torch.Tensor]:
    """peft-style keys that `pipe.load_lora_weights` reads (alpha = rank, so scale 1)."""
    _check_lora(delta)
    out = {}
    for name, layer in sorted(delta.layers.items()):
        up, down = lora_factors(layer)
        out[f"{name}.lora_A.weight"] = down.contiguous()
        out[f"{name}.lora_B.weight"] = up.contiguous()
    return out


def kohya_state(delta: Delta) -> dict[str, torch.Tensor]:
    """kohya sd-scripts keys (`lora_unet_..._attn2_to_k.lora_down.weight`, `.alpha`)."""
    _check_lora(delta)
    out = {}
    for name, layer in sorted(delta.layers.items()):
        component, _, path = name.partition(".")
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te"}[component]
        key = f"{prefix}_{path.replace('.', '_')}"
        up, down = lora_factors(layer)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))
    return out


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


def token_files(delta: Delta) -> dict[str, dict[str, torch.Tensor]]:
    """`<token>.safetensors` -> {token: embedding}, as diffusers writes them for
    `pipe.load_textual_inversion(folder, weight_name=...)` (SDXL: cdtool.export_xl's two-encoder files)."""
    if is_sdxl(delta):
        return sdxl_token_files(delta)
    return {f"{t}.safetensors": {t: (e[0] if e.shape[0] == 1 else e).contiguous()} for t, e in delta.tokens.items()}


def export(
    delta: Delta, target: str, path: Path, base: Mapping[str, torch.Tensor] | None, layers_per_block: int = 2
) -> list[Path]:
    """Write `delta` as `target` at `path` (a folder, except for `official`); returns files written.
    `layers_per_block` is the UNet config's (kohya's SDXL names count it)."""
    from safetensors.torch import save_file

    from cdtool.importers import write_official

    if target == "official":
        if base is None:
            raise CdtoolError("the official layout stores fine-tuned weights: the base model is needed")
        write_official(delta, path, dict(base))
        return [path]
    with atomic_dir(path) as tmp:
        written = []
        if target == "textual-inversion":
            if not delta.tokens:
                raise CdtoolError("the delta has no token embeddings to export as textual inversion")
            if len(delta.tokens) == 1:  # diffusers' default file name
                token, emb = next(iter(delta.tokens.items()))
                state = sdxl_embedding(delta, token) if is_sdxl(delta) else {token: emb.contiguous()}
                save_file(state, str(tmp / "learned_embeds.safetensors"))
                written.append("learned_embeds.safetensors")
        elif delta.layers:
            if target == "diffusers-lora":
                save_file(diffusers_lora_state(delta), str(tmp / LORA_FILE))
                written.append(LORA_FILE)
            elif target == "kohya":
                state = kohya_sdxl_state(delta, layers_per_block) if is_sdxl(delta) else kohya_state(delta)
                save_file(state, str(tmp / "lora.safetensors"), metadata={"ss_network_module": "networks.lora"})
                written.append("lora.safetensors")
            else:
                if base is None:
                    raise CdtoolError("Custom Diffusion weights are fine-tuned weights: the base model is needed")
                torch.save(custom_diffusion_state(delta, base), str(tmp / CUSTOM_DIFFUSION_FILE))
                written.append(CUSTOM_DIFFUSION_FILE)
        for name, state in token_files(delta).items():
            if target in ("kohya", "textual-inversion"):  # A1111 embeddings: the file name is the trigger word
                (tmp / "embeddings").mkdir(exist_ok=True)
                e = next(iter(state.values()))
                a1111 = state if is_sdxl(delta) else {"emb_params": e.reshape(-1, e.shape[-1]).contiguous()}
                save_file(a1111, str(tmp / "embeddings" / name))
                written.append(f"embeddings/{name}")
            if target != "kohya":
                save_file(state, str(tmp / name))
                written.append(name)
    return [path / w for w in written]

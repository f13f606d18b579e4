"""Writing deltas in other tools' layouts: diffusers LoRA, kohya LoRA, diffusers Custom Diffusion.

A key/value delta is exactly a LoRA on attn2.to_k/to_v: low-rank layers keep their factors, and a
full ΔW is written as up = ΔW, down = I (exact; `cdtool compress` first for small files).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cdtool.atomic import inside
from cdtool.delta import Delta, LayerDelta, base_param, check_finite_output, save_safetensors
from cdtool.errors import CdtoolError
from cdtool.export_xl import is_sdxl, kohya_sdxl_state, sdxl_embedding

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


# The stems of the files an export writes itself: a token's file never takes one of these names.
RESERVED_STEMS = (
    "pytorch_lora_weights",
    "pytorch_custom_diffusion_weights",
    "lora",
    "learned_embeds",
    "README",
    "samples",
)
SAMPLES_FILE = "samples.png"
EMBEDDINGS = "embeddings"  # the A1111/ComfyUI embedding files' folder
DIFFUSERS_TOKEN_TARGETS = ("diffusers-lora", "diffusers-custom-diffusion", "textual-inversion")
A1111_TOKEN_TARGETS = ("kohya", "textual-inversion", "checkpoint")


def token_file_stems(delta: Delta) -> dict[str, str]:
    """token -> the stem of its files: Windows-safe, distinct, never one of RESERVED_STEMS."""
    from cdtool.filenames import token_stems

    return token_stems(delta.tokens, RESERVED_STEMS)


def token_files(delta: Delta) -> dict[str, dict[str, torch.Tensor]]:
    """`<stem>.safetensors` -> {token: embedding}, as diffusers writes them for
    `pipe.load_textual_inversion(folder, weight_name=...)` (the token is the file's key)."""
    stems = token_file_stems(delta)
    if is_sdxl(delta):  # both encoders' rows, as cdtool.export_xl writes them
        return {f"{stems[t]}.safetensors": sdxl_embedding(delta, t) for t in delta.tokens}
    return {
        f"{stems[t]}.safetensors": {t: (e[0] if e.shape[0] == 1 else e).contiguous()} for t, e in delta.tokens.items()
    }


def a1111_embeddings(delta: Delta) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """`<stem>.safetensors` -> (tensors, metadata) of AUTOMATIC1111's embedding file: `emb_params`
    [n_vectors, dim]; the UI's prompt word is the file's stem, and the token stays in the metadata."""
    stems = token_file_stems(delta)
    if is_sdxl(delta):  # the UI reads SDXL embeddings as {clip_l, clip_g}
        return {f"{stems[t]}.safetensors": (sdxl_embedding(delta, t), {"token": t}) for t in delta.tokens}
    return {
        f"{stems[t]}.safetensors": ({"emb_params": e.reshape(-1, e.shape[-1]).contiguous()}, {"token": t})
        for t, e in delta.tokens.items()
    }


def export(
    delta: Delta,
    target: str,
    path: Path,
    base: Mapping[str, torch.Tensor] | None,
    *,
    name: str = "",
    model: str | None = None,
    dtype: str = "fp16",
    samples: Path | None = None,
    license: str | None = None,
    layers_per_block: int = 2,
) -> list[Path]:
    """Write `delta` as `target` into the empty folder `path` (for `official`: the file `path`),
    with its model card (README.md); returns the files written. Every file named after a token
    stays inside `path`. `name` is the output folder's
    name (the card's, and the checkpoint file's); `model` the base (`checkpoint` loads it whole);
    `layers_per_block` the UNet config's (kohya's SDXL names count it)."""
    from cdtool.importers import write_official

    if target == "official":
        if base is None:
            raise CdtoolError("the official layout stores fine-tuned weights: the base model is needed")
        write_official(delta, path, dict(base))
        return [path]
    written = _write_weights(delta, target, path, base, name or path.name, model, dtype, layers_per_block)
    if target in DIFFUSERS_TOKEN_TARGETS:
        token_of = {f"{stem}.safetensors": t for t, stem in token_file_stems(delta).items()}
        for file, state in token_files(delta).items():
            # token names are data from strangers; an SDXL file's keys are clip_l/clip_g, so its
            # token is named in the metadata, as in the AUTOMATIC1111 files
            meta = {"token": token_of[file]} if is_sdxl(delta) else None
            save_safetensors(state, inside(path, file), meta)
            written.append(file)
    if target in A1111_TOKEN_TARGETS and delta.tokens:
        (path / EMBEDDINGS).mkdir(exist_ok=True)
        for file, (state, meta) in a1111_embeddings(delta).items():
            save_safetensors(state, inside(path / EMBEDDINGS, file), meta)
            written.append(f"{EMBEDDINGS}/{file}")
    if samples is not None:
        shutil.copyfile(samples, path / SAMPLES_FILE)
        written.append(SAMPLES_FILE)
    written.append(_write_card(delta, target, path, name or path.name, written, samples is not None, license))
    return [path / w for w in written]


def _write_weights(
    delta: Delta,
    target: str,
    path: Path,
    base: Mapping[str, torch.Tensor] | None,
    name: str,
    model: str | None,
    dtype: str,
    layers_per_block: int = 2,
) -> list[str]:
    """The target's own weight file(s), relative to `path`."""
    if target == "textual-inversion":
        if not delta.tokens:
            raise CdtoolError("the delta has no token embeddings to export as textual inversion")
        if len(delta.tokens) == 1:  # diffusers' default file name
            token, emb = next(iter(delta.tokens.items()))
            state = sdxl_embedding(delta, token) if is_sdxl(delta) else {token: emb.contiguous()}
            save_safetensors(state, path / "learned_embeds.safetensors", {"token": token})
            return ["learned_embeds.safetensors"]
        return []
    if target == "checkpoint":
        from cdtool.export_checkpoint import write_checkpoint
        from cdtool.filenames import safe_stem

        if model is None:
            raise CdtoolError("a checkpoint holds the whole base model: the base model is needed")
        file = f"{safe_stem(name)}.safetensors"
        write_checkpoint(delta, model, path / file, dtype)
        return [file]
    if not delta.layers:
        return []
    if target == "diffusers-lora":
        save_safetensors(diffusers_lora_state(delta), path / LORA_FILE)
        return [LORA_FILE]
    if target == "kohya":
        state = kohya_sdxl_state(delta, layers_per_block) if is_sdxl(delta) else kohya_state(delta)
        save_safetensors(state, path / "lora.safetensors", {"ss_network_module": "networks.lora"})
        return ["lora.safetensors"]
    if base is None:
        raise CdtoolError("Custom Diffusion weights are fine-tuned weights: the base model is needed")
    state = custom_diffusion_state(delta, base)
    check_finite_output(state, path / CUSTOM_DIFFUSION_FILE)
    with (path / CUSTOM_DIFFUSION_FILE).open("wb") as f:
        torch.save(state, f)  # to a file object: the archive inside is named `archive`, whatever the folder
    return [CUSTOM_DIFFUSION_FILE]


def _write_card(
    delta: Delta, target: str, path: Path, name: str, written: list[str], samples: bool, license: str | None
) -> str:
    from cdtool.model_card import CARD, CardInputs, TokenFile, model_card

    stems = token_file_stems(delta)
    where = f"{EMBEDDINGS}/" if target in A1111_TOKEN_TARGETS else ""
    token_list = [TokenFile(t, f"{where}{stems[t]}.safetensors", stems[t]) for t in delta.tokens]
    inputs = CardInputs(
        delta=delta,
        target=target,
        folder_name=name,
        files=[*written, CARD],
        token_files=token_list if target in DIFFUSERS_TOKEN_TARGETS + A1111_TOKEN_TARGETS else [],
        samples=SAMPLES_FILE if samples else None,
        license=license,
    )
    (path / CARD).write_text(model_card(inputs), encoding="utf-8")
    return CARD

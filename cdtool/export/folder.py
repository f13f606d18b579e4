"""An export folder: a delta in another tool's layout (`--to`), its weight files (cdtool/export/weights.py),
its token files (cdtool/export/embeddings.py), the sample picture and the model card
(cdtool/export/model_card.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from cdtool.atomic import inside
from cdtool.choices import SDXL
from cdtool.delta.file import Delta, check_finite_output, save_safetensors
from cdtool.errors import CdtoolError
from cdtool.export.embeddings import a1111_embeddings, is_sdxl, sdxl_embedding, token_file_stems, token_files
from cdtool.export.weights import custom_diffusion_state, diffusers_lora_state, kohya_sdxl_state, kohya_state
from cdtool.train.runs import SAMPLES

LORA_FILE = "pytorch_lora_weights.safetensors"
# diffusers' loader needs an entry for every attention processor, empty for the untouched ones,
# which safetensors cannot hold: its own .safetensors output fails to load, so cdtool writes .bin.
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.bin"
EMBEDDINGS = "embeddings"  # the A1111/ComfyUI embedding files' folder
DIFFUSERS_TOKEN_TARGETS = ("diffusers-lora", "diffusers-custom-diffusion", "textual-inversion")
A1111_TOKEN_TARGETS = ("kohya", "textual-inversion", "checkpoint")


def read_source(source: Path, target: str, model_given: bool) -> tuple[Delta, bool]:
    """What `export` writes: a delta in any format, or a whole model's diffusers folder (train
    --method dreambooth), which only `checkpoint` takes, as it is; then its record (no layers, no
    tokens: nothing is applied) and True."""
    from cdtool.delta.importers import read_delta
    from cdtool.errors import UsageError
    from cdtool.models.finetuned import is_model_folder, read_model_record

    if not is_model_folder(source):
        return read_delta(source), False
    if target != "checkpoint":
        raise CdtoolError(
            f"{source} is a whole model; --to checkpoint writes it as one file, the other layouts take a delta: "
            f"`cdtool get-deltas {source} --model BASE -o DELTA.safetensors`, then export that"
        )
    if model_given:
        raise UsageError(f"--model: {source} is a whole model and is exported as it is; leave --model out")
    return read_model_record(source) or Delta(origin=str(source)), True


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
    from cdtool.delta.importers import write_official

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
        shutil.copyfile(samples, path / SAMPLES)
        written.append(SAMPLES)
    written.append(_write_card(delta, target, path, name or path.name, written, samples is not None, license))
    return [path / w for w in written]


def base_names(delta: Delta, target: str, model: str) -> list[str]:
    """The base weights an export reads besides those the delta touches: its `to_out.0` layers'
    biases, and for `diffusers-custom-diffusion` every attention's query (to list the processors)."""
    from cdtool.delta.base import unet_param_names

    names = [f"{n}.bias" for n in delta.layers if n.endswith("to_out.0")]
    if target == "diffusers-custom-diffusion":
        names += [n for n in unet_param_names(model) if n.endswith(".to_q.weight")]
    return names


def kohya_layers_per_block(delta: Delta, base_model: str | None, choose_base: Callable[[], str]) -> int:
    """The UNet's layers per block, which kohya's SDXL names count (2 for every other base): an
    import records no kind, and where its base was read anyway (`base_model`: a Custom Diffusion
    folder's fine-tuned weights) the base says; `choose_base` names it otherwise."""
    if not (delta.kind == SDXL or (delta.kind == "" and base_model is not None)):
        return 2
    from cdtool.models.loading import base_kind, unet_config

    model = base_model or choose_base()
    if delta.kind == SDXL or base_kind(model) == SDXL:
        return int(unet_config(model).get("layers_per_block", 2))
    return 2


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
        from cdtool.export.checkpoint import write_checkpoint
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
    from cdtool.export.model_card import CARD, CardInputs, TokenFile, model_card

    stems = token_file_stems(delta)
    where = f"{EMBEDDINGS}/" if target in A1111_TOKEN_TARGETS else ""
    token_list = [TokenFile(t, f"{where}{stems[t]}.safetensors", stems[t]) for t in delta.tokens]
    inputs = CardInputs(
        delta=delta,
        target=target,
        folder_name=name,
        files=[*written, CARD],
        token_files=token_list if target in DIFFUSERS_TOKEN_TARGETS + A1111_TOKEN_TARGETS else [],
        samples=SAMPLES if samples else None,
        license=license,
    )
    (path / CARD).write_text(model_card(inputs), encoding="utf-8")
    return CARD

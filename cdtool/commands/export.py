"""`cdtool export`: a delta in the layouts other tools load."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.atomic import claim_output
from cdtool.commands.common import (
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    cdtool_command,
    examples,
    pick_available_model,
    pick_model,
)
from cdtool.errors import CdtoolError, UsageError


class Target(str, Enum):
    diffusers_lora = "diffusers-lora"
    kohya = "kohya"
    diffusers_custom_diffusion = "diffusers-custom-diffusion"
    official = "official"
    textual_inversion = "textual-inversion"
    checkpoint = "checkpoint"


class CheckpointDtype(str, Enum):
    fp16 = "fp16"
    fp32 = "fp32"
    bf16 = "bf16"


def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A delta in any supported format (or, for --to checkpoint, a whole model's diffusers folder).",
            show_default=False,
        ),
    ],
    to: Annotated[Target, typer.Option("--to", help="Target layout.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (a .bin file for --to official).")],
    model: ModelOpt = None,
    dtype: Annotated[
        CheckpointDtype | None, typer.Option("--dtype", help="checkpoint: the weights' type.", show_default="fp16")
    ] = None,
    samples: Annotated[
        Path | None,
        typer.Option(
            "--samples",
            help="A picture for the model card (samples.png in the folder); default: the training run's samples.png.",
        ),
    ] = None,
    license: Annotated[
        str | None,
        typer.Option(
            "--license",
            help="The model card's license (a Hub license id); default: the base's where known "
            "(creativeml-openrail-m for Stable Diffusion 1.x), else other.",
        ),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a delta for other tools; every folder gets a model card (README.md, in the Hub's layout).

    diffusers-lora: pytorch_lora_weights.safetensors (pipe.load_lora_weights) and a token file per
    token (pipe.load_textual_inversion). kohya: lora.safetensors with alphas, and AUTOMATIC1111
    embeddings/. diffusers-custom-diffusion: pytorch_custom_diffusion_weights.bin and the token
    files, the layout of diffusers' train_custom_diffusion.py; load with pipe.unet.load_attn_procs(DIR,
    weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe) (without _pipeline diffusers
    silently loads nothing) and pipe.load_textual_inversion. official: the official delta.bin.
    textual-inversion: learned_embeds.safetensors and the token files for pipe.load_textual_inversion,
    and AUTOMATIC1111 embeddings/. checkpoint: the base model with the delta applied, one
    FOLDER.safetensors in the original Stable Diffusion layout (AUTOMATIC1111, ComfyUI,
    StableDiffusionPipeline.from_single_file), and the tokens as AUTOMATIC1111 embeddings/; from a
    whole model's diffusers folder (train --method dreambooth), that model as one file.
    A token's file is named without < and > (Windows-safe): <new1> is new1.safetensors, and the token
    is inside the file.
    An SDXL delta's token files hold both encoders' rows (clip_l, clip_g: the embedding AUTOMATIC1111
    and ComfyUI read; diffusers loads each with load_textual_inversion(..., text_encoder=, tokenizer=)),
    and its kohya LoRA the original UNet's names (lora_unet_input_blocks_..., lora_te1_, lora_te2_).
    """
    # the library loads here, not at the top, so that `cdtool export --help` starts without torch
    from cdtool.export.folder import export as write_export
    from cdtool.export.folder import read_source

    if to is Target.official and output.suffix != ".bin":
        raise UsageError(f"{output}: --to official writes a .bin file")
    if dtype is not None and to is not Target.checkpoint:
        raise UsageError("--dtype is for --to checkpoint")
    if to is Target.official and (samples is not None or license is not None):
        raise UsageError("--samples and --license are for the model card of a folder export, not --to official")
    if samples is not None and not samples.is_file():
        raise CdtoolError(f"--samples {samples}: no such file")
    out = claim_output(output, "export", force, folder=to is not Target.official, inputs=[source])
    delta, whole = read_source(source, to.value, model is not None)
    delta.refuse_personal("export cannot write it: other tools have no InstantBooth adapters for its visual tokens")
    base, base_model = None, None
    if to is Target.checkpoint:
        base_model = str(source) if whole else pick_available_model(model, [delta.base_model])
    elif delta.needs_base or to in (Target.official, Target.diffusers_custom_diffusion):
        from cdtool.delta.base import resolve_on_base
        from cdtool.export.folder import base_names

        base_model = pick_model(model, [delta.base_model])
        delta, base = resolve_on_base(delta, base_model, extra=base_names(delta, to.value, base_model))
    per_block = 2
    if to is Target.kohya:
        from cdtool.export.folder import kohya_layers_per_block

        per_block = kohya_layers_per_block(delta, base_model, lambda: pick_model(model, [delta.base_model]))
    options: dict[str, Any] = {}
    if to is not Target.official:
        from cdtool.export.model_card import run_samples

        options = dict(
            name=output.name,
            model=base_model,
            dtype=(dtype or CheckpointDtype.fp16).value,
            samples=samples or run_samples(delta, source),
            license=license,
            layers_per_block=per_block,
        )
    with out.staged() as stage:
        files = [output / f.relative_to(stage) for f in write_export(delta, to.value, stage, base, **options)]
    console.log(f"wrote {len(files)} file(s) for {to.value}")
    if json_out:
        console.result_json({"output": str(output), "to": to.value, "files": [str(f) for f in files]})
    else:
        for f in files:
            console.result(str(f))


EXAMPLES = examples(
    "cdtool export db.safetensors --to diffusers-lora -o db-lora/",
    "cdtool export pets.safetensors --to checkpoint -o pets-sd15/",
    "cdtool export cat.safetensors --to official -o delta.bin",
)


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EXAMPLES)(cdtool_command(export))

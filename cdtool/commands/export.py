"""`cdtool export`: a delta in the layouts other tools load."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cdtool import console
from cdtool.atomic import check_writable
from cdtool.commands.common import ForceOpt, JsonOpt, ModelOpt, QuietOpt, cdtool_command, examples, pick_model
from cdtool.errors import UsageError


class Target(str, Enum):
    diffusers_lora = "diffusers-lora"
    kohya = "kohya"
    diffusers_custom_diffusion = "diffusers-custom-diffusion"
    official = "official"
    textual_inversion = "textual-inversion"


def export(
    source: Annotated[Path, typer.Argument(help="A delta in any supported format.", show_default=False)],
    to: Annotated[Target, typer.Option("--to", help="Target layout.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (a .bin file for --to official).")],
    model: ModelOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a delta for other tools.

    diffusers-lora: pytorch_lora_weights.safetensors (pipe.load_lora_weights) and <token>.safetensors
    (pipe.load_textual_inversion). kohya: lora.safetensors with alphas, and A1111 embeddings.
    diffusers-custom-diffusion: pytorch_custom_diffusion_weights.bin and <token>.safetensors, the
    layout of diffusers' train_custom_diffusion.py; load with pipe.unet.load_attn_procs(DIR,
    weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe) (without _pipeline diffusers
    silently loads nothing) and pipe.load_textual_inversion. official: the official delta.bin.
    textual-inversion: learned_embeds.safetensors / <token>.safetensors for pipe.load_textual_inversion
    and A1111 embeddings/.
    An SDXL delta's token files hold both encoders' rows (clip_l, clip_g: the embedding AUTOMATIC1111
    and ComfyUI read; diffusers loads each with load_textual_inversion(..., text_encoder=, tokenizer=)),
    and its kohya LoRA the original UNet's names (lora_unet_input_blocks_..., lora_te1_, lora_te2_).
    """
    # the library loads here, not at the top, so that `cdtool export --help` starts without torch
    from cdtool.export import export as write_export
    from cdtool.importers import read_delta

    if to is Target.official and output.suffix != ".bin":
        raise UsageError(f"{output}: --to official writes a .bin file")
    check_writable(output, force)
    delta = read_delta(source)
    base = None
    if delta.needs_base or to in (Target.official, Target.diffusers_custom_diffusion):
        from cdtool.base import fingerprint_names, load_base_params, unet_param_names

        base_model = pick_model(model, [delta.base_model])
        names = fingerprint_names(delta)
        names += [f"{n}.bias" for n in delta.layers if n.endswith("to_out.0") and f"{n}.bias" not in names]
        if to is Target.diffusers_custom_diffusion:  # every attention's query, to list the processors
            names += [n for n in unet_param_names(base_model) if n.endswith(".to_q.weight") and n not in names]
        base = load_base_params(base_model, names)
        if delta.needs_base:
            delta = delta.relative_to(base)
    per_block = 2
    if to is Target.kohya and delta.kind == "sdxl":  # kohya's SDXL names count the UNet's layers per block
        from cdtool.models import unet_config

        per_block = int(unet_config(pick_model(model, [delta.base_model])).get("layers_per_block", 2))
    files = write_export(delta, to.value, output, base, per_block)
    console.log(f"wrote {len(files)} file(s) for {to.value}")
    if json_out:
        console.result_json({"output": str(output), "to": to.value, "files": [str(f) for f in files]})
    else:
        for f in files:
            console.result(str(f))


EXAMPLES = examples(
    "cdtool export cat.safetensors --to diffusers-custom-diffusion -o cat-diffusers/",
    "cdtool export db.safetensors --to diffusers-lora -o db-lora/",
    "cdtool export cat.safetensors --to official -o delta.bin",
)


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EXAMPLES)(cdtool_command(export))

"""`cdtool get-deltas`: a cdtool delta from a fine-tuned model or from any importable delta file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdtool import console
from cdtool.atomic import claim_output
from cdtool.commands.common import (
    BaseAliasOpt,
    DeltaOutputOpt,
    ForceOpt,
    JsonOpt,
    Layers,
    LayersOpt,
    ModelOpt,
    QuietOpt,
    cdtool_command,
    examples,
    pick_alias,
    pick_model,
)
from cdtool.errors import CdtoolError

EXAMPLES = examples(
    "cdtool get-deltas finetuned-sd15/ --model stable-diffusion-v1-5/stable-diffusion-v1-5 -o cat.safetensors",
    "cdtool get-deltas delta.bin -o cat.safetensors",
    "cdtool get-deltas cat.run/checkpoints/step-000100 -o cat-100.safetensors",
)


def get_deltas(
    source: Annotated[
        Path,
        typer.Argument(
            help="A fine-tuned model (diffusers folder or checkpoint), or a delta file in any supported format.",
            show_default=False,
        ),
    ],
    output: DeltaOutputOpt,
    model: ModelOpt = None,
    base: BaseAliasOpt = None,
    layers: LayersOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract a delta from a fully fine-tuned model, or convert any importable delta to cdtool's format.

    Importable: cdtool files, the official Custom Diffusion delta.bin / CompVis .ckpt (also
    compressed), and diffusers' pytorch_custom_diffusion_weights + <token> files.
    """
    # the library loads here, not at the top, so that `cdtool get-deltas --help` starts without torch
    from cdtool.delta.extract import delta_from_source
    from cdtool.delta.importers import check_delta_output, save_delta

    model = pick_alias(model, base, "--model", "--base")
    layer_set = (layers or Layers.kv).value
    if not source.exists():
        raise CdtoolError(f"{source}: no such file or folder")
    check_delta_output(output)
    claim = claim_output(output, "get-deltas", force, inputs=[source])
    bin_output = output.suffix == ".bin"
    got = delta_from_source(
        source,
        lambda recorded: pick_model(model, recorded),
        layer_set,
        read_base=bin_output,
        log=console.log,
        warn=console.warn,
    )
    delta = got.delta
    with claim.staged() as tmp:
        save_delta(delta, tmp, got.base if bin_output else None)
    if json_out:
        console.result_json(
            {
                "output": str(output),
                "source_format": got.source_format,
                "layers_matched": got.matched,
                "layers": len(delta.layers),
                "tokens": list(delta.tokens),
                "base_model": delta.base_model,
            }
        )
    else:
        console.result(str(output))


def register(app: typer.Typer) -> None:
    app.command("get-deltas", epilog=EXAMPLES)(cdtool_command(get_deltas))

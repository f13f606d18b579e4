"""`cdtool personalize`: a subject's photos through a trained InstantBooth encoder, in one forward pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdtool import console
from cdtool.atomic import claim_output
from cdtool.commands.common import DeviceOpt, ForceOpt, JsonOpt, QuietOpt, cdtool_command, examples
from cdtool.errors import UsageError

EXAMPLES = examples(
    "cdtool personalize photos/mittens/ --encoder cat-encoder -o mittens.safetensors",
    "cdtool personalize IMG_01.jpg IMG_02.jpg --encoder cat-encoder --token '<mittens>' -o mittens.safetensors",
)


def personalize(
    photos: Annotated[
        list[str],
        typer.Argument(
            help="Photos of one subject: files, folders or globs. Cut out (an alpha channel, as background "
            "removers write): the encoders see the subject alone.",
            show_default=False,
            metavar="PHOTOS",
        ),
    ],
    encoder: Annotated[
        Path, typer.Option("--encoder", help="The encoder folder (from `cdtool train-encoder`).", show_default=False)
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The concept file to write (.safetensors).", show_default=False)
    ],
    token: Annotated[
        str | None, typer.Option("--token", help="The concept's token in prompts (default: the encoder's identifier).")
    ] = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Personalise in one forward pass: the photos' identifier embedding and visual tokens, written
    as a concept file that `sample --delta` applies (its scale is the adapters' strength), `info`
    describes and `score` judges the samples of. No training: the encoder's category only, one
    concept per image (merge refuses the file). Then: `cdtool sample "a <new1> cat on the moon"
    --delta mittens.safetensors -o out/`.
    """
    from cdtool.dataset.prep import expand_inputs
    from cdtool.delta.file import write_cdtool
    from cdtool.instant.personal import personalize as run
    from cdtool.models.loading import resolve_device

    if output.suffix != ".safetensors":
        raise UsageError(f"{output}: a personalised concept is a .safetensors file (cdtool's delta format)")
    files = expand_inputs(photos)
    if not files:
        raise UsageError(f"no images in {' '.join(photos)}")
    claim = claim_output(output, "personalize", force, inputs=[*files, encoder])
    concept = run(files, encoder, token, device=str(resolve_device(device)))
    with claim.staged() as tmp:
        write_cdtool(concept, tmp)
    console.log(f"{len(files)} photos -> {output} (token {next(iter(concept.tokens))})")
    if json_out:
        console.result_json({"output": str(output), "token": next(iter(concept.tokens)), "photos": len(files)})
    else:
        console.result(str(output))


def register(app: typer.Typer) -> None:
    app.command("personalize", epilog=EXAMPLES)(cdtool_command(personalize))

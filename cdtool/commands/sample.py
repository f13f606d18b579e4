"""`cdtool sample`: images from the base model with deltas applied."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdtool import console
from cdtool.atomic import probe_writable
from cdtool.commands.common import (
    DeltaOpt,
    DeviceOpt,
    DtypeOpt,
    FolderOutputOpt,
    ForceOpt,
    IgnoreBaseOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    Scheduler,
    SeedOpt,
    cdtool_command,
    examples,
    parse_scaled,
    pick_available_model,
)
from cdtool.errors import CdtoolError, UsageError


def sample(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts (quote each one).", show_default=False, metavar="PROMPT...")
    ] = None,
    output: FolderOutputOpt = Path("samples"),
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts", help="File of prompts: one per line, or a JSON list.")
    ] = None,
    delta: DeltaOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images per prompt.")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale.")] = 6.0,
    scheduler: Annotated[Scheduler, typer.Option("--scheduler", help="Sampler.")] = Scheduler("ddim"),  # type: ignore[assignment]
    seed: SeedOpt = 0,
    height: Annotated[int | None, typer.Option("--height", help="Image height (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Image width (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 1,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="Negative prompt.")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png (a row per prompt).")] = False,
    dreambench: Annotated[
        Path | None,
        typer.Option("--dreambench", help="DreamBench's prompts_and_classes.txt: add the 25 prompts of --subject."),
    ] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="DreamBench subject, e.g. dog.")] = None,
    token: Annotated[str, typer.Option("--token", help="Modifier token put into DreamBench prompts.")] = "<new1>",
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    ignore_base_mismatch: IgnoreBaseOpt = False,
    encoder: Annotated[
        Path | None,
        typer.Option(
            "--encoder",
            help="The encoder folder of a personalised concept (cdtool personalize), where it is not the one "
            "the concept records.",
        ),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate images with the base model and any deltas applied.

    Image k of each prompt starts from noise seeded with seed+k and drawn on the CPU, so a seed
    names the same images on any device (same seed and batch size: identical files). An existing
    image is kept when the request that made it (recorded in the PNG: model, deltas and their
    scales, steps, guidance, size, scheduler, seed, negative prompt) is this one; another request
    stops with an error, and --force regenerates.
    Writes PNGs and prompts.json (file name -> prompt) and prints the folder.

    A personalised concept (`cdtool personalize`) brings its encoder's adapters; its scale is their
    strength, and they act on the images whose prompt holds its token.
    """
    # the library loads here, not at the top, so that `cdtool sample --help` starts without torch
    from cdtool.delta.importers import read_delta
    from cdtool.sampling.folder import PROMPTS_FILE, gather_prompts, write_samples
    from cdtool.sampling.generate import check_size

    all_prompts = gather_prompts(prompts or [], prompts_file, dreambench, subject, token)
    if not all_prompts:
        raise UsageError("give at least one prompt, or --prompts FILE")
    if output.exists() and not output.is_dir():
        raise CdtoolError(f"{output} exists and is not a folder")
    for size, flag in ((height, "--height"), (width, "--width")):
        check_size(size, flag)
    from cdtool.models.loading import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))
    deltas = [(p, read_delta(p), s) for p, s in map(parse_scaled, delta or [])]
    model_id = pick_available_model(model, [d.base_model for _, d, _ in deltas])
    probe_writable(output / PROMPTS_FILE)
    run = write_samples(
        output, all_prompts, deltas, model_id, n=n, steps=steps, guidance=guidance, scheduler=scheduler.value,
        seed=seed, height=height, width=width, batch_size=batch_size, negative_prompt=negative_prompt, device=device,
        dtype=dtype, ignore_base_mismatch=ignore_base_mismatch, force=force, grid=grid, encoder=encoder,
    )  # fmt: skip
    if json_out:
        console.result_json(
            {
                "output": str(output),
                "images": [j.file_name for j in run.jobs],
                "generated": [j.file_name for j in run.generated],
                "skipped": run.kept,
                "prompts": all_prompts,
            }
        )
    else:
        console.result(str(output))


EXAMPLES = examples(
    'cdtool sample "photo of a <new1> cat" -d cat.safetensors -o out/',
    "cdtool sample --prompts prompts.txt -d cat.safetensors:0.8 --n 2 --grid -o out/",
)


def register(app: typer.Typer) -> None:
    app.command("sample", epilog=EXAMPLES)(cdtool_command(sample))

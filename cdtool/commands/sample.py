"""`cdtool sample`: images from the base model with deltas applied."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.atomic import atomic_path, probe_writable
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
from cdtool.errors import CdtoolError, UsageError, read_text
from cdtool.hashing import path_sha256

PROMPTS_FILE = "prompts.json"


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSON list."""
    text = read_text(path, "prompts file")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CdtoolError(f"{path}: not valid JSON ({e}); give a list of prompt strings") from e
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise CdtoolError(f"{path}: expected a JSON list of prompt strings")
        return [p.strip() for p in data if p.strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


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
    from cdtool.sampling.generate import (
        REQUEST_KEY,
        check_size,
        generate,
        image_grid,
        image_request,
        plan_jobs,
        save_png,
    )

    all_prompts = list(prompts or [])
    if prompts_file is not None:
        all_prompts += read_prompts(prompts_file)
    if (dreambench is None) != (subject is None):
        raise UsageError("--dreambench and --subject go together")
    if dreambench is not None and subject is not None:
        from cdtool.sampling.dreambench import parse

        noun, bench = parse(dreambench).prompts(subject, token)
        console.log(f"DreamBench: {len(bench)} prompts for {subject} ({noun})")
        all_prompts += bench
    if not all_prompts:
        raise UsageError("give at least one prompt, or --prompts FILE")
    if output.exists() and not output.is_dir():
        raise CdtoolError(f"{output} exists and is not a folder")
    for size, flag in ((height, "--height"), (width, "--width")):
        check_size(size, flag)
    from cdtool.delta.base import model_fingerprint
    from cdtool.models.loading import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))
    specs = [parse_scaled(d) for d in delta or []]
    deltas = [(read_delta(p), s) for p, s in specs]
    model_id = pick_available_model(model, [d.base_model for d, _ in deltas])
    probe_writable(output / PROMPTS_FILE)
    recorded = _claim_folder(output, force)
    request = {
        "model": model_id,
        "deltas": [{"sha256": path_sha256(p), "scale": s} for p, s in specs],
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler.value,
        "height": height,
        "width": width,
        "negative_prompt": negative_prompt or "",
    }

    jobs = plan_jobs(all_prompts, n, seed)
    skipped = [] if force else _kept(output, jobs, request)
    todo = [j for j in jobs if j.file_name not in skipped]

    images: dict[str, Any] = {}
    try:
        if todo:
            from cdtool.models.pipeline import load_with_deltas
            from cdtool.sampling.generate import set_scheduler

            def note_base(pipe: Any) -> None:
                request.setdefault("base_fingerprint", model_fingerprint(model_id, pipe))

            pipe = load_with_deltas(
                model_id,
                deltas,
                device=device,
                dtype=dtype,
                ignore_base_mismatch=ignore_base_mismatch,
                on_base=note_base,
                encoder=encoder,
            )
            default = pipe.unet.config.sample_size * pipe.vae_scale_factor
            for size, flag in ((height, "--height"), (width, "--width")):
                check_size(size, flag, pipe.vae_scale_factor)
            set_scheduler(pipe, scheduler.value)
            with console.progress("sampling", len(todo), plain=True) as bar:
                for job, image in generate(
                    pipe,
                    todo,
                    steps=steps,
                    guidance=guidance,
                    height=height or default,
                    width=width or default,
                    batch_size=batch_size,
                    negative_prompt=negative_prompt,
                ):
                    meta = json.dumps(image_request(request, job), sort_keys=True)
                    save_png(image, output / job.file_name, {REQUEST_KEY: meta})
                    images[job.file_name] = image
                    bar.advance()
    finally:  # complete, or a record of what was made: the same command makes the rest
        _record(output, recorded, jobs, len(todo) - len(images))
    if grid:
        from cdtool.dataset.images import open_image

        tiles = [images.get(j.file_name) or open_image(output / j.file_name).convert("RGB") for j in jobs]
        save_png(image_grid(tiles, n), output / "grid.png")
    if json_out:
        console.result_json(
            {
                "output": str(output),
                "images": [j.file_name for j in jobs],
                "generated": [j.file_name for j in todo],
                "skipped": skipped,
                "prompts": all_prompts,
            }
        )
    else:
        console.result(str(output))


def _kept(output: Path, jobs: list[Any], request: dict[str, Any]) -> list[str]:
    """The images of `jobs` already in `output`, kept because this request made them; one that
    another request made is an error (it would be mislabelled)."""
    from cdtool.delta.base import model_fingerprint
    from cdtool.sampling.generate import image_request, request_differences

    there = [j for j in jobs if (output / j.file_name).exists()]
    if there:
        request["base_fingerprint"] = model_fingerprint(request["model"])
    for job in there:
        differ = request_differences(output / job.file_name, image_request(request, job))
        if differ:
            raise CdtoolError(
                f"{output / job.file_name} was made by another request ({', '.join(differ)} differ); pass "
                "--force to regenerate it, or choose another --output"
            )
    if there:
        console.log(
            f"{len(there)} of {len(jobs)} images already exist in {output}, made by the same request; keeping "
            "them (--force regenerates)"
        )
    return [j.file_name for j in there]


def _claim_folder(output: Path, force: bool) -> dict[str, str]:
    """Lock the folder for this command, remove what a killed one left in it, and return its
    prompts.json mapping; a prompts.json that `cdtool sample` did not write (or cannot be read as
    one) is refused before any work, and replaced only with --force."""
    from cdtool import locks
    from cdtool.atomic import clear_leftovers, clear_leftovers_inside
    from cdtool.sampling.generate import read_prompt_map, written_by_sample

    locks.acquire(output)
    clear_leftovers(output, console.warn)
    clear_leftovers_inside(output, console.warn)
    path = output / PROMPTS_FILE
    if not os.path.lexists(path):
        return {}
    try:
        mapping = read_prompt_map(path)
        if not path.is_file() or path.is_symlink() or not written_by_sample(mapping):
            raise CdtoolError(f"{path}: names images that cdtool sample did not make")
    except CdtoolError as e:
        if force:
            console.warn(f"{path} was not written by cdtool sample; replacing it (--force)")
            return {}
        raise CdtoolError(
            f"{e}; cdtool sample keeps its own prompts.json there: move that file away, pass --force to "
            "replace it, or choose another --output"
        ) from None
    return mapping


def _record(output: Path, recorded: dict[str, str], jobs: list[Any], missing: int) -> None:
    """prompts.json for the images of `jobs` now in the folder (all of them, unless the command
    was stopped: then the images made so far, each recording its request, so that running the
    same command again keeps them and makes the rest)."""
    made = {j.file_name: j.prompt for j in jobs if (output / j.file_name).is_file()}
    if not made:
        return
    with atomic_path(output / PROMPTS_FILE) as tmp:
        tmp.write_text(json.dumps(recorded | made, indent=1, sort_keys=True), encoding="utf-8")
    if missing:
        console.warn(
            f"{output}: {len(made)} of {len(jobs)} images made; prompts.json records them; the same command "
            "makes the rest"
        )


EXAMPLES = examples(
    'cdtool sample "photo of a <new1> cat" -d cat.safetensors -o out/',
    "cdtool sample --prompts prompts.txt -d cat.safetensors:0.8 --n 2 --grid -o out/",
)


def register(app: typer.Typer) -> None:
    app.command("sample", epilog=EXAMPLES)(cdtool_command(sample))

"""A folder of samples as `cdtool sample` writes it: PNGs that record the request that made them
(an image is kept on a re-run only for the same request), prompts.json (file name -> prompt) and
an optional grid."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdtool import console
from cdtool.atomic import atomic_path
from cdtool.errors import CdtoolError, UsageError, read_text
from cdtool.sampling.generate import (
    REQUEST_KEY,
    Job,
    check_size,
    generate,
    image_grid,
    image_request,
    plan_jobs,
    save_png,
)

if TYPE_CHECKING:
    from cdtool.delta.file import Delta

PROMPTS_FILE = "prompts.json"
GRID = "grid.png"


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


def gather_prompts(
    prompts: list[str], prompts_file: Path | None, dreambench: Path | None, subject: str | None, token: str
) -> list[str]:
    """The prompts given, then those of a prompts file, then DreamBench's prompts for `subject`
    (from the dataset's own `dreambench` file, with `token` filled in)."""
    gathered = list(prompts)
    if prompts_file is not None:
        gathered += read_prompts(prompts_file)
    if (dreambench is None) != (subject is None):
        raise UsageError("--dreambench and --subject go together")
    if dreambench is not None and subject is not None:
        from cdtool.sampling.dreambench import parse

        noun, bench = parse(dreambench).prompts(subject, token)
        console.log(f"DreamBench: {len(bench)} prompts for {subject} ({noun})")
        gathered += bench
    return gathered


@dataclass
class SampleRun:
    jobs: list[Job]  # every image asked for
    generated: list[Job]  # those made now
    kept: list[str]  # the file names of those already there, made by the same request


def write_samples(
    output: Path,
    prompts: list[str],
    deltas: list[tuple[Path, Delta, float]],
    model: str,
    *,
    n: int,
    steps: int,
    guidance: float,
    scheduler: str,
    seed: int,
    height: int | None,
    width: int | None,
    batch_size: int,
    negative_prompt: str | None,
    device: str,
    dtype: str,
    ignore_base_mismatch: bool = False,
    force: bool = False,
    grid: bool = False,
    encoder: Path | None = None,
) -> SampleRun:
    """`n` images of each prompt into `output`, from the base `model` with the deltas (path, delta,
    scale) applied; image k of a prompt starts from noise seeded with `seed` + k. Images already
    there that the same request made are kept (unless `force`); one another request made is an
    error. Also writes prompts.json and, with `grid`, grid.png (a row per prompt). A personalised
    concept among the deltas brings its encoder's adapters (from the folder it records, or
    `encoder`). The folder is locked meanwhile (claim_folder); a run that stops records the images
    made so far, so the same request makes the rest."""
    from cdtool import locks
    from cdtool.delta.base import model_fingerprint
    from cdtool.hashing import path_sha256

    lock = locks.acquire(output)
    try:
        recorded = claim_folder(output, force)
        request = {
            "model": model,
            "deltas": [{"sha256": path_sha256(p), "scale": s} for p, _, s in deltas],
            "steps": steps,
            "guidance": guidance,
            "scheduler": scheduler,
            "height": height,
            "width": width,
            "negative_prompt": negative_prompt or "",
        }
        jobs = plan_jobs(prompts, n, seed)
        skipped = [] if force else kept_images(output, jobs, request)
        todo = [j for j in jobs if j.file_name not in skipped]

        images: dict[str, Any] = {}
        try:
            if todo:
                from cdtool.models.pipeline import load_with_deltas
                from cdtool.sampling.generate import set_scheduler

                def note_base(pipe: Any) -> None:
                    request.setdefault("base_fingerprint", model_fingerprint(model, pipe))

                pipe = load_with_deltas(
                    model,
                    [(d, s) for _, d, s in deltas],
                    device=device,
                    dtype=dtype,
                    ignore_base_mismatch=ignore_base_mismatch,
                    on_base=note_base,
                    encoder=encoder,
                )
                default = pipe.unet.config.sample_size * pipe.vae_scale_factor
                for size, flag in ((height, "--height"), (width, "--width")):
                    check_size(size, flag, pipe.vae_scale_factor)
                set_scheduler(pipe, scheduler)
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
            record_prompts(output, recorded, jobs, len(todo) - len(images))
        if grid:
            from cdtool.dataset.images import open_image

            tiles = [images.get(j.file_name) or open_image(output / j.file_name).convert("RGB") for j in jobs]
            save_png(image_grid(tiles, n), output / GRID)
    finally:
        locks.release(lock)
    return SampleRun(jobs, todo, skipped)


def kept_images(output: Path, jobs: list[Job], request: dict[str, Any]) -> list[str]:
    """The images of `jobs` already in `output`, kept because this request made them; one that
    another request made is an error (it would be mislabelled)."""
    from cdtool.delta.base import model_fingerprint
    from cdtool.sampling.generate import request_differences

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


def claim_folder(output: Path, force: bool) -> dict[str, str]:
    """Remove what a killed `cdtool sample` left in `output` (locked by the caller) and return its
    prompts.json mapping; a prompts.json that `cdtool sample` did not write (or cannot be read as
    one) is refused before any work, and replaced only with `force`."""
    from cdtool.atomic import clear_leftovers, clear_leftovers_inside
    from cdtool.sampling.generate import read_prompt_map, written_by_sample

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


def record_prompts(output: Path, recorded: dict[str, str], jobs: list[Job], missing: int) -> None:
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

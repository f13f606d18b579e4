"""Image generation with deterministic, device-independent noise."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdtool.choices import SCHEDULERS
from cdtool.errors import CdtoolError, UsageError


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's scheduler for one of SCHEDULERS, keeping the model's noise schedule."""
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: str
    prompt_index: int
    seed: int
    file_name: str


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt: its words (in any script) joined by dashes, then a
    short hash of the exact text, so prompts that differ only in punctuation, case or spacing
    never share a name."""
    words = re.sub(r"[\W_]+", "-", unicodedata.normalize("NFKC", text).lower()).strip("-")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{words[:limit].rstrip('-') or 'prompt'}-{digest}"


def plan_jobs(prompts: Sequence[str], n: int, seed: int) -> list[Job]:
    """Image k of every prompt uses seed + k, so prompts and deltas compare on the same noise."""
    return [Job(p, i, seed + k, f"{i:03d}-{slug(p)}-s{seed + k}.png") for i, p in enumerate(prompts) for k in range(n)]


MAX_SIDE = 4096


def check_size(value: int | None, flag: str, factor: int = 8) -> None:
    """An image side a Stable Diffusion model can make: a whole number of the VAE's `factor`-pixel
    blocks, and at most MAX_SIDE (memory grows with the square of the side)."""
    if value is None:
        return
    if value < factor or value % factor:
        raise UsageError(
            f"{flag} {value} is not a multiple of {factor}: the model's VAE works in {factor}-pixel blocks"
        )
    if value > MAX_SIDE:
        raise UsageError(
            f"{flag} {value} is more than {MAX_SIDE} pixels: memory grows with the square of the size "
            f"(Stable Diffusion 1.x makes 512, SDXL 1024); sample smaller and upscale"
        )


# The PNG text chunk holding the request an image was made by (JSON).
REQUEST_KEY = "parameters"


def image_request(request: dict[str, Any], job: Job) -> dict[str, Any]:
    """Everything that decides one image: the command's request, its prompt and its seed."""
    return dict(request, prompt=job.prompt, seed=job.seed)


def request_differences(path: Path, wanted: dict[str, Any]) -> list[str]:
    """The parts of `wanted` the request recorded in the PNG at `path` differs in ([] when the same)."""
    from cdtool.dataset.images import ImageError, open_image

    try:
        with open_image(path) as im:
            text = getattr(im, "text", {}).get(REQUEST_KEY)
        recorded = json.loads(text) if text else None
    except (ImageError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return ["the request, which it does not record"]
    keys = sorted(set(recorded) | set(wanted))
    return [k for k in keys if recorded.get(k) != json.loads(json.dumps(wanted.get(k)))]


def read_prompt_map(path: Path) -> dict[str, str]:
    """A sample folder's prompts.json: image file name -> prompt. Anything else (not JSON, a list,
    values that are not strings, not UTF-8) is one error naming the file."""
    from cdtool.errors import read_text

    try:
        doc = json.loads(read_text(path, "prompts file"))
    except json.JSONDecodeError as e:
        raise CdtoolError(f"{path}: not valid JSON ({e}); it should map image file names to prompts") from e
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        held = f"a JSON {type(doc).__name__}" if not isinstance(doc, dict) else "values other than prompt strings"
        raise CdtoolError(f"{path}: holds {held}; it should map image file names to prompts")
    return doc


_SAMPLE_NAME = re.compile(r"\d{3}-.+-s-?\d+\.png")


def written_by_sample(mapping: dict[str, str]) -> bool:
    """Whether a prompts.json mapping names only images as `cdtool sample` names them."""
    return all(_SAMPLE_NAME.fullmatch(name) for name in mapping)


def initial_latents(pipe: Any, seed: int, height: int, width: int) -> torch.Tensor:
    """Starting noise for one image, drawn from a seeded CPU generator."""
    f = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, height // f, width // f)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def generate(
    pipe: Any,
    jobs: Sequence[Job],
    *,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    batch_size: int,
    negative_prompt: str | None,
) -> Iterator[tuple[Job, Any]]:
    """Yield (job, PIL image) in batches of `batch_size`. A personalised concept attached to the
    pipeline (`pipe.cdtool_concept`) goes to the images whose prompt asks for it."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    concept = getattr(pipe, "cdtool_concept", None)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        if concept is not None:
            concept.choose([j.prompt for j in batch], guided=guidance > 1)
        latents = torch.stack([initial_latents(pipe, j.seed, height, width) for j in batch])
        gens = [torch.Generator("cpu").manual_seed(j.seed + 1_000_003) for j in batch]
        out = pipe(
            prompt=[j.prompt for j in batch],
            negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            latents=latents.to(device, dtype),
            generator=gens,
            output_type="np",
        )
        for job, pixels in zip(batch, out.images, strict=True):
            if not np.isfinite(pixels).all():  # drawn as a black image, were it converted
                raise CdtoolError(
                    f"the model made non-finite pixels for {job.prompt!r} (seed {job.seed}); nothing was written "
                    "for it: sample in float32 (--dtype fp32), or check the deltas' scales"
                )
            yield job, pipe.numpy_to_pil(pixels)[0]


def image_grid(images: Sequence[Any], cols: int) -> Any:
    """Tile PIL images row by row."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image: Any, path: Path, text: dict[str, str] | None = None) -> None:
    """Write a PNG atomically, with optional text chunks."""
    from PIL.PngImagePlugin import PngInfo

    from cdtool.atomic import atomic_path

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)

"""Image generation with deterministic, device-independent noise."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdtool.choices import SCHEDULERS


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
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "prompt"


def plan_jobs(prompts: Sequence[str], n: int, seed: int) -> list[Job]:
    """Image k of every prompt uses seed + k, so prompts and deltas compare on the same noise."""
    return [Job(p, i, seed + k, f"{i:03d}-{slug(p)}-s{seed + k}.png") for i, p in enumerate(prompts) for k in range(n)]


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
    """Yield (job, PIL image) in batches of `batch_size`."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
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
            output_type="pil",
        )
        yield from zip(batch, out.images, strict=True)


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

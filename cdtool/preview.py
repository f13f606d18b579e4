"""Pictures that explain themselves: rows of images under the prompt they were made from, each
image with its caption lines (the sample grid at the end of `train`; `score --report`'s picture),
and a training run's loss curve."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdtool.atomic import atomic_path
from cdtool.delta.file import Delta

MIN_TILE = 96  # smaller images (the toy model's 32 px) are enlarged, pixel for pixel, to at least this
LABEL = 14  # pixels of a text line


def preview_prompts(delta: Delta, limit: int = 4) -> list[str]:
    """Prompts for the grid: the concepts' own training prompts, taken in turn from each concept."""
    lists = [c.get("prompts") or [] for c in delta.concepts]
    out: list[str] = []
    for k in range(max((len(p) for p in lists), default=0)):
        for prompts in lists:
            if k < len(prompts) and prompts[k] not in out:
                out.append(prompts[k])
    return out[:limit] or [f"photo of a {t}" for t in delta.tokens][:limit]


def _tile(image: Any, side: int) -> Any:
    from PIL import Image

    image = image.convert("RGB")
    if image.size == (side, side):
        return image
    return image.resize((side, side), Image.Resampling.NEAREST if image.width < side else Image.Resampling.LANCZOS)


def tile_side(width: int) -> int:
    """Images are shown at their size, or enlarged by a whole factor to at least MIN_TILE."""
    return width * max(1, -(-MIN_TILE // width))


def captioned_rows(
    blocks: Sequence[tuple[str, Sequence[tuple[Any, Sequence[str]]]]], side: int | None = None, cols: int = 8
) -> Any:
    """A PIL picture: for each (label, [(image, caption lines)]) a text line, then its images side by
    side (at most `cols` to a row), each with its caption lines under it."""
    from PIL import Image, ImageDraw

    side = side or tile_side(blocks[0][1][0][0].width)
    lines = max((len(c) for _, items in blocks for _, c in items), default=0)
    cell = side + lines * LABEL + (4 if lines else 0)
    heights = [LABEL + -(-max(len(items), 1) // cols) * cell for _, items in blocks]
    width = max(min(cols, max(len(items) for _, items in blocks)) * side, 320)
    grid = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for (label, items), height in zip(blocks, heights, strict=True):
        draw.text((2, y + 1), label, fill="black")
        for i, (image, caption) in enumerate(items):
            x, top = (i % cols) * side, y + LABEL + (i // cols) * cell
            grid.paste(_tile(image, side), (x, top))
            for k, line in enumerate(caption):
                draw.text((x + 2, top + side + 2 + k * LABEL), line, fill="black")
        y += height
    return grid


def sample_preview(
    model: str,
    delta_path: Path | None,
    out: Path,
    *,
    seed: int,
    device: str = "auto",
    per_prompt: int = 2,
    steps: int = 25,
    guidance: float = 6.0,
) -> list[str]:
    """Sample the delta's concept prompts at the model's resolution (image k of a prompt from
    seed + k, as `cdtool sample` draws it) into a grid at `out` with a row per prompt; returns the
    prompts. Without a delta, `model` is a whole model cdtool trained, and its record's prompts are sampled."""
    from cdtool.delta.importers import read_delta
    from cdtool.errors import CdtoolError
    from cdtool.models.finetuned import RECORD, read_model_record
    from cdtool.models.pipeline import load_with_deltas
    from cdtool.sampling.generate import generate, plan_jobs, save_png, set_scheduler

    delta = read_delta(delta_path) if delta_path is not None else read_model_record(Path(model))
    if delta is None:
        raise CdtoolError(f"{model} holds no cdtool record ({RECORD}) naming the prompts to sample")
    prompts = preview_prompts(delta)
    pipe = load_with_deltas(model, [(delta, 1.0)] if delta_path is not None else [], device=device)
    set_scheduler(pipe, "ddim")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    jobs = plan_jobs(prompts, per_prompt, seed)
    made = dict(
        generate(
            pipe,
            jobs,
            steps=steps,
            guidance=guidance,
            height=size,
            width=size,
            batch_size=per_prompt,
            negative_prompt=None,
        )
    )
    rows = [(p, [(made[j], []) for j in jobs if j.prompt == p]) for p in prompts]
    params = {
        "model": model,
        "delta": str(delta_path) if delta_path else None,
        "prompts": prompts,
        "seed": seed,
        "steps": steps,
    }
    save_png(
        captioned_rows(rows), out, {"parameters": json.dumps(params | {"guidance": guidance, "scheduler": "ddim"})}
    )
    return prompts


def loss_curve(entries: list[dict[str, Any]], path: Path) -> None:
    """A small PNG of the training (and evaluation) loss per step, drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 320, 36
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    series = [("loss", (31, 119, 180)), ("eval_loss", (214, 39, 40))]
    values = [e[k] for e in entries for k, _ in series if e.get(k) is not None]
    if len(entries) >= 2 and values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        steps = [e["step"] for e in entries]
        s0, s1 = min(steps), max(steps)
        for key, colour in series:
            pts = [
                (
                    pad + (e["step"] - s0) / max(1, s1 - s0) * (w - 1.5 * pad),
                    h - pad - (e[key] - lo) / span * (h - 1.5 * pad),
                )
                for e in entries
                if e.get(key) is not None
            ]
            if len(pts) >= 2:
                draw.line(pts, fill=colour, width=2)
        draw.text(
            (pad, h - pad + 6), f"step {s0}..{s1}   loss {lo:.4g}..{hi:.4g}   blue: train  red: eval", fill="black"
        )
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")

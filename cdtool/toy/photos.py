"""The toy world's personal concepts as a user would bring them: a few "photos" of each, and the
captions of ordinary toy scenes (regularisation prompts, the merge's regularisation captions). Used by
`cdtool demo` and the quality benchmark, so both start from the same kind of data."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from cdtool.toy.world import PHOTO_OF_SHARE, SUITE, UNSIZED_SHARE, Sampler, render, render_cutout, suite_concept

# (token, class noun, folder name) of the suite's eight personal concepts (cdtool.toy.world.SUITE),
# which the shipped toy model's world holds.
SUITE_PERSONAL = tuple((c.token, c.shape, f"{c.fill}-{c.shape}") for c in SUITE)
# The same of the v1 toy world's two (the v1 toy model, tools/checkpoints/toy1).
V1_PERSONAL = (("<new1>", "star", "new1-star"), ("<new2>", "circle", "new2-circle"))


def toy_captions(rng: random.Random, shape: str | None, n: int) -> list[str]:
    """Toy-world captions: of scenes whose first thing is a `shape` (regularisation prompts), or of
    any scenes (the merge's regularisation captions). Worded as varied as the toy model's pretraining
    captions: some start with "photo of", some leave out a single thing's size."""
    sampler = Sampler(rng)
    out = []
    for _ in range(n):
        scene = sampler.scene()
        if shape is not None:
            scene = replace(scene, things=(replace(scene.things[0], shape=shape), *scene.things[1:]))
        caption = scene.caption(sized=rng.random() >= UNSIZED_SHARE)
        out.append(f"photo of {caption}" if rng.random() < PHOTO_OF_SHARE else caption)
    return out


def write_photos(
    folder: Path, token: str, rng: random.Random, suite: bool = True, count: int = 5, cutouts: Path | None = None
) -> None:
    """`count` renders of the suite's concept (of the v1 world's, without `suite`) as 96 px JPEGs with a
    caption file each; the first one stored rotated with an EXIF orientation tag, as phones do. With
    `cutouts`, the same photos there too as a background remover leaves them (upright RGBA PNGs whose
    alpha marks the concept: `render_cutout`), for InstantBooth's encoders."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if cutouts is not None:
        cutouts.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(rng)
    for i in range(count):
        scene = sampler.suite_scene(suite_concept(token), count=1) if suite else sampler.scene(count=1, concept=token)
        if cutouts is not None:
            render_cutout(scene, 96).save(cutouts / f"IMG_{i:04d}.png")
        image = render(scene, 96)
        exif = Image.Exif()
        if i == 0:
            image = image.transpose(Image.Transpose.ROTATE_90)  # shown upright after orientation 6
            exif[0x0112] = 6
        image.save(folder / f"IMG_{i:04d}.jpg", quality=95, exif=exif)
        caption = scene.caption().replace(token, "{token}")
        (folder / f"IMG_{i:04d}.txt").write_text(caption + "\n")

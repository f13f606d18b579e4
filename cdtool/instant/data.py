"""What an encoder trains on: single captioned images of one category, the identifier inserted
before the category's noun in each caption, and, for the encoders, an augmented view of that same
image (never another image of the same subject: the paper trains without paired images).

Every draw of a step comes from a generator seeded by (seed, step, process) alone, so a resumed
run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cdtool.dataset.folders import Example, check_images, load_image_and_alpha, read_folder
from cdtool.errors import CdtoolError
from cdtool.instant.backbones import resize

# The encoder's view of a training image: a square crop of 3/4 to all of its side at a random
# place, mirrored half the time, resized to the backbone's input size. The paper augments the
# encoder's input at random without saying how; these keep the whole subject in most views.
VIEW_MIN_SIDE = 0.75
# What the encoders see where a photo's alpha channel says the subject is not: zero in the [-1, 1]
# input range (mid grey). The paper segments the subject before encoding and does not say what it puts
# around it; zero is the backbones' neutral input (and close to CLIP's mean after its normalisation).
NEUTRAL = 0.0


def insert_identifier(caption: str, noun: str, identifier: str) -> str | None:
    """The caption with `identifier` before the first mention of the class noun (singular or plural,
    any case): "photo of a cat on a sofa" -> "photo of a <id> cat on a sofa"; None when the caption
    does not name the noun. A caption that already holds the identifier is kept as it is."""
    if re.search(rf"(?<!\S){re.escape(identifier)}(?!\S)", caption):
        return caption
    m = re.search(rf"\b{re.escape(noun)}(?:e?s)?\b", caption, flags=re.IGNORECASE)
    if m is None:
        return None
    return f"{caption[: m.start()]}{identifier} {caption[m.start() :]}"


def read_category(data: Path, noun: str, identifier: str, resolution: int) -> tuple[list[Example], int]:
    """The data folder's images with the identifier in their captions (a folder without captions:
    "photo of a <noun>"), checked to open at `resolution` at least; and how many were left out
    because their caption does not name the noun."""
    folder = read_folder(data, f"photo of a {noun}")
    check_images(folder, resolution)
    kept = []
    for ex in folder.examples:
        caption = insert_identifier(ex.caption, noun, identifier)
        if caption is not None:
            kept.append(Example(ex.path, caption))
    if not kept:
        raise CdtoolError(
            f"no caption in {data} names the class noun {noun!r}; InstantBooth puts the identifier before it "
            "(give the category's noun with --class-noun)"
        )
    return kept, len(folder.examples) - len(kept)


def step_generator(seed: int, step: int, process: int) -> torch.Generator:
    """The generator of every draw of one step of one process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + process)


def subject_only(image: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """What the encoders are shown of an image [3, s, s]: the subject alone where its alpha channel
    [1, s, s] marks it (the rest NEUTRAL, edges blended), the whole image where it has none."""
    if alpha is None:
        return image
    return image * alpha + NEUTRAL * (1 - alpha)


def load_subject(path: Path, size: int) -> torch.Tensor:
    """What the encoders are shown of an image file, [3, size, size]: `subject_only` of its colours
    resized weighted by its alpha (nothing the alpha hides reaches the subject's edge)."""
    return subject_only(*load_image_and_alpha(path, size, weighted=True))


def encoder_view(image: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """An augmented view [3, size, size] of a square image [3, s, s]."""
    s = image.shape[-1]
    side = max(1, round(s * (VIEW_MIN_SIDE + (1 - VIEW_MIN_SIDE) * float(torch.rand((), generator=g)))))
    top = int(torch.randint(0, s - side + 1, (), generator=g))
    left = int(torch.randint(0, s - side + 1, (), generator=g))
    crop = image[:, top : top + side, left : left + side]
    if float(torch.rand((), generator=g)) < 0.5:
        crop = crop.flip(-1)
    return resize(crop[None], size)[0]

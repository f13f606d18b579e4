"""Custom Diffusion's size augmentation, exactly as the paper's code defines it.

With probability 2/3 the instance image is resized to a scale drawn uniformly from [size/3, size],
otherwise from [1.2·size, 1.4·size). Below 0.6·size the prompt gets "a far away " or "very small "
and the image is pasted at a random place on a zero canvas (zero in [-1, 1] pixel space), with a
loss mask over the pasted box shrunk by one latent pixel per side; above size the prompt gets
"zoomed in " or "close up " and a random crop is taken (mask all ones).

Deliberate difference: the reference draws with probability 0.66; the paper says 2/3, as here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAR = ("a far away ", "very small ")
NEAR = ("zoomed in ", "close up ")


@dataclass
class Augmented:
    image: torch.Tensor  # [3, size, size] in [-1, 1]
    mask: torch.Tensor  # [size // factor, size // factor], 1 where the loss counts
    prefix: str  # prepended to the prompt
    scale: int
    crop: tuple[int, int] = (0, 0)  # (top, left) of the view in the scale x scale image, when it zooms in


def draw_scale(size: int, g: torch.Generator) -> int:
    """The random scale: uniform in [size//3, size] w.p. 2/3, else in [int(1.2 size), int(1.4 size))."""
    if float(torch.rand((), generator=g)) < 2 / 3:
        return int(torch.randint(size // 3, size + 1, (), generator=g))
    return int(torch.randint(int(1.2 * size), int(1.4 * size), (), generator=g))


def prompt_prefix(scale: int, size: int, g: torch.Generator) -> str:
    if scale < 0.6 * size:
        return FAR[int(torch.randint(0, 2, (), generator=g))]
    if scale > size:
        return NEAR[int(torch.randint(0, 2, (), generator=g))]
    return ""


def place(
    image: torch.Tensor, size: int, scale: int, factor: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize `image` ([3, H, W], [-1, 1]) to scale x scale, then crop (scale > size) or paste on a
    zero canvas at a random offset; returns (image [3, size, size], mask [size/f, size/f])."""
    view, mask, _ = place_view(image, size, scale, factor, g)
    return view, mask


def place_view(
    image: torch.Tensor, size: int, scale: int, factor: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """`place`, and where a zoomed-in view was cut: (top, left) in the scale x scale image ((0, 0)
    for a pasted one), which SDXL's time ids carry."""
    resized = F.interpolate(image[None], size=(scale, scale), mode="bilinear", antialias=True, align_corners=False)[0]
    m = size // factor
    outer, inner = (scale, size) if scale > size else (size, scale)
    top = int(torch.randint(0, outer - inner + 1, (), generator=g))
    left = int(torch.randint(0, outer - inner + 1, (), generator=g))
    if scale > size:
        return resized[:, top : top + size, left : left + size], torch.ones(m, m), (top, left)
    canvas = image.new_zeros(3, size, size)
    canvas[:, top : top + scale, left : left + scale] = resized
    mask = torch.zeros(m, m)
    mask[top // factor + 1 : (top + scale) // factor - 1, left // factor + 1 : (left + scale) // factor - 1] = 1.0
    return canvas, mask, (0, 0)


def augment(
    image: torch.Tensor, size: int, factor: int, g: torch.Generator, *, enabled: bool = True, hflip: bool = False
) -> Augmented:
    """One training view of an instance image ([3, H, W] in [-1, 1])."""
    if hflip and float(torch.rand((), generator=g)) < 0.5:
        image = image.flip(-1)
    scale = draw_scale(size, g) if enabled else size
    img, mask, crop = place_view(image, size, scale, factor, g)
    prefix = prompt_prefix(scale, size, g) if enabled else ""
    if not enabled:
        mask = torch.ones_like(mask)
    return Augmented(img, mask, prefix, scale, crop)

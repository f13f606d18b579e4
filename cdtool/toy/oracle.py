"""The oracle: a small CNN trained on the toy world that reads an image's background colour, how
many things it shows, which shapes and which fills (8 colours, 2 patterns). It judges the quality
benchmark, so it must be right on held-out renders (measured, see benchmarks/RESULTS.md)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
from torch import nn

from cdtool.toy.world import COLOURS, PATTERNS, SHAPES, Scene

FILLS = (*COLOURS, *PATTERNS)
BACKGROUNDS = tuple(COLOURS)
WEIGHTS = "data/toy/oracle.safetensors"


def targets(scene: Scene) -> dict[str, torch.Tensor]:
    """The labels of a scene: background class, count-1, multi-hot shapes and fills."""
    shapes = torch.zeros(len(SHAPES))
    fills = torch.zeros(len(FILLS))
    for t in scene.things:
        shapes[SHAPES.index(t.shape)] = 1
        fills[FILLS.index(t.pattern or t.colour)] = 1
    return {
        "background": torch.tensor(BACKGROUNDS.index(scene.background)),
        "count": torch.tensor(len(scene.things) - 1),
        "shapes": shapes,
        "fills": fills,
    }


class Oracle(nn.Module):
    """32x32 RGB -> background (8 classes), count (1 or 2), shapes (5 multi-label), fills (10 multi-label)."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 96), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(96 * 16, 192), nn.ReLU())
        self.background = nn.Linear(192, len(BACKGROUNDS))
        self.count = nn.Linear(192, 2)
        self.shapes = nn.Linear(192, len(SHAPES))
        self.fills = nn.Linear(192, len(FILLS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(x))
        return {
            "background": self.background(h),
            "count": self.count(h),
            "shapes": self.shapes(h),
            "fills": self.fills(h),
        }


def to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """PIL images (any size) -> [n, 3, 32, 32] in [0, 1]."""
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (32, 32):
            im = im.resize((32, 32), Image.Resampling.BILINEAR)
        out.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(32, 32, 3).permute(2, 0, 1))
    return torch.stack(out).float() / 255.0


@torch.no_grad()
def read(model: Oracle, images: Sequence[Any]) -> list[dict[str, Any]]:
    """What the oracle sees in each image: background, count, shapes and fills (names)."""
    model.eval()
    out = model(to_tensor(images))
    results = []
    for i in range(len(images)):
        count = int(out["count"][i].argmax()) + 1
        shapes = [SHAPES[j] for j in range(len(SHAPES)) if out["shapes"][i, j] > 0]
        fills = [FILLS[j] for j in range(len(FILLS)) if out["fills"][i, j] > 0]
        results.append(
            {
                "background": BACKGROUNDS[int(out["background"][i].argmax())],
                "count": count,
                "shapes": shapes,
                "fills": fills,
            }
        )
    return results


def load_oracle() -> Oracle:
    """The oracle shipped with cdtool."""
    from safetensors.torch import load_file

    model = Oracle()
    model.load_state_dict(load_file(str(resources.files("cdtool").joinpath(WEIGHTS))))
    return model.eval()

"""The oracle: a small CNN trained on the toy world that reads an image's background colour, how
many things it shows, which shapes and which fills. It judges the quality benchmark, so it must be
right on held-out renders (measured, see benchmarks/RESULTS.md).

Its fills are the 8 colours and the looks of the personal concepts it knows: the shipped oracle, of
the suite's world (`v2`), reads each of the eight suite concepts (`new1` ... `new8`) and any other
two-tone thing (`pattern`); the v1 world's oracle (tools/checkpoints/toy1) reads its two concepts'
patterns (`split`, `checker`). A weights file names its fills and the token of each concept in its
metadata (`world`, `fills`, `tokens`); one without them is the v1 world's two-concept oracle."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
from torch import nn

from cdtool.toy.judge import OTHER_PATTERN, SUITE_TOKENS, V1_TOKENS
from cdtool.toy.world import COLOURS, PATTERNS, SHAPES, SUITE, Scene, Thing

FILLS = (*COLOURS, *PATTERNS)
BACKGROUNDS = tuple(COLOURS)
WEIGHTS = "data/toy/oracle.safetensors"
# The fills and concept tokens of each world's oracle.
WORLD_FILLS = {"v1": FILLS, "v2": (*COLOURS, *(c.fill for c in SUITE), OTHER_PATTERN)}
WORLD_TOKENS = {"v1": V1_TOKENS, "v2": SUITE_TOKENS}


def fill_of(thing: Thing) -> str:
    """The oracle's fill label of a thing: its suite concept, its pattern (the v1 world's concepts),
    `pattern` for a two-tone thing in named colours, else its colour."""
    if thing.concept:
        return thing.concept.strip("<>")
    if thing.pattern and thing.pair:
        return OTHER_PATTERN
    return thing.pattern or thing.colour


def targets(scene: Scene, fills: Sequence[str] = FILLS) -> dict[str, torch.Tensor]:
    """The labels of a scene: background class, count-1, multi-hot shapes and fills."""
    shapes = torch.zeros(len(SHAPES))
    hot = torch.zeros(len(fills))
    for t in scene.things:
        shapes[SHAPES.index(t.shape)] = 1
        hot[list(fills).index(fill_of(t))] = 1
    return {
        "background": torch.tensor(BACKGROUNDS.index(scene.background)),
        "count": torch.tensor(len(scene.things) - 1),
        "shapes": shapes,
        "fills": hot,
    }


class Oracle(nn.Module):
    """32x32 RGB -> background (8 classes), count (1 or 2), shapes (5 multi-label), fills (multi-label:
    `world`'s fills). `tokens` maps each concept's token to its fill, `patterns` is every fill that is
    not a plain colour."""

    def __init__(self, world: str = "v1") -> None:
        super().__init__()
        self.world = world
        self.fill_names = WORLD_FILLS[world]
        self.tokens = dict(WORLD_TOKENS[world])
        self.patterns = frozenset(f for f in self.fill_names if f not in COLOURS)

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
        self.fills = nn.Linear(192, len(self.fill_names))

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
        fills = [name for j, name in enumerate(model.fill_names) if out["fills"][i, j] > 0]
        results.append(
            {
                "background": BACKGROUNDS[int(out["background"][i].argmax())],
                "count": count,
                "shapes": shapes,
                "fills": fills,
            }
        )
    return results


def shipped_weights() -> str:
    """The shipped oracle's weights file (package data)."""
    return str(resources.files("cdtool").joinpath(WEIGHTS))


def load_oracle(path: str | None = None) -> Oracle:
    """The oracle shipped with cdtool, or the one in the weights file `path` (tools/train_oracle.py)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cdtool.errors import CdtoolError, first_line

    given = path is not None
    path = path or shipped_weights()
    try:
        with safe_open(path, "pt") as f:
            world = (f.metadata() or {}).get("world", "v1")
        model = Oracle(world)
        model.load_state_dict(load_file(path))
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        if not given:
            raise
        raise CdtoolError(
            f"{path} is not a toy-world oracle's weights file (tools/train_oracle.py writes one): {first_line(e)}"
        ) from e
    return model.eval()


def save_oracle(model: Oracle, path: str) -> None:
    """Writes the weights with the world they read in the metadata."""
    import json

    from safetensors.torch import save_file

    meta = {"world": model.world, "fills": json.dumps(model.fill_names), "tokens": json.dumps(model.tokens)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)

"""Training data folders: what `prep` and `regset` write (images, metadata.jsonl with file_name and
text, concept.json / regset.json), or plain image folders with one prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdtool.errors import CdtoolError
from cdtool.imagefolder import METADATA
from cdtool.images import IMAGE_SUFFIXES, open_image


@dataclass
class Example:
    path: Path
    caption: str


@dataclass
class Folder:
    """A data folder's examples and what it says about itself."""

    path: Path
    examples: list[Example]
    info: dict[str, Any] = field(default_factory=dict)  # concept.json or regset.json


def read_info(path: Path) -> dict[str, Any]:
    for name in ("concept.json", "regset.json"):
        f = path / name
        if f.exists():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CdtoolError(f"{f}: not valid JSON ({e})") from e
            return data if isinstance(data, dict) else {}
    return {}


def read_folder(path: Path, default_caption: str | None, what: str = "data") -> Folder:
    """Examples from metadata.jsonl (each image its caption), else every image with `default_caption`."""
    if not path.exists():
        raise CdtoolError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise CdtoolError(f"{what} folder {path} is not a folder")
    info = read_info(path)
    meta = path / METADATA
    examples: list[Example] = []
    if meta.exists():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(Example(path / row["file_name"], str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CdtoolError(f"{meta}:{n}: expected a JSON object with file_name and text") from e
    else:
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images and default_caption is None:
            raise CdtoolError(f"{path} has no {METADATA}; give the prompt for its images")
        examples = [Example(p, default_caption or "") for p in images]
    if not examples:
        raise CdtoolError(f"{what} folder {path} has no images; run `cdtool prep` (or `cdtool regset`) to make one")
    return Folder(path, examples, info)


def check_images(folder: Folder, min_size: int, what: str = "data") -> None:
    """Every image opens and is at least min_size on its shorter side (before any model loads)."""
    for ex in folder.examples:
        if not ex.path.exists():
            raise CdtoolError(f"{ex.path}: listed in {folder.path / METADATA} but missing")
        with open_image(ex.path) as im:
            w, h = im.size
        if min(w, h) < min_size:
            raise CdtoolError(
                f"{ex.path} is {w}x{h}, smaller than --resolution {min_size}; use a smaller --resolution "
                f"or larger images (`cdtool prep --size {min_size}` reports small images)"
            )


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB, centre-cropped to a square, resized to size x size; [3, size, size] in [-1, 1]."""
    from PIL import Image, ImageOps

    with open_image(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != size:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1.0

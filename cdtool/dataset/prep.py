"""Building a concept's data folder from a user's photos (what `cdtool prep` does)."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdtool.dataset.folders import METADATA
from cdtool.dataset.images import (
    IMAGE_SUFFIXES,
    ImageError,
    dhash,
    fit,
    near_duplicate,
    open_rgb,
    pixel_sha256,
    thumbnail,
)
from cdtool.errors import CdtoolError
from cdtool.hashing import file_sha256


@dataclass
class Source:
    path: Path
    sha256: str = ""
    image: Any = None
    size: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)
    caption: str = ""
    pixels: str = ""
    phash: int = 0
    thumb: bytes = b""
    duplicate_of: str | None = None
    duplicate_kind: str | None = None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (recursively) and globs -> image files, sorted and unique."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found += [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file():
            found.append(p)
        elif any(c in item for c in "*?["):
            found += [Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file()]
        else:
            raise CdtoolError(f"{item}: no such file or folder")
    return sorted({f.resolve(): f for f in found}.values(), key=lambda f: str(f))


def caption_beside(path: Path) -> str | None:
    for suffix in (".txt", ".caption"):
        f = path.with_suffix(suffix)
        if f.exists():
            return f.read_text(encoding="utf-8").strip()
    return None


def output_name(index: int, sha: str) -> str:
    return f"{index:04d}-{sha[:10]}.png"


def prepare(
    files: list[Path],
    *,
    token: str,
    class_noun: str,
    caption: str,
    captions_from_files: bool,
    size: int,
    crop: str,
    background: tuple[int, int, int],
    dedupe: bool,
) -> tuple[list[Source], dict[str, Any]]:
    """Read, normalise and caption every usable image; returns the kept sources and a report."""
    report: dict[str, Any] = {
        "inputs": len(files),
        "unreadable": [],
        "small": [],
        "duplicates": [],
        "converted": {},
        "caption_files_missing": [],
    }
    kept: list[Source] = []
    for path in files:
        src = Source(path)
        try:
            loaded = open_rgb(path, background)
        except ImageError as e:
            report["unreadable"].append({"path": str(path), "error": e.reason})
            continue
        src.sha256 = file_sha256(path)
        src.size = loaded.original_size
        src.notes = loaded.notes
        if min(src.size) < size:
            report["small"].append({"path": str(path), "size": list(src.size)})
        if src.notes:
            report["converted"][str(path)] = src.notes
        src.image = fit(loaded.image, size, crop, background)
        text = caption_beside(path) if captions_from_files else None
        if captions_from_files and text is None:
            report["caption_files_missing"].append(str(path))
        src.caption = (text or caption).replace("{token}", token).replace("{class}", class_noun)
        src.pixels = pixel_sha256(loaded.image)
        src.phash = dhash(loaded.image)
        src.thumb = thumbnail(loaded.image)
        for other in kept:
            if other.duplicate_of:
                continue
            if other.pixels == src.pixels:
                src.duplicate_of, src.duplicate_kind = str(other.path), "exact"
            elif near_duplicate(other.phash, other.thumb, src.phash, src.thumb):
                src.duplicate_of, src.duplicate_kind = str(other.path), "near"
            if src.duplicate_of:
                report["duplicates"].append(
                    {"path": str(path), "duplicate_of": src.duplicate_of, "kind": src.duplicate_kind}
                )
                break
        if src.duplicate_of and dedupe:
            continue
        kept.append(src)
    report["used"] = len(kept)
    report["dropped_duplicates"] = len(report["duplicates"]) if dedupe else 0
    return kept, report


def write_folder(out: Path, kept: list[Source], concept: dict[str, Any]) -> None:
    """Images (deterministic names), metadata.jsonl and concept.json into the folder `out`."""
    rows = []
    sources = []
    for i, src in enumerate(kept):
        name = output_name(i, src.sha256)
        src.image.save(out / name, format="PNG")
        rows.append({"file_name": name, "text": src.caption})
        sources.append({"path": str(src.path), "sha256": src.sha256, "file_name": name, "size": list(src.size)})
    (out / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "concept.json").write_text(json.dumps(dict(concept, sources=sources), indent=1) + "\n", encoding="utf-8")

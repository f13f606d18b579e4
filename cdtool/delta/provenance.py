"""What made a delta: its `created_by` line and its `provenance` entries, one per command that made
or changed the file (docs/design.md, "Metadata", lists each entry's keys). Every command that writes a
delta builds its entry here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdtool import __version__

if TYPE_CHECKING:
    from cdtool.delta.file import Delta


def created_by(command: str) -> str:
    """`cdtool <version> <command>`: what a file records as its maker."""
    return f"cdtool {__version__} {command}"


def input_sha256(path: Path) -> str | None:
    """The sha256 of an input file; None for a folder (an import read from one)."""
    from cdtool.hashing import file_sha256

    return file_sha256(path) if path.is_file() else None


def stamp(delta: Delta, key: str, entry: dict[str, Any], *, command: str | None = None, new: bool = False) -> None:
    """Record that a command made (`new`: the entry replaces what the inputs recorded) or changed
    `delta` (the entry is added to the source's own): `created_by` names the command (`command`,
    default the key), `provenance[key]` holds the entry."""
    delta.created_by = created_by(command or key)
    delta.provenance = {key: entry} if new else dict(delta.provenance, **{key: entry})


def train_entry(config: dict[str, Any], run: dict[str, Any], method: str) -> dict[str, Any]:
    """`train`: every setting but the concepts, how the run went (steps, stop, lr, processes, loss), the method."""
    return {"config": config, **run, "method": method}


def checkpoint_entry(checkpoint: Path, step: int) -> dict[str, Any]:
    """`train`, for a delta read from a run's checkpoint: which one, at which step."""
    return {"checkpoint": str(checkpoint), "step": step}


def compress_entry(
    source: Path, rank: int | None, energy: float | None, fro: float | None, dtype: str, svd: str
) -> dict[str, Any]:
    """`compress`: the source file and the truncation asked for."""
    return {
        "source": str(source),
        "source_sha256": input_sha256(source),
        "rank": rank,
        "energy": energy,
        "fro": fro,
        "dtype": dtype,
        "svd": svd,
    }


def get_deltas_entry(source: Path, source_format: str) -> dict[str, Any]:
    """`get_deltas`: the source and what it was read as."""
    return {"source": str(source), "source_format": source_format, "source_sha256": input_sha256(source)}


def merge_entry(
    method: str,
    inputs: Sequence[tuple[Path, float]],
    renamed: dict[str, dict[str, str]],
    solved: dict[str, Any] | None,
) -> dict[str, Any]:
    """`merge`: the method, each input with its sha256 and its `file:x` (a weight for least squares,
    else a scale), the tokens renamed, and for the solved methods what they solved with (`solved`)."""
    factor = "weight" if method == "least-squares" else "scale"
    return {
        "method": method,
        "inputs": [{"path": str(p), "sha256": input_sha256(p), factor: s} for p, s in inputs],
        "renamed": renamed,
        **(solved or {}),
    }


def personalize_entry(photos: Sequence[Path], encoder: Path, encoder_sha256: str, step: int) -> dict[str, Any]:
    """`personalize`: each photo with its sha256, and the encoder (its folder, weights' sha256, step)."""
    return {
        "photos": [{"path": str(p), "sha256": input_sha256(Path(p))} for p in photos],
        "encoder": str(encoder.resolve()),
        "encoder_sha256": encoder_sha256,
        "encoder_step": step,
    }

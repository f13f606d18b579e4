"""A whole fine-tuned model as cdtool writes it (`train --method dreambooth`): a diffusers folder that
any diffusers pipeline loads, with `cdtool.json` (how it was made: the delta file's metadata, as one
JSON document) and a model card. `info`, `get-deltas`, `export --to checkpoint` and the sample grid
after training read the record."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cdtool.delta.base import fingerprint
from cdtool.delta.file import Delta
from cdtool.errors import CdtoolError

RECORD = "cdtool.json"
FORMAT = "cdtool.model"
FORMAT_VERSION = "1"
MODEL_INDEX = "model_index.json"


def is_model_folder(path: Path) -> bool:
    """A diffusers model folder (cdtool's or any other)."""
    return path.is_dir() and (path / MODEL_INDEX).is_file()


def unet_fingerprint(params: Mapping[str, torch.Tensor]) -> str:
    """The base fingerprint a whole model records: a delta's (cdtool.delta.base.fingerprint) over
    every UNet parameter of the base, the part every DreamBooth run trains."""
    return fingerprint(params, [n for n in params if n.startswith("unet.")])


def trained_components(record: Delta) -> list[str]:
    """The components a run trained: the UNet, and the text encoders with --train-text-encoder."""
    config = (record.provenance.get("train") or {}).get("config") or {}
    encoders = ["text_encoder", "text_encoder_2"] if record.base_kind == "sdxl" else ["text_encoder"]
    return ["unet", *(encoders if config.get("train_text_encoder") else [])]


def describe_model(record: Delta, path: Path) -> dict[str, Any]:
    """A JSON-ready summary of a whole model cdtool trained (its record, cdtool.json; what `cdtool
    info` shows of a model folder)."""
    return {
        "path": str(path),
        "format": record.source_format,
        "size_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        "base_model": record.base_model or None,
        "base_fingerprint": record.base_fingerprint or None,
        "created_by": record.created_by or None,
        "base_kind": record.kind or None,
        "trained": trained_components(record),
        "concepts": record.concepts,
        "provenance": record.provenance,
    }


def adopt_record(delta: Delta, record: Delta, base: Any, base_model: str, warn: Callable[[str], None]) -> None:
    """A delta extracted from a whole model cdtool trained takes the model's concepts (identifier,
    class noun, prompts: what a merge builds its constraints from) and provenance, once `base` (the
    pipeline of `base_model`) is checked to be the base the model records."""
    from cdtool.delta.base import pipeline_params

    if record.base_fingerprint and unet_fingerprint(pipeline_params(base)) != record.base_fingerprint:
        raise CdtoolError(
            f"{record.origin} was trained from {record.base_model or 'another base'}, whose UNet is not that of "
            f"{base_model}; pass --model with the base it was trained from"
        )
    delta.concepts = [dict(c) for c in record.concepts]
    delta.provenance = dict(record.provenance)
    trained = [c for c in trained_components(record) if c != "unet"]
    if trained:
        warn(
            f"{record.origin} also trained {' and '.join(trained)}; a delta holds UNet layers only, so it carries "
            "the UNet's part of what the model learned"
        )


def record_document(record: Delta) -> dict[str, Any]:
    """cdtool.json: the keys of a delta file's metadata, with its JSON values as JSON."""
    from cdtool import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": next((c.get("method") for c in record.concepts if c.get("method")), None),
        "base_kind": record.base_kind,
        "base_model": record.base_model,
        "base_fingerprint": record.base_fingerprint,
        "trained": trained_components(record),
        "concepts": record.concepts,
        "created_by": record.created_by or f"cdtool {__version__}",
        "provenance": record.provenance,
    }


def write_model_folder(pipe: Any, folder: Path, record: Delta, name: str) -> None:
    """`pipe` as a diffusers folder in `folder` (safetensors in the pipeline's dtype: float32 as it
    trained), its record and its model card (`name`: the folder's final name, which the card's code
    names)."""
    from cdtool.export.model_card import CARD, CardInputs, model_card

    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / RECORD).write_text(json.dumps(record_document(record), indent=1, default=str) + "\n", encoding="utf-8")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    card = CardInputs(delta=record, target="model", folder_name=name, files=sorted([*files, CARD]))
    (folder / CARD).write_text(model_card(card), encoding="utf-8")


def read_model_record(folder: Path) -> Delta | None:
    """The record of a model folder cdtool wrote, as a Delta without layers or tokens (its base,
    fingerprint, concepts and provenance); None for a folder without one."""
    from cdtool.choices import KIND_NAMES
    from cdtool.models.tokens import check_token_name

    path = folder / RECORD
    if not (is_model_folder(folder) and path.is_file()):
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CdtoolError(f"{path}: not a readable cdtool model record ({e}); restore it or remove it") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CdtoolError(f"{path}: not a cdtool model record (no format {FORMAT}); remove it or rename it")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CdtoolError(
            f"{path}: model record version {doc.get('format_version')} is not the one this cdtool reads "
            f"({FORMAT_VERSION}); upgrade cdtool"
        )
    kind = doc.get("base_kind") or ""
    concepts = doc.get("concepts") or []
    if (
        kind not in ("", *KIND_NAMES)
        or not isinstance(concepts, list)
        or not all(isinstance(c, dict) for c in concepts)
    ):
        raise CdtoolError(f"{path}: base_kind or concepts are not what cdtool writes; restore the file")
    for c in concepts:
        if c.get("token"):
            check_token_name(str(c["token"]), path)  # names from files are data from strangers
    return Delta(
        base_kind=kind,
        base_model=str(doc.get("base_model") or ""),
        base_fingerprint=str(doc.get("base_fingerprint") or ""),
        concepts=concepts,
        created_by=str(doc.get("created_by") or ""),
        provenance=dict(doc.get("provenance") or {}),
        source_format=FORMAT,
        origin=str(folder),
    )

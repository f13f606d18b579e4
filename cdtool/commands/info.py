"""`cdtool info`: what a delta file (or a whole model cdtool trained) holds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cdtool import console
from cdtool.commands.common import JsonOpt, QuietOpt, cdtool_command, examples

if TYPE_CHECKING:
    from cdtool.delta.file import Delta


def describe(delta: Delta, path: Path) -> dict[str, Any]:
    """A JSON-ready summary of a delta."""
    ranks = [layer.rank for layer in delta.layers.values()]
    return {
        "path": str(path),
        "format": delta.source_format,
        "size_bytes": path.stat().st_size if path.is_file() else None,
        "base_model": delta.base_model or None,
        "base_fingerprint": delta.base_fingerprint or None,
        "needs_base": delta.needs_base,
        "created_by": delta.created_by or None,
        "base_kind": delta.kind or None,
        "tokens": {t: _token_doc(delta, t) for t in delta.tokens},
        "visual": {t: {"tokens": int(v.shape[0]), "dim": int(v.shape[1])} for t, v in delta.visual.items()},
        "encoder": delta.encoder,
        "concepts": delta.concepts,
        "layers": {
            name: {
                "shape": list(layer.shape),
                "rank": layer.rank,
                "dtype": str(layer.dtype).removeprefix("torch."),
                "bias": layer.bias is not None,
                "absolute": layer.absolute,
            }
            for name, layer in sorted(delta.layers.items())
        },
        "layer_count": len(delta.layers),
        "low_rank_layers": sum(r is not None for r in ranks),
        "provenance": delta.provenance,
    }


def describe_model(record: Delta, path: Path) -> dict[str, Any]:
    """A JSON-ready summary of a whole model cdtool trained (its record, cdtool.json)."""
    from cdtool.models.finetuned import trained_components

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


def _print_head(doc: dict[str, Any], label: str, note: str = "") -> None:
    """The lines a delta and a whole model share: where, what format, which base, made by what."""
    from cdtool.choices import KIND_NAMES

    out = console.result
    out(f"{label + ':':<13}{doc['path']} ({doc['size_bytes'] or 0:,} bytes)")
    out(f"format:      {doc['format']}{note}")
    kind = f"{KIND_NAMES[doc['base_kind']]}, " if doc["base_kind"] else ""
    out(f"base:        {doc['base_model'] or '-'} ({kind}fingerprint {(doc['base_fingerprint'] or '-')[:16]})")
    out(f"created by:  {doc['created_by'] or '-'}")


def _print_provenance(doc: dict[str, Any]) -> None:
    if doc["provenance"]:
        import json

        console.result(f"provenance:  {json.dumps(doc['provenance'], sort_keys=True)}")


def _print_model(doc: dict[str, Any]) -> None:
    _print_head(doc, "folder", " (a whole model: a diffusers folder)")
    console.result(f"trained:     every weight of {', '.join(doc['trained'])}")
    for c in doc["concepts"]:
        console.result(f"concept:     {c.get('token')} class={c.get('class_noun')} method={c.get('method')}")
    _print_provenance(doc)


def _token_doc(delta: Delta, token: str) -> dict[str, int]:
    """A token's rows: how many, and their width (in each text encoder: `dim_2` for SDXL's second)."""
    e = delta.tokens[token]
    doc = {"vectors": int(e.shape[0]), "dim": int(e.shape[1])}
    if token in delta.tokens_2:
        doc["dim_2"] = int(delta.tokens_2[token].shape[1])
    return doc


def _rows_text(v: dict[str, int]) -> str:
    rows = f"{v['vectors']}x{v['dim']}"
    return f"{rows} + {v['vectors']}x{v['dim_2']}" if "dim_2" in v else rows


def _print_text(doc: dict[str, Any]) -> None:
    out = console.result
    _print_head(doc, "file")
    toks = ", ".join(f"{t} ({_rows_text(v)})" for t, v in doc["tokens"].items())
    out(f"tokens:      {toks or '-'}")
    for c in doc["concepts"]:
        out(f"concept:     {c.get('token')} class={c.get('class_noun')} init={c.get('init_token')}")
    for t, v in doc["visual"].items():
        out(f"visual:      {t} ({v['tokens']}x{v['dim']} tokens for the encoder's adapters)")
    if doc["encoder"]:
        e = doc["encoder"]
        out(f"encoder:     {e.get('path')} (sha256 {str(e.get('sha256'))[:16]}, backbone {e.get('backbone')})")
    dtypes = sorted({v["dtype"] for v in doc["layers"].values()})
    ranks = sorted({v["rank"] for v in doc["layers"].values() if v["rank"] is not None})
    rank_text = f"low-rank {doc['low_rank_layers']} (ranks {', '.join(map(str, ranks))})" if ranks else "all full"
    out(f"layers:      {doc['layer_count']}, {rank_text}, dtype {', '.join(dtypes) or '-'}")
    if doc["needs_base"]:
        out("note:        stores fine-tuned weights; commands subtract the base model (--model)")
    for name, v in doc["layers"].items():
        r = f"rank {v['rank']}" if v["rank"] is not None else "full"
        out(f"  {name}  {v['shape'][0]}x{v['shape'][1]}  {r}{'  +bias' if v['bias'] else ''}")
    _print_provenance(doc)


def info(
    file: Annotated[
        Path,
        typer.Argument(
            help="A delta file in any supported format, or a model folder cdtool trained.", show_default=False
        ),
    ],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a delta's format, tokens, concepts, layers, ranks, dtype, size, base and provenance.

    An SDXL delta's tokens show their rows in both text encoders (`<new1> (1x768 + 1x1280)`). A
    whole model cdtool trained (train --method dreambooth) shows its record: base, what trained,
    concepts, provenance.
    """
    # the library loads here, not at the top, so that `cdtool info --help` starts without torch
    from cdtool.delta.importers import read_delta
    from cdtool.models.finetuned import read_model_record

    record = read_model_record(file) if file.is_dir() else None
    doc = describe_model(record, file) if record is not None else describe(read_delta(file), file)
    if json_out:
        console.result_json(doc)
    else:
        (_print_model if record is not None else _print_text)(doc)


EXAMPLES = examples(
    "cdtool info cat.safetensors",
    "cdtool info delta.bin --json",
    "cdtool info dog-model/",
)


def register(app: typer.Typer) -> None:
    app.command("info", epilog=EXAMPLES)(cdtool_command(info))

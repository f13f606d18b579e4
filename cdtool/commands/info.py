"""`cdtool info`: what a delta file (or a whole model cdtool trained) holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.commands.common import JsonOpt, QuietOpt, cdtool_command, examples


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
    from cdtool.delta.file import describe
    from cdtool.delta.importers import read_delta
    from cdtool.models.finetuned import describe_model, read_model_record

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

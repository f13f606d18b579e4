"""`cdtool info`: what a delta file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.commands.common import JsonOpt, QuietOpt, cdtool_command, examples


def _rows_text(v: dict[str, int]) -> str:
    rows = f"{v['vectors']}x{v['dim']}"
    return f"{rows} + {v['vectors']}x{v['dim_2']}" if "dim_2" in v else rows


def _print_text(doc: dict[str, Any]) -> None:
    from cdtool.choices import KIND_NAMES

    out = console.result
    out(f"file:        {doc['path']} ({doc['size_bytes'] or 0:,} bytes)")
    out(f"format:      {doc['format']}")
    kind = f"{KIND_NAMES[doc['base_kind']]}, " if doc["base_kind"] else ""
    out(f"base:        {doc['base_model'] or '-'} ({kind}fingerprint {(doc['base_fingerprint'] or '-')[:16]})")
    out(f"created by:  {doc['created_by'] or '-'}")
    toks = ", ".join(f"{t} ({_rows_text(v)})" for t, v in doc["tokens"].items())
    out(f"tokens:      {toks or '-'}")
    for c in doc["concepts"]:
        out(f"concept:     {c.get('token')} class={c.get('class_noun')} init={c.get('init_token')}")
    dtypes = sorted({v["dtype"] for v in doc["layers"].values()})
    ranks = sorted({v["rank"] for v in doc["layers"].values() if v["rank"] is not None})
    rank_text = f"low-rank {doc['low_rank_layers']} (ranks {', '.join(map(str, ranks))})" if ranks else "all full"
    out(f"layers:      {doc['layer_count']}, {rank_text}, dtype {', '.join(dtypes) or '-'}")
    if doc["needs_base"]:
        out("note:        stores fine-tuned weights; commands subtract the base model (--model)")
    for name, v in doc["layers"].items():
        r = f"rank {v['rank']}" if v["rank"] is not None else "full"
        out(f"  {name}  {v['shape'][0]}x{v['shape'][1]}  {r}{'  +bias' if v['bias'] else ''}")
    if doc["provenance"]:
        import json

        out(f"provenance:  {json.dumps(doc['provenance'], sort_keys=True)}")


def info(
    file: Annotated[Path, typer.Argument(help="A delta file in any supported format.", show_default=False)],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a delta's format, tokens, concepts, layers, ranks, dtype, size, base and provenance.

    An SDXL delta's tokens show their rows in both text encoders (`<new1> (1x768 + 1x1280)`).
    """
    # the library loads here, not at the top, so that `cdtool info --help` starts without torch
    from cdtool.delta.file import describe
    from cdtool.delta.importers import read_delta

    doc = describe(read_delta(file), file)
    if json_out:
        console.result_json(doc)
    else:
        _print_text(doc)


EXAMPLES = examples(
    "cdtool info cat.safetensors",
    "cdtool info delta.bin --json",
)


def register(app: typer.Typer) -> None:
    app.command("info", epilog=EXAMPLES)(cdtool_command(info))

"""`cdtool compress`: low-rank SVD of every ΔW in a delta."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.atomic import claim_output
from cdtool.commands.common import (
    DeltaOutputOpt,
    Dtype,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    cdtool_command,
    examples,
    pick_model,
)
from cdtool.errors import CdtoolError, UsageError

EXAMPLES = examples(
    "cdtool compress pets.safetensors -o pets.small.safetensors",
    "cdtool compress cat.safetensors --rank 32 --dtype fp16 -o cat.r32.safetensors",
)


class Svd(str, Enum):
    exact = "exact"
    randomized = "randomized"


def compress(
    source: Annotated[
        Path, typer.Argument(help="A delta in any supported format (full or already compressed).", show_default=False)
    ],
    output: DeltaOutputOpt,
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="Keep this many singular values per layer.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            min=0.0,
            max=1.0,
            help="Keep singular values until their share of the sum reaches this (the official tool: 0.6). The default.",
        ),
    ] = None,
    fro: Annotated[
        float | None, typer.Option("--fro", min=0.0, max=1.0, help="Keep this share of each layer's Frobenius norm.")
    ] = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Storage dtype of the factors.")] = Dtype.fp32,
    svd: Annotated[Svd, typer.Option("--svd", help="exact, or randomized (faster on large layers).")] = Svd.exact,
    model: ModelOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD.")] = 0,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress each layer's ΔW to up @ down by truncated SVD; tokens are kept unchanged.

    Exactly one of --rank, --energy, --fro (default: --energy 0.6, as the official tool). The base
    model is read only for files that store fine-tuned weights, and for a .bin output.
    """
    # the library loads here, not at the top, so that `cdtool compress --help` starts without torch
    from cdtool.delta.importers import check_delta_output, read_delta, save_delta
    from cdtool.delta.lowrank import compress_delta
    from cdtool.delta.provenance import compress_entry, stamp
    from cdtool.models.loading import DTYPES

    chosen = [x for x in (rank, energy, fro) if x is not None]
    if len(chosen) > 1:
        raise UsageError("give only one of --rank, --energy, --fro")
    if not chosen:
        energy = 0.6
    check_delta_output(output)
    claim = claim_output(output, "compress", force, inputs=[source])
    delta = read_delta(source)
    delta.refuse_personal("compress has nothing to compress in it (no layers; its visual tokens are the concept)")
    base = None
    if delta.needs_base or output.suffix == ".bin":
        from cdtool.delta.base import resolve_on_base

        delta, base = resolve_on_base(delta, pick_model(model, [delta.base_model]))
    if not delta.layers:
        raise CdtoolError(f"{source} has no layers to compress (tokens only)")
    done = compress_delta(
        delta, rank=rank, energy=energy, fro=fro, dtype=DTYPES[dtype.value], method=svd.value, seed=seed
    )
    out, rows, capped = done.delta, done.layers, done.capped
    stamp(out, "compress", compress_entry(source, rank, energy, fro, dtype.value, svd.value))
    with claim.staged() as tmp:
        save_delta(out, tmp, base)
    size_in = source.stat().st_size if source.is_file() else None
    size_out = output.stat().st_size
    if capped:
        console.log(f"--rank {rank} exceeds the size of {_count(len(capped), 'layer')}; they keep their full rank")
    _layer_table(rows)
    console.log(compress_summary(rows, size_in, size_out))
    if json_out:
        console.result_json(
            {
                "output": str(output),
                "layers": rows,
                "capped": capped,
                "size_before": size_in,
                "size_after": size_out,
            }
        )
    else:
        console.result(str(output))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def compress_summary(rows: dict[str, dict[str, Any]], size_in: int | None, size_out: int) -> str:
    """One line for all layers: ranks, kept shares, how many are stored dense, the file sizes."""
    ranks = [r["rank"] for r in rows.values()]
    dense = sum(r["stored"] == "dense" for r in rows.values())
    line = (
        f"{_count(len(rows), 'layer')}: rank {_span(ranks, 'd')}, energy kept {_span([r['energy'] for r in rows.values()], '.3f')}, "
        f"frobenius kept {_span([r['fro'] for r in rows.values()], '.3f')}"
    )
    if dense:
        line += f", {dense} stored dense (factors would not be smaller)"
    if size_in:
        return f"{line}; {size_in:,} -> {size_out:,} bytes ({size_out / size_in:.1%})"
    return f"{line}; {size_out:,} bytes"


def _layer_table(rows: dict[str, dict[str, Any]]) -> None:
    """Every layer in one table, on a terminal only (elsewhere the summary line stands for it)."""
    if not console.interactive():
        return
    from rich.table import Table

    table = Table(title="cdtool compress", title_justify="left")
    for label in ("layer", "shape", "rank", "energy", "frobenius", "stored", "bytes"):
        table.add_column(label, justify="left" if label in ("layer", "stored") else "right", no_wrap=label == "layer")
    for name, r in rows.items():
        table.add_row(
            name,
            "x".join(map(str, r["shape"])),
            str(r["rank"]),
            f"{r['energy']:.3f}",
            f"{r['fro']:.3f}",
            r["stored"],
            f"{r['bytes']:,}",
        )
    console.print_table(table)


def register(app: typer.Typer) -> None:
    app.command("compress", epilog=EXAMPLES)(cdtool_command(compress))

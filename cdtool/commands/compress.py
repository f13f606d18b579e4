"""`cdtool compress`: low-rank SVD of every ΔW in a delta."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import __version__, console
from cdtool.atomic import check_writable
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
from cdtool.errors import UsageError
from cdtool.hashing import file_sha256

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
    from cdtool.delta import Delta, LayerDelta
    from cdtool.importers import check_delta_output, read_delta, save_delta
    from cdtool.lowrank import factors_are_larger, truncate
    from cdtool.models import DTYPES

    chosen = [x for x in (rank, energy, fro) if x is not None]
    if len(chosen) > 1:
        raise UsageError("give only one of --rank, --energy, --fro")
    if not chosen:
        energy = 0.6
    check_delta_output(output)
    check_writable(output, force)
    delta = read_delta(source)
    base = None
    if delta.needs_base or output.suffix == ".bin":
        from cdtool.base import fingerprint_names, load_base_params

        base = load_base_params(pick_model(model, [delta.base_model]), fingerprint_names(delta))
        delta = delta.relative_to(base) if delta.needs_base else delta
    if not delta.layers:
        raise UsageError(f"{source} has no layers to compress (tokens only)")
    out = Delta(
        tokens=delta.tokens,
        tokens_2=delta.tokens_2,
        base_kind=delta.base_kind,
        base_model=delta.base_model,
        base_fingerprint=delta.base_fingerprint,
        concepts=delta.concepts,
        created_by=f"cdtool {__version__} compress",
    )
    rows: dict[str, dict[str, Any]] = {}
    target = DTYPES[dtype.value]
    for name, layer in sorted(delta.layers.items()):
        t = truncate(layer.dense(), rank=rank, energy=energy, fro=fro, method=svd.value, seed=seed)
        if t.capped:
            console.log(f"{name}: rank {rank} exceeds the layer's size; kept all {t.rank}")
        dense = factors_are_larger(layer.shape, t.rank)
        if dense:  # the whole ΔW where nothing was cut, else the rank-k approximation, as one matrix
            full = layer.dense() if t.rank == min(layer.shape) else t.up @ t.down
            out.layers[name] = LayerDelta(full=full.to(target), bias=layer.bias)
        else:
            out.layers[name] = LayerDelta(up=t.up.to(target), down=t.down.to(target), bias=layer.bias)
        rows[name] = {
            "rank": t.rank,
            "energy": t.energy,
            "fro": t.fro,
            "shape": list(layer.shape),
            "was_rank": layer.rank,
            "stored": "dense" if dense else "factors",
        }
    out.provenance = dict(
        delta.provenance,
        compress={
            "source": str(source),
            "source_sha256": file_sha256(source) if source.is_file() else None,
            "rank": rank,
            "energy": energy,
            "fro": fro,
            "dtype": dtype.value,
            "svd": svd.value,
        },
    )
    save_delta(out, output, base)
    size_in = source.stat().st_size if source.is_file() else None
    size_out = output.stat().st_size
    for name, r in rows.items():
        how = f", stored dense (rank-{r['rank']} factors would not be smaller)" if r["stored"] == "dense" else ""
        console.log(f"{name}: rank {r['rank']}, energy {r['energy']:.3f}, frobenius {r['fro']:.3f}{how}")
    if size_in:
        console.log(f"size: {size_in:,} -> {size_out:,} bytes ({size_out / size_in:.1%})")
    if json_out:
        console.result_json({"output": str(output), "layers": rows, "size_before": size_in, "size_after": size_out})
    else:
        console.result(str(output))


def register(app: typer.Typer) -> None:
    app.command("compress", epilog=EXAMPLES)(cdtool_command(compress))

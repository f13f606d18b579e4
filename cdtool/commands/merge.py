"""`cdtool merge`: several concepts into one delta: the paper's closed form, a least-squares fit over
every text row, or a weighted sum."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.atomic import claim_output
from cdtool.choices import CLOSED_FORM, LEAST_SQUARES, SUM
from cdtool.commands.common import (
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    cdtool_command,
    examples,
    parse_scaled,
    pick_model,
)
from cdtool.errors import CdtoolError, UsageError, read_text


class MergeMethodOption(str, Enum):
    closed_form = CLOSED_FORM
    least_squares = LEAST_SQUARES
    sum = SUM


def split_inputs(args: list[str]) -> list[tuple[Path, float]]:
    """`a.safetensors+b.bin:0.5` and separate arguments alike; an existing path is never split."""
    out = []
    for arg in args:
        parts = [arg] if Path(arg).exists() else arg.split("+")
        out.extend(parse_scaled(p) for p in parts if p)
    return out


def merge(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Deltas to merge: `a.safetensors+b.bin` or separate arguments. `file:x` scales that file's ΔW "
            "(closed-form, sum) or weighs its rows in the fit (least-squares; default 1).",
            show_default=False,
            metavar="DELTA...",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Merged delta (.safetensors, or .bin for the official layout)."),
    ] = None,
    method: Annotated[
        MergeMethodOption,
        typer.Option(
            "--method",
            help="closed-form: the paper's (each concept exact on its two target prompts); least-squares: each "
            "concept's outputs on every row of its prompts, padding included, and the base's on the "
            "regularisation captions, fitted together; sum: the weighted sum of the ΔW.",
        ),
    ] = MergeMethodOption.closed_form,
    model: ModelOpt = None,
    reg_captions: Annotated[
        Path | None,
        typer.Option(
            "--reg-captions", help="Regularisation captions, one per line (default: 1200 shipped with cdtool)."
        ),
    ] = None,
    base_weight: Annotated[
        float | None,
        typer.Option(
            "--base-weight",
            min=0.0,
            help="least-squares: weight of the base model's outputs on the regularisation captions, against 1 "
            "for each concept's own rows (default 0.3; larger keeps plain prompts closer to the base).",
            show_default=False,
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="Class nouns per input, `cat+dog`, for files that do not record them."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the analysis; write nothing.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge concepts into one delta.

    closed-form (default, Kumari et al. 2023, Sec. 3.2) keeps each concept's key/value outputs on its
    two target prompts exactly and otherwise stays as close as possible to the base model on 1200
    varied captions. least-squares fits every row the UNet reads for each concept's recorded captions
    and target prompts, and the base's on the captions, in one weighted least-squares solve; it keeps
    concepts that live beyond the target rows (see docs/merging.md, "Which merge"). Tokens used by two inputs
    are renamed to the next free <newK>.
    """
    specs = split_inputs(inputs)
    if len(specs) < 2:
        raise UsageError("give at least two deltas to merge")
    from cdtool.merge.job import MergeRequest, check_inputs, merge_files

    check_inputs(method.value, specs)
    if output is None and not dry_run:
        raise UsageError("give --output (or --dry-run)")
    if base_weight is not None and method is not MergeMethodOption.least_squares:
        raise UsageError("--base-weight belongs to --method least-squares")
    if output is not None:
        from cdtool.delta.importers import check_delta_output

        check_delta_output(output)
        if not dry_run:
            claim = claim_output(output, "merge", force, inputs=[p for p, _ in specs])
    nouns = classes.split("+") if classes else []
    if nouns and len(nouns) != len(specs):
        raise UsageError(f"--classes names {len(nouns)} classes for {len(specs)} inputs")
    request = MergeRequest(
        method.value,
        specs,
        model,
        nouns,
        captions=None if method is MergeMethodOption.sum else _read_captions(reg_captions),
        reg_captions=reg_captions,
        base_weight=base_weight,
        dry_run=dry_run,
    )
    merged = merge_files(request, lambda recorded: pick_model(model, recorded), warn=console.warn, log=console.log)
    doc = merged.doc
    if merged.delta is None:
        if json_out:
            console.result_json(doc)
        else:
            _print_analysis(doc)
        return
    assert output is not None
    from cdtool.delta.importers import save_delta

    with claim.staged() as tmp:
        save_delta(merged.delta, tmp, merged.base if output.suffix == ".bin" else None)
    if json_out:
        console.result_json(dict(doc, output=str(output)))
    else:
        console.result(str(output))


def _read_captions(path: Path | None) -> list[str]:
    from cdtool.merge.deltas import default_reg_captions

    if path is None:
        return default_reg_captions()
    captions = [ln.strip() for ln in read_text(path, "captions file").splitlines() if ln.strip()]
    if not captions:
        raise CdtoolError(f"{path}: no captions in the file")
    return captions


def _print_analysis(doc: dict[str, Any]) -> None:
    out = console.result
    out(f"method:    {doc['method']}  base: {doc['base_model']}")
    for c in doc["concepts"]:
        out(f"concept:   {c.get('token')} ({c.get('class_noun')})")
    for path, m in doc["renamed"].items():
        out(f"renamed:   {path}: " + ", ".join(f"{a} -> {b}" for a, b in m.items()))
    out(f"layers:    {len(doc['layers'])}")
    for n, v in doc["layers"].items():
        ranks = ", ".join("full" if r is None else str(r) for r in v["ranks"])
        out(f"  {n}  ranks: {ranks}")
    if "target_rows" in doc:
        out(
            f"targets:   {doc['target_rows']} rows, largest cross-concept cosine {doc['target_overlap']:.4f} "
            "(1: indistinguishable)"
        )
        out(f"reg set:   {doc['reg_captions']} captions, {doc['reg_rows']} feature rows")
    if "concept_rows" in doc:
        rows = ", ".join(str(n) for n in doc["concept_rows"])
        weights = ", ".join(f"{w:g}" for w in doc["weights"])
        out(f"fit:       rows per input {rows}; weights {weights}; base weight {doc['base_weight']:g}")


EXAMPLES = examples(
    "cdtool merge cat.safetensors+dog.safetensors -o pets.safetensors",
    "cdtool merge cat.safetensors dog.safetensors --method least-squares -o pets-ls.safetensors",
    "cdtool merge cat.safetensors:2+dog.safetensors --method least-squares --base-weight 1 --dry-run",
)


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=EXAMPLES)(cdtool_command(merge))

"""`cdtool merge`: several concepts into one delta, in closed form (the paper's method) or as a sum."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import __version__, console
from cdtool.atomic import claim_output
from cdtool.base import TOKEN_EMBEDDING, fingerprint, fingerprint_names, load_base_params
from cdtool.commands.common import ForceOpt, JsonOpt, ModelOpt, QuietOpt, cdtool_command, parse_scaled
from cdtool.delta import Delta
from cdtool.errors import CdtoolError, UsageError
from cdtool.hashing import file_sha256
from cdtool.importers import check_delta_output, read_delta, save_delta


class Method(str, Enum):
    closed_form = "closed-form"
    sum = "sum"


def split_inputs(args: list[str]) -> list[tuple[Path, float]]:
    """`a.safetensors+b.bin:0.5` and separate arguments alike; an existing path is never split."""
    out = []
    for arg in args:
        parts = [arg] if Path(arg).exists() else arg.split("+")
        out.extend(parse_scaled(p) for p in parts if p)
    return out


def _with_classes(delta: Delta, noun: str | None) -> Delta:
    if not delta.concepts:
        delta.concepts = [{"token": t, "class_noun": None, "init_token": None, "prompts": []} for t in delta.tokens]
        if not delta.concepts:
            delta.concepts = [{"token": None, "class_noun": None, "init_token": None, "prompts": []}]
    if noun:
        for c in delta.concepts:
            c["class_noun"] = noun
    return delta


def merge(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Deltas to merge: `a.safetensors+b.bin` or separate arguments; `file:scale` weights a file.",
            show_default=False,
            metavar="DELTA...",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Merged delta (.safetensors, or .bin for the official layout)."),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method", help="closed-form: the paper's constrained optimisation; sum: weighted sum of the ΔW."
        ),
    ] = Method.closed_form,
    model: ModelOpt = None,
    reg_captions: Annotated[
        Path | None,
        typer.Option(
            "--reg-captions", help="Regularisation captions, one per line (default: 1200 shipped with cdtool)."
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

    closed-form (default) keeps each concept's key/value outputs on its own prompts exactly and
    otherwise stays as close as possible to the base model on 1200 varied captions (Kumari et al.
    2023, Sec. 3.2). Tokens used by two inputs are renamed to the next free <newK>.
    """
    specs = split_inputs(inputs)
    if len(specs) < 2:
        raise UsageError("give at least two deltas to merge")
    if output is None and not dry_run:
        raise UsageError("give --output (or --dry-run)")
    if output is not None:
        check_delta_output(output)
        if not dry_run:
            claim = claim_output(output, "merge", force, inputs=[p for p, _ in specs])
    nouns = classes.split("+") if classes else []
    if nouns and len(nouns) != len(specs):
        raise UsageError(f"--classes names {len(nouns)} classes for {len(specs)} inputs")
    captions = None
    if method is Method.closed_form:
        from cdtool.merge import default_reg_captions

        if reg_captions is not None:
            if not reg_captions.is_file():
                raise CdtoolError(f"{reg_captions}: no such captions file")
            captions = [ln.strip() for ln in reg_captions.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not captions:
                raise CdtoolError(f"{reg_captions}: no captions in the file")
        else:
            captions = default_reg_captions()

    deltas = [_with_classes(read_delta(p), nouns[i] if nouns else None) for i, (p, _) in enumerate(specs)]
    bases = sorted({d.base_model for d in deltas if d.base_model})
    if model is None and len(bases) > 1:
        raise CdtoolError(f"the inputs were made for different base models ({', '.join(bases)}); they cannot be merged")
    from cdtool.commands.common import pick_model

    base_model = pick_model(model, bases)

    from cdtool.merge import assign_tokens, check_closed_form_layers, rename_tokens

    if method is Method.closed_form:
        check_closed_form_layers(deltas)

    renames = assign_tokens(deltas)
    for (path, _), mapping in zip(specs, renames, strict=True):
        for old, new in mapping.items():
            console.warn(f"{path}: token {old} is taken by an earlier input; renamed to {new}")
    deltas = [rename_tokens(d, m) for d, m in zip(deltas, renames, strict=True)]

    names = sorted(
        {f"{n}.weight" for d in deltas for n in d.layers}
        | {f"{n}.bias" for d in deltas for n, layer in d.layers.items() if layer.bias is not None}
    )
    console.log(f"reading {len(names)} base weights of {base_model}")
    base = load_base_params(base_model, [*names, TOKEN_EMBEDDING])
    tokenizer = encoder = None
    if method is Method.closed_form or any(d.tokens and d.base_fingerprint for d in deltas):
        from cdtool.models import load_text_side

        tokenizer, encoder = load_text_side(base_model)
    vocab = len(tokenizer) if tokenizer is not None else None
    for i, d in enumerate(deltas):
        if d.needs_base:
            deltas[i] = d = d.relative_to(base)
        if d.base_fingerprint and fingerprint(base, fingerprint_names(d), vocab) != d.base_fingerprint:
            raise CdtoolError(
                f"{d.origin} was made for another base model than {base_model} (fingerprint mismatch); inputs with different bases are refused"
            )
    deltas = [d if s == 1.0 else _scaled(d, s) for d, (_, s) in zip(deltas, specs, strict=True)]

    doc: dict[str, Any] = {
        "method": method.value,
        "base_model": base_model,
        "inputs": [str(p) for p, _ in specs],
        "renamed": {str(p): m for (p, _), m in zip(specs, renames, strict=True) if m},
        "concepts": [c for d in deltas for c in d.concepts],
        "tokens": [t for d in deltas for t in d.tokens],
        "layers": {
            n: {"ranks": [d.layers[n].rank for d in deltas if n in d.layers]}
            for n in sorted({n for d in deltas for n in d.layers})
        },
    }
    if method is Method.sum:
        from cdtool.merge import weighted_sum

        merged = weighted_sum([(d, 1.0) for d in deltas])
    else:
        from cdtool.merge import closed_form_merge
        from cdtool.text_features import cached_reg_gram

        assert captions is not None
        gram, rows, cached = cached_reg_gram(tokenizer, encoder, captions)
        console.log(f"regularisation features: {len(captions)} captions, {rows} rows{' (cached)' if cached else ''}")
        result = closed_form_merge(deltas, base, tokenizer, encoder, gram, dry_run=dry_run)
        merged = result.delta
        doc.update(
            reg_captions=len(captions),
            reg_rows=rows,
            target_rows=result.target_rows,
            target_rows_kept=result.target_rows_kept,
            target_overlap=result.overlap,
            ridge={"gram": result.ridge_gram, "targets": result.ridge_targets},
        )
        for n, rep in result.layers.items():
            doc["layers"][n].update(rep)
        dim = gram.shape[0]
        if result.target_rows_kept > dim:
            console.warn(
                f"{result.target_rows_kept} target rows exceed the text feature size {dim}: the constraints cannot all hold; see the residuals"
            )
        if result.ridge_gram or result.ridge_targets:
            console.warn(
                f"the system was ill-conditioned; a relative ridge of {max(result.ridge_gram, result.ridge_targets):g} was added"
            )
        if result.layers:
            worst_res = max(r["constraint_residual"] for r in result.layers.values())
            mean_drift = sum(r["reg_drift"] for r in result.layers.values()) / len(result.layers)
            doc["total"] = {"max_constraint_residual": worst_res, "mean_reg_drift": mean_drift}
            console.log(
                f"{len(result.layers)} layers: max constraint residual {worst_res:.2e}, mean drift on regularisation features {mean_drift:.2e}"
            )
        console.log(
            f"target rows: {result.target_rows} ({result.target_rows_kept} distinct); largest cross-concept overlap {result.overlap:.3f}"
        )
    if dry_run:
        doc["dry_run"] = True
        if json_out:
            console.result_json(doc)
        else:
            _print_analysis(doc)
        return
    assert output is not None
    merged.base_model = base_model
    merged.base_fingerprint = fingerprint(base, fingerprint_names(merged), vocab)
    merged.created_by = f"cdtool {__version__} merge"
    merged.provenance = {
        "merge": {
            "method": method.value,
            "inputs": [
                {"path": str(p), "scale": s, "sha256": file_sha256(p) if p.is_file() else None} for p, s in specs
            ],
            "renamed": doc["renamed"],
            **(
                {
                    "reg_captions": str(reg_captions) if reg_captions else "cdtool default",
                    "reg_rows": doc["reg_rows"],
                    "ridge": doc["ridge"],
                    "total": doc.get("total"),
                }
                if method is Method.closed_form
                else {}
            ),
        }
    }
    with claim.staged() as tmp:
        save_delta(merged, tmp, base if output.suffix == ".bin" else None)
    if json_out:
        console.result_json(dict(doc, output=str(output)))
    else:
        console.result(str(output))


def _scaled(d: Delta, s: float) -> Delta:
    from cdtool.delta import LayerDelta

    layers = {
        n: LayerDelta(full=s * layer.dense().float(), bias=None if layer.bias is None else s * layer.bias)
        for n, layer in d.layers.items()
    }
    return Delta(
        layers=layers,
        tokens=d.tokens,
        base_model=d.base_model,
        base_fingerprint=d.base_fingerprint,
        concepts=d.concepts,
        provenance=d.provenance,
        origin=d.origin,
        source_format=d.source_format,
    )


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
            f"targets:   {doc['target_rows']} rows ({doc['target_rows_kept']} distinct), largest cross-concept cosine {doc['target_overlap']:.3f}"
        )
        out(f"reg set:   {doc['reg_captions']} captions, {doc['reg_rows']} feature rows")


def register(app: typer.Typer) -> None:
    app.command("merge")(cdtool_command(merge))

"""`cdtool merge`: several concepts into one delta: the paper's closed form, a least-squares fit over
every text row, or a weighted sum."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cdtool import __version__, console
from cdtool.atomic import claim_output
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

if TYPE_CHECKING:
    from cdtool.merge.deltas import MergeResult
    from cdtool.merge.inputs import MergeInputs


class MergeMethodOption(str, Enum):
    closed_form = "closed-form"
    least_squares = "least-squares"
    sum = "sum"


def split_inputs(args: list[str]) -> list[tuple[Path, float]]:
    """`a.safetensors+b.bin:0.5` and separate arguments alike; an existing path is never split."""
    out = []
    for arg in args:
        parts = [arg] if Path(arg).exists() else arg.split("+")
        out.extend(parse_scaled(p) for p in parts if p)
    return out


def check_distinct(paths: list[Path]) -> None:
    """Each input is merged once: the same file twice (under any name), or two copies of one file,
    is refused, naming it."""
    from cdtool.hashing import file_sha256

    seen: dict[tuple[int, int], Path] = {}
    sizes: dict[int, list[Path]] = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue  # a missing input is named when it is read
        first = seen.setdefault((st.st_dev, st.st_ino), p)
        if first is not p:
            same = f" (as {first} and {p})" if str(first) != str(p) else ""
            raise UsageError(
                f"{p} is given twice{same}; merge each delta once (to weigh one more, give it a scale: {p}:2)"
            )
        if p.is_file():
            sizes.setdefault(st.st_size, []).append(p)
    for group in (g for g in sizes.values() if len(g) > 1):
        digests: dict[str, Path] = {}
        for p in group:
            first = digests.setdefault(file_sha256(p), p)
            if first is not p:
                raise UsageError(f"{first} and {p} are copies of one delta (the same bytes); merge it once")


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
    concepts that live beyond the target rows (see README, "Which merge"). Tokens used by two inputs
    are renamed to the next free <newK>.
    """
    specs = split_inputs(inputs)
    if len(specs) < 2:
        raise UsageError("give at least two deltas to merge")
    check_distinct([p for p, _ in specs])
    if method is MergeMethodOption.least_squares and any(s <= 0 for _, s in specs):
        spec = next(f"{p}:{s:g}" for p, s in specs if s <= 0)
        raise UsageError(f"{spec}: a least-squares weight must be above zero")
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
    captions = None if method is MergeMethodOption.sum else _read_captions(reg_captions)
    # least-squares reads `file:x` as the input's weight in the fit; the others scale its ΔW
    scales = [1.0 if method is MergeMethodOption.least_squares else s for _, s in specs]
    from cdtool.merge.inputs import prepare_merge_inputs, read_merge_inputs, recorded_bases

    paths = [p for p, _ in specs]
    deltas = read_merge_inputs(paths, nouns)
    base_model = pick_model(model, recorded_bases(deltas, model))
    loaded = prepare_merge_inputs(
        paths,
        deltas,
        scales,
        base_model,
        text_side=method is not MergeMethodOption.sum,
        warn=console.warn,
        log=console.log,
    )
    del deltas  # loaded.deltas holds them now, relative to the base
    doc = _inputs_doc(method, loaded, specs)
    if method is MergeMethodOption.sum:
        from cdtool.merge.deltas import sum_deltas

        merged = sum_deltas(loaded.deltas)
    else:
        assert captions is not None
        weights = [s for _, s in specs]
        lam = base_weight if base_weight is not None else _default_base_weight()
        result = _solve(method, loaded, captions, weights, lam, dry_run, doc)
        merged = result.delta
        if not dry_run:
            _warn_growth(result, doc)
    if dry_run:
        doc["dry_run"] = True
        if json_out:
            console.result_json(doc)
        else:
            _print_analysis(doc)
        return
    assert output is not None
    loaded.deltas.clear()  # the inputs' ΔW (2.7 GB on SDXL) are not needed to write the merge
    with claim.staged() as tmp:
        _write(merged, tmp, method, loaded, specs, reg_captions, doc)
    if json_out:
        console.result_json(dict(doc, output=str(output)))
    else:
        console.result(str(output))


def _default_base_weight() -> float:
    from cdtool.merge.deltas import DEFAULT_BASE_WEIGHT

    return DEFAULT_BASE_WEIGHT


def _read_captions(path: Path | None) -> list[str]:
    from cdtool.merge.deltas import default_reg_captions

    if path is None:
        return default_reg_captions()
    captions = [ln.strip() for ln in read_text(path, "captions file").splitlines() if ln.strip()]
    if not captions:
        raise CdtoolError(f"{path}: no captions in the file")
    return captions


def _inputs_doc(method: MergeMethodOption, loaded: MergeInputs, specs: list[tuple[Path, float]]) -> dict[str, Any]:
    deltas = loaded.deltas
    return {
        "method": method.value,
        "base_model": loaded.base_model,
        "inputs": [str(p) for p, _ in specs],
        "renamed": {str(p): m for (p, _), m in zip(specs, loaded.renames, strict=True) if m},
        "concepts": [c for d in deltas for c in d.concepts],
        "tokens": [t for d in deltas for t in d.tokens],
        "layers": {
            n: {"ranks": [d.layers[n].rank for d in deltas if n in d.layers]}
            for n in sorted({n for d in deltas for n in d.layers})
        },
    }


def _solve(
    method: MergeMethodOption,
    loaded: MergeInputs,
    captions: list[str],
    weights: list[float],
    base_weight: float,
    dry_run: bool,
    doc: dict[str, Any],
) -> MergeResult:
    """Run the closed form or the least-squares merge; fill `doc` with its analysis; warn."""
    from cdtool.merge.deltas import merge_targets, solve_least_squares, solve_merge
    from cdtool.merge.text_features import cached_reg_gram

    least_squares = method is MergeMethodOption.least_squares  # which solves on every padded row
    assert loaded.text is not None
    gram, rows, cached = cached_reg_gram(loaded.text, captions, padded=least_squares)
    console.log(f"regularisation features: {len(captions)} captions, {rows} rows{' (cached)' if cached else ''}")
    targets = merge_targets(loaded.deltas, loaded.text, padded=least_squares)
    loaded.text = None  # the text encoders (3.3 GB in float32 on SDXL) are done with
    if least_squares:
        result = solve_least_squares(
            loaded.deltas, loaded.base, targets, gram / rows, weights, base_weight, dry_run=dry_run
        )
        doc.update(weights=weights, base_weight=base_weight, concept_rows=result.concept_rows)
    else:
        result = solve_merge(loaded.deltas, loaded.base, gram, targets.c, targets.owner, dry_run=dry_run)
        doc.update(target_rows_kept=result.target_rows_kept, ridge_targets=result.ridge_targets)
    doc.update(
        reg_captions=len(captions),
        reg_rows=rows,
        target_rows=result.target_rows,
        target_overlap=result.overlap,
        ridge={"gram": result.ridge_gram, **({} if least_squares else {"targets": result.ridge_targets})},
    )
    for n, rep in result.layers.items():
        doc["layers"][n].update(rep)
    _summarise(result, loaded, doc, least_squares, int(gram.shape[0]))
    return result


def _summarise(result: MergeResult, loaded: MergeInputs, doc: dict[str, Any], least_squares: bool, dim: int) -> None:
    """The totals and the warnings a merge's analysis calls for."""
    from cdtool.merge.deltas import PARALLEL_COSINE

    if not least_squares and result.target_rows_kept > dim:
        console.warn(
            f"{result.target_rows_kept} target rows exceed the text feature size {dim}: the constraints cannot all hold; see the residuals"
        )
    if result.ridge_gram or result.ridge_targets:
        console.warn(
            f"the system was ill-conditioned; a relative ridge of {max(result.ridge_gram, result.ridge_targets):g} was added"
        )
    layers = result.layers.values()
    if result.layers and least_squares:
        worst = [max(r["own_error"][i] for r in layers) for i in range(len(loaded.deltas))]
        mean_drift = sum(r["reg_drift"] for r in layers) / len(result.layers)
        doc["total"] = {"max_own_error": worst, "mean_reg_drift": mean_drift}
        each = ", ".join(f"{e:.3f}" for e in worst)
        console.log(
            f"{len(result.layers)} layers: largest relative error on each input's own rows {each}; "
            f"mean drift on regularisation rows {mean_drift:.3f}"
        )
    elif result.layers:
        worst_res = max(r["constraint_residual"] for r in layers)
        mean_drift = sum(r["reg_drift"] for r in layers) / len(result.layers)
        doc["total"] = {"max_constraint_residual": worst_res, "mean_reg_drift": mean_drift}
        console.log(
            f"{len(result.layers)} layers: max constraint residual {worst_res:.2e}, mean drift on regularisation features {mean_drift:.2e}"
        )
    console.log(
        f"target prompts: {result.target_rows} text rows; the most similar rows of two different concepts have "
        f"cosine {result.overlap:.4f} (1 would make them indistinguishable to the merge)"
    )
    if result.overlap > PARALLEL_COSINE:
        _warn_parallel(loaded, result.overlap, result.closest)


def _warn_parallel(loaded: MergeInputs, cosine: float, pair: tuple[int, int] | None) -> None:
    names = " and ".join(str(loaded.paths[i]) for i in pair) if pair else "two inputs"
    console.warn(
        f"{names} have nearly parallel target rows (cosine {cosine:.6f}): the merge cannot keep both concepts "
        "apart. Their tokens probably started from the same word; retrain one with another --init-token "
        "(a concept trained as <newK> starts from the K-th default initialiser), or merge with --method sum"
    )


def _warn_growth(result: MergeResult, doc: dict[str, Any]) -> None:
    from cdtool.merge.deltas import BLOWUP_RATIO
    from cdtool.merge.gram_norms import largest_growth

    ratio, layer = largest_growth(result.sizes)
    doc["largest_growth"] = {"ratio": ratio, "layer": layer}
    if ratio > BLOWUP_RATIO:
        console.warn(
            f"in {layer} the merged delta changes the keys/values of ordinary captions {ratio:.0f}x as much as its "
            "largest input does: the concepts' constraints fight each other and plain prompts will likely break; "
            "check the inputs' tokens (see above) or use --method least-squares"
        )


def _write(
    merged: Any,
    output: Path,
    method: MergeMethodOption,
    loaded: MergeInputs,
    specs: list[tuple[Path, float]],
    reg_captions: Path | None,
    doc: dict[str, Any],
) -> None:
    from cdtool.delta.base import fingerprint, fingerprint_names
    from cdtool.delta.importers import save_delta
    from cdtool.hashing import file_sha256

    merged.base_model = loaded.base_model
    merged.base_kind = loaded.base_kind
    merged.base_fingerprint = fingerprint(loaded.base, fingerprint_names(merged), loaded.vocab)
    merged.created_by = f"cdtool {__version__} merge"
    solved = {
        "reg_captions": str(reg_captions) if reg_captions else "cdtool default",
        "reg_rows": doc.get("reg_rows"),
        "ridge": doc.get("ridge"),
        "total": doc.get("total"),
    }
    if method is MergeMethodOption.least_squares:
        solved["base_weight"] = doc["base_weight"]
    merged.provenance = {
        "merge": {
            "method": method.value,
            "inputs": [
                {
                    "path": str(p),
                    "sha256": file_sha256(p) if p.is_file() else None,
                    ("weight" if method is MergeMethodOption.least_squares else "scale"): s,
                }
                for p, s in specs
            ],
            "renamed": doc["renamed"],
            **({} if method is MergeMethodOption.sum else solved),
        }
    }
    save_delta(merged, output, loaded.base if output.suffix == ".bin" else None)


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

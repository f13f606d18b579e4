"""A whole merge, as `cdtool merge` runs it: the inputs read and prepared against one base, the
chosen method's solver, the analysis document with the warnings it calls for, and the merged
delta's base and provenance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdtool.choices import LEAST_SQUARES, SUM
from cdtool.errors import UsageError

if TYPE_CHECKING:
    import torch

    from cdtool.delta.file import Delta
    from cdtool.merge.deltas import MergeResult
    from cdtool.merge.inputs import MergeInputs

Log = Callable[[str], None]


@dataclass
class MergeRequest:
    method: str  # cdtool.choices: CLOSED_FORM, LEAST_SQUARES or SUM
    inputs: list[tuple[Path, float]]  # each delta with its `file:x` (a weight for least squares, else a scale)
    model: str | None = None  # --model, where given (inputs recording different bases need it)
    classes: list[str] = field(default_factory=list)  # class nouns per input, for files without them
    captions: list[str] | None = None  # the regularisation captions (the solved methods)
    reg_captions: Path | None = None  # their file, for the provenance (None: cdtool's own)
    base_weight: float | None = None  # least squares: the base's rows' weight (default: DEFAULT_BASE_WEIGHT)
    dry_run: bool = False


@dataclass
class MergeOutcome:
    doc: dict[str, Any]  # the analysis: inputs, concepts, tokens, layers, and the solver's figures
    delta: Delta | None  # the merged delta, tied to its base, with its provenance; None on a dry run
    base: dict[str, torch.Tensor]  # the base weights read (a .bin output needs them)


def check_inputs(method: str, inputs: list[tuple[Path, float]]) -> None:
    """The inputs as the command line gives them (each path with its `file:x`), before anything is
    read: each is merged once (the same file twice under any name, or two copies of one file, is
    refused, naming it), and a least-squares weight is above zero. Usage errors."""
    check_distinct([p for p, _ in inputs])
    if method == LEAST_SQUARES and any(s <= 0 for _, s in inputs):
        spec = next(f"{p}:{s:g}" for p, s in inputs if s <= 0)
        raise UsageError(f"{spec}: a least-squares weight must be above zero")


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


def merge_files(request: MergeRequest, choose_base: Callable[[list[str]], str], *, warn: Log, log: Log) -> MergeOutcome:
    """Read the inputs, make them relative to one base (`choose_base` picks it from the bases they
    record), rename shared tokens apart, and merge them by the requested method."""
    from cdtool.merge.deltas import sum_deltas
    from cdtool.merge.inputs import prepare_merge_inputs, read_merge_inputs, recorded_bases

    paths = [p for p, _ in request.inputs]
    deltas = read_merge_inputs(paths, request.classes)
    base_model = choose_base(recorded_bases(deltas, request.model))
    # least-squares reads `file:x` as the input's weight in the fit; the others scale its ΔW
    scales = [1.0 if request.method == LEAST_SQUARES else s for _, s in request.inputs]
    solved = request.method != SUM
    loaded = prepare_merge_inputs(paths, deltas, scales, base_model, text_side=solved, warn=warn, log=log)
    del deltas  # loaded.deltas holds them now, relative to the base
    doc = inputs_doc(request, loaded)
    if not solved:
        merged = sum_deltas(loaded.deltas)
    else:
        result = solve(request, loaded, doc, warn=warn, log=log)
        merged = result.delta
        if not request.dry_run:
            warn_growth(result, doc, warn)
    if request.dry_run:
        doc["dry_run"] = True
        return MergeOutcome(doc, None, loaded.base)
    loaded.deltas.clear()  # the inputs' ΔW (2.7 GB on SDXL) are not needed to write the merge
    record_merge(merged, request, loaded, doc)
    return MergeOutcome(doc, merged, loaded.base)


def inputs_doc(request: MergeRequest, loaded: MergeInputs) -> dict[str, Any]:
    """The analysis's part that needs no solver: the inputs, their concepts and tokens, each layer
    with every input's rank there."""
    deltas = loaded.deltas
    return {
        "method": request.method,
        "base_model": loaded.base_model,
        "inputs": [str(p) for p, _ in request.inputs],
        "renamed": {str(p): m for (p, _), m in zip(request.inputs, loaded.renames, strict=True) if m},
        "concepts": [c for d in deltas for c in d.concepts],
        "tokens": [t for d in deltas for t in d.tokens],
        "layers": {
            n: {"ranks": [d.layers[n].rank for d in deltas if n in d.layers]}
            for n in sorted({n for d in deltas for n in d.layers})
        },
    }


def solve(request: MergeRequest, loaded: MergeInputs, doc: dict[str, Any], *, warn: Log, log: Log) -> MergeResult:
    """Run the closed form or the least-squares merge; fill `doc` with its analysis; warn."""
    from cdtool.merge.deltas import DEFAULT_BASE_WEIGHT, merge_targets, solve_least_squares, solve_merge
    from cdtool.merge.text_features import cached_reg_gram

    least_squares = request.method == LEAST_SQUARES  # which solves on every row, padding included
    captions = request.captions
    assert loaded.text is not None and captions is not None
    gram, rows, cached = cached_reg_gram(loaded.text, captions, padded=least_squares)
    log(f"regularisation features: {len(captions)} captions, {rows} rows{' (cached)' if cached else ''}")
    targets = merge_targets(loaded.deltas, loaded.text, padded=least_squares)
    loaded.text = None  # the text encoders (3.3 GB in float32 on SDXL) are done with
    if least_squares:
        weights = [s for _, s in request.inputs]
        lam = DEFAULT_BASE_WEIGHT if request.base_weight is None else request.base_weight
        result = solve_least_squares(
            loaded.deltas, loaded.base, targets, gram / rows, weights, lam, dry_run=request.dry_run
        )
        doc.update(weights=weights, base_weight=lam, concept_rows=result.concept_rows)
    else:
        result = solve_merge(loaded.deltas, loaded.base, gram, targets.c, targets.owner, dry_run=request.dry_run)
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
    summarise(result, loaded, doc, least_squares, int(gram.shape[0]), warn=warn, log=log)
    return result


def summarise(
    result: MergeResult, loaded: MergeInputs, doc: dict[str, Any], least_squares: bool, dim: int, *, warn: Log, log: Log
) -> None:
    """The totals and the warnings a merge's analysis calls for."""
    from cdtool.merge.deltas import PARALLEL_COSINE

    if not least_squares and result.target_rows_kept > dim:
        warn(
            f"{result.target_rows_kept} target rows exceed the text feature size {dim}: the constraints cannot all hold; see the residuals"
        )
    if result.ridge_gram or result.ridge_targets:
        warn(
            f"the system was ill-conditioned; a relative ridge of {max(result.ridge_gram, result.ridge_targets):g} was added"
        )
    layers = result.layers.values()
    if result.layers and least_squares:
        worst = [max(r["own_error"][i] for r in layers) for i in range(len(loaded.deltas))]
        mean_drift = sum(r["reg_drift"] for r in layers) / len(result.layers)
        doc["total"] = {"max_own_error": worst, "mean_reg_drift": mean_drift}
        each = ", ".join(f"{e:.3f}" for e in worst)
        log(
            f"{len(result.layers)} layers: largest relative error on each input's own rows {each}; "
            f"mean drift on regularisation rows {mean_drift:.3f}"
        )
    elif result.layers:
        worst_res = max(r["constraint_residual"] for r in layers)
        mean_drift = sum(r["reg_drift"] for r in layers) / len(result.layers)
        doc["total"] = {"max_constraint_residual": worst_res, "mean_reg_drift": mean_drift}
        log(
            f"{len(result.layers)} layers: max constraint residual {worst_res:.2e}, mean drift on regularisation features {mean_drift:.2e}"
        )
    log(
        f"target prompts: {result.target_rows} text rows; the most similar rows of two different concepts have "
        f"cosine {result.overlap:.4f} (1 would make them indistinguishable to the merge)"
    )
    if result.overlap > PARALLEL_COSINE:
        warn_parallel(loaded, result.overlap, result.closest, warn)


def warn_parallel(loaded: MergeInputs, cosine: float, pair: tuple[int, int] | None, warn: Log) -> None:
    names = " and ".join(str(loaded.paths[i]) for i in pair) if pair else "two inputs"
    warn(
        f"{names} have nearly parallel target rows (cosine {cosine:.6f}): the merge cannot keep both concepts "
        "apart. Their tokens probably started from the same word; retrain one with another --init-token "
        "(a concept trained as <newK> starts from the K-th default initialiser), or merge with --method sum"
    )


def warn_growth(result: MergeResult, doc: dict[str, Any], warn: Log) -> None:
    from cdtool.merge.deltas import BLOWUP_RATIO
    from cdtool.merge.gram_norms import largest_growth

    ratio, layer = largest_growth(result.sizes)
    doc["largest_growth"] = {"ratio": ratio, "layer": layer}
    if ratio > BLOWUP_RATIO:
        warn(
            f"in {layer} the merged delta changes the keys/values of ordinary captions {ratio:.0f}x as much as its "
            "largest input does: the concepts' constraints fight each other and plain prompts will likely break; "
            "check the inputs' tokens (see above) or use --method least-squares"
        )


def record_merge(merged: Delta, request: MergeRequest, loaded: MergeInputs, doc: dict[str, Any]) -> None:
    """Tie the merged delta to the base it was solved on, and record the merge's provenance (which
    replaces the inputs': their sha256 identify them)."""
    from cdtool.delta.base import record_base
    from cdtool.delta.provenance import merge_entry, stamp

    record_base(merged, loaded.base_model, loaded.base, loaded.vocab)
    merged.base_kind = loaded.base_kind
    solved = None
    if request.method != SUM:
        solved = {
            "reg_captions": str(request.reg_captions) if request.reg_captions else "cdtool default",
            "reg_rows": doc.get("reg_rows"),
            "ridge": doc.get("ridge"),
            "total": doc.get("total"),
        }
        if request.method == LEAST_SQUARES:
            solved["base_weight"] = doc["base_weight"]
    stamp(merged, "merge", merge_entry(request.method, request.inputs, doc["renamed"], solved), new=True)

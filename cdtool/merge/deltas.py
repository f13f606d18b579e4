"""Merging deltas: token renaming, the closed-form merge over a model, and the weighted sum."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch

from cdtool.choices import LAYER_SETS
from cdtool.delta.file import Delta, LayerDelta
from cdtool.errors import CdtoolError
from cdtool.merge.closed_form import coefficients, constraint_residual, drift_squared, prepare
from cdtool.merge.gram_norms import LayerSizes, SizeSketch, sizes_on
from cdtool.models.tokens import check_token_name

if TYPE_CHECKING:
    from cdtool.models.conditioning import TextSide

# the projections a text-feature merge covers: those that read the text features (the kv layer set)
KV_SUFFIXES = tuple(f".{s}" for s in LAYER_SETS["kv"])
# The least-squares merge's default weight of the base model's outputs on the regularisation
# captions' rows, against weight 1 for each concept's own rows (mean Gram matrices both): measured on
# the toy model in benchmarks/RESULTS.md ("Merging").
DEFAULT_BASE_WEIGHT = 0.3
# Warn when target rows of two concepts are this parallel, or a merged layer's ΔW is this many
# times its largest input's: the merge then cannot tell the concepts apart, or they fight.
PARALLEL_COSINE = 0.999
BLOWUP_RATIO = 10.0


def default_reg_captions() -> list[str]:
    """The regularisation captions shipped with cdtool (1200, written for it)."""
    text = resources.files("cdtool").joinpath("data/reg_captions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def assign_tokens(deltas: Sequence[Delta]) -> list[dict[str, str]]:
    """Per input, {old token: new token}: a token already taken by an earlier input is renamed to
    the next free `<newK>` (free across all inputs)."""
    taken_anywhere = {t for d in deltas for t in d.tokens}
    used: set[str] = set()
    renames: list[dict[str, str]] = []
    k = 1
    for d in deltas:
        mapping = {}
        for token in d.tokens:
            if token in used:
                while f"<new{k}>" in taken_anywhere or f"<new{k}>" in used:
                    k += 1
                mapping[token] = f"<new{k}>"
            used.add(mapping.get(token, token))
        renames.append(mapping)
    return renames


def rename_tokens(delta: Delta, mapping: Mapping[str, str]) -> Delta:
    """A copy of `delta` with tokens (and the prompts that mention them) renamed."""
    if not mapping:
        return delta
    for new in mapping.values():
        check_token_name(new, delta.origin or "merge")
    pattern = re.compile("|".join(re.escape(t) for t in sorted(mapping, key=len, reverse=True)))

    def sub(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(0)], text)

    concepts = []
    for c in delta.concepts:
        c = dict(c)
        if c.get("token") in mapping:
            c["token"] = mapping[c["token"]]
        c["prompts"] = [sub(p) for p in c.get("prompts") or []]
        concepts.append(c)
    return replace(
        delta,
        tokens={mapping.get(t, t): e for t, e in delta.tokens.items()},
        tokens_2={mapping.get(t, t): e for t, e in delta.tokens_2.items()},
        concepts=concepts,
    )


def check_closed_form_layers(deltas: Sequence[Delta]) -> None:
    """The closed form covers attn2.to_k/to_v; name the first layer it cannot merge."""
    bad = sorted({n for d in deltas for n in d.layers if not n.endswith(KV_SUFFIXES)})
    if bad:
        raise CdtoolError(
            f"the closed-form merge covers attn2.to_k/to_v only, not {bad[0]}"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; use --method sum for such deltas"
        )


def sum_deltas(deltas: Sequence[Delta]) -> Delta:
    """ΔW = Σ ΔW_i on the union of layers (bias changes summed too); tokens and concepts united
    (already renamed, and scaled where asked)."""
    out = Delta()
    for d in deltas:
        for name, layer in d.layers.items():
            dense = layer.dense().float()
            bias = None if layer.bias is None else layer.bias.float()
            if name in out.layers:
                prev = out.layers[name]
                if prev.full is not None:
                    dense = prev.full + dense
                if prev.bias is not None:
                    bias = prev.bias if bias is None else prev.bias + bias
            out.layers[name] = LayerDelta(full=dense, bias=bias)
        out.tokens.update(d.tokens)
        out.tokens_2.update(d.tokens_2)
        out.concepts.extend(d.concepts)
    return out


def target_prompts(token: str | None, class_noun: str, style: bool = False) -> list[tuple[str, str]]:
    """The paper's target prompts as (prefix, subject) pairs: "<new1> cat" and "photo of a <new1>
    cat" ("painting in the style of" for styles)."""
    subject = f"{token} {class_noun}" if token else class_noun
    return [("", subject), ("painting in the style of " if style else "photo of a ", subject)]


def is_style(concept: Mapping[str, Any]) -> bool:
    # The official code treats a class containing "art" as a style; cdtool also reads `kind`.
    return concept.get("kind") == "style" or "art" in (concept.get("class_noun") or "").split()


@dataclass
class MergeResult:
    delta: Delta
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> residual, drift
    ridge_gram: float = 0.0
    ridge_targets: float = 0.0
    target_rows: int = 0
    target_rows_kept: int = 0
    overlap: float = 0.0  # largest |cosine| between target rows of different concepts
    closest: tuple[int, int] | None = None  # the two inputs those rows belong to
    concept_rows: list[int] = field(default_factory=list)  # least squares: rows fitted per input
    sizes: dict[str, LayerSizes] = field(default_factory=dict)  # on the regularisation rows, per layer


@dataclass
class MergeTargets:
    """What a solver reads of the text side: the paper's target rows C and the input each came
    from; for least squares also every row of each input's prompts."""

    c: torch.Tensor
    owner: list[int]
    rows: list[torch.Tensor] = field(default_factory=list)


def merge_targets(deltas: Sequence[Delta], text: TextSide, *, padded: bool = False) -> MergeTargets:
    """Add the relative, renamed deltas' tokens to the base's text side and encode the target rows
    (and with `padded`, the least-squares rows); the encoders are not needed after this."""
    from cdtool.models.conditioning import padded_rows

    check_closed_form_layers(deltas)
    add_delta_tokens(text, deltas)
    c, owner = paper_target_rows(deltas, text)
    rows = [padded_rows(text, concept_prompts(d)) for d in deltas] if padded else []
    return MergeTargets(c, owner, rows)


def add_delta_tokens(text: TextSide, deltas: Sequence[Delta]) -> None:
    """Add the deltas' new tokens, with their learned rows, to the base's text side."""
    from cdtool.models.tokens import add_text_tokens, plan_text_tokens

    add_text_tokens(text, plan_text_tokens(text, deltas))


def paper_target_rows(deltas: Sequence[Delta], text: TextSide) -> tuple[torch.Tensor, list[int]]:
    """The closed form's target rows C (float64, one text feature per row: for SDXL both encoders'
    rows at a position, concatenated) and the input each came from: the paper's prompts ("<new1>
    cat", "photo of a <new1> cat") from the subject to end-of-text (cdtool.models.conditioning.text_rows)."""
    from cdtool.models.conditioning import text_rows

    tokenizer = text.tokenizer
    prompts, starts, owner = [], [], []
    for i, d in enumerate(deltas):
        for concept in d.concepts:
            noun = concept.get("class_noun")
            if not noun:
                raise CdtoolError(
                    f"{d.origin}: concept {concept.get('token')} has no class noun recorded; pass --classes"
                )
            for prefix, subject in target_prompts(concept.get("token"), noun, is_style(concept)):
                # Rows start at the subject, as in the official code: the prefix' features are the
                # same for every concept and would make the constraints contradict each other.
                n_prefix = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
                prompts.append(prefix + subject)
                starts.append(1 + n_prefix)
                owner.append(i)
    rows = text_rows(text, prompts, starts)
    return torch.cat(rows).double(), [o for o, r in zip(owner, rows, strict=True) for _ in range(r.shape[0])]


def solve_merge(
    deltas: Sequence[Delta],
    base: Mapping[str, torch.Tensor],
    reg_gram: torch.Tensor,
    c: torch.Tensor,
    row_owner: Sequence[int],
    *,
    dry_run: bool = False,
) -> MergeResult:
    """Per layer, W closest to W0 on the regularisation features (`reg_gram`) with W c = W_i c for
    every target row c of input i (`row_owner`); the merged delta holds W - W0 and every token."""
    system = prepare(reg_gram, c)
    result = MergeResult(
        delta=Delta(),
        ridge_gram=system.ridge_gram,
        ridge_targets=system.ridge_targets,
        target_rows=int(c.shape[0]),
        target_rows_kept=len(system.kept_rows),
    )
    result.overlap, result.closest = closest_inputs(c, row_owner)
    keep_tokens(result.delta, deltas)
    if dry_run:
        return result
    gram32, sketch = system.gram.float(), SizeSketch(system.gram)
    for name, inputs in layer_inputs(deltas):
        w0 = base[f"{name}.weight"].double()
        values = torch.empty(c.shape[0], w0.shape[0], dtype=torch.float64)
        for i, dw_i in enumerate(inputs):
            w_i = w0 if dw_i is None else w0 + dw_i.double()
            idx = [r for r, o in enumerate(row_owner) if o == i]
            values[idx] = (w_i @ c[idx].T).T
        x = coefficients(system, w0, values)
        dw = (x.T @ system.d).float()
        (base_size,) = sizes_on(gram32, [w0])
        drift = drift_squared(system, x) ** 0.5  # of the float64 solution; the residual of the float32 ΔW written
        result.layers[name] = {
            "constraint_residual": constraint_residual(system, w0 + dw.double(), values),
            "reg_drift": drift / max(base_size, 1e-30),
        }
        result.sizes[name] = LayerSizes(drift, sketch.sizes([d for d in inputs if d is not None]))
        result.delta.layers[name] = LayerDelta(full=dw)
    return result


def layer_inputs(deltas: Sequence[Delta]) -> Iterator[tuple[str, list[torch.Tensor | None]]]:
    """Each layer any input changes, in name order, with each input's dense ΔW (None where the
    input leaves the layer at the base)."""
    for name in sorted({n for d in deltas for n in d.layers}):
        yield name, [d.layers[name].dense() if name in d.layers else None for d in deltas]


def keep_tokens(merged: Delta, deltas: Sequence[Delta]) -> None:
    """A merge keeps every input's tokens (both encoders' rows) and concepts."""
    for d in deltas:
        merged.tokens.update(d.tokens)
        merged.tokens_2.update(d.tokens_2)
        merged.concepts.extend(d.concepts)


def closest_inputs(c: torch.Tensor, owner: Sequence[int]) -> tuple[float, tuple[int, int] | None]:
    """The largest |cosine| between rows of different inputs, and which two inputs hold them."""
    n = torch.nn.functional.normalize(c.double(), dim=1)
    cos = (n @ n.T).abs()
    o = torch.tensor(list(owner))
    cos[o[:, None] == o[None, :]] = -1.0
    if float(cos.max()) < 0:
        return 0.0, None
    i, j = divmod(int(cos.argmax()), cos.shape[1])
    return float(cos[i, j]), (int(o[i]), int(o[j]))


def concept_prompts(delta: Delta) -> list[str]:
    """The prompts a delta's concepts are trained and used with: each concept's recorded captions
    (textual inversion records templates: filled in with the token) and the paper's target prompts."""
    prompts: list[str] = []
    for concept in delta.concepts:
        token = concept.get("token")
        for p in concept.get("prompts") or []:
            prompts.append(p.replace("{}", token) if token else p)
        noun = concept.get("class_noun")
        if not noun:
            raise CdtoolError(f"{delta.origin}: concept {token} has no class noun recorded; pass --classes")
        prompts += [prefix + subject for prefix, subject in target_prompts(token, noun, is_style(concept))]
    return list(dict.fromkeys(prompts))


def solve_least_squares(
    deltas: Sequence[Delta],
    base: Mapping[str, torch.Tensor],
    targets: MergeTargets,
    reg_gram: torch.Tensor,
    weights: Sequence[float],
    base_weight: float,
    *,
    dry_run: bool = False,
) -> MergeResult:
    """Merge relative, renamed deltas by weighted least squares over every text row (see
    least_squares.py): input i's outputs on all rows of its prompts (`targets.rows[i]`, weight
    `weights[i]`) and the base's on the regularisation captions' rows (`reg_gram`, their mean Gram
    matrix; weight `base_weight`)."""
    from cdtool.merge.least_squares import gram_factor, own_errors, prepare_lsq, solve_lsq_layer

    system = prepare_lsq([gram_factor(x) for x in targets.rows], weights, reg_gram, base_weight)
    result = MergeResult(
        delta=Delta(),
        ridge_gram=system.ridge,
        target_rows=int(targets.c.shape[0]),
        concept_rows=[int(x.shape[0]) for x in targets.rows],
    )
    result.overlap, result.closest = closest_inputs(targets.c, targets.owner)
    keep_tokens(result.delta, deltas)
    if dry_run:
        return result
    gram32, sketch = system.reg_gram.float(), SizeSketch(system.reg_gram)
    for name, inputs in layer_inputs(deltas):
        w0 = base[f"{name}.weight"]
        dw = solve_lsq_layer(system, inputs).float()
        base_size, merged_size = sizes_on(gram32, [w0, dw])
        result.layers[name] = {  # of the float32 ΔW written
            "own_error": own_errors(system, w0, dw, inputs),
            "reg_drift": merged_size / max(base_size, 1e-30),
        }
        result.sizes[name] = LayerSizes(merged_size, sketch.sizes([d for d in inputs if d is not None]))
        result.delta.layers[name] = LayerDelta(full=dw)
    return result

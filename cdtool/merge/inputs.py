"""Reading the inputs of a merge: deltas made relative to one base, checked against it, with their
tokens renamed apart, and the base's weights and text side the solvers need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cdtool.delta.file import Delta, LayerDelta
from cdtool.errors import CdtoolError

if TYPE_CHECKING:
    from cdtool.models.conditioning import TextSide


@dataclass
class MergeInputs:
    paths: list[Path]
    deltas: list[Delta]  # relative to the base, renamed, scaled
    renames: list[dict[str, str]]  # per input: {old token: new token}
    base_model: str
    base_kind: str  # sd1, sd2 or sdxl
    base: dict[str, torch.Tensor]  # the touched base weights (and the token embedding tables)
    text: TextSide | None = None  # the base's text side, when loaded (dropped once encoded)
    vocab: int | None = None  # the base tokenizer's size, with the text side


def with_classes(delta: Delta, noun: str | None) -> Delta:
    """Give a delta that records no concepts one per token (or one without a token), and set every
    concept's class noun to `noun` when given."""
    if not delta.concepts:
        delta.concepts = [{"token": t, "class_noun": None, "init_token": None, "prompts": []} for t in delta.tokens]
        if not delta.concepts:
            delta.concepts = [{"token": None, "class_noun": None, "init_token": None, "prompts": []}]
    if noun:
        for c in delta.concepts:
            c["class_noun"] = noun
    return delta


def scaled(d: Delta, s: float) -> Delta:
    """A copy of `d` with every ΔW (and bias change) times `s`; tokens unchanged."""
    if s == 1.0:
        return d
    layers = {
        n: LayerDelta(full=s * layer.dense().float(), bias=None if layer.bias is None else s * layer.bias)
        for n, layer in d.layers.items()
    }
    return replace(d, layers=layers, created_by="")


def read_merge_inputs(paths: Sequence[Path], nouns: Sequence[str]) -> list[Delta]:
    """The inputs as read, each with its concepts (and `nouns` as class nouns when given)."""
    from cdtool.delta.importers import read_delta

    deltas = [with_classes(read_delta(p), nouns[i] if nouns else None) for i, p in enumerate(paths)]
    for d in deltas:
        d.refuse_personal("merge cannot combine it: InstantBooth puts one concept in an image (sample it alone)")
    return deltas


def recorded_bases(deltas: Sequence[Delta], model: str | None) -> list[str]:
    """The base models the inputs record; several of them (and no --model) cannot be merged."""
    bases = sorted({d.base_model for d in deltas if d.base_model})
    if model is None and len(bases) > 1:
        raise CdtoolError(f"the inputs were made for different base models ({', '.join(bases)}); they cannot be merged")
    return bases


def prepare_merge_inputs(
    paths: Sequence[Path],
    deltas: Sequence[Delta],
    scales: Sequence[float],
    base_model: str,
    *,
    text_side: bool,
    warn: Callable[[str], None],
    log: Callable[[str], None],
) -> MergeInputs:
    """Rename tokens apart, load the base (and its text side when a solver needs it), make the
    inputs relative to it, check their fingerprints and scale them."""
    from cdtool.choices import SDXL
    from cdtool.delta.base import (
        TOKEN_EMBEDDING,
        TOKEN_EMBEDDING_2,
        check_fits,
        check_kind,
        load_base_params,
    )
    from cdtool.merge.deltas import assign_tokens, check_closed_form_layers, rename_tokens
    from cdtool.models.loading import base_kind

    kind = base_kind(base_model)
    for d in deltas:
        check_kind(d, kind, base_model)
    if text_side:
        check_closed_form_layers(deltas)
    renames = assign_tokens(deltas)
    for path, mapping in zip(paths, renames, strict=True):
        for old, new in mapping.items():
            warn(f"{path}: token {old} is taken by an earlier input; renamed to {new}")
    renamed = [rename_tokens(d, m) for d, m in zip(deltas, renames, strict=True)]
    names = sorted(
        {f"{n}.weight" for d in renamed for n in d.layers}
        | {f"{n}.bias" for d in renamed for n, layer in d.layers.items() if layer.bias is not None}
    )
    log(f"reading {len(names)} base weights of {base_model}")
    tables = [TOKEN_EMBEDDING, TOKEN_EMBEDDING_2] if kind == SDXL else [TOKEN_EMBEDDING]
    # as stored: every solver reads W0 in float64 (the SDXL key/value weights: 0.7 GB, not 1.4, in float16)
    base = load_base_params(base_model, [*names, *tables], as_stored=True)
    loaded = MergeInputs(list(paths), renamed, renames, base_model, kind, base)
    if text_side or any(d.tokens and d.base_fingerprint for d in renamed):
        from cdtool.models.loading import load_text_side

        loaded.text = load_text_side(base_model)
        loaded.vocab = len(loaded.text.tokenizer)
    relative = [d.relative_to(base) if d.needs_base else d for d in renamed]
    for d in relative:
        check_fits(d, base, base_model)
    check_fingerprints(relative, base, loaded.vocab, base_model)
    loaded.deltas = [scaled(d, s) for d, s in zip(relative, scales, strict=True)]
    return loaded


def check_fingerprints(
    deltas: Sequence[Delta], base: dict[str, torch.Tensor], vocab: int | None, base_model: str
) -> None:
    """Each input that records its base's fingerprint must match this base (inputs on the same
    layers share one fingerprint of it)."""
    from cdtool.delta.base import fingerprint, fingerprint_names

    prints: dict[tuple[str, ...], str] = {}
    for d in deltas:
        if not d.base_fingerprint:
            continue
        names = tuple(fingerprint_names(d))
        if names not in prints:
            prints[names] = fingerprint(base, names, vocab)
        if prints[names] != d.base_fingerprint:
            raise CdtoolError(
                f"{d.origin} was made for another base model than {base_model} (fingerprint mismatch); inputs with different bases are refused"
            )

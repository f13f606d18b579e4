"""Applying deltas to a loaded pipeline: new tokens into the tokenizer and embedding table, and
W += scale * ΔW on every listed Linear. A direct weight update, so the pipeline stays a plain
diffusers pipeline (diffusers' `load_attn_procs` silently loads nothing for these weights)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cdtool.base import fingerprint, fingerprint_names, pipeline_params
from cdtool.delta import Delta
from cdtool.errors import CdtoolError


def token_names(token: str, n_vectors: int) -> list[str]:
    """The tokenizer entries of a token with n vectors (diffusers' textual-inversion convention)."""
    return [token] + [f"{token}_{i}" for i in range(1, n_vectors)]


def is_existing_word(tokenizer: Any, token: str) -> bool:
    """True when `token` is already in the vocabulary or encodes to one existing piece."""
    if token in tokenizer.get_vocab():
        return True
    ids = tokenizer(token, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] < tokenizer.vocab_size


def check_base(
    delta: Delta, params: dict[str, torch.Tensor], vocab_size: int, ignore: bool, warn: Callable[[str], None]
) -> None:
    """Compare the delta's recorded base fingerprint with the loaded model's."""
    if not delta.base_fingerprint:
        return
    actual = fingerprint(params, fingerprint_names(delta), vocab_size)
    if actual == delta.base_fingerprint:
        return
    msg = (
        f"{delta.origin or 'the delta'} was made for the base model {delta.base_model or '?'} "
        f"(fingerprint {delta.base_fingerprint[:12]}), not for this one ({actual[:12]})"
    )
    if ignore:
        warn(f"{msg}; applying anyway (--ignore-base-mismatch)")
        return
    hint = f"pass --model {delta.base_model}" if delta.base_model else "pass the base model it was trained on"
    raise CdtoolError(f"{msg}; {hint}, or --ignore-base-mismatch to apply it anyway")


def apply_deltas(
    pipe: Any,
    deltas: Sequence[tuple[Delta, float]],
    *,
    ignore_base_mismatch: bool = False,
    warn: Callable[[str], None] = lambda _m: None,
) -> list[Delta]:
    """Apply (delta, scale) pairs to `pipe` in place; returns the deltas made relative to the base.

    All checks run before anything changes, so a failure leaves the pipeline as it was.
    """
    params = pipeline_params(pipe)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    vocab_size = len(tokenizer)
    base = {n: p.detach() for n, p in params.items()}
    relative = [d.relative_to(base) if d.needs_base else d for d, _ in deltas]
    for d in relative:
        check_base(d, params, vocab_size, ignore_base_mismatch, warn)
    new_tokens = _plan_tokens(tokenizer, encoder, relative)
    for d in relative:
        for name, layer in d.layers.items():
            module = _linear(pipe, name)
            if tuple(module.weight.shape) != layer.shape:
                raise CdtoolError(
                    f"{d.origin or 'delta'}: layer {name} has shape {layer.shape}, the model's is "
                    f"{tuple(module.weight.shape)}; is the delta for another base model?"
                )
    if new_tokens:
        tokenizer.add_tokens(list(new_tokens))
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for tok, row in new_tokens.items():
                table[tokenizer.convert_tokens_to_ids(tok)] = row.to(table.dtype)
    with torch.no_grad():
        for d, (_, scale) in zip(relative, deltas, strict=True):
            for name, layer in d.layers.items():
                module = _linear(pipe, name)
                w = module.weight
                w += (scale * layer.dense().float()).to(w.device, w.dtype)
                if layer.bias is not None:
                    module.bias += (scale * layer.bias.float()).to(w.device, w.dtype)
    return relative


def _plan_tokens(tokenizer: Any, encoder: Any, deltas: Sequence[Delta]) -> dict[str, torch.Tensor]:
    """token entry -> embedding row, refusing existing words and conflicting definitions."""
    dim = encoder.get_input_embeddings().weight.shape[1]
    planned: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for d in deltas:
        for token, emb in d.tokens.items():
            if emb.shape[-1] != dim:
                raise CdtoolError(
                    f"{d.origin or 'delta'}: token {token} has a {emb.shape[-1]}-dim embedding, the "
                    f"model's text encoder uses {dim}; is the delta for another base model?"
                )
            for entry, row in zip(token_names(token, emb.shape[0]), emb, strict=True):
                if entry in planned:
                    if not torch.equal(planned[entry], row.float()):
                        raise CdtoolError(
                            f"token {entry} is defined differently by {origin[entry]} and "
                            f"{d.origin or 'another delta'}; merge them with `cdtool merge`, which renames collisions"
                        )
                    continue
                if is_existing_word(tokenizer, entry):
                    raise CdtoolError(
                        f"{d.origin or 'delta'}: token {entry!r} already exists in the model's "
                        "vocabulary; a modifier token must be new, such as <new1>"
                    )
                planned[entry] = row.float()
                origin[entry] = d.origin or "a delta"
    return planned


def _linear(pipe: Any, name: str) -> torch.nn.Module:
    component, _, path = name.partition(".")
    root = getattr(pipe, component, None)
    if root is None:
        raise CdtoolError(f"the model has no {component} for layer {name}")
    try:
        module = root.get_submodule(path)
    except AttributeError as e:
        raise CdtoolError(f"layer {name} does not exist in this model; is the delta for another base?") from e
    if not isinstance(module, torch.nn.Linear):
        raise CdtoolError(f"layer {name} is a {type(module).__name__}, not a Linear")
    return module

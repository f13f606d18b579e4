"""Applying deltas to a loaded pipeline: new tokens into the tokenizer and embedding table, and
W += scale * ΔW on every listed Linear. A direct weight update, so the pipeline stays a plain
diffusers pipeline (diffusers' `load_attn_procs` silently loads nothing for these weights)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cdtool.delta.base import check_fits, check_kind, fingerprint, fingerprint_names, pipeline_params
from cdtool.delta.file import Delta
from cdtool.errors import CdtoolError
from cdtool.models.conditioning import TextSide
from cdtool.models.loading import pipeline_kind
from cdtool.models.tokens import add_text_tokens, plan_text_tokens


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
    model: str = "",
) -> list[Delta]:
    """Apply (delta, scale) pairs to `pipe` in place; returns the deltas made relative to the base.
    New tokens go into every tokenizer and text encoder the pipeline has (both, for SDXL). `model`
    names the base in messages.

    All checks run before anything changes, so a failure leaves the pipeline as it was.
    """
    params = pipeline_params(pipe)
    text = TextSide.of(pipe)
    vocab_size = len(text.tokenizer)
    kind = pipeline_kind(pipe)
    base = {n: p.detach() for n, p in params.items()}
    for d, _ in deltas:
        check_kind(d, kind, model, ignore_base_mismatch, warn)
    relative = [d.relative_to(base) if d.needs_base else d for d, _ in deltas]
    for d in relative:
        check_base(d, params, vocab_size, ignore_base_mismatch, warn)
    for d in relative:
        for name in d.layers:
            _linear(pipe, name)
        check_fits(d, params, model or "loaded")
    new_tokens = plan_text_tokens(text, relative)
    for d, (_, scale) in zip(relative, deltas, strict=True):
        check_stays_finite(pipe, d, scale)
    add_text_tokens(text, new_tokens)
    with torch.no_grad():
        for d, (_, scale) in zip(relative, deltas, strict=True):
            for name, layer in d.layers.items():
                module = _linear(pipe, name)
                w = module.weight
                w += (scale * layer.dense().float()).to(w.device, w.dtype)
                if layer.bias is not None:
                    module.bias += (scale * layer.bias.float()).to(w.device, w.dtype)
    return relative


def check_stays_finite(pipe: Any, delta: Delta, scale: float) -> None:
    """W + scale * ΔW stays finite in float32 for every layer (a bound, without forming the sum):
    a scale or a delta so large that the weights overflow would make images of NaN, drawn black."""
    limit = torch.finfo(torch.float32).max
    for name, layer in delta.layers.items():
        module = _linear(pipe, name)
        pairs = [(module.weight, layer.dense())]
        if layer.bias is not None and module.bias is not None:
            pairs.append((module.bias, layer.bias))
        for w, change in pairs:
            reach = abs(scale) * float(change.float().abs().max())
            if not reach + float(w.detach().abs().max()) < limit:
                raise CdtoolError(
                    f"{delta.origin or 'a delta'} at scale {scale:g}: the weights of layer {name} would overflow "
                    f"(the change reaches {reach:.3g}); use a smaller scale"
                )


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

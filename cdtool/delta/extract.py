"""Deltas from fully fine-tuned models: the difference of their cross-attention weights and the
embeddings of the tokens they added; and `get-deltas`' sources (such a model, a training run or
checkpoint, any importable delta file) made into a cdtool delta tied to its base."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdtool.delta.file import Delta, LayerDelta
from cdtool.errors import CdtoolError
from cdtool.models.layers import trainable_layer_names

# a key only a whole single-file Stable Diffusion checkpoint holds (the UNet's first convolution)
MODEL_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def extract_delta(tuned: Any, base: Any, layers: str = "kv") -> tuple[Delta, int]:
    """ΔW of the selected layers and the new tokens' embeddings; also the number of layers that
    exist in both models with the same shape."""
    delta = Delta()
    base_modules = dict(base.unet.named_modules())
    matched = 0
    for name in trainable_layer_names(tuned.unet, layers):
        path = name[len("unet.") :]
        b = base_modules.get(path)
        t = tuned.unet.get_submodule(path)
        if b is None or b.weight.shape != t.weight.shape:
            continue
        matched += 1
        dw = t.weight.detach().float() - b.weight.detach().float()
        db = None
        if t.bias is not None and b.bias is not None and not torch.equal(t.bias, b.bias):
            db = t.bias.detach().float() - b.bias.detach().float()
        if torch.count_nonzero(dw) or db is not None:
            delta.layers[name] = LayerDelta(full=dw, bias=db)
    from cdtool.models.loading import pipeline_kind

    delta.base_kind = pipeline_kind(base)
    base_vocab = base.tokenizer.get_vocab()
    tables = [(tuned.tokenizer, tuned.text_encoder, delta.tokens)]
    if getattr(tuned, "text_encoder_2", None) is not None:  # SDXL: the rows of the second encoder too
        tables.append((tuned.tokenizer_2, tuned.text_encoder_2, delta.tokens_2))
    for tokenizer, encoder, rows in tables:
        table = encoder.get_input_embeddings().weight.detach().float()
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if token not in base_vocab:
                rows[token] = table[idx : idx + 1].clone()
    return delta, matched


def is_full_model(source: Path) -> bool:
    """A diffusers folder, or a checkpoint file holding a whole model rather than a delta."""
    if source.is_dir():
        return (source / "model_index.json").exists()
    if source.suffix != ".safetensors":
        return False  # pickled CompVis checkpoints import as deltas (their attn2 layers)
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as f:
            return MODEL_KEY in set(f.keys())
    except Exception:
        return False


@dataclass
class SourceDelta:
    """What `get-deltas` made of its source."""

    delta: Delta  # relative to its base, with its base recorded, its provenance and its concepts
    base: dict[str, torch.Tensor] | None  # the base weights read (None where none was needed)
    matched: int  # the layers found in both the source and the base
    source_format: str


def delta_from_source(
    source: Path,
    choose_base: Callable[[list[str]], str],
    layer_set: str,
    *,
    read_base: bool,
    log: Callable[[str], None],
    warn: Callable[[str], None] | None = None,
) -> SourceDelta:
    """A fine-tuned model's difference from its base (`layer_set` layers and new tokens), or the
    delta of a training run, a checkpoint or any importable file. `choose_base` picks the base from
    the bases the source records; the base is read where the source holds fine-tuned weights, has
    no fingerprint, or `read_base` asks for it (a .bin output). A whole model cdtool trained (train
    --method dreambooth) gives the base it records, and its delta the model's concepts and provenance
    (`warn`, default `log`: what the delta leaves out). The delta then records the base it was taken against, a
    `get_deltas` provenance entry, and a concept per token where it records none."""
    from cdtool.delta.provenance import get_deltas_entry, stamp

    if is_full_model(source):
        from cdtool.models.finetuned import read_model_record

        record = read_model_record(source) if source.is_dir() else None  # a whole model cdtool trained
        base_model = choose_base([record.base_model] if record is not None else [])
        converted = _from_model(source, base_model, layer_set, record, log, warn or log)
    else:
        converted = _from_file(source, choose_base, read_base)
    delta = converted.delta
    stamp(delta, "get_deltas", get_deltas_entry(source, converted.source_format), command="get-deltas")
    if not delta.concepts:
        delta.concepts = [{"token": t, "class_noun": None, "init_token": None, "prompts": []} for t in delta.tokens]
    return converted


def _from_model(
    source: Path,
    base_model: str,
    layer_set: str,
    record: Delta | None,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> SourceDelta:
    from cdtool.delta.base import check_kind, pipeline_params, record_base
    from cdtool.models.loading import load_pipeline, pipeline_kind

    log(f"loading {source} and its base {base_model}")
    tuned, base_pipe = load_pipeline(str(source)), load_pipeline(base_model)
    check_kind(Delta(base_kind=pipeline_kind(tuned), origin=str(source)), pipeline_kind(base_pipe), base_model)
    delta, matched = extract_delta(tuned, base_pipe, layer_set)
    if record is not None:
        from cdtool.models.finetuned import adopt_record

        adopt_record(delta, record, base_pipe, base_model, warn)
    if matched == 0:
        raise CdtoolError(f"no {layer_set} layers of {source} match the base {base_model}; is it the right base?")
    log(f"{matched} layers matched, {len(delta.layers)} changed, {len(delta.tokens)} new tokens")
    if not delta.layers and not delta.tokens:
        raise CdtoolError(f"{source} does not differ from {base_model} in any {layer_set} layer or token")
    params = pipeline_params(base_pipe)
    record_base(delta, base_model, params, len(base_pipe.tokenizer))
    return SourceDelta(delta, params, matched, "fine-tuned-model")


def _from_file(source: Path, choose_base: Callable[[list[str]], str], read_base: bool) -> SourceDelta:
    from cdtool.delta.base import resolve_on_base
    from cdtool.delta.importers import read_delta
    from cdtool.train.runs import delta_from_run, is_run_folder

    if is_run_folder(source):
        from cdtool.delta.file import check_numbers

        delta = delta_from_run(source)
        check_numbers(delta, str(source))
    else:
        delta = read_delta(source)
    source_format = delta.source_format
    base_model = choose_base([delta.base_model])
    params = None
    if delta.needs_base or read_base or not delta.base_fingerprint:
        delta, params = resolve_on_base(delta, base_model, record=True)
    if not delta.layers and not delta.tokens:
        raise CdtoolError(f"{source}: no layers and no tokens found")
    return SourceDelta(delta, params, len(delta.layers), source_format)

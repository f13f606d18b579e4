"""Deltas from fully fine-tuned models: the difference of their cross-attention weights and the
embeddings of the tokens they added."""

from __future__ import annotations

from typing import Any

import torch

from cdtool.delta.file import Delta, LayerDelta
from cdtool.models.layers import trainable_layer_names


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

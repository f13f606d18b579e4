"""Text-encoder features as rows: the inputs of the cross-attention key/value projections."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cdtool.atomic import atomic_path
from cdtool.paths import cache_dir


@torch.no_grad()
def feature_rows(
    tokenizer: Any, encoder: Any, prompts: Sequence[str], starts: Sequence[int] | None = None, batch: int = 64
) -> list[torch.Tensor]:
    """Per prompt, the final hidden states (after the final layer norm) from position `start`
    (default 1: after start-of-text) up to and including the first end-of-text; no padding.

    Prompts are batched with end-of-text padding: CLIP's text attention is causal, so padding
    after the first end-of-text cannot change the rows kept."""
    out: list[torch.Tensor] = []
    eos = tokenizer.eos_token_id
    device = next(encoder.parameters()).device
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        enc = tokenizer(
            chunk, padding="longest", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        )
        hidden = encoder(enc.input_ids.to(device))[0].float().cpu()
        for j, ids in enumerate(enc.input_ids):
            end = int((ids == eos).nonzero()[0])
            start = 1 if starts is None else starts[i + j]
            out.append(hidden[j, start : end + 1])
    return out


@torch.no_grad()
def padded_rows(tokenizer: Any, encoder: Any, prompts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Every row the UNet's cross-attention reads for the prompts, as the pipeline encodes them:
    padded to the tokenizer's length with its own padding token, start-of-text and padding included.
    [len(prompts) * length, dim]."""
    device = next(encoder.parameters()).device
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    out = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(
            list(prompts[i : i + batch]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = enc.attention_mask.to(device) if use_mask else None
        hidden = encoder(enc.input_ids.to(device), attention_mask=mask)[0].float().cpu()
        out.append(hidden.reshape(-1, hidden.shape[-1]))
    return torch.cat(out)


def gram(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A = Σ r rᵀ over all rows (float64) and the number of rows."""
    stacked = torch.cat(list(rows)).double()
    return stacked.T @ stacked, int(stacked.shape[0])


def encoder_fingerprint(encoder: Any) -> str:
    """The base fingerprint over all of the text encoder's weights, for cache keys."""
    from cdtool.base import fingerprint

    state = encoder.state_dict()
    return fingerprint(state, state.keys())


def cached_reg_gram(
    tokenizer: Any, encoder: Any, captions: Sequence[str], *, padded: bool = False
) -> tuple[torch.Tensor, int, bool]:
    """A = C_regᵀ C_reg (a sum, float64) for the regularisation captions, cached on disk per (text
    encoder, captions, rows): the rows up to end-of-text (the closed form's) or, with `padded`, every
    row as the pipeline encodes it (the least-squares merge's). Returns (A, rows, was_cached)."""
    from safetensors.torch import load_file, save_file

    key_caps = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    key_enc = encoder_fingerprint(encoder)[:16]
    name = f"{key_enc}-{key_caps}{'-padded' if padded else ''}.safetensors"
    path: Path = cache_dir() / "reg-gram" / name
    if path.exists():
        try:
            data = load_file(str(path))
            return data["gram"], int(data["rows"]), True
        except Exception:
            path.unlink(missing_ok=True)
    if padded:  # summed per chunk: all rows of 1200 captions would take 0.5 GB in float64
        chunks = [gram([padded_rows(tokenizer, encoder, captions[i : i + 256])]) for i in range(0, len(captions), 256)]
        a, n = sum(g for g, _ in chunks), sum(k for _, k in chunks)
    else:
        a, n = gram(feature_rows(tokenizer, encoder, captions))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"gram": a, "rows": torch.tensor(n)}, str(tmp))
    return a, n, False

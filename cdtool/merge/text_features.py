"""Text-encoder features as rows (the inputs of the cross-attention key/value projections, computed
in cdtool/models/conditioning.py), their Gram matrices, and the cache of the regularisation captions'."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cdtool.atomic import atomic_path
from cdtool.models.conditioning import TextSide, padded_rows, text_rows
from cdtool.paths import cache_dir


def feature_rows(
    tokenizer: Any, encoder: Any, prompts: Sequence[str], starts: Sequence[int] | None = None, batch: int = 64
) -> list[torch.Tensor]:
    """The closed form's rows (cdtool.models.conditioning.text_rows) of a base with one text encoder."""
    return text_rows(TextSide([tokenizer], [encoder]), prompts, starts, batch)


def gram(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A = Σ r rᵀ over all rows (float64) and the number of rows."""
    stacked = torch.cat(list(rows)).double()
    return stacked.T @ stacked, int(stacked.shape[0])


def encoder_fingerprint(text: TextSide) -> str:
    """The base fingerprint over all weights of the text encoder (of both, for SDXL), for cache keys."""
    from cdtool.delta.base import fingerprint

    if not text.xl:
        state = text.encoder.state_dict()
        return fingerprint(state, state.keys())
    state = {f"text_encoder.{k}": v for k, v in text.encoders[0].state_dict().items()}
    state |= {f"text_encoder_2.{k}": v for k, v in text.encoders[1].state_dict().items()}
    return fingerprint(state, state.keys())


def cached_reg_gram(text: TextSide, captions: Sequence[str], *, padded: bool = False) -> tuple[torch.Tensor, int, bool]:
    """A = C_regᵀ C_reg (a sum, float64) for the regularisation captions, cached on disk per (text
    encoders, captions, rows): the rows up to end-of-text (the closed form's) or, with `padded`, every
    row as the pipeline encodes it (the least-squares merge's). Returns (A, rows, was_cached)."""
    from safetensors.torch import load_file, save_file

    key_caps = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    key_enc = encoder_fingerprint(text)[:16]
    name = f"{key_enc}-{key_caps}{'-padded' if padded else ''}.safetensors"
    path: Path = cache_dir() / "reg-gram" / name
    if path.exists():
        try:
            data = load_file(str(path))
            return data["gram"], int(data["rows"]), True
        except Exception:
            path.unlink(missing_ok=True)
    if padded:  # summed per chunk: all rows of 1200 captions would take 0.5 GB in float64
        chunks = [gram([padded_rows(text, captions[i : i + 256])]) for i in range(0, len(captions), 256)]
        a, n = sum(g for g, _ in chunks), sum(k for _, k in chunks)
    else:
        a, n = gram(text_rows(text, captions))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"gram": a, "rows": torch.tensor(n)}, str(tmp))
    return a, n, False

"""Which text rows the UNet's cross-attention reads: the share of attention on each part of a caption.

    python research/attention_rows.py MODEL [--delta DELTA] [--n 32] [--steps 10] [--no-background]

Samples N toy captions (with `--delta`, the concept's own prompts "a small <token> <noun> on a ...
background", the delta applied) without guidance and records every cross-attention layer's attention
probabilities at every sampling step, averaged over pixels, heads, layers and steps: the share of
attention on start-of-text, each word of the caption by its role (the new token, the class noun,
colour and pattern words, the background phrase, other words), end-of-text and the padding after
it. Stable Diffusion's cross-attention puts most of its mass on start-of-text, and Custom
Diffusion's concept is read from the token's row and the rows after it; a toy that reads its
captions from elsewhere (the padding, a sentence summary at end-of-text) makes a fine-tune change
something else than it does on Stable Diffusion.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def attention_probs(
    attn: Any, hidden_states: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The cross-attention layer `attn`'s probabilities [batch x heads, pixels, rows] of its pixels'
    queries over `keys` [batch, rows, inner] (its own keys, or others to compare with)."""
    q = attn.head_to_batch_dim(attn.to_q(hidden_states))
    k = attn.head_to_batch_dim(keys)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, k.shape[1], hidden_states.shape[0])
    return attn.get_attention_scores(q, k, mask)


def sample_with(pipe: Any, prompts: list[str], steps: int, wrap: Callable[[str, Any], Any]) -> None:
    """Sample `prompts` (latents only, no guidance, seed 0) with each attention processor replaced by
    `wrap(name, processor)`; the pipeline's own processors are back afterwards."""
    originals = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({n: wrap(n, p) for n, p in originals.items()})
    try:
        pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        pipe.unet.set_attn_processor(originals)


class Recorder:
    """An attention processor that records the mean attention each key row receives (over pixels
    and heads) and then computes the layer as the processor it wraps."""

    def __init__(self, inner: Any, sink: list[torch.Tensor]) -> None:
        self.inner, self.sink = inner, sink

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:  # fmt: skip
        if encoder_hidden_states is not None:
            probs = attention_probs(attn, hidden_states, attn.to_k(encoder_hidden_states), attention_mask)
            b = hidden_states.shape[0]
            self.sink.append(probs.mean(1).reshape(b, attn.heads, -1).mean(1))  # [batch, rows]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)


def words_of(pieces: list[str]) -> list[list[int]]:
    """The indices of a tokenized caption's word pieces grouped into words (a CLIP piece that ends a
    word ends with "</w>"; a new token is a word by itself)."""
    words: list[list[int]] = [[]]
    for i, piece in enumerate(pieces):
        words[-1].append(i)
        if piece.endswith("</w>") or piece.startswith("<"):
            words.append([])
    return [w for w in words if w]


def roles(pieces: list[str], token: str | None, noun_words: set[str], colour_words: set[str]) -> list[str]:
    """Each word piece's role in a toy caption (start- and end-of-text excluded), read word by word:
    the new token, the class noun, colour and pattern words ("and" between two tones included), the
    background phrase (from "on" to the end), other words."""
    words = words_of(pieces)
    text = ["".join(pieces[i] for i in w).removesuffix("</w>") for w in words]
    out: list[str] = []
    in_background = False
    for k, (word, indices) in enumerate(zip(text, words, strict=True)):
        in_background = in_background or word == "on"
        between_tones = word == "and" and 0 < k < len(text) - 1 and {text[k - 1], text[k + 1]} <= colour_words
        if token and word == token:
            role = "token"
        elif in_background:
            role = "background phrase"
        elif word in noun_words:
            role = "class noun"
        elif word in colour_words or between_tones:
            role = "colour or look"
        else:
            role = "other word"
        out += [role] * len(indices)
    return out


@torch.no_grad()
def attention_shares(pipe: Any, prompts: list[str], steps: int, token: str | None) -> dict[str, Any]:
    """Mean share of cross-attention on each part of the prompts (see the module docstring)."""
    from cdtool.toy.world import COLOURS, KIND_WORDS, LOOKS, SHAPES, SUITE

    tok = pipe.tokenizer
    sink: list[torch.Tensor] = []
    sample_with(pipe, prompts, steps, lambda name, proc: Recorder(proc, sink) if "attn2" in name else proc)
    mass = torch.stack(sink).mean(0)  # [prompts, rows], each row of a prompt's mass summing to 1
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    colour_words = {*COLOURS, *KIND_WORDS.values(), *LOOKS, *(t for c in SUITE for t in c.tones)}
    shares: dict[str, list[float]] = defaultdict(list)
    per_row: dict[str, list[float]] = defaultdict(list)
    for p, row_ids in enumerate(ids):
        eos = int((row_ids == tok.eos_token_id).int().argmax())
        words = tok.convert_ids_to_tokens(row_ids[1:eos].tolist())
        parts: dict[str, list[int]] = defaultdict(list)
        parts["start-of-text"].append(0)
        for i, role in enumerate(roles(words, token, set(SHAPES), colour_words), 1):
            parts[role].append(i)
        parts["end-of-text"].append(eos)
        parts["padding"] = list(range(eos + 1, ids.shape[1]))
        for role, rows in parts.items():
            shares[role].append(float(mass[p, rows].sum()))
            per_row[role].append(float(mass[p, rows].mean()) if rows else 0.0)
    return {
        "share": {k: round(sum(v) / len(prompts), 4) for k, v in shares.items()},
        "per_row": {k: round(sum(v) / len(v), 5) for k, v in per_row.items()},
    }


def main() -> None:
    from cdtool.delta.importers import read_delta
    from cdtool.models.apply import apply_deltas
    from cdtool.models.loading import load_pipeline
    from cdtool.toy.photos import toy_captions
    from cdtool.toy.world import COLOURS, with_article

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--delta", type=Path)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-background", action="store_true", help="the captions without their background phrase")
    args = ap.parse_args()
    pipe = load_pipeline(args.model)
    token = None
    prompts = toy_captions(random.Random(args.seed), None, args.n)
    if args.delta:
        delta = apply_deltas(pipe, [(read_delta(args.delta), 1.0)], model=args.model)[0]
        concept = delta.concepts[0]
        token = concept["token"]
        prompts = [
            f"a small {token} {concept['class_noun']} on {with_article(list(COLOURS)[i % len(COLOURS)])} background"
            for i in range(args.n)
        ]
    if args.no_background:
        prompts = [p.split(" on ")[0] for p in prompts]
    out = attention_shares(pipe, prompts, args.steps, token)
    print(
        json.dumps({"model": args.model, "delta": str(args.delta) if args.delta else None, "n": args.n} | out, indent=1)
    )


if __name__ == "__main__":
    main()

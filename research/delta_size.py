"""How much a toy delta changes what the UNet's cross-attention reads from ordinary captions.

    python research/delta_size.py DELTA [DELTA ...] --model MODEL [--n 64]

For each delta, over N ordinary toy captions (no modifier token) and each key/value layer it changes:
the size of the change of the layer's output, ||ΔW c|| / ||W c||, per text row c, split into the
rows up to end-of-text and the padding rows after it, and the same on the concept's own prompts
("a small <token> <noun> on a ... background": the token's row); and the cosine of the token's row in
its training captions (those the delta records) to its row in those sampling prompts. Beside them,
`ordinary_attention_output`: the relative change of the cross-attention layers' outputs while 16 of
the ordinary captions are sampled (6 steps, no guidance), the change once attention has weighed the
rows. Stable Diffusion's Custom Diffusion fine-tunes change ordinary captions' keys and values by
little while the token's row carries the concept; a toy whose fine-tunes change every caption's by
tens of percent cannot show what a merge of such deltas keeps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@torch.no_grad()
def relative_change(pipe, delta, captions: list[str], token_rows: bool = False) -> dict[str, float]:
    """Mean ||ΔW c|| / ||W c|| over the delta's layers and the captions' rows (up to end-of-text,
    padding; with `token_rows`, the rows holding a new token)."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    hidden = enc(ids)[0]
    eos = (ids == tok.eos_token_id).int().argmax(1)
    pos = torch.arange(ids.shape[1])[None]
    masks = {"caption": (pos <= eos[:, None]) & (pos > 0), "padding": pos > eos[:, None]}
    if token_rows:
        masks = {"token": ids >= len(tok) - len(delta.tokens)}
    params = dict(pipe.unet.named_parameters())
    sums = {k: [] for k in masks}
    for name, layer in delta.layers.items():
        w = params[name.removeprefix("unet.") + ".weight"].float()
        base = hidden @ w.T
        change = hidden @ layer.dense().float().T
        ratio = change.norm(dim=-1) / base.norm(dim=-1).clamp(min=1e-8)
        for k, m in masks.items():
            sums[k].append(float(ratio[m].mean()))
    # a delta without layers (textual inversion) changes no key or value: 0 by definition
    return {k: sum(v) / len(v) if v else 0.0 for k, v in sums.items()}


@torch.no_grad()
def token_row_cosine(pipe, token: str, trained: list[str], sampled: list[str]) -> dict[str, float]:
    """Mean, min and max cosine of the token's output row in each training caption to its row in each
    sampling prompt (every pair)."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    token_id = tok.convert_tokens_to_ids(token)

    def rows(prompts: list[str]) -> torch.Tensor:
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        at = (ids == token_id).int().argmax(1)
        return torch.nn.functional.normalize(enc(ids)[0][torch.arange(len(prompts)), at], dim=-1)

    cos = rows(trained) @ rows(sampled).T
    return {"mean": float(cos.mean()), "min": float(cos.min()), "max": float(cos.max())}


class BaseBeside:
    """An attention processor that computes its cross-attention layer as the wrapped processor does
    (the delta's keys and values) and beside it with the base's key/value weights, recording the
    relative change of the layer's output, ||out - out_base|| / ||out_base||."""

    def __init__(self, inner: Any, w_k: torch.Tensor, w_v: torch.Tensor, sink: list[float]) -> None:
        self.inner, self.w_k, self.w_v, self.sink = inner, w_k, w_v, sink

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:  # fmt: skip
        from research.attention_rows import attention_probs

        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        if encoder_hidden_states is not None:
            probs = attention_probs(attn, hidden_states, encoder_hidden_states @ self.w_k.T)
            v = attn.head_to_batch_dim(encoder_hidden_states @ self.w_v.T)
            base = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))
            self.sink.append(float((out - base).norm() / base.norm().clamp(min=1e-8)))
        return out


@torch.no_grad()
def output_change(pipe: Any, delta: Any, captions: list[str], steps: int = 6) -> float:
    """Mean relative change of the cross-attention layers' outputs (over the layers the delta changes
    and the sampling steps) while sampling `captions` with the delta applied: what a change of keys and
    values does once attention has weighed the rows (a row few pixels attend to changes little)."""
    from research.attention_rows import sample_with

    params = dict(pipe.unet.named_parameters())
    changed = {n.removeprefix("unet.").rsplit(".", 1)[0] for n in delta.layers}  # ...attn2
    bases = {m: tuple(params[f"{m}.{p}.weight"].detach().clone() for p in ("to_k", "to_v")) for m in changed}
    sink: list[float] = []

    def wrap(name: str, proc: Any) -> Any:
        module = name.removesuffix(".processor")
        return BaseBeside(proc, *bases[module], sink) if module in bases else proc

    added = [(params[n.removeprefix("unet.") + ".weight"], layer.dense()) for n, layer in delta.layers.items()]
    try:
        for weight, d in added:
            weight.add_(d.to(weight.dtype))
        sample_with(pipe, captions, steps, wrap)
    finally:
        for weight, d in added:
            weight.sub_(d.to(weight.dtype))
    return sum(sink) / len(sink) if sink else 0.0


def main() -> None:
    from cdtool.delta.importers import read_delta
    from cdtool.models.apply import apply_deltas
    from cdtool.models.loading import load_pipeline
    from cdtool.toy.photos import toy_captions
    from cdtool.toy.world import COLOURS, with_article

    ap = argparse.ArgumentParser()
    ap.add_argument("deltas", nargs="+", type=Path)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    captions = toy_captions(random.Random(args.seed), None, args.n)
    out = {}
    for path in args.deltas:
        pipe = load_pipeline(args.model)
        delta = apply_deltas(pipe, [(read_delta(path), 0.0)], model=args.model)[0]  # adds the tokens, changes nothing
        concept = delta.concepts[0] if delta.concepts else {}
        own = [
            f"a small {concept.get('token')} {concept.get('class_noun')} on {with_article(bg)} background"
            for bg in COLOURS
        ]
        out[str(path)] = {"ordinary": relative_change(pipe, delta, captions)}
        out[str(path)]["ordinary_attention_output"] = output_change(pipe, delta, captions[:16])
        if concept.get("token"):
            trained = [p.replace("{token}", concept["token"]) for p in concept.get("prompts", [])]
            out[str(path)]["concept_prompts"] = relative_change(pipe, delta, own, token_rows=True)
            if trained:
                out[str(path)]["token_row_training_vs_sampling"] = token_row_cosine(
                    pipe, concept["token"], trained, own
                )
    print(json.dumps({"model": args.model, "n": args.n, "deltas": out}, indent=1))


if __name__ == "__main__":
    main()

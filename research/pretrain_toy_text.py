"""Pretrains the toy model's text encoder alone, as CLIP was trained: contrastively against images.

    python research/pretrain_toy_text.py [--width 96] [--steps 1500] --out toy-text

Stable Diffusion's UNet was trained on a frozen CLIP text encoder that had learned from images
before; the toy model's UNet is trained the same way (`pretrain_toy.py --text-encoder toy-text`).
A text encoder trained together with the UNet (the shipped toy model's) learns to pack the prompt into
the padding rows after end-of-text, each of them differently, and its UNet reads it there: rows the
paper's closed-form merge does not constrain (measured in benchmarks/RESULTS.md). In Stable
Diffusion the padding is the end-of-text token again, which CLIP trained as the caption's summary
at whatever position a caption ended, so its padding rows are summaries much like the end-of-text
row the merge does constrain. Here the contrastive loss is taken at the end-of-text row and at one
random padding row of each caption, so every position past the caption learns to be that summary.

Image side: a small CNN (initialised from the oracle's convolutional trunk, then trained) and a
linear projection; text side: a CLIPTextModel with the real CLIP vocabulary and a linear projection
of the pooled row. Scenes and captions are those of the UNet's pretraining (`pretrain_toy.batch`),
varied views and wordings included. Only the CLIPTextModel is saved (float32 diffusers-style
subfolder `text_encoder/`); the rows of tokens the toy captions never use keep their initial values
(no weight decay on the embedding table), so they stay as untrained as the vocabulary's rare tokens
are in CLIP.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))  # pretrain_toy builds the scenes

from pretrain_toy import TEXT, batch


def pooled_rows(hidden: torch.Tensor, ids: torch.Tensor, eos_id: int, gen: torch.Generator) -> tuple:
    """(end-of-text rows, one random later row per caption) of `hidden` [n, L, d]."""
    n, length, _ = hidden.shape
    eos = (ids == eos_id).int().argmax(dim=1)
    later = eos + (torch.rand(n, generator=gen) * (length - eos).float()).long()  # in [eos, length - 1]
    rows = torch.arange(n)
    return hidden[rows, eos], hidden[rows, later]


def main() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdtool.models.clip_vocab import load_clip_tokenizer
    from cdtool.toy.oracle import load_oracle
    from cdtool.toy.world import Sampler

    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=96, help="the text features' width (the UNet's cross_attention_dim)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sampler = Sampler(random.Random(args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    tokenizer = load_clip_tokenizer()

    config = dict(TEXT, hidden_size=args.width, intermediate_size=4 * args.width, projection_dim=args.width)
    config["num_hidden_layers"] = args.layers
    text = CLIPTextModel(CLIPTextConfig(**config)).train()
    oracle = load_oracle()
    image = copy.deepcopy(oracle.features).train().requires_grad_(True)
    image_proj = torch.nn.Linear(oracle.hidden[0].in_features, args.width)
    text_proj = torch.nn.Linear(args.width, args.width, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(2.659))  # CLIP's initial temperature, log(1/0.07)
    table = text.get_input_embeddings().weight
    others = [p for p in text.parameters() if p is not table]
    heads = [*image.parameters(), *image_proj.parameters(), *text_proj.parameters(), log_scale]
    opt = torch.optim.AdamW(
        [
            {"params": [table], "weight_decay": 0.0},
            {"params": others + heads, "weight_decay": 1e-2},
        ],
        lr=args.lr,
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    t0 = time.perf_counter()
    running = None
    for step in range(1, args.steps + 1):
        x, captions = batch(sampler, args.batch, views=True)
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = text(ids)[0]
        img = F.normalize(image_proj(image((x + 1) / 2)), dim=-1)
        scale = log_scale.clamp(max=4.6052).exp()
        labels = torch.arange(len(captions))
        loss = 0.0
        for rows in pooled_rows(hidden, ids, tokenizer.eos_token_id, gen):
            txt = F.normalize(text_proj(rows), dim=-1)
            logits = scale * txt @ img.T
            loss = loss + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 4
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([table, *others, *heads], 1.0)
        opt.step()
        warmup.step()
        now = torch.tensor([float(loss.detach()), float((logits.argmax(dim=1) == labels).float().mean())])
        running = now if running is None else 0.95 * running + 0.05 * now
        if step % 50 == 0:
            print(
                f"text {step}: loss {running[0]:.3f} caption->image top-1 {running[1]:.2f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    text.eval().save_pretrained(args.out / "text_encoder", safe_serialization=True)
    print(f"done: {args.steps} steps in {time.perf_counter() - t0:.0f}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()

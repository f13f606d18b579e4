"""Which text rows the closed-form merge must hold for a toy concept to survive it.

    python benchmarks/quality.py --out bench-quality          # the deltas and merge captions
    python research/merge_targets.py bench-quality [--variants paper:1,paper:2,...] [--n 16] [--model toy]

Merges the benchmark's single-concept deltas (new1-star, new2-circle) with cdtool's closed-form
solver (cdtool.merge.deltas.solve_merge) under different target rows, samples and scores each result as
the benchmark does, and prints one table row per variant. A variant is TARGETS:WHO[:K], WHO being
1 (`<new1>` alone), 2 (`<new2>` alone) or both:

- paper: the paper's target rows ("<newK> noun", "photo of a <newK> noun", subject to end-of-text);
- prompts:WHO:K: the token rows (up to end-of-text) of the first K of the benchmark's 8 concept
  prompts, the very prompts then sampled;
- padded:WHO:K: all 76 rows of the 8 concept prompts, padding after end-of-text included, reduced to
  their top K principal directions (scaled by their singular values);
- captions-padded:WHO:K: the same for the captions each delta was trained on (recorded in it).

Only `paper` is cdtool's merge; the others are measurements (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DELTAS = ("new1-star", "new2-circle")
DEFAULT = "paper:1,paper:2,prompts:1:5,prompts:2:5,padded:2:24,captions-padded:both:16,captions-padded:both:24"


def principal_rows(tokenizer: Any, encoder: Any, prompts: list[str], k: int) -> torch.Tensor:
    """Top k principal directions of the prompts' 76 rows after start-of-text, padding included."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        h = encoder(ids)[0].float()[:, 1:]
    _, s, vh = torch.linalg.svd(h.reshape(-1, h.shape[-1]), full_matrices=False)
    return (vh[:k] * (s[:k, None] / s[0])).double()


def main() -> None:
    from benchmarks.quality import Bench, Settings
    from cdtool.delta.file import write_cdtool
    from cdtool.delta.importers import read_delta
    from cdtool.merge.deltas import add_delta_tokens, paper_target_rows, solve_merge
    from cdtool.merge.text_features import feature_rows, gram
    from cdtool.models.conditioning import TextSide
    from cdtool.models.loading import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path, help="a quality benchmark's output folder")
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--n", type=int, default=16, help="samples per prompt group")
    ap.add_argument("--model", default="toy", help="the base the benchmark was run on (quality.py --model)")
    args = ap.parse_args()
    out = args.bench / "merge-targets"
    captions = [x for x in (args.bench / "merge-captions.txt").read_text().splitlines() if x.strip()]
    bench = Bench(out, Settings(n=args.n, sample_steps=12, model=args.model), quiet=True)
    print(
        "| targets | rows | `<new1>` split star | `<new2>` checker | mean regularisation drift | plain prompts obeyed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for variant in args.variants.split(","):
        kind, who, *k = variant.split(":")
        picked = [0, 1] if who == "both" else [int(who) - 1]
        pipe = load_pipeline(args.model)
        text = TextSide.of(pipe)
        tok, enc = text.tokenizer, text.encoder
        base = {f"unet.{n}": p.detach().float() for n, p in pipe.unet.named_parameters()}
        reg_gram, _ = gram(feature_rows(tok, enc, captions))
        deltas = [read_delta(args.bench / f"{DELTAS[i]}.safetensors") for i in picked]
        add_delta_tokens(text, deltas)
        if kind == "paper":
            c, owner = paper_target_rows(deltas, text)
        else:
            parts, owner = [], []
            for j, d in enumerate(deltas):
                concept = bench.groups[f"concept {d.concepts[0]['token']}"]
                if kind == "prompts":
                    rows = torch.cat(feature_rows(tok, enc, concept[: int(k[0])])).double()
                elif kind == "padded":
                    rows = principal_rows(tok, enc, concept, int(k[0]))
                elif kind == "captions-padded":
                    rows = principal_rows(tok, enc, list(d.concepts[0]["prompts"]), int(k[0]))
                else:
                    raise SystemExit(f"unknown targets {kind!r} in {variant!r}")
                parts.append(rows)
                owner += [j] * rows.shape[0]
            c = torch.cat(parts)
        merged = solve_merge(deltas, base, reg_gram, c, owner)
        merged.delta.base_model = args.model  # the fingerprint stays unset: sampling then trusts the name
        path = out / f"{variant.replace(':', '-')}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_cdtool(merged.delta, path)
        groups = [f"concept {d.concepts[0]['token']}" for d in deltas]
        groups += [f"prior {d.concepts[0]['class_noun']}" for d in deltas]
        r = bench.evaluate(variant.replace(":", "-"), [path], groups)
        fid = {d.concepts[0]["token"]: r[f"concept {d.concepts[0]['token']}"]["concept_fidelity"] for d in deltas}
        obeyed = " / ".join(f"{r[g]['prompt_fidelity']:.2f}" for g in groups if g.startswith("prior"))
        drift = sum(x["reg_drift"] for x in merged.layers.values()) / len(merged.layers)
        cells = [f"{fid[t]:.2f}" if t in fid else "" for t in ("<new1>", "<new2>")]
        print(f"| {variant} | {c.shape[0]} | {cells[0]} | {cells[1]} | {drift:.2f} | {obeyed} |", flush=True)


if __name__ == "__main__":
    main()

"""Which text rows the closed-form merge must hold for a toy concept to survive it.

    python benchmarks/quality.py --out bench-quality          # the deltas and merge captions
    python research/merge_targets.py bench-quality --variants paper:each,captions:each --n 32
    python benchmarks/quality.py --v1 --out bench-v1
    python research/merge_targets.py bench-v1 --v1 [--variants paper:1,paper:2,...] [--n 16]

Merges the benchmark's single-concept deltas (the suite's eight; with --v1 the v1 world's two,
new1-star and new2-circle, of a `quality.py --v1` run on the v1 toy model and its oracle in
tools/checkpoints/toy1) with cdtool's closed-form solver (cdtool.merge.deltas.solve_merge) under different target rows, samples
and scores each result as the benchmark does, and prints one table row per variant. A variant is
TARGETS:WHO[:K], WHO being 1 (`<new1>` alone), 2 (`<new2>` alone), ..., both (the first two
together) or each (every concept alone in turn, one merge each):

- paper: the paper's target rows ("<newK> noun", "photo of a <newK> noun", subject to end-of-text);
- prompts:WHO:K: the token rows (up to end-of-text) of the first K of the benchmark's 8 concept
  prompts, the very prompts then sampled;
- padded:WHO:K: all 76 rows of the 8 concept prompts, padding after end-of-text included, reduced to
  their top K principal directions (scaled by their singular values);
- captions-padded:WHO:K: the same for the captions each delta was trained on (recorded in it);
- captions:WHO: every row up to end-of-text, after start-of-text, of the captions each delta was
  trained on and the paper's two prompts (the prompts least squares fits, without their padding).

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


def target_rows(kind: str, k: list[str], deltas: list, text: Any, bench: Any) -> tuple[torch.Tensor, list[int]]:
    """The closed form's constraint rows of variant kind TARGETS (see the module docstring) and the
    delta each row belongs to."""
    from cdtool.merge.deltas import concept_prompts, paper_target_rows
    from cdtool.merge.text_features import feature_rows
    from cdtool.models.conditioning import text_rows

    tok, enc = text.tokenizer, text.encoder
    if kind == "paper":
        return paper_target_rows(deltas, text)
    parts, owner = [], []
    for j, d in enumerate(deltas):
        concept = bench.groups[f"concept {d.concepts[0]['token']}"]
        if kind == "prompts":
            rows = torch.cat(feature_rows(tok, enc, concept[: int(k[0])])).double()
        elif kind == "padded":
            rows = principal_rows(tok, enc, concept, int(k[0]))
        elif kind == "captions-padded":
            rows = principal_rows(tok, enc, list(d.concepts[0]["prompts"]), int(k[0]))
        elif kind == "captions":
            prompts = concept_prompts(d)
            rows = torch.cat(text_rows(text, prompts, [1] * len(prompts))).double()
        else:
            raise SystemExit(f"unknown targets {kind!r}")
        parts.append(rows)
        owner += [j] * rows.shape[0]
    return torch.cat(parts), owner


def main() -> None:
    from benchmarks.quality import V1_MODEL, V1_ORACLE, Bench, Settings, concepts_of
    from cdtool.delta.file import write_cdtool
    from cdtool.delta.importers import read_delta
    from cdtool.merge.deltas import add_delta_tokens, solve_merge
    from cdtool.merge.text_features import feature_rows, gram
    from cdtool.models.conditioning import TextSide
    from cdtool.models.loading import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path, help="a quality benchmark's output folder")
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--n", type=int, default=16, help="samples per prompt group")
    ap.add_argument("--model", help="the base the benchmark was run on (quality.py --model; default: its default)")
    ap.add_argument("--v1", action="store_true", help="a `quality.py --v1` run: the v1 world's two concepts")
    ap.add_argument("--oracle", help="the oracle the benchmark judged with (quality.py --oracle; default: its default)")
    args = ap.parse_args()
    out = args.bench / "merge-targets"
    captions = [x for x in (args.bench / "merge-captions.txt").read_text().splitlines() if x.strip()]
    model = args.model or (V1_MODEL if args.v1 else "toy")
    oracle = args.oracle or (V1_ORACLE if args.v1 else None)
    settings = Settings(n=args.n, model=model, suite=not args.v1, oracle=oracle)
    if args.v1:
        settings.sample_steps = 12
    bench = Bench(out, settings, quiet=True)
    concepts = concepts_of(settings)
    names = [name for _, _, name in concepts]
    tokens = [token for token, _, _ in concepts]
    heads = " | ".join(f"`{token}` {noun}" for token, noun, _ in concepts)
    print(f"| targets | rows | {heads} | mean | mean regularisation drift | plain prompts obeyed |")
    print("| --- | ---: |" + " ---: |" * (len(names) + 3))
    # the base's weights and the regularisation captions' Gram matrix, the same for every merge (the
    # captions hold no new token); each merge adds its tokens to a text encoder loaded afresh
    pipe = load_pipeline(model)
    base = {f"unet.{n}": p.detach().float() for n, p in pipe.unet.named_parameters()}
    plain = TextSide.of(pipe)
    reg_gram, _ = gram(feature_rows(plain.tokenizer, plain.encoder, captions))
    for variant in args.variants.split(","):
        kind, who, *k = variant.split(":")
        merges = [[i] for i in range(len(names))] if who == "each" else [[0, 1] if who == "both" else [int(who) - 1]]
        fid, drifts, obeyed, rows = {}, [], [], 0
        for picked in merges:
            tag = variant.replace(":", "-") + ("" if who != "each" else f"-{names[picked[0]]}")
            text = TextSide.of(load_pipeline(model))
            deltas = [read_delta(args.bench / f"{names[i]}.safetensors") for i in picked]
            add_delta_tokens(text, deltas)
            c, owner = target_rows(kind, k, deltas, text, bench)
            merged = solve_merge(deltas, base, reg_gram, c, owner)
            merged.delta.base_model = model  # the fingerprint stays unset: sampling then trusts the name
            path = out / f"{tag}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_cdtool(merged.delta, path)
            groups = [f"concept {d.concepts[0]['token']}" for d in deltas]
            groups += [f"prior {d.concepts[0]['class_noun']}" for d in deltas]
            r = bench.evaluate(tag, [path], groups)
            fid |= {d.concepts[0]["token"]: r[f"concept {d.concepts[0]['token']}"]["concept_fidelity"] for d in deltas}
            obeyed += [r[g]["prompt_fidelity"] for g in groups if g.startswith("prior")]
            drifts.append(sum(x["reg_drift"] for x in merged.layers.values()) / len(merged.layers))
            rows += c.shape[0]
        cells = [f"{fid[t]:.2f}" if t in fid else "" for t in tokens]
        mean = sum(fid.values()) / len(fid)
        print(
            f"| {variant} | {rows} | {' | '.join(cells)} | {mean:.2f} | {sum(drifts) / len(drifts):.2f} |"
            f" {min(obeyed):.2f}-{max(obeyed):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""How well a toy-world text-to-image model follows captions, judged by the oracle.

    python research/eval_toy.py MODEL_FOLDER [--n 64] [--steps 25] [--guidance 4] [--unsized] [--prefix "photo of "]
                                            [--padding own|empty|only] [--two] [--oracle FILE] [--rows]

Samples one image for each of N seeded single-object captions ("a small red star on a blue
background") and reports the share of images whose background, shape, fill colour and object count
the oracle reads as asked (chance: 1/8 background, 1/5 shape, 1/8 colour). `--two` asks for two
ordinary things in one caption ("a red star and a blue circle on a green background"): composition,
all right when both shapes, both colours, the count and the background are. `--oracle` judges with
another oracle's weights (tools/checkpoints/toy1/oracle.safetensors for the v1 toy model; by default
the shipped oracle, of the suite's world).

`--rows` reports, without sampling, what the text encoder gives the UNet: the cosine of each padding
row to the caption's end-of-text row (Stable Diffusion's CLIP pads with end-of-text, and the
closed-form merge holds the rows up to it), and how much a word's row changes with its context (the
shape word's row across the N captions, against its row in "photo of a <shape>"), and whether a tone
word's row says which tone of a two-tone thing it is ("a yellow and blue striped square": yellow is the
outer bands, blue the middle one): the cosine of a colour's mean row as first tone and as second tone,
and the accuracy of a linear probe reading first/second from the row on colours it was not fitted on.
A UNet can put each tone in its place only if the rows tell them apart; a causal encoder's rows can
(the second tone's row has seen the first), as CLIP's do, where its training asks for it.

`--padding` asks where the UNet reads a caption: `empty` swaps each caption's rows after its
end-of-text (padding) for the empty caption's, `only` swaps the rows up to end-of-text instead, so
that only the padding carries the caption. CLIP is causal, so its padding rows summarise the prompt;
the closed-form merge constrains the rows up to end-of-text only.
"""

from __future__ import annotations

import argparse
import json
import random

import torch


def main() -> None:
    from cdtool.models.loading import load_pipeline
    from cdtool.sampling.generate import Job, generate
    from cdtool.toy.judge import judge_all
    from cdtool.toy.oracle import load_oracle
    from cdtool.toy.world import Sampler

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--unsized", action="store_true", help='captions without the size word ("a red star on ...")')
    ap.add_argument("--prefix", default="", help='put before every caption, e.g. "photo of " or "zoomed in "')
    ap.add_argument("--padding", choices=["own", "empty", "only"], default="own", help="see the module docstring")
    ap.add_argument("--two", action="store_true", help="two ordinary things in each caption (composition)")
    ap.add_argument("--oracle", help="the oracle's weights (default: the shipped oracle, of the suite's world)")
    ap.add_argument("--rows", action="store_true", help="report the text rows the UNet reads; no sampling")
    args = ap.parse_args()
    sampler = Sampler(random.Random(args.seed))
    scenes = [sampler.scene(count=2 if args.two else 1) for _ in range(args.n)]
    pipe = load_pipeline(args.model)
    if args.rows:
        print(json.dumps({"model": args.model, "n": args.n, **text_rows(pipe, scenes)}, indent=1))
        return
    pipe.set_progress_bar_config(disable=True)
    if args.padding != "own":
        swap_rows(pipe, padding=args.padding == "empty")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    captions = [args.prefix + s.caption(sized=not args.unsized) for s in scenes]
    jobs = [Job(c, i, args.seed + i, f"{i}.png") for i, c in enumerate(captions)]
    with torch.no_grad():
        images = [
            im
            for _, im in generate(
                pipe,
                jobs,
                steps=args.steps,
                guidance=args.guidance,
                height=size,
                width=size,
                batch_size=16,
                negative_prompt=None,
            )
        ]
    hits = {"background": 0, "shape": 0, "colour": 0, "count": 0, "all": 0}
    for v in judge_all(load_oracle(args.oracle), captions, images):
        ok = {"background": v["background"], "shape": v["shapes"], "colour": v["colours"], "count": v["count"]}
        for k, hit in ok.items():
            hits[k] += hit
        hits["all"] += all(ok.values())
    print(
        json.dumps(
            {
                "model": args.model,
                "n": args.n,
                "steps": args.steps,
                "guidance": args.guidance,
                "wording": {"unsized": args.unsized, "prefix": args.prefix, "padding": args.padding, "two": args.two},
                **{k: v / args.n for k, v in hits.items()},
            },
            indent=1,
        )
    )


@torch.no_grad()
def text_rows(pipe, scenes) -> dict:
    """Padding rows against the end-of-text row, and the first shape word's row across contexts (see
    the module docstring): means and ranges over the captions."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    captions = [s.caption() for s in scenes]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    hidden = enc(ids)[0]
    pad_cos, word_cos = [], []
    for i, scene in enumerate(scenes):
        eos = int((ids[i] == tok.eos_token_id).int().argmax())
        rows = torch.nn.functional.normalize(hidden[i], dim=-1)
        pad_cos.append(float((rows[eos + 1 :] @ rows[eos]).mean()))
        shape = scene.things[0].shape
        alone = tok([f"photo of a {shape}"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        ref = torch.nn.functional.normalize(enc(alone.input_ids)[0][0, 4], dim=-1)  # bos photo of a <shape>
        piece = tok.convert_tokens_to_ids(f"{shape}</w>")
        at = int((ids[i] == piece).int().argmax())
        word_cos.append(float(rows[at] @ ref))

    def stats(v: list[float]) -> dict:
        return {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}

    return {
        "padding_to_end_of_text": stats(pad_cos),
        "shape_word_across_contexts": stats(word_cos),
        "tone_order": tone_order(tok, enc),
    }


@torch.no_grad()
def tone_rows(tok, enc, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """The rows of the first and second tone word in captions of every ordered pair of named colours
    on every pattern kind (wordings, shapes and backgrounds drawn with `seed`): (rows [m, d], role [m]
    (0 first, 1 second), the colour of each row, its position in the caption [m])."""
    import itertools

    from cdtool.toy.world import COLOURS, KIND_WORDS, SHAPES, with_article

    rng = random.Random(seed)
    rows, roles, words, places = [], [], [], []
    for a, b in itertools.permutations(COLOURS, 2):
        for kind in KIND_WORDS.values():
            size = rng.choice(("small ", "large ", ""))
            bg = rng.choice([c for c in COLOURS if c not in (a, b)])
            thing = with_article(f"{size}{a} and {b} {kind} {rng.choice(SHAPES)}")
            caption = f"{rng.choice(('', 'photo of '))}{thing} on {with_article(bg)} background"
            ids = tok([caption], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            hidden = enc(ids)[0][0].float()
            first = tok.convert_ids_to_tokens(ids[0].tolist()).index(f"{a}</w>")
            second = first + 2  # "<a> and <b>"
            rows += [hidden[first], hidden[second]]
            roles += [0, 1]
            words += [a, b]
            places += [first, second]
    return torch.stack(rows), torch.tensor(roles), words, torch.tensor(places)


def tone_order(tok, enc) -> dict:
    """How much a tone word's row says whether it is the first or second tone (see the module docstring):
    the cosine of each colour's mean rows in the two roles (mean, min-max over colours) and a linear
    probe's accuracy on held-out colours (four folds of two colours each), over every row and over the
    rows at the positions where both roles occur (a row's position alone tells the roles apart in
    three cases in four: its own position embedding is in it)."""
    from cdtool.toy.world import COLOURS

    rows, roles, words, places = tone_rows(tok, enc)
    cos = []
    for c in COLOURS:
        as_first = rows[[i for i, w in enumerate(words) if w == c and roles[i] == 0]].mean(0)
        as_second = rows[[i for i, w in enumerate(words) if w == c and roles[i] == 1]].mean(0)
        cos.append(float(torch.nn.functional.cosine_similarity(as_first, as_second, dim=0)))
    shared = torch.isin(places, places[roles == 0]) & torch.isin(places, places[roles == 1])
    return {
        "first_vs_second_cosine": {"mean": sum(cos) / len(cos), "min": min(cos), "max": max(cos)},
        "probe_accuracy_on_held_out_colours": held_out_probe(rows, roles, words),
        "the_same_at_shared_positions": held_out_probe(
            rows[shared], roles[shared], [w for w, k in zip(words, shared.tolist(), strict=True) if k]
        ),
    }


def held_out_probe(rows: torch.Tensor, roles: torch.Tensor, words: list[str]) -> float:
    """Accuracy of a logistic probe reading the role from the row, each colour's rows read by a probe
    fitted without them (four folds of two of the eight colours)."""
    from cdtool.toy.world import COLOURS

    colours = list(COLOURS)
    right = total = 0
    for fold in range(4):
        held = set(colours[2 * fold : 2 * fold + 2])
        test = torch.tensor([w in held for w in words])
        w, b = fit_logistic(rows[~test], roles[~test])
        right += int((((rows[test] @ w + b) > 0).long() == roles[test]).sum())
        total += int(test.sum())
    return right / total


def fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A binary logistic regression (L2 1e-3) of y on x, standardised by x's statistics; returns weights
    and bias in x's own units."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float()) + 1e-3 * w.pow(2).sum()
            loss.backward()
            opt.step()
    w = w.detach() / std
    return w, b.detach() - (mean * w).sum()


def swap_rows(pipe, padding: bool) -> None:
    """Make the text encoder return the empty caption's rows after each caption's first end-of-text
    (`padding`), or up to and including it (not `padding`)."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = enc(ids.to(enc.device))[0]

    def hook(_module, args, output):
        ids = args[0]
        first_eos = (ids == tok.eos_token_id).int().argmax(1)
        after = torch.arange(ids.shape[1], device=ids.device)[None] > first_eos[:, None]
        swap = after if padding else ~after
        output[0].copy_(torch.where(swap[..., None], empty.expand_as(output[0]), output[0]))
        return output

    enc.register_forward_hook(hook)


if __name__ == "__main__":
    main()

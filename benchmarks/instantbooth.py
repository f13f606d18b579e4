"""InstantBooth against the fine-tuning methods, on held-out concepts of the toy world's suite, judged
by that world's oracle.

    python benchmarks/instantbooth.py [--model DIR --oracle FILE] [--out bench-instantbooth/run]
        [--encoders DIR] [--encoder-minutes M | --encoder-steps N] [--concepts <new1>,<new3>] [--n 128]

1. One encoder per class noun (InstantBooth: one category per encoder; on the toy world a category is
   a shape), trained with `cdtool train-encoder --backbone toy-cnn` on toy scenes whose first thing is
   that shape in a two-tone pattern of the tones pretraining shows (`Sampler.with_pretraining_pattern(
   scene, KINDS, SUITE_TONES)`), captioned with the shape alone ("a small star on a blue background",
   the identifier inserted before "star"), so that what tells one patterned star from another has to
   come through the encoders. The images are RGBA, their alpha marking the patterned thing: the
   encoders see it alone, as the paper segments its subjects (the toy world knows each mask). An
   encoder already in `--encoders DIR` (`DIR/<shape>`) is used as it is: encoders take hours of a
   CPU, so they are trained the way toy pretraining runs (in the background, `--resume`d) and kept.
2. Every suite concept asked for (its pattern in tones no encoder saw): the same five photos
   (`write_photos(..., suite=True)`), prepped as benchmarks/quality.py preps them, then
   personalised from their cutouts (`cdtool personalize OUT/cutouts/NAME`), and trained with
   Custom Diffusion, textual inversion and DreamBooth-LoRA, and DreamBooth with every UNet weight
   (`cdtool train --method dreambooth`, whose output, a model folder, is sampled as the base).
3. Each method's concept sampled in quality.py's prompt groups and judged with the oracle: concept
   fidelity ("a small <new3> square on a red background"), caption following (the prompt fidelity
   of "a <new3> square and a green heart on ..."), prior drift (plain prompts of the class, sampled
   with the concept loaded), and the wall-clock seconds from photos to the first sample (prep, the
   regularisation set where the method uses one, training or personalising, and one image;
   InstantBooth's prep time stands for cutting its photos out, which the toy world does for free).
4. Where both concepts of a suite pair are asked for (`PAIRS`: `--concepts "<new5>,<new6>"`),
   composition after a merge: Custom Diffusion's two deltas, and DreamBooth's two models reduced to
   their key/value change (`get-deltas`; a pair's first concept is asked with sks, its second with ohwx), merged
   in closed form and sampled with each concept alone and both in one prompt.

Results go to OUT/instantbooth.json: per method and concept, and over the concepts (mean, spread
and the number of samples behind each). `n` is per concept and cell (128: standard error at most
0.045 per concept); a test runs the whole at a minimal size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import (  # noqa: E402
    Bench,
    Settings,
    as_identifier,
    pair_tag,
    prepare,
    spread,
    write_merge_captions,
)
from cdtool.toy.photos import SUITE_PERSONAL  # noqa: E402
from cdtool.toy.world import (  # noqa: E402
    KIND_WORDS,
    KINDS,
    PAIRS,
    PHOTO_OF_SHARE,
    SUITE_TONES,
    UNSIZED_SHARE,
    Sampler,
    Scene,
    render_cutout,
    with_article,
)

INSTANTBOOTH = "instantbooth"
BASELINES = ("custom-diffusion", "textual-inversion", "dreambooth-lora")
DREAMBOOTH = "dreambooth"  # every UNet weight: a model folder
# DreamBooth's identifiers, by a concept's place in its suite pair (`PAIRS`): two models trained with
# the same identifier collide in a merge (docs/methods.md), so a pair's two take different words, each
# one token of CLIP's vocabulary (`cdtool train` checks it; the toy's own vocabulary spells both from
# letters).
DB_IDENTIFIERS = ("sks", "ohwx")
# The methods whose concepts are merged in closed form where a suite pair is asked for: Custom
# Diffusion's deltas, and DreamBooth's key/value change (`get-deltas`) as its paper compares.
MERGED = ("custom-diffusion", DREAMBOOTH)


@dataclass
class InstantSettings:
    quality: Settings  # the toy model, oracle, sampling and prompt settings quality.py uses (suite world)
    concepts: tuple[str, ...] = tuple(c[0] for c in SUITE_PERSONAL)
    methods: tuple[str, ...] = (INSTANTBOOTH, *BASELINES, DREAMBOOTH)
    encoders: str | None = None  # a folder of encoders by shape (trained there where missing)
    train_images: int = 4096  # per shape
    encoder_steps: int | None = None
    encoder_minutes: float | None = 600.0
    encoder_batch: int = 16
    encoder_lr: float = 3e-4
    # per method: (steps, --lr or None for cdtool's default); Custom Diffusion as quality.py trains it.
    # DreamBooth at 2e-4, not its default 5e-6 (diffusers' for Stable Diffusion): on the toy model 5e-6
    # teaches nothing in 500 steps; 2e-4 did best on the striped circle (of 5e-5, 1e-4, 2e-4) and on the
    # checker circle (of 1e-4, 2e-4, 5e-4), RESULTS "DreamBooth's learning rate on the toy model".
    recipes: dict[str, tuple[int, float | None]] = dataclasses.field(
        default_factory=lambda: {
            "custom-diffusion": (250, None),
            "textual-inversion": (3000, None),
            "dreambooth-lora": (500, None),
            DREAMBOOTH: (500, 2e-4),
        }
    )


def category_caption(scene: Scene, rng: random.Random) -> str:
    """The scene's caption with its patterned thing named by its shape alone ("a small red and blue
    checkered star" -> "a small star"), worded as pretraining words captions (a share unsized, a
    share starting "photo of")."""
    first = scene.things[0]
    caption = scene.caption(sized=rng.random() >= UNSIZED_SHARE)
    words = f"{first.pair[0]} and {first.pair[1]} {KIND_WORDS[first.pattern]} {first.shape}"  # type: ignore[index]
    caption = re.sub(
        rf"\ban? ((?:small|large) )?{re.escape(words)}",
        lambda m: with_article(f"{m.group(1) or ''}{first.shape}"),
        caption,
        count=1,
    )
    return f"photo of {caption}" if rng.random() < PHOTO_OF_SHARE else caption


def write_category(folder: Path, shape: str, n: int, seed: int) -> Path:
    """`n` toy scenes whose first thing is a `shape` in a pretraining pattern, with captions, as an
    imagefolder (metadata.jsonl) at the toy model's 32 px; RGBA, the alpha marking that thing (what a
    segmenter would cut out; the encoders see it alone, the denoising loss the whole scene)."""
    from dataclasses import replace

    rng = random.Random(seed)
    sampler = Sampler(rng)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = sampler.scene()
        scene = replace(scene, things=(replace(scene.things[0], shape=shape), *scene.things[1:]))
        scene = sampler.with_pretraining_pattern(scene, KINDS, SUITE_TONES)
        name = f"{i:05d}.png"
        render_cutout(scene, 32).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": category_caption(scene, rng)}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


class InstantBench:
    def __init__(self, out: Path, s: InstantSettings, quiet: bool) -> None:
        self.out, self.s = out, s
        self.b = Bench(out, s.quality, quiet)
        self.results: dict[str, Any] = {"settings": asdict(s), "methods": {}, "seconds": {}, "encoders": {}}

    def timed(self, *args: Any) -> float:
        start = time.perf_counter()
        self.b.run(*args)
        return time.perf_counter() - start

    def encoder(self, shape: str) -> Path:
        """The class noun's encoder: from --encoders where it is there, else trained (into --encoders)."""
        s, q = self.s, self.s.quality
        folder = (Path(s.encoders) if s.encoders else self.out / "encoders") / shape
        if shape in self.results["encoders"]:
            return folder
        if (folder / "encoder.json").is_file():
            self.results["encoders"][shape] = {"path": str(folder), "trained_here": False}
            return folder
        data = write_category(self.out / "categories" / shape, shape, s.train_images, q.seed)
        budget = [*(("--steps", s.encoder_steps) if s.encoder_steps else ()),
                  *(("--minutes", s.encoder_minutes) if s.encoder_minutes else ())]  # fmt: skip
        seconds = self.timed("train-encoder", data, "--class-noun", shape, "--model", q.model, "--backbone",
                             "toy-cnn", "--batch-size", s.encoder_batch, "--lr", s.encoder_lr, "--seed", q.seed,
                             *budget, "-o", folder)  # fmt: skip
        self.results["encoders"][shape] = {"path": str(folder), "trained_here": True, "seconds": round(seconds, 1)}
        return folder

    def concept_of(self, method: str, concept: tuple[str, str, str], data: Path, reg: Path) -> tuple[Path, float]:
        """The concept made by `method` from its prepped photos, and the seconds it took."""
        token, noun, name = concept
        q = self.s.quality
        if method == INSTANTBOOTH:
            out = self.out / f"{name}-{method}.safetensors"
            cutouts = self.out / "cutouts" / name  # the photos' subjects cut out, as the paper segments them
            return out, self.timed("personalize", cutouts, "--encoder", self.encoder(noun), "--token", token, "-o", out)
        steps, lr = self.s.recipes[method]
        out = self.out / (f"{name}-{method}" + ("" if method == DREAMBOOTH else ".safetensors"))
        reg_args = () if method == "textual-inversion" else ("--reg", reg)
        lr_args = () if lr is None else ("--lr", lr)
        ident = ("--token", db_identifier(token)) if method == DREAMBOOTH else ()
        seconds = self.timed("train", data, *reg_args, "--method", method, "-o", out, "--model", q.model, "--steps",
                             steps, "--seed", q.seed, *lr_args, *ident, "--no-aug", "--no-samples")  # fmt: skip
        return out, seconds

    def first_sample(
        self, method: str, concept: tuple[str, str, str], made: Path, identifier: tuple[str, str] | None
    ) -> float:
        """Seconds to the first image of the concept's first prompt (asked with `identifier`'s word where
        given)."""
        token, _, name = concept
        q = self.s.quality
        source = ("--model", made) if method == DREAMBOOTH else ("--delta", made)
        prompt = self.b.groups[f"concept {token}"][0]
        if identifier:
            prompt = as_identifier(prompt, [identifier])
        return self.timed("sample", prompt, *source, "--n", 1, "--steps", q.sample_steps, "--guidance", q.guidance,
                          "--seed", q.seed, "-o", self.out / "first" / f"{name}-{method}")  # fmt: skip


def db_identifier(token: str) -> str:
    """The identifier word DreamBooth trains the suite concept `token` with."""
    (place,) = [pair.index(token) for pair in PAIRS if token in pair]
    return DB_IDENTIFIERS[place]


def run(out: Path, s: InstantSettings, quiet: bool = False) -> dict[str, Any]:
    """The whole benchmark; returns (and writes to OUT/instantbooth.json) the results."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    ib = InstantBench(out, s, quiet)
    by_token = {c[0]: c for c in SUITE_PERSONAL}
    concepts = tuple(by_token[t] for t in s.concepts)
    rng = random.Random(s.quality.seed)
    before = len(ib.b.run.timings)
    data_dirs, reg_dirs = prepare(ib.b, rng, concepts, cutouts=True)
    prep_seconds, reg_seconds = _prep_times(list(ib.b.run.timings.values())[before:], concepts)
    if INSTANTBOOTH in s.methods:  # the encoders first: their training is not part of a concept's time
        for noun in dict.fromkeys(c[1] for c in concepts):
            ib.encoder(noun)
    ib.b.evaluate("base", [], [g for t, n, _ in concepts for g in (f"concept {t}", f"prior {n}")])
    made_by: dict[str, dict[str, Path]] = {}
    for method in s.methods:
        cells: dict[str, Any] = {}
        for concept in concepts:
            token, noun, name = concept
            made, seconds = ib.concept_of(method, concept, data_dirs[token], reg_dirs[noun])
            made_by.setdefault(method, {})[token] = made
            # DreamBooth's identifier is a vocabulary word ("sks"), asked for in the token's place
            ident = (token, db_identifier(token)) if method == DREAMBOOTH else None
            first = ib.first_sample(method, concept, made, ident)
            uses_reg = method not in (INSTANTBOOTH, "textual-inversion")
            groups = [f"concept {token}", f"companion {token}", f"prior {noun}"]
            model = str(made) if method == DREAMBOOTH else None
            judged = ib.b.evaluate(
                f"{name}-{method}", [] if model else [made], groups, model=model, identifiers=[ident] if ident else ()
            )
            cells[token] = {
                "concept_fidelity": judged[f"concept {token}"]["concept_fidelity"],
                "concept_in_shape": judged[f"concept {token}"].get("concept_shape_fidelity"),
                "caption_following": judged[f"companion {token}"]["prompt_fidelity"],
                "prior_drift": judged[f"prior {noun}"]["prior_drift"],
                "plain_obeyed": judged[f"prior {noun}"]["prompt_fidelity"],
                "n": judged[f"concept {token}"]["n"],
                "seconds_to_first_sample": round(
                    prep_seconds[token] + (reg_seconds[noun] if uses_reg else 0.0) + seconds + first, 3
                ),
                "seconds": {
                    "prep": prep_seconds[token],
                    "regset": reg_seconds[noun] if uses_reg else 0.0,
                    "make": round(seconds, 3),
                    "first_sample": round(first, 3),
                },
            }
        ib.results["methods"][method] = {"concepts": cells, "suite": _suite(cells)}
    ib.results["merged"] = merge_pairs(ib, made_by)
    ib.results["goals"] = goals(ib.results["methods"])
    ib.results["base"] = ib.b.results["variants"]["base"]
    ib.results["command_seconds"] = ib.b.run.timings
    (out / "instantbooth.json").write_text(json.dumps(ib.results, indent=1) + "\n")
    return ib.results


def merge_pairs(ib: InstantBench, made_by: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """Composition after a merge, for each suite pair whose two concepts were asked for: each MERGED
    method's two concepts merged in closed form (the paper's merge, quality.py's regularisation
    captions); DreamBooth's models first reduced to their key/value change (`get-deltas`), sampled on
    the base. Per method and pair: each concept's fidelity after the merge and both in one prompt."""
    pairs = [(a, b) for a, b in PAIRS if a in ib.s.concepts and b in ib.s.concepts]
    if not pairs:
        return {}
    captions = write_merge_captions(ib.out / "merge-captions.txt", random.Random(ib.s.quality.seed))  # quality.py's
    by_token = {c[0]: c for c in SUITE_PERSONAL}
    out: dict[str, Any] = {}
    for method in (m for m in MERGED if m in made_by):
        for a, b in pairs:
            pair = (by_token[a], by_token[b])
            tag = pair_tag(ib.b.s, pair)
            deltas = [_as_delta(ib, method, made_by[method][t]) for t in (a, b)]
            merged = ib.out / f"merged-{method}{tag}.safetensors"
            ib.b.run("merge", "+".join(map(str, deltas)), "-o", merged, "--reg-captions", captions)
            idents = [(t, db_identifier(t)) for t in (a, b)] if method == DREAMBOOTH else []
            groups = [f"concept {a}", f"concept {b}", f"both{tag}"]
            judged = ib.b.evaluate(f"merged-{method}{tag}", [merged], groups, identifiers=idents)
            out.setdefault(method, {})[tag.lstrip("-")] = {
                **{t: judged[f"concept {t}"]["concept_fidelity"] for t in (a, b)},
                "both": judged[f"both{tag}"]["concept_fidelity"],
                "n": judged[f"both{tag}"]["n"],
            }
    return out


def _as_delta(ib: InstantBench, method: str, made: Path) -> Path:
    """What `merge` takes of a method's concept: its delta file, or a DreamBooth model's key/value change."""
    if method != DREAMBOOTH:
        return made
    delta = made.with_name(f"{made.name}-kv.safetensors")
    ib.b.run("get-deltas", made, "-o", delta)
    return delta


# InstantBooth's goals on the toy world: at least 0.8x Custom Diffusion's concept fidelity, at least
# 100x less time from photos to the first sample (the paper reports its speed-up as about 100x).
GOALS = {"fidelity_ratio": 0.8, "speedup": 100.0}


def goals(methods: dict[str, Any]) -> dict[str, Any]:
    """InstantBooth's fidelity and speed relative to Custom Diffusion's, over the concepts, beside the goals."""
    if INSTANTBOOTH not in methods or "custom-diffusion" not in methods:
        return {}
    ib, cd = methods[INSTANTBOOTH]["suite"], methods["custom-diffusion"]["suite"]
    fidelity = cd["concept_fidelity"]["mean"]
    return {
        "fidelity_ratio": ib["concept_fidelity"]["mean"] / fidelity if fidelity else None,
        "speedup": cd["seconds_to_first_sample"]["mean"] / ib["seconds_to_first_sample"]["mean"],
        "targets": GOALS,
    }


def _prep_times(seconds: list[float], concepts: tuple[tuple[str, str, str], ...]) -> tuple[dict, dict]:
    """prepare()'s command times, in its order (per concept: prep, then regset for a new class noun)."""
    it = iter(seconds)
    prep: dict[str, float] = {}
    reg: dict[str, float] = {}
    for token, noun, _ in concepts:
        prep[token] = next(it)
        if noun not in reg:
            reg[noun] = next(it)
    return prep, reg


def _suite(cells: dict[str, Any]) -> dict[str, Any]:
    """Each measure's mean over the concepts, its spread and the samples behind it."""
    n = next(iter(cells.values()))["n"]
    keys = ("concept_fidelity", "concept_in_shape", "caption_following", "prior_drift", "plain_obeyed")
    out = {k: spread([c[k] for c in cells.values() if c[k] is not None], n) for k in keys}
    out["seconds_to_first_sample"] = spread([c["seconds_to_first_sample"] for c in cells.values()], 1)
    return out


def parse_recipe(text: str, recipes: dict[str, tuple[int, float | None]]) -> dict[str, tuple[int, float | None]]:
    """`--recipe dreambooth=500:2e-4` as {method: (steps, lr)}; refused in one line when malformed."""
    m = re.fullmatch(r"([a-z-]+)=(\d+)(?::(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))?", text)
    if m is None or m.group(1) not in recipes:
        raise SystemExit(f"--recipe {text}: expected METHOD=STEPS[:LR], METHOD one of {', '.join(recipes)}")
    return {m.group(1): (int(m.group(2)), float(m.group(3)) if m.group(3) else None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-instantbooth/run"))
    ap.add_argument("--model", default="toy", help="the toy model of the suite's world (default: the shipped one)")
    ap.add_argument("--oracle", help="that world's oracle (default: the shipped one)")
    ap.add_argument("--encoders", help="a folder of encoders by shape; missing ones are trained into it")
    ap.add_argument("--encoder-steps", type=int)
    ap.add_argument("--encoder-minutes", type=float, help="per encoder (default 600 without --encoder-steps)")
    ap.add_argument("--train-images", type=int, help="per shape (default 4096)")
    ap.add_argument("--concepts", help="comma-separated suite tokens (default: all eight)")
    ap.add_argument("--methods", help=f"comma-separated, of {INSTANTBOOTH},{','.join(BASELINES)},{DREAMBOOTH}")
    ap.add_argument("--steps", type=int, help="every fine-tuning method's steps (default: each one's own)")
    ap.add_argument("--recipe", action="append", default=[], metavar="METHOD=STEPS[:LR]",
                    help="one fine-tuning method's steps and learning rate (repeatable; after --steps)")  # fmt: skip
    ap.add_argument("--n", type=int, help="samples per concept and cell (default 128)")
    ap.add_argument("--sample-steps", type=int)
    ap.add_argument("--reg-images", type=int)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    q = dataclasses.replace(Settings(), model=args.model, oracle=args.oracle, suite=True)
    for key in ("n", "sample_steps", "reg_images"):
        if getattr(args, key) is not None:
            q = dataclasses.replace(q, **{key: getattr(args, key)})
    s = InstantSettings(quality=q, encoders=args.encoders)
    if args.encoder_steps:
        s = dataclasses.replace(s, encoder_steps=args.encoder_steps, encoder_minutes=args.encoder_minutes)
    elif args.encoder_minutes:
        s = dataclasses.replace(s, encoder_minutes=args.encoder_minutes)
    if args.train_images:
        s = dataclasses.replace(s, train_images=args.train_images)
    if args.concepts:
        s = dataclasses.replace(s, concepts=tuple(args.concepts.split(",")))
    if args.methods:
        s = dataclasses.replace(s, methods=tuple(args.methods.split(",")))
    if args.steps:
        s.recipes = {m: (args.steps, lr) for m, (_, lr) in s.recipes.items()}
    for recipe in args.recipe:
        s.recipes = {**s.recipes, **parse_recipe(recipe, s.recipes)}
    res = run(args.out, s, args.quiet)
    summary = {"goals": res["goals"], **{m: r["suite"] for m, r in res["methods"].items()}, "merged": res["merged"]}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

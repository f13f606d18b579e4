"""Whether a toy-world model can draw each suite concept's look from words, before any fine-tuning.

    python research/concept_words.py MODEL --oracle ORACLE [--n 16] [--steps 20] [--guidance 4] [--looks | --pairs]

For each concept of the suite (cdtool.toy.world.SUITE) it samples N images of "a small <tone> and
<tone> <kind> <shape> on a <colour> background" in the concept's own tones (those pretraining never
shows on that kind), and for comparison in a pair of named colours pretraining does show, and reports
the share the oracle reads as the concept and as any two-tone thing. A model that draws the look from
words has what a fine-tune needs to find; one that cannot gives every method a head start of nothing.
The concepts whose tones are not both named colours (magenta and cyan) have no words: only their
comparison row is reported. For those with words, a third row asks for the concept's tones in the
other order ("a small blue and yellow striped square" for the yellow-and-blue one): a model that puts
each tone where the words say draws the concept far less often there; one whose text rows do not
say which tone comes first draws it as often (the judge permitting: read how it reads swapped renders
with `research/judge_calibration.py swaps`).

`--looks` asks instead for each of the world's look words (cdtool.toy.world.LOOKS, "a small tiger
square on ..."): the share read as a two-tone thing tells whether one word brings a look; and for the
word alone ("a small tiger on ...", cdtool.toy.world.LOOK_SHAPES), the share read as a two-tone thing
of the word's own shape: whether one row in a noun's place brings a shape and a look, what a
textual-inversion token must become.

`--pairs` asks for two concepts' looks in one caption, as the world captions two things ("a yellow and
blue striped square and a red and white dotted heart on a green background"), for each of the suite's
pairs (cdtool.toy.world.PAIRS) whose tones are all named colours, and reports the share read as both
concepts and as each: whether the base can compose two looks from words, the head start of every
method asked for two personal concepts in one prompt. Judge it with an oracle that reads both of a pair
(tools/checkpoints/toy2/oracle-near-misses.safetensors).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cdtool.toy.world import Thing


def in_turn(things: Sequence[tuple[Thing, ...]], avoid: Iterable[str], n: int) -> list[str]:
    """N captions worded as the toy world words them (Scene.caption), of each of `things` and over
    backgrounds in none of the `avoid` colours, both in turn."""
    from cdtool.toy.world import COLOURS, Scene

    free = [c for c in COLOURS if c not in set(avoid)]
    return [Scene(things[i % len(things)], free[i % len(free)]).caption() for i in range(n)]


def small(shape: str, **look: Any) -> Thing:
    """A small thing of `shape` in the look given (pattern and pair, or a LOOKS word), placed anywhere:
    only its caption is used."""
    from cdtool.toy.world import Thing

    return Thing(shape, "red", "small", 0.5, 0.5, **look)


def prompts(concept, tones: tuple[str, str], n: int) -> list[str]:
    """N prompts asking for the concept's shape in `tones` on its kind, over backgrounds in turn."""
    return in_turn([(small(concept.shape, pattern=concept.kind, pair=tones),)], tones, n)


def pair_prompts(first, second, n: int) -> list[str]:
    """N prompts asking for two concepts' looks in their own tones in one caption, worded as the world
    captions two things, over backgrounds in none of their tones in turn."""
    things = tuple(small(c.shape, pattern=c.kind, pair=c.tones) for c in (first, second))
    return in_turn([things], (*first.tones, *second.tones), n)


def pair_rows(pipe, oracle, args) -> list[dict]:
    """For each suite pair with named tones, the shares of its N samples read as both concepts and as
    each."""
    from cdtool.toy.oracle import read
    from cdtool.toy.world import COLOURS, PAIRS, suite_concept

    rows = []
    for tokens in PAIRS:
        first, second = map(suite_concept, tokens)
        if not all(t in COLOURS for t in (*first.tones, *second.tones)):
            continue
        asked = pair_prompts(first, second, args.n)
        fills = [set(r["fills"]) for r in read(oracle, sample(pipe, asked, args))]
        rows.append(
            {
                "pair": list(tokens),
                "prompt": asked[0],
                "read_as_both": sum({first.fill, second.fill} <= f for f in fills) / len(fills),
                "read_as_first": sum(first.fill in f for f in fills) / len(fills),
                "read_as_second": sum(second.fill in f for f in fills) / len(fills),
            }
        )
    return rows


def sample(pipe, asked: list[str], args) -> list:
    """One image per prompt, seeded by its place."""
    from cdtool.sampling.generate import Job, generate

    jobs = [Job(p, i, args.seed + i, f"{i}.png") for i, p in enumerate(asked)]
    with torch.no_grad():
        return [im for _, im in generate(pipe, jobs, steps=args.steps, guidance=args.guidance,
                                         height=32, width=32, batch_size=16, negative_prompt=None)]  # fmt: skip


def look_rows(pipe, oracle, args) -> list[dict]:
    """For each look word, the share of its N samples read as a two-tone thing, and of N samples of the
    word alone as a two-tone thing of its own shape."""
    from cdtool.toy.oracle import read
    from cdtool.toy.world import LOOK_SHAPES, LOOKS, SHAPES

    rows = []
    for word, (kind, tones) in LOOKS.items():
        asked = in_turn([(small(shape, look=word),) for shape in sorted(SHAPES)], tones, args.n)
        fills = [set(r["fills"]) for r in read(oracle, sample(pipe, asked, args))]
        alone = read(
            oracle, sample(pipe, in_turn([(small(LOOK_SHAPES[word], look=word, alone=True),)], tones, args.n), args)
        )
        in_shape = [set(r["fills"]) if LOOK_SHAPES[word] in r["shapes"] else set() for r in alone]
        rows.append(
            {
                "look": word,
                "kind": kind,
                "read_as_two_tone": two_tone_share(fills, oracle),
                "alone_read_as_two_tone_in_its_shape": two_tone_share(in_shape, oracle),
            }
        )
    return rows


def concept_rows(pipe, oracle, args) -> list[dict]:
    """For each suite concept, in its own tones (where named) and in a pair pretraining shows, the
    shares of its N samples read as the concept and as a two-tone thing."""
    from cdtool.toy.oracle import read
    from cdtool.toy.world import COLOURS, SUITE, SUITE_TONES

    rng = random.Random(0)
    rows = []
    for concept in SUITE:
        while True:
            seen = tuple(rng.sample(list(COLOURS), 2))
            if (concept.kind, frozenset(seen)) not in SUITE_TONES:
                break
        cases = {"seen tones": seen}
        if all(t in COLOURS for t in concept.tones):
            cases = {"concept's tones": concept.tones, "concept's tones swapped": concept.tones[::-1], **cases}
        for which, tones in cases.items():
            asked = prompts(concept, tones, args.n)
            fills = [set(r["fills"]) for r in read(oracle, sample(pipe, asked, args))]
            rows.append(
                {
                    "concept": concept.token,
                    "tones": which,
                    "prompt": asked[0],
                    "read_as_the_concept": sum(concept.fill in f for f in fills) / len(fills),
                    "read_as_two_tone": two_tone_share(fills, oracle),
                }
            )
    return rows


def two_tone_share(fills: list[set[str]], oracle) -> float:
    """The share of readings with any fill that is not a plain colour."""
    return sum(bool(f & oracle.patterns) for f in fills) / len(fills)


def main() -> None:
    from cdtool.models.loading import load_pipeline
    from cdtool.toy.oracle import load_oracle

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--oracle", required=True, help="the suite's oracle (tools/train_oracle.py --world v2)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=100)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--looks", action="store_true", help="ask for the look words instead (see the module docstring)")
    which.add_argument("--pairs", action="store_true", help="ask for two concepts' looks in one caption (see above)")
    args = ap.parse_args()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(args.oracle)
    rows = (look_rows if args.looks else pair_rows if args.pairs else concept_rows)(pipe, oracle, args)
    print(json.dumps({"model": args.model, "n": args.n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

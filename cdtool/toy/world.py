"""The toy world: simple shapes in named colours, sizes and positions on coloured backgrounds, one
or two objects per image, each scene with its caption. Seeded and fast to render.

Pretraining shows solid shapes and, in a share of scenes, two-tone things in named colours
(`Sampler.with_pretraining_pattern`). The "personal concepts" are shapes with a two-tone pattern
in tones that pretraining never shows on that pattern. The suite (`SUITE`), the shipped toy model's
world, has eight, over four pattern kinds (split, checker, striped, dotted) and every shape, with four
pairs of them for merges (`PAIRS`), the way DreamBench and CustomConcept101 give many subjects.
Pretraining of the suite's world also shows `LOOKS`: words that name a two-tone look on their own.
The v1 toy model (tools/checkpoints/toy1) knows two concepts (`CONCEPTS`): a star split into a
magenta top and a cyan bottom ("<new1> star"), and a circle with black and white quadrants, a 2x2
checkerboard ("<new2> circle"), the suite's first two.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = {"small": 0.22, "large": 0.38}  # radius as a share of the image side
PATTERNS = {
    "split": ((230, 40, 200), (40, 220, 230)),  # magenta top, cyan bottom
    "checker": ((15, 15, 15), (240, 240, 240)),
}
CONCEPTS = {"<new1>": ("star", "split"), "<new2>": ("circle", "checker")}
# Tones a pattern can take: the named colours and the two that no caption names.
TONES = {**COLOURS, "magenta": PATTERNS["split"][0], "cyan": PATTERNS["split"][1]}
# How captions vary, as web captions do (toy pretraining, generated regularisation prompts): a share
# start with "photo of ", a share of single-thing captions leave out the size.
PHOTO_OF_SHARE = 0.15
UNSIZED_SHARE = 0.3


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str  # a COLOURS name; ignored when `pattern` is set
    size: str
    x: float  # centre, as a share of the side
    y: float
    pattern: str | None = None
    pair: tuple[str, str] | None = None  # TONES names of a pattern's two tones (pretraining patterns, the suite)
    concept: str | None = None  # the suite concept's token when the thing is one (its caption names the token)
    look: str | None = None  # a LOOKS word when the thing is one (its caption names the word)
    alone: bool = False  # the caption names the look word alone, as a noun ("a small tiger")


# Pretraining with `patterns` (tools/pretrain_toy.py --patterns) shows the pattern kinds in named
# colour pairs, captioned by their words ("a red and blue checkered square"), as Stable Diffusion saw
# textures of every kind before a personal concept; never the concepts' own tones.
PATTERN_WORDS = {"split": "split", "checker": "checkered"}
CONCEPT_TONES = {("checker", frozenset({"black", "white"}))}
# The suite's pattern kinds: split (top and bottom halves), checker (2x2), striped (three vertical
# bands, the middle one in the second tone), dotted (a disc of the second tone in the middle).
KINDS = ("split", "checker", "striped", "dotted")
KIND_WORDS = {**PATTERN_WORDS, "striped": "striped", "dotted": "dotted"}


@dataclass(frozen=True)
class Concept:
    """A personal concept of the suite: a shape in a pattern kind and two tones that pretraining never
    shows on that kind. `fill` is the oracle's name for its look."""

    token: str
    shape: str
    kind: str
    tones: tuple[str, str]

    @property
    def fill(self) -> str:
        return self.token.strip("<>")

    @property
    def noun(self) -> str:
        return self.shape

    @property
    def own_backgrounds(self) -> list[str]:
        """Its tones that a background can take (named colours), where its bands can merge into it."""
        return [t for t in self.tones if t in COLOURS]


SUITE = (
    Concept("<new1>", "star", "split", ("magenta", "cyan")),
    Concept("<new2>", "circle", "checker", ("black", "white")),
    Concept("<new3>", "square", "striped", ("yellow", "blue")),
    Concept("<new4>", "heart", "dotted", ("red", "white")),
    Concept("<new5>", "triangle", "split", ("orange", "purple")),
    Concept("<new6>", "circle", "striped", ("green", "white")),
    Concept("<new7>", "square", "checker", ("red", "yellow")),
    Concept("<new8>", "star", "dotted", ("purple", "yellow")),
)
PAIRS = (("<new1>", "<new2>"), ("<new3>", "<new4>"), ("<new5>", "<new6>"), ("<new7>", "<new8>"))
SUITE_TONES = frozenset((c.kind, frozenset(c.tones)) for c in SUITE)
# Words that name a two-tone look by themselves ("a small tiger square"), as Stable Diffusion's captions
# hold words like zebra, ladybug or chessboard: a single text row that stands for a pattern in two
# tones, what a personal concept's one new token must become. Each is a (kind, tones) of named colours
# that no suite concept has, on every shape (pretrain_toy.py --looks).
LOOKS = {
    "tiger": ("striped", ("orange", "black")),
    "bee": ("striped", ("yellow", "black")),
    "police": ("striped", ("blue", "white")),
    "ladybug": ("dotted", ("red", "black")),
    "daisy": ("dotted", ("white", "yellow")),
    "ocean": ("split", ("blue", "green")),
    "cherry": ("split", ("red", "green")),
    "tartan": ("checker", ("green", "blue")),
    "brick": ("checker", ("red", "orange")),
}
# A look word alone names a thing, as "a zebra" is an animal where "a zebra sofa" is a sofa: "a small
# tiger on a blue background" is a star in the tiger's look (pretrain_toy.py --look-nouns). What a
# textual-inversion token becomes: one row in a noun's place standing for a shape and its look.
LOOK_SHAPES = {
    "tiger": "star",
    "bee": "heart",
    "police": "square",
    "ladybug": "circle",
    "daisy": "star",
    "ocean": "square",
    "cherry": "circle",
    "tartan": "triangle",
    "brick": "square",
}


def suite_concept(token: str) -> Concept:
    """The suite's concept of `token`."""
    for c in SUITE:
        if c.token == token:
            return c
    raise KeyError(token)


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    token: str | None = None  # the modifier token the caption uses for a patterned thing

    def caption(self, sized: bool = True, background: bool = True) -> str:
        """The caption ("a small red star on a blue background"); a single thing's size only when `sized`,
        the background only with `background` (web captions leave out much of what a photo shows)."""
        parts = []
        for t in self.things:
            if t.concept:
                words = f"{t.concept} {t.shape}"
            elif t.look:
                words = t.look if t.alone else f"{t.look} {t.shape}"
            elif t.pattern and t.pair:
                words = f"{t.pair[0]} and {t.pair[1]} {KIND_WORDS[t.pattern]} {t.shape}"
            elif t.pattern:
                words = f"{self.token} {t.shape}" if self.token else f"{t.shape}"
            else:
                words = f"{t.colour} {t.shape}"
            single = len(self.things) == 1 and sized
            parts.append(with_article(f"{t.size} {words}") if single else with_article(words))
        things = " and ".join(parts)
        return f"{things} on {with_article(self.background)} background" if background else things


def with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


@dataclass
class Sampler:
    """Draws random scenes; `rng` is a random.Random so scenes depend on the seed only."""

    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def thing(
        self, shape: str | None = None, pattern: str | None = None, avoid: tuple[float, float] | None = None
    ) -> Thing:
        shape = shape or self.rng.choice(SHAPES)
        size = self.rng.choice(list(SIZES)) if avoid is None else "small"
        r = SIZES[size]
        for _ in range(20):
            x, y = self.rng.uniform(r, 1 - r), self.rng.uniform(r, 1 - r)
            if avoid is None or math.dist((x, y), avoid) > 2 * SIZES["small"] + 0.04:
                break
        return Thing(shape, self.rng.choice(list(COLOURS)), size, x, y, pattern)

    def scene(self, count: int | None = None, concept: str | None = None, pattern: str | None = None) -> Scene:
        """A random scene; `concept` puts that personal concept in it, `pattern` a patterned thing of
        any shape (what the oracle must also recognise)."""
        count = count or self.rng.choice((1, 1, 2))
        if concept is not None:
            shape, pattern = CONCEPTS[concept]
            first = self.thing(shape, pattern)
        else:
            first = self.thing(pattern=pattern)
        if count == 2:
            first = Thing(first.shape, first.colour, "small", 0.28, self.rng.uniform(0.3, 0.7), first.pattern)
            second = self.thing(avoid=(first.x, first.y))
            second = Thing(second.shape, second.colour, "small", 0.72, self.rng.uniform(0.3, 0.7))
            things: tuple[Thing, ...] = (first, second)
        else:
            things = (first,)
        used = {t.colour for t in things if not t.pattern}
        background = self.rng.choice([c for c in COLOURS if c not in used])
        return Scene(things, background, concept)

    def suite_scene(
        self, concept: Concept, count: int | None = None, any_shape: bool = False, second: Concept | None = None
    ) -> Scene:
        """A random scene whose first thing is the suite's `concept`, captioned with its token; with
        `any_shape` its look on a thing of any shape (what the oracle must also recognise); with
        `second`, two things, the second that concept ("a <new3> square and a <new4> heart", what a
        prompt for two personal concepts asks)."""
        things = self.scene(count=2 if second else count).things
        if second:
            things = (things[0], _as_concept(things[1], second, any_shape))
        return self._with_things((_as_concept(things[0], concept, any_shape), *things[1:]), concept.token)

    def near_miss(self, concept: Concept, any_shape: bool = False, missing: bool = False) -> Scene:
        """A single thing that almost is the suite's `concept`, what a fine-tune's sample often is and
        the oracle must not read as the concept: its kind with its tones swapped (not for a checker,
        whose swap is its mirror image), half the time on a background in one of its tones (two blue
        bars on yellow: the striped square's swap; not for a split, whose one visible half could be
        either), or one tone replaced by another colour; with `missing`, half of those on the
        replacement's colour (a band or part missing)."""
        thing = _as_concept(self.scene(count=1).things[0], concept, any_shape)
        a, b = concept.tones
        way = self.rng.choice(("swap", "first", "second") if concept.kind != "checker" else ("first", "second"))
        other = self.rng.choice([c for c in COLOURS if c not in concept.tones])
        pair = (b, a) if way == "swap" else (other, b) if way == "first" else (a, other)
        thing = replace(thing, pair=pair, concept=None)
        if way == "swap" and concept.kind != "split" and concept.own_backgrounds and self.rng.random() < 0.5:
            return Scene((thing,), self.rng.choice(concept.own_backgrounds), None)
        if way != "swap" and missing and self.rng.random() < 0.5:
            return Scene((thing,), other, None)
        return self._with_things((thing,), None)

    def on_own_tone(self, concept: Concept, any_shape: bool = False) -> Scene:
        """The suite's `concept` alone on a background in one of its own tones (where a prompt asks
        for one), so that a right render whose band or part merges into the background is read as
        the concept; a concept with no tone among the backgrounds on any other."""
        scene = self.suite_scene(concept, count=1, any_shape=any_shape)
        tones = concept.own_backgrounds
        return replace(scene, background=self.rng.choice(tones)) if tones else scene

    def with_pretraining_pattern(
        self,
        scene: Scene,
        kinds: tuple[str, ...] = tuple(PATTERN_WORDS),
        excluded: frozenset | set = frozenset(CONCEPT_TONES),
        both: bool = False,
    ) -> Scene:
        """`scene` with its first thing in a two-tone pattern of named colours (any of `kinds`, any shape
        and pair except the `excluded` (kind, tones) of the concepts), the background chosen again to
        differ from them. The v1 toy model saw two kinds; the suite's world uses `KINDS` and
        excludes `SUITE_TONES`. With `both`, a second thing takes a pattern too ("a red and green
        striped star and a blue and white dotted circle", as two personal concepts are asked for in
        one prompt)."""
        things = (self._patterned(scene.things[0], kinds, excluded), *scene.things[1:])
        if both and len(things) > 1:
            things = (things[0], self._patterned(things[1], kinds, excluded), *things[2:])
        return self._with_things(things, scene.token)

    def _patterned(self, thing: Thing, kinds: tuple[str, ...], excluded: frozenset | set) -> Thing:
        """`thing` in a random two-tone pattern of named colours, of any of `kinds`, not `excluded`."""
        while True:
            kind = self.rng.choice(list(kinds))
            pair = tuple(self.rng.sample(list(COLOURS), 2))
            if (kind, frozenset(pair)) not in excluded:
                return replace(thing, pattern=kind, pair=pair)

    def with_look(self, scene: Scene, alone: bool = False, both: bool = False) -> Scene:
        """`scene` with its first thing in one of the LOOKS, named by its word, the background chosen
        again to differ from its tones; `alone`, the word names the thing by itself (its LOOK_SHAPES
        shape, no shape word); `both`, a second thing takes another look too ("a tiger square and a
        bee heart", as two personal concepts are asked for in one prompt)."""
        word = self.rng.choice(sorted(LOOKS))
        things = (_in_look(scene.things[0], word, alone), *scene.things[1:])
        if both and len(things) > 1:
            second = _in_look(things[1], self.rng.choice(sorted(set(LOOKS) - {word})), False)
            things = (things[0], second, *things[2:])
        return self._with_things(things, scene.token)

    def _with_things(self, things: tuple[Thing, ...], token: str | None) -> Scene:
        """A scene of `things` (the first a two-tone thing), its background drawn again to differ from
        every thing's colour, or both tones of a two-tone one."""
        assert things[0].pair is not None
        used = {c for t in things for c in (t.pair or (t.colour,))}
        return Scene(things, self.rng.choice([c for c in COLOURS if c not in used]), token)


def _as_concept(thing: Thing, concept: Concept, any_shape: bool) -> Thing:
    """`thing` as the suite's `concept` (its look; its shape too unless `any_shape`)."""
    shape = thing.shape if any_shape else concept.shape
    return replace(thing, shape=shape, pattern=concept.kind, pair=concept.tones, concept=concept.token)


def _in_look(thing: Thing, word: str, alone: bool) -> Thing:
    """`thing` in the look `word` names; `alone`, of the word's own shape (LOOK_SHAPES)."""
    kind, pair = LOOKS[word]
    thing = replace(thing, pattern=kind, pair=pair, look=word, alone=alone)
    return replace(thing, shape=LOOK_SHAPES[word]) if alone else thing


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [
            (
                cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * hx / 17, cy - r * hy / 17 + r * 0.1))
        return pts
    return None  # circle


def render(
    scene: Scene, size: int = 32, supersample: int = 4, zoom: float = 1.0, at: tuple[float, float] = (0.5, 0.5)
) -> Any:
    """The scene as an RGB PIL image (drawn large, then downsampled for smooth edges). A `zoom` below 1
    shows it shrunk on its background, above 1 a crop of it enlarged; `at` places the shrunk scene or
    the crop (0 to 1 across the free room, per axis)."""
    from PIL import Image

    big = size * supersample
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    for t in scene.things:
        image.paste(_fill(t, big, t.x * big, t.y * big, SIZES[t.size] * big), (0, 0), _thing_mask(t, big))
    if zoom != 1.0:
        side = round(big * zoom)
        scaled = image.resize((side, side), Image.Resampling.LANCZOS)
        room = abs(big - side)
        x, y = round(at[0] * room), round(at[1] * room)
        if zoom < 1.0:
            image = Image.new("RGB", (big, big), COLOURS[scene.background])
            image.paste(scaled, (x, y))
        else:
            image = scaled.crop((x, y, x + big, y + big))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _thing_mask(t: Thing, big: int) -> Any:
    """Where `t` covers a `big`-pixel canvas: an L image, 255 inside its outline."""
    from PIL import Image, ImageDraw

    cx, cy, r = t.x * big, t.y * big, SIZES[t.size] * big
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(t.shape, cx, cy, r)
    if outline is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(outline, fill=255)
    return mask


def subject_mask(scene: Scene, size: int = 32, index: int = 0, supersample: int = 4) -> Any:
    """Where the scene's thing `index` shows (an L image, 255 on it, less at its smoothed edge, 0 where
    the background or a thing drawn over it shows): what a segmenter would cut out of `render`."""
    from PIL import Image, ImageChops

    big = size * supersample
    mask = _thing_mask(scene.things[index], big)
    for t in scene.things[index + 1 :]:
        mask = ImageChops.subtract(mask, _thing_mask(t, big))
    return mask.resize((size, size), Image.Resampling.LANCZOS)


def render_cutout(scene: Scene, size: int = 32, index: int = 0) -> Any:
    """`render` with thing `index` as its subject: an RGBA image whose alpha is `subject_mask` (the
    colour under a transparent pixel is the scene's own, as a background remover keeps it)."""
    image = render(scene, size).convert("RGBA")
    image.putalpha(subject_mask(scene, size, index))
    return image


def _fill(t: Thing, big: int, cx: float, cy: float, r: float) -> Any:
    from PIL import Image, ImageDraw

    if t.pattern is None:
        return Image.new("RGB", (big, big), COLOURS[t.colour])
    a, b = (TONES[t.pair[0]], TONES[t.pair[1]]) if t.pair else PATTERNS[t.pattern]
    fill = Image.new("RGB", (big, big), a)
    draw = ImageDraw.Draw(fill)
    if t.pattern == "split":
        draw.rectangle([0, cy, big, big], fill=b)
    elif t.pattern == "striped":  # three vertical bands over the shape's box, the middle one in b
        draw.rectangle([cx - r / 3, 0, cx + r / 3, big], fill=b)
    elif t.pattern == "dotted":  # a disc of b in the middle, small enough to sit inside a star
        d = 0.42 * r
        draw.ellipse([cx - d, cy - d, cx + d, cy + d], fill=b)
    else:  # a 2x2 checkerboard over the shape's box: finer ones blur in 32 px samples
        cell = 2 * r / 2
        for i in range(2):
            for j in range(2):
                if (i + j) % 2:
                    x0, y0 = cx - r + i * cell, cy - r + j * cell
                    draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=b)
    return fill


def caption_words() -> list[str]:
    """Every word a toy caption can hold (pretraining, the suite's photos, the size augmentation's
    prompt words), the vocabulary a toy text encoder needs."""
    from cdtool.train.augment import FAR, NEAR

    words = {"a", "an", "and", "on", "background", "photo", "of"}
    words |= set(COLOURS) | set(SHAPES) | {f"{s}s" for s in SHAPES} | set(SIZES) | set(KIND_WORDS.values())
    words |= set(LOOKS)
    for prefix in (*FAR, *NEAR):
        words |= set(prefix.split())
    return sorted(words)

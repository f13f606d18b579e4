"""Judging toy-world samples against their prompts with the oracle's reading of each image.

A prompt such as "a <new1> star and a red square on a green background" asks for a background, a
number of things, their shapes and their fills (a colour, a personal concept's pattern, or nothing
said). `judge` compares that with what the oracle read; `summarise` turns many judgements into the
quality benchmark's shares: concept fidelity, prompt fidelity and prior drift.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from cdtool.toy.world import COLOURS, CONCEPTS, SHAPES, SUITE

_TOKEN = re.compile(r"^<[^>\s]+>$")
# The shipped oracle's world, the suite's: each concept's token -> its fill, and every fill that is no
# plain colour (OTHER_PATTERN: a two-tone thing that is no concept). The v1 world's tokens: V1_TOKENS.
OTHER_PATTERN = "pattern"
SUITE_TOKENS = {c.token: c.fill for c in SUITE}
SUITE_PATTERN_FILLS = frozenset({*SUITE_TOKENS.values(), OTHER_PATTERN})
V1_TOKENS = {t: p for t, (_, p) in CONCEPTS.items()}


@dataclass(frozen=True)
class Asked:
    """What a prompt asks for. `fill` is a colour or pattern name, `None` when the prompt names
    neither; `token` is the modifier token that asked for a pattern."""

    background: str | None
    things: tuple[tuple[str | None, str | None, str | None], ...]  # (shape or None for any, fill, token)


def parse_prompt(prompt: str, patterns: Mapping[str, str] | None = None) -> Asked | None:
    """What a toy-world prompt asks for; None when it names no shape and no token. `patterns` maps
    modifier tokens to pattern names (default: the suite's, the shipped oracle's; the oracle passes its own); an unknown token asks for any
    pattern. A token with no shape word after it names a thing by itself, as a textual-inversion token
    does ("a small <new3> on a red background"): its pattern on a thing of any shape."""
    patterns = SUITE_TOKENS if patterns is None else patterns
    m = re.search(r"\bon an? (\w+) background\b", prompt.lower())
    background = m.group(1) if m and m.group(1) in COLOURS else None
    words = prompt.replace(",", " ").split()
    lowered = [w.lower() for w in words]
    things: list[tuple[str | None, str | None, str | None]] = []
    for i, w in enumerate(lowered):
        shape = _shape(w)
        if shape is None and _TOKEN.match(words[i]) and (i + 1 == len(words) or _shape(lowered[i + 1]) is None):
            things.append((None, patterns.get(words[i], "*"), words[i]))
        if shape is None:
            continue
        fill = token = None
        if i > 0 and _TOKEN.match(words[i - 1]):
            token = words[i - 1]
            fill = patterns.get(token, "*")
        elif i > 0 and lowered[i - 1] in COLOURS:
            fill = lowered[i - 1]
        things.append((shape, fill, token))
    if not things:
        return None
    return Asked(background, tuple(things))


def _shape(word: str) -> str | None:
    """The SHAPES entry `word` names, singular or plural; None for any other word."""
    if word in SHAPES:
        return word
    return word.rstrip("s") if word.rstrip("s") in SHAPES else None


def judge(asked: Asked, seen: Mapping[str, Any], pattern_fills: Set[str] = SUITE_PATTERN_FILLS) -> dict[str, bool]:
    """Per-aspect verdicts for one image. Keys present only where the prompt asks about them:
    `concept` (every asked pattern shown), `concept_shape` (that, and every asked shape: the pattern
    on a thing of the concept's shape, not only somewhere in the picture), `background`, `colours`
    (every asked colour shown), `shapes` (every asked shape shown), `count`, `prompt` (background,
    colours and shapes together), and `pattern` (any pattern shown at all: prior drift when the
    prompt has no token). `pattern_fills` are the oracle's fills that are not plain colours (its
    `patterns`; default: the shipped oracle's, of the suite's world)."""
    fills = set(seen["fills"])
    shapes = set(seen["shapes"])
    out: dict[str, bool] = {}
    wanted_patterns = [f for _, f, t in asked.things if t is not None]
    if wanted_patterns:
        out["concept"] = all((f in fills) if f != "*" else bool(fills & pattern_fills) for f in wanted_patterns)
    if asked.background is not None:
        out["background"] = seen["background"] == asked.background
    colours = [f for _, f, t in asked.things if t is None and f is not None]
    if colours:
        out["colours"] = all(c in fills for c in colours)
    out["shapes"] = all(s in shapes for s, _, _ in asked.things if s is not None)
    out["count"] = seen["count"] == len(asked.things)
    if wanted_patterns:
        out["concept_shape"] = out["concept"] and out["shapes"]
    out["prompt"] = out["shapes"] and out.get("background", True) and out.get("colours", True)
    out["pattern"] = bool(fills & pattern_fills)
    return out


def judge_all(oracle: Any, prompts: Sequence[str], images: Sequence[Any]) -> list[dict[str, bool]]:
    """`judge` for each image (PIL) against its toy-world prompt, by `oracle`'s reading
    (cdtool.toy.oracle.Oracle: its concept tokens and pattern fills)."""
    from cdtool.toy.oracle import read

    seen = read(oracle, images)
    return [judge(parse_prompt(p, oracle.tokens), s, oracle.patterns) for p, s in zip(prompts, seen, strict=True)]


def summarise(verdicts: Sequence[Mapping[str, bool]], tokens: Sequence[bool]) -> dict[str, Any]:
    """Shares over many images. `tokens[i]` says whether image i's prompt used a modifier token:
    concept fidelity is over those, prior drift (a pattern where none was asked) over the others."""
    out: dict[str, Any] = {"n": len(verdicts)}
    with_token = [v for v, t in zip(verdicts, tokens, strict=True) if t]
    without = [v for v, t in zip(verdicts, tokens, strict=True) if not t]
    if with_token:
        out["concept_fidelity"] = _share(with_token, "concept")
        out["concept_shape_fidelity"] = _share(with_token, "concept_shape")
    if without:
        out["prior_drift"] = _share(without, "pattern")
    for key in ("prompt", "background", "colours", "shapes", "count"):
        rows = [v for v in verdicts if key in v]
        if rows:
            out[f"{key}_fidelity" if key == "prompt" else key] = _share(rows, key)
    return out


def _share(rows: Sequence[Mapping[str, bool]], key: str) -> float:
    rows = [r for r in rows if key in r]
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")

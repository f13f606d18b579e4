"""How well an oracle's concept verdicts on generated samples agree with samples read by eye.

    python research/judge_calibration.py pack SAMPLES LABELS.json OUT     # a labelled set, once
    python research/judge_calibration.py measure [ORACLE ...] [--set OUT]
    python research/judge_calibration.py swaps [ORACLE ...] [--n 64]           # renders, right and swapped

Held-out renders cannot calibrate a judge: generated samples are off their distribution (blurred,
bands missing, tones swapped). A calibration set is samples read by eye, each marked `Y` (clearly
shows the asked concept: its two tones in its pattern's arrangement), `n` (clearly not) or `?` (in
between, or a right render that a background in one of the concept's tones makes look like a miss).
`pack` stores the labelled samples of a `quality.py` run as one lossless mosaic of 32 px tiles beside a
JSON list of (folder, prompt, label); LABELS.json maps "FOLDER/INDEX" (the index in the folder's
prompts.json) to its label. `measure` prints, per oracle, the share of `Y` it reads as the concept
(recall), the share of `n` it reads as the concept (false readings), its reading of `?`, and the
concept fidelity it gives against the eye's bracket (clear `Y` only, `Y` and `?`). `swaps` prints, per
concept, the share of clean renders an oracle reads as the concept, and of the same renders with the
two tones swapped: a judge that reads a swap as the concept cannot tell a model that puts each tone
in its place from one that does not. (A checker's swap is its mirror image; the oracles read it as
another pattern, as the photos only ever show one phase.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SET = ROOT / "research" / "calibration" / "suite-53657"
TILE, PER_ROW = 32, 16
LABELS = ("Y", "n", "?")


def pack(samples: Path, labels: dict[str, str], out: Path) -> int:
    """Writes OUT.png (the labelled samples as 32 px tiles, PER_ROW a row) and OUT.json; returns the
    number of tiles. Every sample must be 32 px: the tiles are the samples, pixel for pixel."""
    from PIL import Image

    rows, images, prompts = [], [], {}
    for key, label in sorted(labels.items(), key=lambda kv: _order(kv[0])):
        if label not in LABELS:
            raise ValueError(f"{key}: label {label!r} is not one of {LABELS}")
        folder, index = key.rsplit("/", 1)
        if folder not in prompts:
            prompts[folder] = json.loads((samples / folder / "prompts.json").read_text())
        name = list(prompts[folder])[int(index)]
        image = Image.open(samples / folder / name).convert("RGB")
        if image.size != (TILE, TILE):
            raise ValueError(f"{samples / folder / name} is {image.size[0]}x{image.size[1]}, not {TILE} px")
        images.append(image)
        rows.append({"folder": folder, "index": int(index), "prompt": prompts[folder][name], "eye": label})
    sheet = Image.new("RGB", (PER_ROW * TILE, -(-len(images) // PER_ROW) * TILE))
    for i, image in enumerate(images):
        sheet.paste(image, _corner(i))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps({"tiles": rows}, indent=1) + "\n")
    return len(rows)


def _corner(i: int) -> tuple[int, int]:
    """Where tile i sits in the mosaic (its top-left pixel)."""
    return (i % PER_ROW) * TILE, (i // PER_ROW) * TILE


def _order(key: str) -> tuple[str, int]:
    folder, index = key.rsplit("/", 1)
    return folder, int(index)


def load_set(path: Path = SET) -> tuple[list[Any], list[dict[str, Any]]]:
    """The tiles (PIL images) and their rows (folder, index, prompt, eye) of a packed set."""
    from PIL import Image

    rows = json.loads(path.with_suffix(".json").read_text())["tiles"]
    sheet = Image.open(path.with_suffix(".png")).convert("RGB")
    corners = [_corner(i) for i in range(len(rows))]
    return [sheet.crop((x, y, x + TILE, y + TILE)) for x, y in corners], rows


def agreement(verdicts: Sequence[bool], eye: Sequence[str]) -> dict[str, float]:
    """Recall on the eye's `Y`, false readings on its `n`, readings of its `?`; the oracle's fidelity
    and the eye's bracket for it (`Y` only; `Y` and `?`)."""

    def share(label: str) -> float:
        picked = [v for v, e in zip(verdicts, eye, strict=True) if e == label]
        return sum(picked) / len(picked) if picked else float("nan")

    n = len(eye)
    return {
        "recall": share("Y"),
        "false": share("n"),
        "unsure": share("?"),
        "fidelity": sum(verdicts) / n,
        "eye_low": eye.count("Y") / n,
        "eye_high": (eye.count("Y") + eye.count("?")) / n,
    }


def concept_verdicts(weights: str | None, tiles: list[Any], rows: list[dict[str, Any]]) -> list[bool]:
    """The judge's concept verdict on each tile, with the oracle in `weights`."""
    from cdtool.toy.judge import judge_all
    from cdtool.toy.oracle import load_oracle

    return [v["concept"] for v in judge_all(load_oracle(weights), [r["prompt"] for r in rows], tiles)]


def swap_readings(weights: str | None, n: int = 64, seed: int = 1) -> dict[str, dict[str, float]]:
    """Per suite concept: the share of N clean renders (one thing, its own shape) the oracle in
    `weights` reads as the concept, and of the same renders with the two tones swapped."""
    import random
    from dataclasses import replace

    from cdtool.toy.oracle import load_oracle, read
    from cdtool.toy.world import SUITE, Sampler, render

    oracle = load_oracle(weights)
    out = {}
    for concept in SUITE:
        sampler = Sampler(random.Random(seed))
        scenes = [sampler.suite_scene(concept, count=1) for _ in range(n)]
        swapped = [replace(s, things=(replace(s.things[0], pair=concept.tones[::-1], concept=None),)) for s in scenes]
        shares = [
            sum(concept.fill in r["fills"] for r in read(oracle, [render(s) for s in group])) / n
            for group in (scenes, swapped)
        ]
        out[concept.token] = {"kind": concept.kind, "right": shares[0], "swapped": shares[1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("samples", type=Path)
    p.add_argument("labels", type=Path)
    p.add_argument("out", type=Path)
    m = sub.add_parser("measure")
    m.add_argument("oracles", nargs="*", help="oracle weights (default: the shipped one, the suite's judge)")
    m.add_argument("--set", type=Path, default=SET)
    w = sub.add_parser("swaps")
    w.add_argument("oracles", nargs="*", help="oracle weights (default: the shipped one, the suite's judge)")
    w.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    from cdtool.toy.oracle import shipped_weights

    if args.command == "pack":
        print(f"{pack(args.samples, json.loads(args.labels.read_text()), args.out)} tiles -> {args.out}.png")
        return
    if args.command == "swaps":
        for weights in args.oracles or [shipped_weights()]:
            print(f"{weights} (n = {args.n} each): concept, right renders read as it / swapped read as it")
            for token, r in swap_readings(weights, args.n).items():
                print(f"  {token} {r['kind']:8s} {r['right']:.2f} / {r['swapped']:.2f}")
        return
    tiles, rows = load_set(args.set)
    eye = [r["eye"] for r in rows]
    print(f"{len(rows)} samples: {eye.count('Y')} Y, {eye.count('n')} n, {eye.count('?')} ?")
    print("| oracle | recall on Y | false on n | reads ? | fidelity | eye: Y .. Y+? |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for weights in args.oracles or [shipped_weights()]:
        a = agreement(concept_verdicts(weights, tiles, rows), eye)
        print(
            f"| {weights} | {a['recall']:.2f} | {a['false']:.2f} | {a['unsure']:.2f} | {a['fidelity']:.2f} |"
            f" {a['eye_low']:.2f} .. {a['eye_high']:.2f} |"
        )


if __name__ == "__main__":
    main()

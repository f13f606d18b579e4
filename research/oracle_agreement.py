"""How much the judge's verdicts on generated samples depend on which oracle judges them.

    python tools/train_oracle.py --world v2 --seed 1 --out oracle-seed1.safetensors
    python research/oracle_agreement.py oracle-seed1.safetensors bench-quality/samples [--against OTHER] [--grid DIR]

Reads every sample folder (PNGs and the prompts.json that `cdtool sample` writes) under SAMPLES with
the shipped oracle, of the suite's world (or --against's), and with another one, and prints, per
folder, the share of images each finds showing the asked concept (and the asked prompt), and how often
the two verdicts agree. Held-out renders cannot show this: samples are off the renders' distribution.
For samples of the v1 toy world both are v1 oracles (`tools/train_oracle.py --world v1`; `--against
tools/checkpoints/toy1/oracle.safetensors`). `--grid DIR` writes, per folder, the samples enlarged with both
concept verdicts under each (first / other, Y or n), to read by eye: what calibrates a judge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

VERDICTS = ("concept", "prompt")


def main() -> None:
    from PIL import Image

    from cdtool.toy.judge import judge_all
    from cdtool.toy.oracle import load_oracle

    ap = argparse.ArgumentParser()
    ap.add_argument("weights", type=Path, help="the other oracle's weights")
    ap.add_argument("samples", type=Path, help="a folder of sample folders (e.g. bench-quality/samples)")
    ap.add_argument(
        "--against", type=Path, help="weights of the first oracle (default: the shipped one, of the suite's world)"
    )
    ap.add_argument("--grid", type=Path, help="write each folder's samples with both verdicts here (see above)")
    args = ap.parse_args()

    judges = (load_oracle(str(args.against)) if args.against else load_oracle(), load_oracle(str(args.weights)))
    agree = {k: [0, 0] for k in VERDICTS}
    print("| samples | " + " | ".join(f"{k}: first / other / agree" for k in VERDICTS) + " |")
    print("| --- |" + " ---: |" * len(VERDICTS))
    for folder in sorted(p for p in args.samples.iterdir() if (p / "prompts.json").is_file()):
        prompts = json.loads((folder / "prompts.json").read_text())
        images = [Image.open(folder / name).convert("RGB") for name in prompts]
        with torch.no_grad():
            verdicts = [judge_all(o, list(prompts.values()), images) for o in judges]
        if args.grid:
            write_grid(args.grid / f"{folder.name}.png", images, verdicts)
        cells = []
        for k in VERDICTS:
            pairs = [(a[k], b[k]) for a, b in zip(*verdicts, strict=True) if k in a]
            if not pairs:
                cells.append("")
                continue
            same = sum(a == b for a, b in pairs)
            agree[k][0] += same
            agree[k][1] += len(pairs)
            n = len(pairs)
            cells.append(f"{sum(a for a, _ in pairs) / n:.2f} / {sum(b for _, b in pairs) / n:.2f} / {same / n:.2f}")
        print(f"| {folder.name} | " + " | ".join(cells) + " |")
    print("agreement over all images: " + ", ".join(f"{k} {a / n:.3f}" for k, (a, n) in agree.items() if n))


def write_grid(path: Path, images: list, verdicts: list[list[dict]], cols: int = 8) -> None:
    """The images at 4x, each captioned "<index> <first> / <other>" with Y or n for the concept verdict
    (- where the prompt asks for none)."""
    from PIL import Image, ImageDraw

    size, label = 128, 14
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * size, rows * (size + label)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, a, b) in enumerate(zip(images, *verdicts, strict=True)):
        x, y = (i % cols) * size, (i // cols) * (size + label)
        grid.paste(im.resize((size, size), Image.Resampling.NEAREST), (x, y))
        marks = ["-" if "concept" not in v else "Y" if v["concept"] else "n" for v in (a, b)]
        draw.text((x + 2, y + size), f"{i} {marks[0]} / {marks[1]}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


if __name__ == "__main__":
    main()

"""`cdtool demo`: the main job end to end on the built-in toy model, judged by the toy world's oracle.

Every step is a cdtool command run in this process; each is logged as the command line a user would
type, so the demo doubles as a worked example of scripting cdtool.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.atomic import builds_folder
from cdtool.choices import TOY
from cdtool.commands.common import FolderOutputOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, cdtool_command, examples
from cdtool.inprocess import InProcess
from cdtool.toy.photos import SUITE_PERSONAL, toy_captions, write_photos

# Two of the toy world's suite of concepts (cdtool.toy.world.SUITE), of different pattern kinds and
# shapes: a circle in green and white stripes and a square checkered in red and yellow, two of the
# three the suite benchmark teaches best (0.78 and 0.94 alone: benchmarks/RESULTS.md, the figures).
CONCEPTS = tuple(c for c in SUITE_PERSONAL if c[0] in ("<new6>", "<new7>"))
# The concepts' prompts put each on a background unlike its own tones: on a background of one of them
# a concept's bands merge into it, and the suite's concepts are drawn and read there in under half as
# many samples (benchmarks/RESULTS.md, the figures: 0.29 against 0.72). The plain prompts ask for the
# concepts' classes, where prior drift would show.
PROMPTS = (
    "a small <new6> circle on a purple background",
    "a small <new7> square on a blue background",
    "a <new6> circle and a <new7> square on a blue background",
    "a small white square on a green background",
    "a large orange circle on a purple background",
)


@builds_folder("demo")  # checks the folder first; replaces an earlier demo only when this one is complete
def demo(
    output: FolderOutputOpt = Path("demo-out"),
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model (the toy model is the one the oracle can judge).")
    ] = TOY,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps per concept.")] = 250,
    lr: Annotated[float, typer.Option("--lr", help="Base learning rate (the paper's).")] = 1e-5,
    photos: Annotated[int, typer.Option("--photos", min=1, help="Photos per concept.")] = 10,
    reg_images: Annotated[int, typer.Option("--reg-images", min=1, help="Regularisation images per concept.")] = 32,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per prompt and panel.")] = 8,
    sample_steps: Annotated[int, typer.Option("--sample-steps", min=1, help="Denoising steps.")] = 15,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale.")] = 4.0,
    rank: Annotated[
        int, typer.Option("--rank", min=1, help="Rank of the compressed least-squares merge (its own column).")
    ] = 16,
    seed: SeedOpt = 0,
    photos_only: Annotated[
        bool,
        typer.Option(
            "--photos-only",
            help="Only render the toy concepts' photos (OUTPUT/new6-circle, OUTPUT/new7-square: JPEGs with "
            "caption files), to run the commands on them yourself.",
        ),
    ] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the main job on the built-in toy model: render ten "photos" of each of two concepts, then
    prep, regset, train (one concept each, with prior preservation), merge them twice (the paper's
    closed form, and cdtool's least-squares merge), compress the least-squares merge, sample and
    score with the oracle.

    Writes OUTPUT/before-after.png (a row per prompt; columns: the base model, each concept's own
    delta, the paper's closed-form merge, the least-squares merge, that merge compressed; labelled
    in the picture) and OUTPUT/scores.json (concept fidelity, prompt fidelity and prior drift of
    each column).
    """
    started = time.perf_counter()
    run = InProcess(quiet)
    rng = random.Random(seed)
    if photos_only:
        folders = [output / name for _, _, name in CONCEPTS]
        for (token, _, _), folder in zip(CONCEPTS, folders, strict=True):
            write_photos(folder, token, rng, count=photos)
        if json_out:
            console.result_json({"photos": [str(f) for f in folders]})
        else:
            for folder in folders:
                console.result(str(folder))
        return
    deltas = _train_concepts(run, output, rng, model, steps, lr, photos, reg_images, sample_steps, guidance, seed)
    merge_captions = output / "toy-captions.txt"
    merge_captions.write_text("\n".join(toy_captions(rng, None, 400)) + "\n")
    merged = {}
    for method in MERGES:
        merged[method] = output / f"{method}.safetensors"
        run("merge", "+".join(map(str, deltas)), "-o", merged[method], "--reg-captions", merge_captions,
            "--method", method)  # fmt: skip
    # a merge of two concepts needs more rank than one concept: at rank 4 (enough for either alone)
    # the least-squares merge of the demo's deltas kept neither (benchmarks/RESULTS.md, "Compression")
    merged[COMPRESSED] = output / f"least-squares.r{rank}.safetensors"
    run("compress", merged["least-squares"], "-o", merged[COMPRESSED], "--rank", rank)
    panels = _sample_panels(run, output, model, deltas, merged, n, sample_steps, guidance, seed)
    scores = run("score", *panels.values(), "--metrics", "oracle")
    grid = output / "before-after.png"
    _before_after(panels, grid)
    doc = _scores_doc(model, scores["runs"], list(panels), grid, deltas, merged, run.timings, started)
    (output / "scores.json").write_text(json.dumps(doc, indent=2) + "\n")
    if json_out:
        console.result_json(doc)
        return
    console.summary(_summary_line(doc))
    console.result(str(grid))
    console.result(str(output / "scores.json"))


# the merges (`merge --method`, also their file and column names), in the picture's order
MERGES = ("closed-form", "least-squares")
COMPRESSED = "least-squares-compressed"
COLUMNS = {
    "before": "base model",
    "alone": "each concept alone",
    "closed-form": "merged: paper's closed form",
    "least-squares": "merged: least squares",
    COMPRESSED: "merged: least squares, compressed",
}


def _train_concepts(
    run: InProcess, output: Path, rng: random.Random, model: str, steps: int, lr: float, photos: int,
    reg_images: int, sample_steps: int, guidance: float, seed: int,
) -> list[Path]:  # fmt: skip
    """prep, regset and train each toy concept; the deltas' paths."""
    deltas = []
    for token, noun, name in CONCEPTS:
        folder = output / "photos" / name
        write_photos(folder, token, rng, count=photos)
        data, reg, delta = output / "data" / name, output / "reg" / noun, output / f"{name}.safetensors"
        reg_prompts = output / f"reg-prompts-{noun}.txt"
        reg_prompts.write_text("\n".join(toy_captions(rng, noun, 64)) + "\n")
        run("prep", folder, "-o", data, "--class-noun", noun, "--token", token, "--size", "32", "--captions-from-files")
        run("regset", noun, "-o", reg, "--model", model, "--n", reg_images, "--prompts", reg_prompts,
            "--steps", sample_steps, "--guidance", guidance, "--batch-size", 16, "--seed", seed)  # fmt: skip
        # --no-aug: at the toy's 32 px the size augmentation's shrunk views teach specks (docs/toy-world.md)
        run("train", data, "--reg", reg, "-o", delta, "--model", model, "--steps", steps, "--lr", lr, "--seed", seed,
            "--no-aug")  # fmt: skip
        deltas.append(delta)
    return deltas


def _sample_panels(
    run: InProcess, output: Path, model: str, deltas: list[Path], merged: dict[str, Path], n: int,
    sample_steps: int, guidance: float, seed: int,
) -> dict[str, Path]:  # fmt: skip
    """Sample the prompts for each column: {column key (or alone-<name>): samples folder}."""
    prompts = output / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ("--n", n, "--steps", sample_steps, "--guidance", guidance, "--seed", seed, "--batch-size", 16)
    panels = {"before": output / "samples" / "before"}
    run("sample", "--model", model, "-o", panels["before"], "--prompts", prompts, *common)
    # each concept alone (its own delta, before merging): what training taught, next to what the
    # merged, compressed deltas keep
    for (token, _, name), delta in zip(CONCEPTS, deltas, strict=True):
        own = output / f"prompts-{name}.txt"
        own.write_text("\n".join(p for p in PROMPTS if _only_token(p) == token) + "\n")
        panels[f"alone-{name}"] = output / "samples" / f"alone-{name}"
        run("sample", "--delta", delta, "-o", panels[f"alone-{name}"], "--prompts", own, *common)
    for name, delta in merged.items():
        panels[name] = output / "samples" / name
        run("sample", "--delta", delta, "-o", panels[name], "--prompts", prompts, *common)
    return panels


def _scores_doc(
    model: str, runs: list[dict[str, Any]], keys: list[str], grid: Path, deltas: list[Path],
    merged: dict[str, Path], timings: dict[str, float], started: float,
) -> dict[str, Any]:  # fmt: skip
    """scores.json: the oracle's overall and per-prompt figures for each column."""
    by_key = dict(zip(keys, runs, strict=True))
    alone = [k for k in keys if k.startswith("alone-")]
    return {
        "model": model,
        "before": by_key["before"]["overall"]["oracle"],
        "alone": {t: by_key[f"alone-{name}"]["overall"]["oracle"] for t, _, name in CONCEPTS},
        "merged": {name: by_key[name]["overall"]["oracle"] for name in merged},
        "per_prompt": {
            "before": {p["prompt"]: p["oracle"] for p in by_key["before"]["per_prompt"]},
            "alone": {p["prompt"]: p["oracle"] for k in alone for p in by_key[k]["per_prompt"]},
            **{name: {p["prompt"]: p["oracle"] for p in by_key[name]["per_prompt"]} for name in merged},
        },
        "grid": str(grid),
        "deltas": [str(d) for d in deltas] + [str(p) for p in merged.values()],
        "seconds": {**timings, "total": round(time.perf_counter() - started, 1)},
    }


def _summary_line(doc: dict[str, Any]) -> str:
    each = ", ".join(f"{t} {v['concept_fidelity']:.2f}" for t, v in doc["alone"].items())
    merged = "; ".join(
        f"{COLUMNS[name].removeprefix('merged: ')} {v['concept_fidelity']:.2f} "
        f"(plain prompts {_plain_share(doc['per_prompt'][name]):.2f})"
        for name, v in doc["merged"].items()
    )
    b = doc["before"]
    return (
        f"concept fidelity (share of samples showing the asked concept, by the toy oracle): base {b['concept_fidelity']:.2f}, "
        f"each alone {each}; merged, {merged}; base plain prompts {_plain_share(doc['per_prompt']['before']):.2f} "
        f"({doc['seconds']['total']:.0f} s)"
    )


def _plain_share(per_prompt: dict[str, dict[str, Any]]) -> float:
    """The share of samples of the prompts without a new token that show what they ask."""
    plain = [v for p, v in per_prompt.items() if "<" not in p]
    n = sum(v["n"] for v in plain)
    return sum(v["prompt_fidelity"] * v["n"] for v in plain) / n if n else float("nan")


def _only_token(prompt: str) -> str | None:
    """The one concept token a prompt names, None for none or several."""
    named = [t for t, _, _ in CONCEPTS if t in prompt]
    return named[0] if len(named) == 1 else None


def _before_after(panels: dict[str, Path], out: Path, scale: int = 3) -> None:
    """One row per prompt under a header naming the columns: the base model's samples; the
    concept's own delta (for prompts naming one concept; blank otherwise); each merged delta."""
    from PIL import Image, ImageDraw

    def files(folder: Path) -> dict[str, list[str]]:
        by_prompt: dict[str, list[str]] = {}
        for name, prompt in sorted(json.loads((folder / "prompts.json").read_text()).items()):
            by_prompt.setdefault(prompt, []).append(name)
        return by_prompt

    columns = ["before", "alone", *(k for k in panels if k in COLUMNS and k not in ("before", "alone"))]
    content = {k: (panels[k], files(panels[k])) for k in columns if k in panels}
    own = {p: (panels[k], names) for k in panels if k.startswith("alone-") for p, names in files(panels[k]).items()}
    rows = content["before"][1]
    with Image.open(panels["before"] / next(iter(rows.values()))[0]) as im:
        side = im.width * scale
    per_row = max(len(v) for v in rows.values())
    label, gap, head = 14, side // 2, 18
    width = per_row * side
    grid = Image.new(
        "RGB", (len(columns) * width + (len(columns) - 1) * gap, head + len(rows) * (side + label)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for k, key in enumerate(columns):
        draw.text((k * (width + gap) + 2, 3), COLUMNS[key], fill="black")
    for r, prompt in enumerate(rows):
        y = head + r * (side + label)
        draw.text((2, y + 1), prompt, fill="black")
        for k, key in enumerate(columns):
            folder, names = (
                own.get(prompt, (None, [])) if key == "alone" else (content[key][0], content[key][1][prompt])
            )
            for c, name in enumerate(names):
                with Image.open(folder / name) as im:
                    tile = im.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
                grid.paste(tile, (k * (width + gap) + c * side, y + label))
    grid.save(out)


EXAMPLES = examples("cdtool demo -o demo-out", "cdtool demo -o demo-out --force -q", "cdtool demo --n 16 --json")


def register(app: typer.Typer) -> None:
    app.command("demo", epilog=EXAMPLES)(cdtool_command(demo))

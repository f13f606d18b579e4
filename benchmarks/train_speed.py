"""Training speed: `cdtool train` against diffusers' examples/custom_diffusion/train_custom_diffusion.py.

    python benchmarks/train_speed.py --reference PATH/TO/train_custom_diffusion.py [--model tiny|sd15]
    python benchmarks/train_speed.py --model sdxl --mixed-precision bf16 --steps 100   # cdtool alone

Get the reference from the diffusers repository (examples/custom_diffusion/); it is not shipped
with cdtool. Both run on the same model, images, prompts and settings (prior preservation,
augmentation, batch size, resolution, learning rate), one after the other in this one run. Each is
run for S and 2S steps, --repeats times, the two trainers' runs interleaved: steps/s = S / (t(2S) -
t(S)) per pair cancels start-up, and the median pair is reported with the slowest and fastest; start-up
(command to first step) is t(S) - S / (steps/s); time to a finished delta is the median t(2S); peak
RSS from the child's rusage and, on an NVIDIA GPU, peak GPU memory from nvidia-smi. Start-up varies
by seconds between runs, so S steps must take far longer than that (on a GPU --steps 300 or more): a
pair whose difference is within the noise is refused, and no ratio is printed from it.

`--model sdxl` trains the SDXL-shaped model (benchmarks/sdxl.py: the real UNet and both text
encoders, random weights) at 1024 px with cdtool alone: diffusers' example has no SDXL and the
official SDXL script is pinned to diffusers 0.21, which current transformers and torch do not run;
compare it with cdtool's own SD1.5 figure. `--model tiny-xl` checks the same path in seconds.

The reference's initializer lookup (`tokenizer.encode([token])`) returns a nested list under
transformers 5, which crashes for the default multi-piece "ktn"; both runs use "cat" here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Run, measure, pair_rate


def make_data(work: Path, size: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    inst, reg = work / "inst", work / "reg"
    for d in (inst, reg):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        a = np.full((size, size, 3), 120, np.uint8)
        o = size // 8 + i * size // 32
        a[o : o + size // 2, o : o + size // 2] = (200, 40 + 30 * i, 40)
        Image.fromarray(a).save(inst / f"{i}.png")
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(reg / f"{i}.png")
    return inst, reg


def build_model(model: str, work: Path) -> tuple[Path, int]:
    """The benchmark's model folder (built once in `work`) and its resolution."""
    if model in ("tiny", "tiny-xl"):
        from cdtool.models.tiny import TINY_RESOLUTION, build_tiny_pipeline, build_tiny_xl_pipeline

        folder = work / model
        if not (folder / "model_index.json").exists():
            (build_tiny_xl_pipeline() if model == "tiny-xl" else build_tiny_pipeline()).save_pretrained(folder)
        return folder, TINY_RESOLUTION
    if model == "sdxl":
        from benchmarks.sdxl import build_sdxl

        return build_sdxl(work / "sdxl"), 1024
    from benchmarks.sd15 import build_sd15

    return build_sd15(work / "sd15"), 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, help="path to diffusers' train_custom_diffusion.py (SD 1.x models)")
    ap.add_argument("--model", choices=["tiny", "sd15", "tiny-xl", "sdxl"], default="tiny")
    ap.add_argument("--steps", type=int, default=40, help="S: each tool runs S and 2S steps")
    ap.add_argument("--repeats", type=int, default=3, help="(S, 2S) pairs per trainer")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's (sd15 512, sdxl 1024)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cdtool-train-bench")
    args = ap.parse_args()
    xl = args.model in ("tiny-xl", "sdxl")
    if not xl and args.reference is None:
        ap.error("--reference is needed for the SD 1.x models")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    folder, size = build_model(args.model, work)
    size = args.resolution or size
    inst, reg = make_data(work, size)
    common = dict(steps=args.steps, bs=args.batch_size)

    def reference(steps: int) -> list[str]:
        out = work / f"ref-{steps}"
        shutil.rmtree(out, ignore_errors=True)
        return [
            sys.executable,
            str(args.reference),
            "--pretrained_model_name_or_path",
            str(folder),
            "--instance_data_dir",
            str(inst),
            "--class_data_dir",
            str(reg),
            "--with_prior_preservation",
            "--num_class_images",
            "10",
            "--instance_prompt",
            "photo of a <new1> cat",
            "--class_prompt",
            "photo of a cat",
            "--modifier_token",
            "<new1>",
            "--initializer_token",
            "cat",
            "--resolution",
            str(size),
            "--train_batch_size",
            str(common["bs"]),
            "--max_train_steps",
            str(steps),
            "--learning_rate",
            "1e-5",
            "--scale_lr",
            "--checkpointing_steps",
            "100000",
            "--output_dir",
            str(out),
            "--seed",
            "0",
            "--mixed_precision",
            args.mixed_precision,
            "--dataloader_num_workers",
            "0",
        ]

    def cdtool(steps: int) -> list[str]:
        out = work / f"cd-{steps}.safetensors"
        return [
            sys.executable,
            "-m",
            "cdtool",
            "train",
            "--no-samples",  # the reference writes no sample grid: time the training alone
            str(inst),
            "--class-noun",
            "cat",
            "--token",
            "<new1>",
            "--init-token",
            "cat",
            "--reg",
            str(reg),
            "--prompt",
            "photo of a {token} {class}",
            "-o",
            str(out),
            "--model",
            str(folder),
            "--resolution",
            str(size),
            "--steps",
            str(steps),
            "--batch-size",
            str(common["bs"]),
            "--lr",
            "1e-5",
            "--mixed-precision",
            args.mixed_precision,
            "--force",
            "-q",
        ]

    def timed(name: str, build: Callable[[int], list[str]], steps: int) -> Run:
        run = measure(build(steps))
        print(f"{name}: {steps} steps in {run.seconds:.1f} s", file=sys.stderr, flush=True)  # kept if cut short
        return run

    trainers = (
        {"cdtool train": cdtool} if xl else {"diffusers train_custom_diffusion.py": reference, "cdtool train": cdtool}
    )
    runs: dict[str, list[tuple[Run, Run]]] = {name: [] for name in trainers}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
        for name, build in trainers.items():
            runs[name].append((timed(name, build, args.steps), timed(name, build, 2 * args.steps)))
    print(
        f"model {args.model}, {size}px, batch {args.batch_size} (+{args.batch_size} class images), {2 * args.steps} "
        f"steps, mixed precision {args.mixed_precision}, {args.repeats} pairs per trainer"
    )
    print_table(runs, args.steps)


def print_table(runs: dict[str, list[tuple[Run, Run]]], steps: int) -> None:
    """One row per trainer; the ratio column only where both rates could be measured."""
    rates = {name: pair_rate([a.seconds for a, _ in p], [b.seconds for _, b in p], steps) for name, p in runs.items()}
    ref = next(iter(rates.values()))
    print(
        "| trainer | steps/s (median; range) | start-up s | time to delta s | peak RSS MB | peak GPU MB | steps/s vs reference |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, pairs in runs.items():
        r = rates[name]
        delta = sorted(b.seconds for _, b in pairs)[len(pairs) // 2]
        rss = max(b.peak_rss_mb for _, b in pairs)
        gpu = max(max(a.peak_gpu_mb, b.peak_gpu_mb) for a, b in pairs)
        if r.median is None:
            rate, startup = f"not measured: {r.why}", "-"
        else:
            rate, startup = f"{r.median:.2f} ({r.low:.2f}-{r.high:.2f})", f"{r.startup_s:.1f}"
        ratio = f"{r.median / ref.median:.2f}x" if r.median and ref.median and len(runs) > 1 else "-"
        print(f"| {name} | {rate} | {startup} | {delta:.1f} | {rss:.0f} | {gpu:.0f} | {ratio} |")


if __name__ == "__main__":
    main()

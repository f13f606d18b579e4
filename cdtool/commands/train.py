"""`cdtool train`: Custom Diffusion training of one or several concepts (or a baseline method)."""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cdtool import console
from cdtool.atomic import Output, claim_output
from cdtool.commands.common import (
    ForceOpt,
    JsonOpt,
    Layers,
    LayersOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    cdtool_command,
    examples,
    pick_alias,
    pick_available_model,
)
from cdtool.errors import CdtoolError, UsageError
from cdtool.train.recipes import CUSTOM_DIFFUSION, DREAMBOOTH, DREAMBOOTH_LORA, LORA_TARGETS, TEXTUAL_INVERSION

if TYPE_CHECKING:
    from cdtool.train.config import TrainConfig
    from cdtool.train.trainer import TrainResult


EXAMPLES = examples(
    "cdtool train data/cat --reg reg/cat -o cat.safetensors",
    "cdtool train data/cat --reg reg/cat --concept data/dog,token=<new2>,class=dog,reg=reg/dog -o pets.safetensors",
    "cdtool train data/dog --reg reg/dog --method dreambooth --gradient-checkpointing -o dog-model/",
)


class TrainMethodOption(str, Enum):
    custom_diffusion = CUSTOM_DIFFUSION
    textual_inversion = TEXTUAL_INVERSION
    dreambooth_lora = DREAMBOOTH_LORA
    dreambooth = DREAMBOOTH


class Property(str, Enum):
    object = "object"
    style = "style"


class Precision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class EarlyStop(str, Enum):
    none = "none"
    dvar = "dvar"


def train(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The delta to write: .safetensors (cdtool's format), or .bin (the official layout); for "
            "dreambooth, the model folder to write. With --resume, default: the run's.",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Argument(
            help="The concept's data folder (from `cdtool prep`, or images with one prompt).", show_default=False
        ),
    ] = None,
    reg: Annotated[
        Path | None, typer.Option("--reg", help="Regularisation folder (from `cdtool regset`) for prior preservation.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Modifier token (default: from concept.json, else <new1>); for dreambooth the identifier, an "
            "existing rare vocabulary token (default: sks).",
        ),
    ] = None,
    class_noun: Annotated[
        str | None, typer.Option("--class-noun", help="Class noun (default: from concept.json).")
    ] = None,
    init_token: Annotated[
        str | None,
        typer.Option(
            "--init-token",
            help="Word the new embedding starts from, read as a prompt writes it (default: a rare vocabulary "
            "entry per token, the K-th for <newK> (ktn, pll, ucd, ... as the reference), so that separately "
            "trained concepts start apart).",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", help="Caption template for folders without metadata.jsonl, e.g. 'photo of a {token} {class}'."
        ),
    ] = None,
    concept: Annotated[
        list[str] | None,
        typer.Option(
            "--concept",
            help="Another concept for joint training: DIR,token=<new2>,class=dog,reg=DIR[,init=pll,prompt=...]. Repeatable.",
        ),
    ] = None,
    concepts_file: Annotated[
        Path | None, typer.Option("--concepts", help="diffusers concepts_list JSON for joint training.")
    ] = None,
    model: ModelOpt = None,
    method: Annotated[
        TrainMethodOption,
        typer.Option(
            "--method",
            help="custom-diffusion (the paper), or the baselines it compares against: textual-inversion, "
            "dreambooth (every UNet weight; writes a model folder), dreambooth-lora.",
        ),
    ] = TrainMethodOption.custom_diffusion,
    num_vectors: Annotated[
        int, typer.Option("--num-vectors", min=1, help="Textual inversion: embedding vectors per token.")
    ] = 1,
    prop: Annotated[
        Property, typer.Option("--property", help="Textual inversion: object or style caption templates.")
    ] = Property.object,
    rank: Annotated[int, typer.Option("--rank", min=1, help="DreamBooth-LoRA: LoRA rank.")] = 4,
    lora_alpha: Annotated[
        float | None, typer.Option("--lora-alpha", help="DreamBooth-LoRA: LoRA alpha (default: the rank).")
    ] = None,
    target: Annotated[
        str, typer.Option("--target", help="DreamBooth-LoRA: comma-separated UNet attention projections to adapt.")
    ] = ",".join(LORA_TARGETS),
    train_text_encoder: Annotated[
        bool,
        typer.Option(
            "--train-text-encoder",
            help="DreamBooth: also train every text-encoder weight; DreamBooth-LoRA: also adapt its attention.",
        ),
    ] = False,
    text_encoder_lr: Annotated[
        float | None,
        typer.Option(
            "--text-encoder-lr", help="DreamBooth(-LoRA): the text encoder's learning rate (default: the UNet's)."
        ),
    ] = None,
    layers: LayersOpt = None,
    train_alias: Annotated[
        Layers | None, typer.Option("--train", hidden=True, help="Another name of --layers.")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", min=8, help="Training resolution (default: the model's).")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Optimiser steps (default: 250 per concept for custom-diffusion, 3000 textual-inversion, 500 "
            "dreambooth-lora, 800 dreambooth).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Instance images per step and process (as many class images are added with --reg; default: 1 "
            "for dreambooth, else 4).",
        ),
    ] = None,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps.")] = 1,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Base learning rate (default per method: 1e-5, 1.25e-3, 1e-4, dreambooth 5e-6; see --scale-lr).",
        ),
    ] = None,
    scale_lr: Annotated[
        bool | None,
        typer.Option(
            "--scale-lr/--no-scale-lr",
            help="Scale lr by batch x accumulation x processes, x2 with --reg, as the reference (8e-5 for custom-diffusion). Default: on; off for dreambooth and dreambooth-lora.",
        ),
    ] = None,
    prior_weight: Annotated[
        float,
        typer.Option("--prior-weight", "--prior-loss-weight", min=0.0, help="Weight of the prior-preservation loss."),
    ] = 1.0,
    aug: Annotated[
        bool | None,
        typer.Option(
            "--aug/--no-aug",
            help="The paper's size augmentation with its prompt words and loss mask (default: on for custom-diffusion).",
        ),
    ] = None,
    hflip: Annotated[bool, typer.Option("--hflip", help="Random horizontal flips.")] = False,
    seed: SeedOpt = 0,
    mixed_precision: Annotated[Precision, typer.Option("--mixed-precision", help="no, fp16 or bf16.")] = Precision.no,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")
    ] = False,
    use_8bit_adam: Annotated[bool, typer.Option("--use-8bit-adam", help="bitsandbytes' 8-bit AdamW.")] = False,
    early_stop: Annotated[
        EarlyStop,
        typer.Option(
            "--early-stop",
            help="dvar: stop when the DVAR statistic of a fixed evaluation batch falls below --dvar-eps.",
        ),
    ] = EarlyStop.none,
    dvar_window: Annotated[
        int | None,
        typer.Option(
            "--dvar-window",
            min=2,
            help="DVAR window (the DVAR paper's: 180 custom-diffusion, 310 textual-inversion, 440 dreambooth-lora).",
        ),
    ] = None,
    dvar_eps: Annotated[
        float | None, typer.Option("--dvar-eps", help="DVAR threshold (the DVAR paper's: 0.15, 0.15, 0.4).")
    ] = None,
    eval_batch: Annotated[int, typer.Option("--eval-batch", min=1, help="DVAR evaluation batch size.")] = 4,
    checkpoint_every: Annotated[
        int,
        typer.Option("--checkpoint-every", min=0, help="Save a resumable checkpoint every N steps (and at the end)."),
    ] = 0,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", min=1, help="Checkpoints kept.")] = 2,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", help="Run folder: log, loss curve, checkpoints (default: beside the output)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this folder from its latest checkpoint, with its settings (--steps, "
            "--checkpoint-every, --keep-checkpoints, --device and -o may change).",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu or cuda (under accelerate launch the launcher decides).")
    ] = "auto",
    samples: Annotated[
        bool,
        typer.Option(
            "--samples/--no-samples",
            help="At the end, sample the concepts' prompts with the trained delta (seeded, at the model's "
            "resolution) into samples.png in the run folder, beside loss.png.",
        ),
    ] = True,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Teach the model new concepts: Custom Diffusion fine-tuning of the cross-attention key/value
    projections and a new modifier token per concept (or, with --method, textual inversion,
    DreamBooth or DreamBooth with LoRA, the baselines the papers compare against). DreamBooth
    trains every UNet weight and writes a whole model, a diffusers folder (-o DIR).

    Several processes: `accelerate launch --multi_gpu --num_processes 2 -m cdtool train ...` (on a
    CPU-only machine too: cdtool then runs accelerate's multi-CPU mode).
    """
    # the library loads here, not at the top, so that `cdtool train --help` starts without torch
    from cdtool.models.loading import default_resolution
    from cdtool.train.concepts import build_concepts, concepts_from_options
    from cdtool.train.config import training_config
    from cdtool.train.runs import load_run_config, resumed_config

    _check_device(device)
    described = {"token": token, "class": class_noun, "reg": reg, "init": init_token, "prompt": prompt}
    raw = concepts_from_options(data, described, concept or [], concepts_file)
    saved = load_run_config(resume) if resume is not None else None
    if not raw and saved is None:
        raise UsageError("give a data folder, --concept or --concepts FILE (or --resume RUN)")
    if output is None:
        if saved is None:
            raise UsageError("give --output (the delta to write)")
        output = Path(saved.output)
    _check_output(output, saved.method if saved is not None and _default(ctx, "method") else method.value)
    model_id = saved.model if saved is not None and model is None else pick_available_model(model)
    res = resolution or (saved.resolution if saved is not None else default_resolution(model_id))
    specs = build_concepts(raw, res, method.value) if raw else saved.concepts  # type: ignore[union-attr]
    main = _rank() == 0  # under `accelerate launch` every process runs this command
    if not main:
        console.set_quiet(True)
    if not any(s.reg_examples for s in specs) and main and method is not TrainMethodOption.textual_inversion:
        console.warn(
            "no --reg folder: training without prior preservation; the class may drift (make one with `cdtool regset`)"
        )
    folder = resume or run_dir or output.with_name(output.stem + ".run")
    layer_set = (pick_alias(layers, train_alias, "--layers", "--train") or Layers.kv).value
    lora_targets = tuple(t.strip() for t in target.split(",") if t.strip())
    cfg = training_config(
        method.value, specs, model=model_id, output=str(output), run_dir=str(folder), resolution=res, train=layer_set,
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, scale_lr=scale_lr, prior_weight=prior_weight,
        aug=aug, hflip=hflip, seed=seed, mixed_precision=mixed_precision.value,
        gradient_checkpointing=gradient_checkpointing, use_8bit_adam=use_8bit_adam, early_stop=early_stop.value,
        dvar_window=dvar_window, dvar_eps=dvar_eps, eval_batch=eval_batch, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, device=device, num_vectors=num_vectors, property=prop.value, rank=rank,
        lora_alpha=lora_alpha, lora_targets=lora_targets, train_text_encoder=train_text_encoder,
        text_encoder_lr=text_encoder_lr,
    )  # fmt: skip
    if saved is not None:
        given = _given(ctx, bool(raw))
        _check_resume(resume, saved, cfg, given)  # type: ignore[arg-type]
        cfg = resumed_config(saved, cfg, given)
    inputs = [Path(s.data) for s in specs]
    result = _claim_and_run(cfg, resume, force, inputs) if main else _run(cfg, resume is not None, replace_output=True)
    if not main:
        if samples:
            console.summary(f"process {_rank()}: the sample grid is left to the main process")
        return
    console.log(f"stopped at step {result.steps}: {result.reason}")
    grid = _sample_grid(cfg) if samples else None
    if json_out:
        console.result_json({k: v for k, v in vars(result).items() if k != "pipeline"} | {"samples": grid})
    else:
        console.result(str(output))


def _sample_grid(cfg: TrainConfig) -> str:
    """The concepts' prompts sampled with the delta just written (or the model, for a whole model),
    a row per prompt (runs.SAMPLES)."""
    from cdtool.preview import sample_preview
    from cdtool.train.runs import DELTA, SAMPLES

    path = Path(cfg.run_dir) / SAMPLES
    console.log(f"sampling the concepts' prompts into {path}")
    if cfg.method == DREAMBOOTH:
        sample_preview(cfg.output, None, path, seed=cfg.seed, device=cfg.device)
    else:
        sample_preview(cfg.model, Path(cfg.run_dir) / DELTA, path, seed=cfg.seed, device=cfg.device)
    return str(path)


def _check_output(output: Path, method: str) -> None:
    """A delta method writes a delta file; DreamBooth a model folder."""
    from cdtool.delta.importers import check_delta_output

    if method != DREAMBOOTH:
        check_delta_output(output)
    elif output.suffix.lower() in (".safetensors", ".bin", ".ckpt", ".pt"):
        raise UsageError(
            f"--output {output}: dreambooth trains every UNet weight and writes a whole model as a diffusers "
            f"folder; give a folder name (`cdtool export DIR --to checkpoint` then makes one file)"
        )


def _default(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was left at its default."""
    source = ctx.get_parameter_source(name)
    return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")


def _claim_and_run(cfg: TrainConfig, resume: Path | None, force: bool, inputs: list[Path]) -> TrainResult:
    """Claim the delta and the run folder, then train: a stale run folder is never continued (with
    --force it is replaced once the new run is complete, or has a checkpoint to resume from); on
    resume the delta may be replaced without --force only when it is this run's own."""
    from cdtool import locks
    from cdtool.train.runs import foreign_files, has_checkpoint, is_run_delta, is_run_model

    output, folder, model = Path(cfg.output), Path(cfg.run_dir), cfg.method == DREAMBOOTH
    locks.acquire(folder)  # one command per run folder, from here to the end
    if resume is not None:
        own = is_run_model(output, resume) if model else is_run_delta(output, resume)
        out = claim_output(output, "train", force or own, folder=model, inputs=inputs)
        return _run(cfg, True, replace_output=out.existed, output=out if model else None)
    out = claim_output(output, "train", force, folder=model, inputs=inputs)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise CdtoolError(f"run folder {folder} already exists; pass --resume {folder} to continue it, or --force")
    run = claim_output(folder, "train", force, folder=True, ownership=foreign_files)
    with run.in_place(keep=has_checkpoint):
        return _run(cfg, False, replace_output=out.existed, output=out if model else None)


def _check_device(device: str) -> None:
    """The --device rule of every command (cdtool.models.loading.resolve_device); accelerate then picks the GPU."""
    from cdtool.models.loading import resolve_device

    resolve_device(device)
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"--device {device}: train runs on auto, cpu or cuda (choose the GPU with CUDA_VISIBLE_DEVICES)"
        )


# Options whose name is not the setting's (TrainConfig field) name; the concept options set `concepts`.
_SETTING = {"layers": "train", "train_alias": "train", "prop": "property", "target": "lora_targets"}
_CONCEPT_OPTIONS = ("data", "reg", "token", "class_noun", "init_token", "prompt", "concept", "concepts_file")


def _given(ctx: typer.Context, concepts: bool) -> set[str]:
    """The settings (TrainConfig field names) this command line gives, rather than leaves at their default."""
    given = {"concepts"} if concepts else set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP") and name not in _CONCEPT_OPTIONS:
            given.add(_SETTING.get(name, name))
    return given


def _option(setting: str) -> str:
    """The command-line option of a setting (a TrainConfig field)."""
    if setting == "concepts":
        return "the data (DATA, --concept, --concepts)"
    names = {"train": "--layers", "property": "--property", "lora_targets": "--target"}
    return names.get(setting, "--" + setting.replace("_", "-"))


def _check_resume(run_dir: Path, saved: TrainConfig, asked: TrainConfig, given: set[str]) -> None:
    """A resumed run continues with its own settings: any given option that differs is named."""
    from cdtool.train.runs import resume_differences

    differ = resume_differences(saved, asked, given)
    if differ:
        said = "; ".join(_option(k) if k == "concepts" else f"{_option(k)} {a} (the run: {b})" for k, a, b in differ)
        raise CdtoolError(
            f"{run_dir} was trained with other settings: {said}; leave them out to continue the run as it was"
        )


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _run(cfg: TrainConfig, resume: bool, replace_output: bool, output: Output | None = None) -> TrainResult:
    from cdtool.train.trainer import train as run_training

    every = max(1, cfg.steps // 20)
    if console.interactive():
        with console.progress("training", cfg.steps) as bar:

            def update(step: int, total: int, e: dict[str, Any]) -> None:
                ev = f" eval {e['eval_loss']:.4f}" if "eval_loss" in e else ""
                bar.advance(1, f"loss {e['loss']:.4f}{ev} lr {e['lr']:.2e}")

            return run_training(
                cfg, resume=resume, log=console.log, progress=update, replace_output=replace_output, output=output
            )
    last = {"t": None}

    def plain(step: int, total: int, e: dict[str, Any]) -> None:
        now = time.perf_counter()
        if step % every == 0 or step == total:
            rate = "" if last["t"] is None else f" {every / (now - last['t']):.2f} it/s"
            ev = f" eval {e['eval_loss']:.4f}" if "eval_loss" in e else ""
            dv = f" dvar {e['dvar']:.3f}" if e.get("dvar") is not None else ""
            console.log(f"step {step}/{total} loss {e['loss']:.4f}{ev}{dv} lr {e['lr']:.2e}{rate}")
            last["t"] = now
        sys.stderr.flush()

    return run_training(
        cfg, resume=resume, log=console.log, progress=plain, replace_output=replace_output, output=output
    )


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EXAMPLES)(cdtool_command(train))

"""`cdtool train-encoder`: train an InstantBooth encoder for one category of subjects."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cdtool import console
from cdtool.atomic import claim_output
from cdtool.commands.common import (
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    cdtool_command,
    examples,
    pick_available_model,
)
from cdtool.errors import CdtoolError, UsageError

if TYPE_CHECKING:
    from cdtool.instant.folder import EncoderSettings

EXAMPLES = examples(
    "cdtool train-encoder data/cats --class-noun cat --backbone ViT-B-32:openai --minutes 600 -o cat-encoder",
    "cdtool train-encoder --resume cat-encoder --minutes 600",
    "cdtool train-encoder data/shapes --class-noun star --model toy --steps 20000 -o star-encoder",
)


class Precision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


def train_encoder(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Captioned images of one category (a folder from `cdtool regset` or `prep`, or images with "
            "metadata.jsonl); without captions each is 'photo of a <class noun>'. An image's alpha channel marks "
            "its subject: the encoders see that alone, the denoising loss the whole image with the colours "
            "kept under the alpha (add masks to photos, not cut-outs on black).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The encoder folder to write.")] = None,
    class_noun: Annotated[
        str | None, typer.Option("--class-noun", help="The category's noun; the identifier goes before it.")
    ] = None,
    model: ModelOpt = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone",
            help="open_clip vision tower NAME:WEIGHTS (a tag, or a local file), or toy-cnn (trained from scratch). "
            "Default: toy-cnn for --model toy, else ViT-B-32:openai.",
        ),
    ] = None,
    token: Annotated[str, typer.Option("--token", help="The identifier in the training captions.")] = "<new1>",
    init_token: Annotated[
        str | None, typer.Option("--init-token", help="Where the identifier's embedding starts (default: train's).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Stop after this many steps.")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", min=0.0, help="Stop after this much time.")] = None,
    checkpoint_minutes: Annotated[
        float, typer.Option("--checkpoint-minutes", min=0.0, max=10.0, help="Save at least this often.")
    ] = 10.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per step and process.")] = 4,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Learning rate of the heads and adapters.")] = 1e-4,
    backbone_lr: Annotated[
        float | None,
        typer.Option("--backbone-lr", min=0.0, help="Learning rate of the backbones (default: lr/10; toy-cnn: lr)."),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", min=8, help="Training resolution (default: the model's).")
    ] = None,
    seed: SeedOpt = 0,
    mixed_precision: Annotated[Precision, typer.Option("--mixed-precision", help="no, fp16 or bf16.")] = Precision.no,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the encoder in this folder (--steps, --minutes, --checkpoint-minutes, --device may change).",
        ),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train an InstantBooth encoder (Shi et al. 2023): photos of a subject of the category become its
    personalised concept in one forward pass (`cdtool personalize`). The base model stays frozen;
    the concept encoder, the patch encoder and the UNet adapters learn from single captioned images.

    One category per encoder. Budgeted by --steps and/or --minutes, saved at least every
    --checkpoint-minutes, at the end and when stopped (Ctrl-C, SIGTERM); --resume continues weights,
    optimiser, step and data order.
    Several processes: `accelerate launch --multi_gpu --num_processes 2 -m cdtool train-encoder ...`.
    """
    from cdtool.instant.data import read_category
    from cdtool.instant.folder import foreign_files, is_encoder_folder, read_encoder
    from cdtool.instant.trainer import train_encoder as run
    from cdtool.models.loading import base_kind, default_resolution

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device}: train-encoder runs on auto, cpu or cuda")
    if resume is not None:
        enc = read_encoder(resume)
        settings, folder, pairs = _resumed(ctx, enc.settings, steps, minutes, checkpoint_minutes, device), resume, None
    else:
        if data is None or class_noun is None or output is None:
            raise UsageError("give DATA, --class-noun and --output (or --resume ENC_DIR)")
        model_id = pick_available_model(model)
        from cdtool.instant.trainer import refuse_sdxl

        refuse_sdxl(base_kind(model_id), model_id)
        res = resolution or default_resolution(model_id)
        settings = _settings(model_id, class_noun, backbone, token, init_token, data, res, ctx.params)
        found, skipped = read_category(data, class_noun, token, settings.resolution)
        if skipped:
            console.warn(f"{skipped} captions in {data} do not name {class_noun!r}; training on the other {len(found)}")
        pairs, folder = [(str(ex.path.resolve()), ex.caption) for ex in found], output
    if settings.steps is None and settings.minutes is None:
        raise UsageError("give --steps, --minutes or both: how long to train")
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch the main process writes
        console.set_quiet(True)
        run(settings, folder, pairs)
        return
    if resume is None:
        if is_encoder_folder(folder) and not force:
            raise CdtoolError(f"{folder} already holds an encoder; pass --resume {folder} to continue it, or --force")
        claim = claim_output(folder, "train-encoder", force, folder=True, inputs=[data], ownership=foreign_files)
        with claim.in_place(keep=is_encoder_folder):
            progress = run(settings, folder, pairs, log=console.log)
    else:
        progress = run(settings, folder, None, log=console.log)
    console.log(f"{folder}: step {progress.step}, loss {progress.final_loss}")
    if json_out:
        console.result_json({"output": str(folder), **vars(progress)})
    else:
        console.result(str(folder))


def _settings(
    model: str,
    noun: str,
    backbone: str | None,
    token: str,
    init: str | None,
    data: Path,
    resolution: int,
    params: dict,
) -> EncoderSettings:
    from cdtool.choices import TOY
    from cdtool.instant.backbones import TOY_CNN, check_backbone
    from cdtool.instant.folder import EncoderSettings
    from cdtool.models.tokens import check_token_name, default_init_tokens

    check_token_name(token, "--token")
    chosen = backbone or (TOY_CNN if model == TOY else "ViT-B-32:openai")
    check_backbone(chosen)
    return EncoderSettings(
        model=model,
        class_noun=noun,
        identifier=token,
        backbone=chosen,
        data=str(data.resolve()),
        init_token=init or default_init_tokens([token])[0],
        resolution=resolution,
        batch_size=params["batch_size"],
        lr=params["lr"],
        backbone_lr=params["backbone_lr"],
        seed=params["seed"],
        mixed_precision=params["mixed_precision"].value,
        gradient_checkpointing=params["gradient_checkpointing"],
        steps=params["steps"],
        minutes=params["minutes"],
        checkpoint_minutes=params["checkpoint_minutes"],
        device=params["device"],
    )


def _resumed(
    ctx: typer.Context, saved: EncoderSettings, steps: int | None, minutes: float | None, every: float, device: str
) -> EncoderSettings:
    """The saved settings, with what a resumed run may change; any other option given is refused."""
    from dataclasses import replace

    fixed = [
        name
        for name in ctx.params
        if name not in ("steps", "minutes", "checkpoint_minutes", "device", "resume", "force", "json_out", "quiet")
        and (source := ctx.get_parameter_source(name)) is not None
        and source.name not in ("DEFAULT", "DEFAULT_MAP")
    ]
    if fixed:
        opts = ", ".join("DATA" if n == "data" else "--" + n.replace("_", "-") for n in fixed)
        raise CdtoolError(f"{opts}: a resumed encoder keeps its own settings; only --steps, --minutes, "
                          "--checkpoint-minutes and --device may change")  # fmt: skip
    given = {n for n in ("steps", "minutes") if ctx.get_parameter_source(n).name not in ("DEFAULT", "DEFAULT_MAP")}
    budget = {"steps": steps, "minutes": minutes} if given else {}
    return replace(saved, **budget, checkpoint_minutes=every, device=device)


def register(app: typer.Typer) -> None:
    app.command("train-encoder", epilog=EXAMPLES)(cdtool_command(train_encoder))

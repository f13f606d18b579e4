"""Training an InstantBooth encoder on HF accelerate (Shi et al. 2023).

The base's UNet, VAE and text encoder stay frozen; the concept encoder, the patch encoder and the
adapters train with the denoising loss on single captioned images of one category. Each step takes
a batch of images; each image is its own concept: its caption holds the identifier before the class
noun, the concept encoder's embedding of an augmented view of the same image stands in for the
identifier's token embedding, and the patch encoder's tokens of that view go to the adapters.

Budgeted by steps and/or wall clock, saved at least every `checkpoint_minutes`, at the end, and when
Ctrl-C or SIGTERM stops a single process (the weights and the step count move together under held
signals, so the checkpoint is a step's boundary); a resumed run restores the weights and AdamW's
state, and since every draw of a step is seeded by (seed, step, process), it continues the
uninterrupted run's data and noise (bit for bit on the CPU).
Under several processes every process draws its own batch and the gradients are averaged (DDP).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler

from cdtool.choices import SDXL
from cdtool.dataset.folders import load_image
from cdtool.delta.base import TOKEN_EMBEDDING, fingerprint, pipeline_params
from cdtool.errors import CdtoolError, signals_held
from cdtool.instant.adapters import Attached, BlockShape, attach, transformer_blocks
from cdtool.instant.backbones import TOY_CNN, load_backbone
from cdtool.instant.data import encoder_view, load_subject, step_generator
from cdtool.instant.encoders import InstantEncoder, identifier_rows
from cdtool.instant.folder import (
    LOG,
    LOSS_CURVE,
    OPTIMIZER,
    WEIGHTS,
    EncoderSettings,
    Progress,
    read_data,
    write_data,
    write_settings,
)
from cdtool.models.conditioning import TextSide, encode
from cdtool.models.loading import load_pipeline, pipeline_kind
from cdtool.models.tokens import add_token_rows, check_new_token, resolve_init_token
from cdtool.train.trainer import prediction_target


def refuse_sdxl(kind: str, model: str) -> None:
    """InstantBooth is defined on one text encoder; SDXL's two would need a concept head each."""
    if kind == SDXL:
        raise CdtoolError(
            f"{model} is a Stable Diffusion XL base; InstantBooth encoders train on Stable Diffusion 1.x and 2.x bases"
        )


def encoder_base_names(params: dict[str, torch.Tensor], blocks: list[BlockShape]) -> list[str]:
    """The base parameters an encoder's base fingerprint covers: the token table and every
    parameter of the transformer blocks its adapters attach to."""
    prefixes = tuple(f"unet.{b.path}." for b in blocks)
    return [TOKEN_EMBEDDING, *sorted(n for n in params if n.startswith(prefixes))]


def base_fingerprints(pipe: Any) -> tuple[str, str, list[BlockShape]]:
    """(the encoder's base fingerprint, the token table's as deltas take it, the adapters' blocks)
    of an unmodified pipeline."""
    params = pipeline_params(pipe)
    vocab = len(pipe.tokenizer)
    blocks = transformer_blocks(pipe.unet)
    return (
        fingerprint(params, encoder_base_names(params, blocks), vocab),
        fingerprint(params, [TOKEN_EMBEDDING], vocab),
        blocks,
    )


def backbone_lr(s: EncoderSettings) -> float:
    """A pretrained tower moves at a tenth of the rate of what starts from scratch; toy-cnn starts
    from scratch itself (cdtool's choice: the paper does not give its rates)."""
    if s.backbone_lr is not None:
        return s.backbone_lr
    return s.lr if s.backbone.partition(":")[0] == TOY_CNN else s.lr / 10


def build_encoder(s: EncoderSettings, pretrained: bool, init_row: torch.Tensor | None = None) -> InstantEncoder:
    """The encoder `s` describes, seeded; backbones with their pretrained weights only for a new run."""
    blocks = [BlockShape(p, int(w), int(h)) for p, w, h in s.blocks]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        concept = load_backbone(s.backbone, pretrained)
        patch = load_backbone(s.backbone, pretrained, tokens_only=True)
        return InstantEncoder(concept, patch, s.text_dim, s.visual_dim, blocks, init_row)


@dataclass
class _Parts:
    pipe: Any
    text: TextSide
    scheduler: Any
    attached: Attached
    rows: dict[str, torch.Tensor]  # the identifier's embedding per sample of the step ("now")
    token_id: int
    device: torch.device


def prepare_base(s: EncoderSettings, new: bool, pipe: Any = None) -> tuple[Any, torch.Tensor]:
    """The base pipeline (`pipe`, else loaded), checked against (or, for a new encoder, recorded in)
    `s`, the identifier added to its tokenizer; returns it and the identifier's initial embedding."""
    pipe = load_pipeline(s.model) if pipe is None else pipe
    kind = pipeline_kind(pipe)
    refuse_sdxl(kind, s.model)
    base, token_base, blocks = base_fingerprints(pipe)
    text = TextSide.of(pipe)
    if new:
        s.base_kind, s.base_fingerprint, s.token_fingerprint = kind, base, token_base
        s.vocab_size = len(text.tokenizer)
        s.blocks = [[b.path, b.width, b.heads] for b in blocks]
        s.text_dim = int(text.encoder.get_input_embeddings().weight.shape[1])
        s.visual_dim = int(pipe.unet.config.cross_attention_dim)
    elif base != s.base_fingerprint:
        raise CdtoolError(f"{s.model} is not the base this encoder was trained for (its fingerprint differs)")
    check_new_token(text.tokenizer, s.identifier)
    init = text.encoder.get_input_embeddings().weight[resolve_init_token(text.tokenizer, s.init_token)]
    add_token_rows(text.tokenizer, text.encoder, {s.identifier: init.detach().clone()})
    return pipe, init.detach().clone().float()


def train_encoder(
    s: EncoderSettings,
    folder: Path,
    examples: list[tuple[str, str]] | None = None,
    *,
    log: Callable[[str], None] = print,
    pipe: Any = None,
) -> Progress:
    """Train a new encoder on `examples` (image path, caption with the identifier) into `folder`, or
    continue the one there (no `examples`: --resume); the main process writes it. Returns its
    progress. `pipe`: the base, already loaded (it stays frozen; its tokenizer gains the identifier)."""
    started = time.perf_counter()
    resume = examples is None
    on_cpu = s.device == "cpu" or (s.device == "auto" and not torch.cuda.is_available())
    AcceleratorState._reset_state(reset_partial_state=True)  # one process may train several times
    acc = Accelerator(mixed_precision=s.mixed_precision, cpu=on_cpu)
    pipe, init_row = prepare_base(s, not resume, pipe)
    encoder = build_encoder(s, pretrained=not resume, init_row=init_row)
    progress = Progress(processes=acc.num_processes)
    if resume:
        progress = _load_state(folder, encoder)
        progress.processes = acc.num_processes
    parts = _freeze(s, pipe, encoder, acc.device)
    optimizer = torch.optim.AdamW(_groups(s, encoder), lr=s.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if resume:
        optimizer.load_state_dict(_read_optimizer(folder, progress.step))
    encoder_p, optimizer = acc.prepare(encoder, optimizer)
    if examples is None:
        examples = read_data(folder)
        if acc.is_main_process:  # the log continues from the checkpoint
            kept = [
                line for line in (folder / LOG).read_text().splitlines() if json.loads(line)["step"] <= progress.step
            ]
            (folder / LOG).write_text("".join(line + "\n" for line in kept))
    elif acc.is_main_process:
        write_data(folder, examples)
        (folder / LOG).write_text("")
    if not resume:
        _save(folder, s, progress, acc, encoder_p, optimizer)
    deadline = None if s.minutes is None else started + 60 * s.minutes
    next_save, counted = started + 60 * s.checkpoint_minutes, started
    saved = progress.step
    try:
        while s.steps is None or progress.step < s.steps:
            if _agree(acc, deadline is not None and time.perf_counter() >= deadline):
                log(f"stopped at step {progress.step}: --minutes {s.minutes:g} reached")
                break
            loss = _step(s, parts, encoder_p, optimizer, acc, examples, progress.step)
            with signals_held():  # the weights and the step count move together, or not at all
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
            progress.final_loss = float(acc.reduce(loss.detach(), reduction="mean"))
            if acc.is_main_process:
                with (folder / LOG).open("a") as f:
                    f.write(json.dumps({"step": progress.step, "loss": progress.final_loss}) + "\n")
                if progress.step % max(1, (s.steps or 100) // 20) == 0:
                    log(f"step {progress.step}{'/' + str(s.steps) if s.steps else ''} loss {progress.final_loss:.4f}")
            if _agree(acc, time.perf_counter() >= next_save):
                _save(folder, s, _timed(progress, counted), acc, encoder_p, optimizer)
                next_save = counted = time.perf_counter()
                next_save += 60 * s.checkpoint_minutes
                saved = progress.step
        _save(folder, s, _timed(progress, counted), acc, encoder_p, optimizer)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the steps since the last checkpoint are kept too
        if acc.num_processes == 1 and progress.step > saved:  # several would have to agree to save
            _save(folder, s, _timed(progress, counted), acc, encoder_p, optimizer)
            log(f"saved step {progress.step} before stopping")
        raise
    finally:
        parts.attached.detach()
        acc.end_training()
    return progress


def _timed(progress: Progress, since: float) -> Progress:
    progress.seconds = round(progress.seconds + time.perf_counter() - since, 1)
    return progress


def _agree(acc: Accelerator, flag: bool) -> bool:
    """A decision every process takes together (the first to see the time is up decides for all)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)


def _freeze(s: EncoderSettings, pipe: Any, encoder: InstantEncoder, device: torch.device) -> _Parts:
    """The base frozen (held in the half type on CUDA under mixed precision), the encoder training,
    the adapters attached and the identifier's per-sample embeddings hooked into the token table."""
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.mixed_precision, torch.float32)
    dtype = half if device.type == "cuda" else torch.float32
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval().to(device, dtype)
    if s.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.unet.train()
    encoder.to(device).train()
    text = TextSide.of(pipe)
    rows: dict[str, torch.Tensor] = {}
    token_id = int(text.tokenizer.convert_tokens_to_ids(s.identifier))

    def replace_identifier(_m: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return identifier_rows(args[0], out, rows["now"], token_id) if "now" in rows else out

    handle = text.encoder.get_input_embeddings().register_forward_hook(replace_identifier)
    attached = attach(pipe.unet, encoder.adapters, [BlockShape(p, int(w), int(h)) for p, w, h in s.blocks])
    attached.handles.append(handle)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return _Parts(pipe, text, scheduler, attached, rows, token_id, device)


def _groups(s: EncoderSettings, encoder: InstantEncoder) -> list[dict[str, Any]]:
    backbones = [*encoder.concept_backbone.parameters(), *encoder.patch_backbone.parameters()]
    ids = {id(p) for p in backbones}
    rest = [p for p in encoder.parameters() if id(p) not in ids]
    return [{"params": backbones, "lr": backbone_lr(s)}, {"params": rest, "lr": s.lr}]


def _step(
    s: EncoderSettings,
    parts: _Parts,
    encoder: Any,
    optimizer: Any,
    acc: Accelerator,
    examples: list[tuple[str, str]],
    step: int,
) -> torch.Tensor:
    """The loss and gradients of one step's batch, drawn by (seed, step, process); the weights are
    not changed (the caller applies the step)."""
    g = step_generator(s.seed, step, acc.process_index)
    picks = [examples[int(i)] for i in torch.randint(0, len(examples), (s.batch_size,), generator=g)]
    images = torch.stack([load_image(Path(p), s.resolution) for p, _ in picks])
    size = encoder_image_size(encoder)
    views = torch.stack([encoder_view(load_subject(Path(p), s.resolution), size, g) for p, _ in picks])
    pipe, dev = parts.pipe, parts.device
    with torch.no_grad():
        dist = pipe.vae.encode(images.to(dev, pipe.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=g).to(dev)
        latents = (dist.mean.float() + dist.std.float() * eps) * float(pipe.vae.config.scaling_factor)
    noise = torch.randn(latents.shape, generator=g).to(dev)
    t = torch.randint(0, parts.scheduler.config.num_train_timesteps, (s.batch_size,), generator=g).to(dev)
    with acc.autocast():
        rows, tokens = encoder(views.to(dev))
        parts.rows["now"], parts.attached.injection.tokens = rows, tokens
        hidden = encode(parts.text, [c for _, c in picks], dev).hidden
        noisy = parts.scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy.to(pipe.unet.dtype), t, encoder_hidden_states=hidden.to(pipe.unet.dtype)).sample
        loss = F.mse_loss(pred.float(), prediction_target(parts.scheduler, latents, noise, t).float())
    if _agree(acc, not bool(torch.isfinite(loss.detach()))):  # the last checkpoint stays as it was
        raise CdtoolError(f"the loss is not finite at step {step + 1}; lower --lr, or resume from the last checkpoint")
    acc.backward(loss)
    acc.clip_grad_norm_(encoder.parameters(), 1.0)
    parts.rows.clear()
    parts.attached.injection.tokens = None
    return loss


def encoder_image_size(encoder: Any) -> int:
    return int(getattr(encoder, "module", encoder).image_size)


def _save(folder: Path, s: EncoderSettings, progress: Progress, acc: Accelerator, encoder: Any, opt: Any) -> None:
    """A checkpoint: the weights, AdamW's state, then encoder.json (each atomic; all record the step)."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        from safetensors.torch import save_file

        from cdtool.atomic import atomic_path
        from cdtool.instant.folder import FORMAT
        from cdtool.preview import loss_curve

        weights = {k: v.detach().float().cpu().contiguous() for k, v in acc.unwrap_model(encoder).state_dict().items()}
        with atomic_path(folder / WEIGHTS) as tmp:
            save_file(weights, str(tmp), metadata={"format": FORMAT, "step": str(progress.step)})
        with atomic_path(folder / OPTIMIZER) as tmp:
            torch.save({"step": progress.step, "optimizer": opt.state_dict()}, str(tmp))
        write_settings(folder, s, progress)
        entries = [json.loads(line) for line in (folder / LOG).read_text().splitlines() if line.strip()]
        loss_curve(entries, folder / LOSS_CURVE)
    acc.wait_for_everyone()


def load_weights(folder: Path, encoder: torch.nn.Module) -> int:
    """The encoder's weights from its folder, into `encoder`; returns the step they were saved at."""
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        step = int((f.metadata() or {}).get("step", -1))
        state = {k: f.get_tensor(k) for k in f.keys()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CdtoolError(
            f"{folder / WEIGHTS} does not fit its encoder.json ({len(missing)} weights missing, {len(unexpected)} "
            "unexpected); was the folder written by another cdtool?"
        )
    return step


def _load_state(folder: Path, encoder: InstantEncoder) -> Progress:
    from cdtool.instant.folder import read_encoder

    progress = read_encoder(folder).progress
    if load_weights(folder, encoder) != progress.step:
        raise CdtoolError(f"{folder}: the weights are not those of its last checkpoint (a save was cut short)")
    return progress


def _read_optimizer(folder: Path, step: int) -> dict[str, Any]:
    from cdtool.delta.importers import load_pickle

    state = load_pickle(folder / OPTIMIZER)
    if int(state.get("step", -1)) != step:
        raise CdtoolError(f"{folder}: the optimiser state is not that of its last checkpoint (a save was cut short)")
    return state["optimizer"]

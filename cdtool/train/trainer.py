"""Training on HF accelerate: Custom Diffusion (Kumari et al. 2023), and the baselines it is compared
against (textual inversion, DreamBooth with every UNet weight or with LoRA). `train` runs the steps every method shares, in
order; what differs per method (layers, adapting, captions, loss, the delta) is in cdtool/train/methods.py.

What Custom Diffusion trains: the UNet's cross-attention key/value projections (or all cross-attention
projections, the reference's `crossattn` mode) and the new tokens' embedding rows; everything else is
frozen. Prior preservation with a regularisation set, the size augmentation with its prompt words and
loss mask, AdamW and the learning-rate scaling follow the reference code. DVAR early stopping (Voronov
et al. 2023) is optional.

Work done once rather than every step: the regularisation images' latent distributions (and those
of their mirror images) and the class prompts' text features are computed before the first step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from diffusers import DDPMScheduler

from cdtool.atomic import Output, claim_output
from cdtool.choices import SDXL
from cdtool.dataset.folders import Example, load_image
from cdtool.delta.base import TOKEN_EMBEDDING_2, fingerprint, fingerprint_names, pipeline_params
from cdtool.delta.file import Delta, LayerDelta
from cdtool.delta.importers import save_delta
from cdtool.delta.provenance import stamp, train_entry
from cdtool.errors import CdtoolError
from cdtool.models.conditioning import Encoded, TextSide, encode, time_ids, unet_inputs
from cdtool.models.finetuned import unet_fingerprint, write_model_folder
from cdtool.models.loading import base_kind, load_pipeline, pipeline_kind
from cdtool.models.tokens import (
    TokenRows,
    add_text_tokens,
    attach_token_rows,
    check_new_token,
    is_existing_word,
    resolve_init_token,
    token_names,
)
from cdtool.preview import loss_curve
from cdtool.train.augment import augment
from cdtool.train.concepts import ConceptSpec
from cdtool.train.config import TrainConfig
from cdtool.train.losses import dvar
from cdtool.train.methods import TrainingMethod, method_for
from cdtool.train.runs import (
    DELTA,
    LOSS_CURVE,
    load_checkpoint,
    log_step,
    read_log,
    save_checkpoint,
    start_run,
)


@dataclass
class TrainResult:
    steps: int
    stopped_early: bool
    reason: str
    final_loss: float | None
    dvar: float | None
    learning_rate: float
    seconds: float
    output: str
    run_dir: str
    pipeline: Any = None  # the trained pipeline, when asked for (tests)


class _Rng:
    """Every random draw of the trainer comes from these CPU generators, so a seed means the same
    on any device and a resumed run continues the same stream."""

    def __init__(self, seed: int, rank: int) -> None:
        self.data = torch.Generator().manual_seed(seed * 1000 + 17 + rank)
        self.noise = torch.Generator().manual_seed(seed * 1000 + 29 + rank)

    def state(self) -> dict[str, torch.Tensor]:
        return {"data": self.data.get_state(), "noise": self.noise.get_state()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.data.set_state(state["data"])
        self.noise.set_state(state["noise"])


def compute_in_fp32(layers: list[torch.nn.Module], half: torch.dtype) -> list[Any]:
    """Trainable fp32 layers inside a model held in `half`: their input is cast up, their output down
    (as diffusers' Custom Diffusion processors do). Returns the hook handles."""
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:])))
        handles.append(layer.register_forward_hook(lambda m, args, out: out.to(half)))
    return handles


def _latent_dist(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """[B, 2C, h, w]: mean and log-variance of the VAE posterior."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.parameters.float()


def _sample_latents(params: torch.Tensor, g: torch.Generator, scaling: float) -> torch.Tensor:
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=g).to(mean.device)
    return (mean + std * eps) * scaling


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    keep_pipeline: bool = False,
    replace_output: bool = True,
    output: Output | None = None,
) -> TrainResult:
    """Train the concepts of `cfg`; writes the delta (main process) and the run folder. Without
    `replace_output`, a delta written at `cfg.output` meanwhile is a conflict (cdtool.atomic). A
    method that trains a whole model writes it through `output`, the claimed folder (claimed here
    when not given)."""
    started = time.perf_counter()
    method = method_for(cfg.method)
    accelerator = _accelerator(cfg)
    main, run_dir = accelerator.is_main_process, Path(cfg.run_dir)
    if method.full_model and main and output is None:
        output = claim_output(Path(cfg.output), "train", replace_output, folder=True)
    torch.manual_seed(cfg.seed)  # module initialisation only; training draws from _Rng
    random.seed(cfg.seed)
    pipe = load_pipeline(cfg.model)
    parts = training_parts(cfg, pipe, accelerator.device)

    tokens = _plan_tokens(cfg, method, parts.text)
    layer_names = method.layer_names(cfg, parts.unet, parts.text.named())
    base = _record_base(method, pipe, layer_names, tokens)
    _add_tokens(tokens, parts)
    trainable = _freeze_and_adapt(cfg, method, parts, layer_names, tokens)
    lr = _learning_rate(cfg, accelerator.num_processes)
    optimizer = _optimizer(cfg, trainable, lr)
    hooks = _hold_in_half(cfg, method, parts, layer_names)
    prepared, optimizer = _prepare(accelerator, [parts.unet, *parts.text.encoders], optimizer)
    parts.unet_p, parts.text_p = prepared[0], TextSide(parts.text.tokenizers, prepared[1:])
    if parts.unet_dtype != torch.float32:  # accelerate's autocast wrapper off the UNet's forward, in place (DDP stays)
        accelerator.unwrap_model(parts.unet_p, keep_fp32_wrapper=False)
    rng = _Rng(cfg.seed, accelerator.process_index)
    data = _cache_data(cfg, parts)
    eval_batch = _eval_batch(cfg, method, parts, data) if cfg.early_stop == "dvar" else None

    step, history, entries = 0, [], []
    if resume:
        step, history, rng_state = load_checkpoint(run_dir, accelerator, trainable, optimizer)
        rng.load(rng_state)
        if main:
            log(f"resumed {run_dir} at step {step}")
    elif main:
        start_run(run_dir, cfg)
    stop_reason, stat, last_loss = "", None, None
    while step < cfg.steps:
        for _ in range(cfg.grad_accum):
            with accelerator.accumulate(parts.unet_p, *parts.text_p.encoders):
                loss = _loss(method, parts, _draw_batch(cfg, method, parts, data, tokens, rng), cfg.prior_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(trainable.values()), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        entry: dict[str, Any] = {"step": step, "loss": last_loss, "lr": lr}
        if eval_batch is not None:
            history.append(_eval_loss(parts, tokens, eval_batch))
            stat = dvar(history, cfg.dvar_window)
            entry.update(eval_loss=history[-1], dvar=stat)
        entries.append(entry)
        if main:
            log_step(run_dir, entry)
            if progress is not None:
                progress(step, cfg.steps, entry)
        if stat is not None and stat < cfg.dvar_eps:
            stop_reason = f"DVAR {stat:.4f} < {cfg.dvar_eps} over the last {cfg.dvar_window} evaluations"
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(
                run_dir, accelerator, trainable, optimizer, rng.state(), step, history, cfg.keep_checkpoints
            )
    if cfg.checkpoint_every and step % cfg.checkpoint_every:  # the last step too, so a run can be extended
        save_checkpoint(run_dir, accelerator, trainable, optimizer, rng.state(), step, history, cfg.keep_checkpoints)

    accelerator.wait_for_everyone()
    run = {"steps_run": step, "stopped_early": bool(stop_reason), "stop_reason": stop_reason, "learning_rate": lr}
    run |= {"processes": accelerator.num_processes, "final_loss": last_loss}
    delta = _build_delta(cfg, method, parts, layer_names, base, tokens, run)
    if main:
        entries = read_log(run_dir) if resume else entries
        if output is not None:  # a whole model: the delta's metadata is its record
            _write_model(cfg, pipe, parts, delta, output, entries)
        else:
            _write_outputs(cfg, delta, base, entries, replace_output)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    for h in hooks:
        h.remove()
    return TrainResult(
        steps=step,
        stopped_early=bool(stop_reason),
        reason=stop_reason or f"reached {cfg.steps} steps",
        final_loss=last_loss,
        dvar=stat,
        learning_rate=lr,
        seconds=time.perf_counter() - started,
        output=cfg.output,
        run_dir=str(run_dir),
        pipeline=pipe if keep_pipeline else None,
    )


# The steps of a run, in the order `train` takes them.


def _accelerator(cfg: TrainConfig) -> Accelerator:
    # Without CUDA, cpu=True is what makes accelerate run several CPU processes (MULTI_CPU) under
    # `accelerate launch --multi_gpu --num_processes N` (its `--cpu` flag starts one process without MPI).
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    # accelerate keeps its state (device, mixed precision) in process-wide singletons that a later
    # Accelerator silently keeps (an earlier CUDA run wins over --device cpu) or may not change (mixed
    # precision); one process may train several times (cdtool demo, notebooks, tests). Under
    # `accelerate launch` nothing is set up before the first run, so this resets nothing there.
    AcceleratorState._reset_state(reset_partial_state=True)
    # SDXL is conditioned on the first text encoder's penultimate layer: trained, its last layer gets
    # no gradient, which DDP must be told of (as diffusers' SDXL DreamBooth scripts tell it)
    unused = cfg.train_text_encoder and base_kind(cfg.model) == SDXL
    return Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        cpu=on_cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else None,
    )


@dataclass
class TrainingParts:
    """The pipeline's pieces as training uses them."""

    kind: str  # the kind of base (sd1, sd2, sdxl)
    text: TextSide  # the tokenizers and text encoders (two of each for SDXL)
    vae: Any
    unet: Any
    scheduler: Any  # DDPM, for adding noise
    device: torch.device
    factor: int  # the VAE's downscaling
    scaling: float  # the VAE's latent scaling
    unet_dtype: torch.dtype = torch.float32  # the half type when the UNet is held in it
    unet_p: Any = None  # the UNet and the text encoders as accelerate prepared them (DDP, autocast)
    text_p: TextSide | None = None
    # a whole model's frozen components as loaded (CPU), where the run holds them in a half type
    originals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def training_parts(cfg: TrainConfig, pipe: Any, device: torch.device) -> TrainingParts:
    factor = pipe.vae_scale_factor
    if cfg.resolution % factor:
        raise CdtoolError(f"--resolution {cfg.resolution} is not a multiple of the VAE's factor {factor}")
    return TrainingParts(
        kind=pipeline_kind(pipe),
        text=TextSide.of(pipe),
        vae=pipe.vae,
        unet=pipe.unet,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        device=device,
        factor=factor,
        scaling=float(getattr(pipe.vae.config, "scaling_factor", 0.18215)),
    )


@dataclass
class _NewTokens:
    """The concepts whose token is new, its tokenizer entries, and the rows they start from."""

    concepts: list[ConceptSpec]
    entries: dict[str, list[str]]  # token -> its entries ("<t>", "<t>_1", ... for several vectors)
    vectors: int
    init_ids: list[int]
    first_id: int  # the base vocabulary's size: the first new entry's id
    rows: list[TokenRows] = field(default_factory=list)  # the trainable rows per text encoder, once added

    def expand(self, text: str) -> str:
        """Multi-vector tokens appear in prompts as their entries: "<t>" -> "<t> <t>_1 <t>_2"."""
        for token, names in self.entries.items():
            if len(names) > 1:
                text = text.replace(token, " ".join(names))
        return text


def _plan_tokens(cfg: TrainConfig, method: TrainingMethod, text: TextSide) -> _NewTokens:
    """New tokens, initialised from their rare initialiser pieces (in every text encoder, from the
    same vocabulary entry). DreamBooth's identifier may be an existing rare word ("sks"), which is
    then used as it is and not trained."""
    tokenizer = text.tokenizer
    new = [c for c in cfg.concepts if not (method.token_may_exist and is_existing_word(tokenizer, c.token))]
    for c in new:
        for tok in text.tokenizers:
            check_new_token(tok, c.token)
    vectors = method.vectors(cfg)
    init_ids = [resolve_init_token(tokenizer, c.init_token) for c in new for _ in range(vectors)]
    for tok in text.tokenizers[1:]:
        if len(tok) != len(tokenizer) or [resolve_init_token(tok, c.init_token) for c in new] != init_ids[::vectors]:
            raise CdtoolError("the model's two tokenizers have different vocabularies; cdtool needs them to agree")
    return _NewTokens(
        concepts=new,
        entries={c.token: token_names(c.token, vectors) for c in new},
        vectors=vectors,
        init_ids=init_ids,
        first_id=len(tokenizer),
    )


@dataclass
class _Base:
    """What the delta is measured against: the base's fingerprint and the trained layers' weights."""

    fingerprint: str
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]


def _record_base(method: TrainingMethod, pipe: Any, layer_names: list[str], tokens: _NewTokens) -> _Base:
    params = pipeline_params(pipe)
    if method.full_model:  # no delta: the model is written whole, and records its base by fingerprint
        return _Base(fingerprint=unet_fingerprint(params), weights={}, biases={})
    # the fingerprint covers what the written delta will name: layers trained as themselves carry
    # their bias's change too (to_out.0 under --train attn2), LoRA factors do not
    touched = Delta(
        layers={
            n: LayerDelta(
                full=torch.zeros(1, 1),
                bias=torch.zeros(1) if method.trains_weights and f"{n}.bias" in params else None,
            )
            for n in layer_names
        },
        tokens={c.token: torch.zeros(1, 1) for c in tokens.concepts},
        tokens_2={c.token: torch.zeros(1, 1) for c in tokens.concepts} if TOKEN_EMBEDDING_2 in params else {},
    )
    return _Base(
        fingerprint=fingerprint(params, fingerprint_names(touched), tokens.first_id),
        weights={n: params[f"{n}.weight"].detach().clone() for n in layer_names},
        biases={n: params[f"{n}.bias"].detach().clone() for n in layer_names if f"{n}.bias" in params},
    )


def _add_tokens(tokens: _NewTokens, parts: TrainingParts) -> None:
    """The new entries into the tokenizer(s) and embedding table(s), their trainable rows hooked in
    (one TokenRows per text encoder: for SDXL both rows of a token train)."""
    if not tokens.concepts:
        return
    inits = [e.get_input_embeddings().weight.detach()[tokens.init_ids].clone() for e in parts.text.encoders]
    flat = [e for c in tokens.concepts for e in tokens.entries[c.token]]
    ids = add_text_tokens(parts.text, [dict(zip(flat, init, strict=True)) for init in inits])
    if ids != list(range(tokens.first_id, tokens.first_id + len(flat))):
        raise CdtoolError("internal: new tokens did not get consecutive ids")
    tokens.rows = [
        attach_token_rows(e, init, tokens.first_id) for e, init in zip(parts.text.encoders, inits, strict=True)
    ]


def _freeze_and_adapt(
    cfg: TrainConfig, method: TrainingMethod, parts: TrainingParts, layer_names: list[str], tokens: _NewTokens
) -> dict[str, torch.nn.Parameter]:
    """Everything frozen except what the method trains; returns the trained parameters by name."""
    for module in (parts.unet, parts.vae, *parts.text.encoders):
        module.requires_grad_(False)
    method.adapt(cfg, parts.unet, parts.text.named(), layer_names)
    for rows in tokens.rows:
        rows.weight.requires_grad_(True)
    if cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    parts.unet.train()
    trainable = {f"unet.{n}": p for n, p in parts.unet.named_parameters() if p.requires_grad}
    for component, encoder in parts.text.named().items():
        trainable.update({f"{component}.{n}": p for n, p in encoder.named_parameters() if p.requires_grad})
    if not trainable:
        raise CdtoolError("nothing to train: textual inversion needs a new token")
    return trainable


def _learning_rate(cfg: TrainConfig, processes: int) -> float:
    """As the reference: x batch x accumulation x processes, x2 with prior (when scale_lr)."""
    prior = any(c.reg_examples for c in cfg.concepts)
    lr = cfg.lr
    if cfg.scale_lr:
        lr *= cfg.batch_size * cfg.grad_accum * processes * (2 if prior else 1)
    return lr


def _optimizer(cfg: TrainConfig, trainable: dict[str, torch.nn.Parameter], lr: float) -> Any:
    """AdamW as the reference sets it; the text encoder's trained weights may have their own rate."""

    def is_text_weight(name: str) -> bool:  # a text encoder's own weights (its LoRA, or all of it), not new token rows
        return name.startswith(("text_encoder.", "text_encoder_2.")) and ".cdtool_token_rows." not in name

    groups: list[dict[str, Any]] = [{"params": [p for n, p in trainable.items() if not is_text_weight(n)]}]
    if any(is_text_weight(n) for n in trainable):
        groups.append(
            {"params": [p for n, p in trainable.items() if is_text_weight(n)], "lr": cfg.text_encoder_lr or lr}
        )
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    try:
        import bitsandbytes as bnb  # optional: only --use-8bit-adam needs it
    except ImportError as e:
        raise CdtoolError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from e
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def _prepare(accelerator: Accelerator, modules: list[Any], optimizer: Any) -> tuple[list[Any], Any]:
    """accelerate's prepare: the modules that train wrapped for several processes (DDP), the frozen
    ones only placed and given autocast, as accelerate's multi-GPU mode treats them (its multi-CPU
    mode would wrap them too, and DDP refuses a module with nothing to train)."""
    trains = [any(p.requires_grad for p in m.parameters()) for m in modules]
    *trained, optimizer = accelerator.prepare(*[m for m, t in zip(modules, trains, strict=True) if t], optimizer)
    done = iter(trained)
    out = [
        next(done) if t else accelerator.prepare_model(m, evaluation_mode=True)
        for m, t in zip(modules, trains, strict=True)
    ]
    return out, optimizer


def _hold_in_half(cfg: TrainConfig, method: TrainingMethod, parts: TrainingParts, layer_names: list[str]) -> list[Any]:
    """The VAE on the device in the run's precision. On CUDA with mixed precision the frozen weights
    are held in the half type (as the reference holds them), halving their memory, and the UNet runs
    wholly in it without autocast's per-op casts, as the reference runs it: on an H100 a step was
    CPU-bound (profiled: ~66 ms of GPU work in a ~170 ms step at 512 px, batch 2+2). What trains
    stays fp32, the optimiser's master copy, and computes in fp32. The text encoder (its new rows
    train) keeps autocast, and so does the CPU, whose autocast keeps group norm in fp32 and so needs
    fp32 weights. Returns the hooks that cast around the trained layers."""
    parts.vae.to(parts.device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if method.full_model and weight_dtype != torch.float32:  # written whole at the end, as loaded
        frozen = {"vae": parts.vae, **parts.text.named()}
        parts.originals = {
            name: {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            for name, module in frozen.items()
            if not any(p.requires_grad for p in module.parameters())
        }
    # SDXL's VAE overflows in float16 (its config says force_upcast): it encodes in float32, as in
    # diffusers' SDXL training scripts
    upcast = parts.text.xl and bool(getattr(parts.vae.config, "force_upcast", False))
    parts.vae.to(dtype=torch.float32 if upcast else weight_dtype)
    if weight_dtype == torch.float32 or parts.device.type != "cuda":
        return []
    for module in (parts.unet, *parts.text.encoders):
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
    if method.full_model:  # the whole UNet trains: fp32 under accelerate's autocast, as diffusers' script
        return []
    parts.unet_dtype = weight_dtype
    if not method.trains_weights:  # peft's LoRA layers cast for themselves
        return []
    return compute_in_fp32([parts.unet.get_submodule(n[len("unet.") :]) for n in layer_names], weight_dtype)


@dataclass
class _Data:
    """Instance images held in memory at up to 1.4x the resolution (the augmentation's largest
    scale); the regularisation images' latent distributions and class text features, computed once."""

    instances: list[tuple[int, Example]]  # (concept index, example)
    pixels: dict[Path, torch.Tensor]
    regs: list[Example]
    reg_dist: list[torch.Tensor]  # per class image: [views, 2C, h, w] (views: itself, and mirrored with --hflip)
    reg_text: dict[str, Encoded]  # class caption -> its conditioning (one prompt's: [L, D], pooled [P])


def _cache_data(cfg: TrainConfig, parts: TrainingParts) -> _Data:
    size = cfg.resolution
    instances = [(c_i, ex) for c_i, c in enumerate(cfg.concepts) for ex in c.examples]
    hold = int(1.4 * size) if cfg.aug else size
    pixels: dict[Path, torch.Tensor] = {}
    for _, ex in instances:
        if ex.path not in pixels:
            pixels[ex.path] = load_image(ex.path, hold)
    data = _Data(instances, pixels, [ex for c in cfg.concepts for ex in c.reg_examples], [], {})
    with torch.no_grad():
        for i in range(0, len(data.regs), 8):
            chunk = torch.stack([load_image(ex.path, size) for ex in data.regs[i : i + 8]])
            views = [chunk, chunk.flip(-1)] if cfg.hflip else [chunk]
            dists = [_latent_dist(parts.vae, v).cpu() for v in views]
            for j in range(chunk.shape[0]):
                data.reg_dist.append(torch.stack([d[j] for d in dists]))
        captions = sorted({ex.caption for ex in data.regs})
        for i in range(0, len(captions), 16):
            enc = encode(parts.text, captions[i : i + 16], parts.device)
            for j, caption in enumerate(captions[i : i + 16]):
                pooled = None if enc.pooled is None else enc.pooled[j].float().cpu()
                data.reg_text[caption] = Encoded(enc.hidden[j].float().cpu(), pooled)
    return data


def batch_time_ids(parts: TrainingParts, views: list[Any], n_class: int, size: int) -> torch.Tensor | None:
    """SDXL's time ids of a batch, [B, 6] (None for the other kinds). An instance view that the
    augmentation zoomed into is a size x size crop at (top, left) of a scale x scale image; any
    other view, and every class image, is a whole size x size image (original = target, crop 0, 0:
    what the pipeline conditions on when sampling)."""
    if not parts.text.xl:
        return None
    whole = time_ids((size, size), (0, 0), (size, size))
    ids = [time_ids((v.scale, v.scale), v.crop, (size, size)) if v.scale > size else whole for v in views]
    return torch.stack(ids + [whole] * n_class)


@dataclass
class _EvalBatch:
    """DVAR's fixed evaluation batch: the same latents, noise and timesteps at every step."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]
    time_ids: torch.Tensor | None = None  # SDXL: whole images at the resolution


def _eval_batch(cfg: TrainConfig, method: TrainingMethod, parts: TrainingParts, data: _Data) -> _EvalBatch:
    """Drawn once, from its own generator (training's draws untouched)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 3)
    picks = [data.instances[int(i)] for i in torch.randint(0, len(data.instances), (cfg.eval_batch,), generator=g)]
    with torch.no_grad():
        imgs = torch.stack([load_image(ex.path, cfg.resolution) for _, ex in picks])
        lat = _sample_latents(_latent_dist(parts.vae, imgs).cpu(), g, parts.scaling)
    return _EvalBatch(
        latents=lat,
        noise=torch.randn(lat.shape, generator=g),
        timesteps=torch.randperm(parts.scheduler.config.num_train_timesteps, generator=g)[: cfg.eval_batch],
        prompts=[method.eval_prompt(cfg, cfg.concepts[c_i], ex) for c_i, ex in picks],
        time_ids=batch_time_ids(parts, [], cfg.eval_batch, cfg.resolution),
    )


@dataclass
class _Batch:
    """One step's instance views (first) and class images (after them, with --reg)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    mask: torch.Tensor  # the instance views' loss masks
    prompts: list[str]  # the instance views' prompts
    class_text: Encoded | None  # the class images' conditioning
    time_ids: torch.Tensor | None  # SDXL: every image's size and crop conditioning, [B, 6]


def _draw_batch(
    cfg: TrainConfig, method: TrainingMethod, parts: TrainingParts, data: _Data, tokens: _NewTokens, rng: _Rng
) -> _Batch:
    picks = [
        data.instances[int(i)] for i in torch.randint(0, len(data.instances), (cfg.batch_size,), generator=rng.data)
    ]
    # augmented on the device: on a GPU the CPU's antialiased resize of a 512 px view took 8 ms,
    # more than the copy; the random draws stay on the CPU generators
    views = [
        augment(
            data.pixels[ex.path].to(parts.device),
            cfg.resolution,
            parts.factor,
            rng.data,
            enabled=cfg.aug,
            hflip=cfg.hflip,
        )
        for _, ex in picks
    ]
    captions = [method.caption(cfg, cfg.concepts[c_i], ex, rng.data) for c_i, ex in picks]
    prompts = [tokens.expand(v.prefix + c) for v, c in zip(views, captions, strict=True)]
    with torch.no_grad():  # latents stay on the device: no wait for the VAE mid-step
        lat = _sample_latents(_latent_dist(parts.vae, torch.stack([v.image for v in views])), rng.noise, parts.scaling)
    cls_text = None
    if data.regs:
        rp = [int(i) for i in torch.randint(0, len(data.regs), (cfg.batch_size,), generator=rng.data)]
        flips = [int(torch.randint(0, data.reg_dist[i].shape[0], (), generator=rng.data)) for i in rp]
        rlat = _sample_latents(
            torch.stack([data.reg_dist[i][f] for i, f in zip(rp, flips, strict=True)]), rng.noise, parts.scaling
        )
        lat = torch.cat([lat, rlat.to(lat.device)])
        cls_text = _stack([data.reg_text[data.regs[i].caption] for i in rp])
    noise = torch.randn(lat.shape, generator=rng.noise).to(lat.device)
    t = torch.randint(0, parts.scheduler.config.num_train_timesteps, (lat.shape[0],), generator=rng.noise)
    ids = batch_time_ids(parts, views, lat.shape[0] - len(views), cfg.resolution)
    return _Batch(lat, noise, t.to(lat.device), torch.stack([v.mask for v in views]), prompts, cls_text, ids)


def _stack(items: list[Encoded]) -> Encoded:
    pooled = None if items[0].pooled is None else torch.stack([e.pooled for e in items])  # type: ignore[misc]
    return Encoded(torch.stack([e.hidden for e in items]), pooled)


def _cat(a: Encoded, b: Encoded) -> Encoded:
    """The instance views' conditioning, then the class images'."""
    pooled = None if a.pooled is None else torch.cat([a.pooled, b.pooled.to(a.pooled.device, a.pooled.dtype)])  # type: ignore[union-attr]
    return Encoded(torch.cat([a.hidden, b.hidden.to(a.hidden.device, a.hidden.dtype)]), pooled)


def _loss(method: TrainingMethod, parts: TrainingParts, batch: _Batch, prior_weight: float) -> torch.Tensor:
    assert parts.text_p is not None
    text = encode(parts.text_p, batch.prompts, parts.device)
    if batch.class_text is not None:
        text = _cat(text, batch.class_text)
    pred, target = _predict(parts.unet_p, parts, batch.latents, batch.noise, batch.timesteps, text, batch.time_ids)
    return method.loss(pred, target, batch.mask.to(parts.device), prior_weight)


def _eval_loss(parts: TrainingParts, tokens: _NewTokens, ev: _EvalBatch) -> float:
    with torch.no_grad():
        text = encode(parts.text, [tokens.expand(p) for p in ev.prompts], parts.device)
        pred, target = _predict(parts.unet, parts, ev.latents, ev.noise, ev.timesteps, text, ev.time_ids)
        return float(F.mse_loss(pred.float(), target.float()))


def _predict(
    unet: Any,
    parts: TrainingParts,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    text: Encoded,
    ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction for the latents noised to timesteps `t` under the conditioning `text`
    (and SDXL's time ids), and what it should predict."""
    noisy = parts.scheduler.add_noise(latents, noise, t)
    pred = unet(
        noisy.to(parts.device, parts.unet_dtype), t.to(parts.device), **unet_inputs(text, ids, parts.unet_dtype)
    )
    return pred.sample, prediction_target(parts.scheduler, latents, noise, t).to(parts.device)


def prediction_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: the noise, or the velocity for v-prediction models."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def _build_delta(
    cfg: TrainConfig,
    method: TrainingMethod,
    parts: TrainingParts,
    layer_names: list[str],
    base: _Base,
    tokens: _NewTokens,
    run: dict[str, Any],
) -> Delta:
    """ΔW of every trained layer, the learned rows, and what made them (`run`: how the run went)."""
    delta = Delta(
        base_kind=parts.kind,
        base_model=cfg.model,
        base_fingerprint=base.fingerprint,
    )
    modules = {"unet": parts.unet, **parts.text.named()}
    for n in layer_names:
        component, _, path = n.partition(".")
        delta.layers[n] = method.layer_delta(
            modules[component].get_submodule(path), base.weights[n], base.biases.get(n)
        )
    learned = [r.weight.detach().float().cpu() for r in tokens.rows]
    for i, c in enumerate(tokens.concepts):
        own = slice(i * tokens.vectors, (i + 1) * tokens.vectors)
        delta.tokens[c.token] = learned[0][own].clone()
        if len(learned) > 1:
            delta.tokens_2[c.token] = learned[1][own].clone()
    delta.concepts = [method.concept_record(cfg, c, c in tokens.concepts) for c in cfg.concepts]
    config = {k: v for k, v in asdict(cfg).items() if k != "concepts"}
    stamp(delta, "train", train_entry(config, run, method.name), command=f"train ({method.name})", new=True)
    return delta


def _write_model(
    cfg: TrainConfig, pipe: Any, parts: TrainingParts, record: Delta, output: Output, entries: list[dict[str, Any]]
) -> None:
    """The whole trained model as a diffusers folder (float32, as diffusers' train_dreambooth.py
    writes it) with its record and card, moved into place whole; the loss curve in the run folder.
    Components held in a half type come back as they were loaded."""
    for name, state in parts.originals.items():
        module = getattr(pipe, name)
        module.to(torch.float32)
        module.load_state_dict(state)
    pipe.to(torch.float32)
    with output.staged() as stage:
        write_model_folder(pipe, stage, record, Path(cfg.output).name)
    loss_curve(entries, Path(cfg.run_dir) / LOSS_CURVE)


def _write_outputs(
    cfg: TrainConfig, delta: Delta, base: _Base, entries: list[dict[str, Any]], replace_output: bool
) -> None:
    """The delta (with the base weights a .bin export needs), its copy in the run folder, the loss curve."""
    base_params = {f"{n}.weight": w for n, w in base.weights.items()} | {f"{n}.bias": b for n, b in base.biases.items()}
    save_delta(delta, Path(cfg.output), base_params, replace=replace_output)
    save_delta(delta, Path(cfg.run_dir) / DELTA)
    loss_curve(entries, Path(cfg.run_dir) / LOSS_CURVE)

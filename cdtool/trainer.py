"""Custom Diffusion training (Kumari et al. 2023), on HF accelerate.

What trains: the UNet's cross-attention key/value projections (or all cross-attention projections,
the reference's `crossattn` mode) and the new tokens' embedding rows; everything else is frozen.
Prior preservation with a regularisation set, the size augmentation with its prompt words and loss
mask, AdamW and the learning-rate scaling follow the reference code. DVAR early stopping (Voronov
et al. 2023) is optional.

Work done once rather than every step: the regularisation images' latent distributions (and those
of their mirror images) and the class prompts' text features are computed before the first step.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cdtool import __version__
from cdtool.atomic import atomic_path
from cdtool.augment import augment
from cdtool.data import Example, load_image
from cdtool.errors import CdtoolError
from cdtool.losses import custom_diffusion_loss, dvar

CHECKPOINTS = "checkpoints"
LOG = "log.jsonl"
CONFIG = "config.json"


@dataclass
class ConceptSpec:
    """One concept: its photos (with captions), token, class noun and regularisation set."""

    token: str
    class_noun: str
    init_token: str
    examples: list[Example]
    reg_examples: list[Example] = field(default_factory=list)
    data: str = ""
    reg: str | None = None


@dataclass
class TrainConfig:
    concepts: list[ConceptSpec]
    model: str
    output: str
    run_dir: str
    method: str = "custom-diffusion"
    train: str = "kv"  # custom diffusion: kv = attn2.to_k/to_v; attn2 = all cross-attention projections
    resolution: int = 512
    steps: int = 250
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    scale_lr: bool = True
    prior_weight: float = 1.0
    aug: bool = True
    hflip: bool = False
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    early_stop: str = "none"
    dvar_window: int = 180
    dvar_eps: float = 0.15
    eval_batch: int = 4
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    device: str = "auto"
    num_vectors: int = 1  # textual inversion: embedding rows per token
    property: str = "object"  # textual inversion: object or style caption templates
    rank: int = 4  # dreambooth-lora
    lora_alpha: float | None = None  # default: the rank (scale 1)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        d = asdict(self)
        for k in ("steps", "checkpoint_every", "keep_checkpoints", "device", "output", "run_dir"):
            d.pop(k)
        return d


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


def _encode_prompts(tokenizer: Any, encoder: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)
    return encoder(ids)[0]


def _compute_in_fp32(layers: list[torch.nn.Module], half: torch.dtype) -> list[Any]:
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
) -> TrainResult:
    """Train the concepts of `cfg`; writes the delta (main process) and the run folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler

    from cdtool.attention import use_detaching_cross_attention
    from cdtool.base import fingerprint, fingerprint_names, pipeline_params
    from cdtool.delta import Delta, LayerDelta
    from cdtool.extract import trainable_layer_names
    from cdtool.importers import save_delta
    from cdtool.models import load_pipeline
    from cdtool.tokens import attach_token_rows, check_new_token, resolve_init_token

    started = time.perf_counter()
    # Without CUDA, cpu=True is what makes accelerate run several CPU processes (MULTI_CPU) under
    # `accelerate launch --multi_gpu --num_processes N` (its `--cpu` flag starts one process without MPI).
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    # accelerate keeps its state (device, mixed precision) in process-wide singletons that a later
    # Accelerator silently keeps (an earlier CUDA run wins over --device cpu) or may not change (mixed
    # precision); one process may train several times (cdtool demo, notebooks, tests). Under
    # `accelerate launch` nothing is set up before the first run, so this resets nothing there.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision, cpu=on_cpu
    )
    device = accelerator.device
    main = accelerator.is_main_process
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)  # module initialisation only; training draws from _Rng
    random.seed(cfg.seed)

    pipe = load_pipeline(cfg.model)
    tokenizer, encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    factor = pipe.vae_scale_factor
    if cfg.resolution % factor:
        raise CdtoolError(f"--resolution {cfg.resolution} is not a multiple of the VAE's factor {factor}")

    from cdtool.apply import is_existing_word, token_names
    from cdtool.methods import (
        CUSTOM_DIFFUSION,
        DREAMBOOTH_LORA,
        OBJECT_TEMPLATES,
        STYLE_TEMPLATES,
        TEXT_LORA_TARGETS,
        TEXTUAL_INVERSION,
    )

    method = cfg.method
    # New tokens, initialised from their rare initialiser pieces. DreamBooth's identifier may be
    # an existing rare word ("sks"), which is then used as it is and not trained.
    new_concepts = []
    for c in cfg.concepts:
        if method == DREAMBOOTH_LORA and is_existing_word(tokenizer, c.token):
            continue
        check_new_token(tokenizer, c.token)
        new_concepts.append(c)
    vectors = cfg.num_vectors if method == TEXTUAL_INVERSION else 1
    entries = {c.token: token_names(c.token, vectors) for c in new_concepts}
    init_ids = [resolve_init_token(tokenizer, c.init_token) for c in new_concepts for _ in range(vectors)]
    base_vocab = len(tokenizer)
    if method == CUSTOM_DIFFUSION:
        layer_names = trainable_layer_names(unet, cfg.train)
    elif method == DREAMBOOTH_LORA:
        suffixes = tuple(f".{t}" for t in cfg.lora_targets)
        layer_names = [
            f"unet.{n}"
            for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(suffixes) and (".attn1." in n or ".attn2." in n)
        ]
        if not layer_names:
            raise CdtoolError(f"no UNet attention projection matches --target {','.join(cfg.lora_targets)}")
        if cfg.train_text_encoder:
            te_suffixes = tuple(f".{t}" for t in TEXT_LORA_TARGETS)
            layer_names += [
                f"text_encoder.{n}"
                for n, m in encoder.named_modules()
                if isinstance(m, torch.nn.Linear) and n.endswith(te_suffixes)
            ]
    else:
        layer_names = []
    base_params = pipeline_params(pipe)
    # the fingerprint covers what the written delta will name: full-rank layers (custom-diffusion)
    # carry their bias's change too (to_out.0 under --train attn2), LoRA factors do not
    full_rank = method == CUSTOM_DIFFUSION
    fingerprint_delta = Delta(
        layers={
            n: LayerDelta(
                full=torch.zeros(1, 1), bias=torch.zeros(1) if full_rank and f"{n}.bias" in base_params else None
            )
            for n in layer_names
        },
        tokens={c.token: torch.zeros(1, 1) for c in new_concepts},
    )
    base_fp = fingerprint(base_params, fingerprint_names(fingerprint_delta), base_vocab)
    base_weights = {n: base_params[f"{n}.weight"].detach().clone() for n in layer_names}
    base_biases = {n: base_params[f"{n}.bias"].detach().clone() for n in layer_names if f"{n}.bias" in base_params}
    rows = None
    if new_concepts:
        init_rows = encoder.get_input_embeddings().weight.detach()[init_ids].clone()
        flat = [e for c in new_concepts for e in entries[c.token]]
        tokenizer.add_tokens(flat)
        if tokenizer.convert_tokens_to_ids(flat) != list(range(base_vocab, base_vocab + len(flat))):
            raise CdtoolError("internal: new tokens did not get consecutive ids")
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rows = attach_token_rows(encoder, init_rows, base_vocab)

    def expand(text: str) -> str:
        """Multi-vector tokens appear in prompts as their entries: "<t>" -> "<t> <t>_1 <t>_2"."""
        for token, names in entries.items():
            if len(names) > 1:
                text = text.replace(token, " ".join(names))
        return text

    templates = STYLE_TEMPLATES if cfg.property == "style" else OBJECT_TEMPLATES

    # frozen everywhere except what the method trains
    for module in (unet, vae, encoder):
        module.requires_grad_(False)
    if method == CUSTOM_DIFFUSION:
        for n in layer_names:
            lin = unet.get_submodule(n[len("unet.") :])
            lin.weight.requires_grad_(True)
            if lin.bias is not None:
                lin.bias.requires_grad_(True)
        use_detaching_cross_attention(unet)
    elif method == DREAMBOOTH_LORA:
        from peft import LoraConfig

        alpha = cfg.lora_alpha or cfg.rank
        unet_targets = [n[len("unet.") :] for n in layer_names if n.startswith("unet.")]
        unet.add_adapter(
            LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=unet_targets)
        )
        te_targets = [n[len("text_encoder.") :] for n in layer_names if n.startswith("text_encoder.")]
        if te_targets:
            encoder.add_adapter(
                LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=te_targets)
            )
    if rows is not None:
        rows.weight.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    trainable.update({f"text_encoder.{n}": p for n, p in encoder.named_parameters() if p.requires_grad})
    if not trainable:
        raise CdtoolError("nothing to train: textual inversion needs a new token")

    prior = any(c.reg_examples for c in cfg.concepts)
    lr = cfg.lr
    if cfg.scale_lr:  # as the reference: x batch x accumulation x processes, x2 with prior
        lr *= cfg.batch_size * cfg.grad_accum * accelerator.num_processes * (2 if prior else 1)

    def is_te_lora(name: str) -> bool:
        return name.startswith("text_encoder.") and "lora_" in name

    groups: list[dict[str, Any]] = [{"params": [p for n, p in trainable.items() if not is_te_lora(n)]}]
    if any(is_te_lora(n) for n in trainable):
        groups.append({"params": [p for n, p in trainable.items() if is_te_lora(n)], "lr": cfg.text_encoder_lr or lr})
    params = list(trainable.values())
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise CdtoolError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from e
        optimizer = bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    vae.to(device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    vae.to(dtype=weight_dtype)
    # On CUDA with mixed precision the frozen weights are held in the half type (as the reference holds
    # them), halving their memory, and the UNet runs wholly in it without autocast's per-op casts, as
    # the reference runs it: on an H100 a step is CPU-bound (profiled: ~66 ms of GPU work in a
    # ~170 ms step at 512 px, batch 2+2). What trains stays fp32, the optimiser's master copy, and
    # computes in fp32. The text encoder (its new rows train) keeps autocast, and so does the CPU,
    # whose autocast keeps group norm in fp32 and so needs fp32 weights.
    half_unet = weight_dtype != torch.float32 and device.type == "cuda"
    hooks = []
    if half_unet:
        for module in (unet, encoder):
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(weight_dtype)
        if method == CUSTOM_DIFFUSION:  # peft's LoRA layers cast for themselves
            hooks = _compute_in_fp32([unet.get_submodule(n[len("unet.") :]) for n in layer_names], weight_dtype)
    unet_dtype = weight_dtype if half_unet else torch.float32
    unet_p, encoder_p, optimizer = accelerator.prepare(unet, encoder, optimizer)
    if half_unet:  # takes accelerate's autocast wrapper off the UNet's forward, in place (DDP stays)
        accelerator.unwrap_model(unet_p, keep_fp32_wrapper=False)
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    size = cfg.resolution
    rng = _Rng(cfg.seed, accelerator.process_index)

    # data: instance images held in memory at up to 1.4x the resolution (the augmentation's
    # largest scale); regularisation latents and class text features computed once
    instances = [(c_i, ex) for c_i, c in enumerate(cfg.concepts) for ex in c.examples]
    hold = int(1.4 * size) if cfg.aug else size
    pixels: dict[Path, torch.Tensor] = {}
    for _, ex in instances:
        if ex.path not in pixels:
            pixels[ex.path] = load_image(ex.path, hold)
    regs = [ex for c in cfg.concepts for ex in c.reg_examples]
    reg_dist: list[torch.Tensor] = []
    reg_text: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(0, len(regs), 8):
            chunk = torch.stack([load_image(ex.path, size) for ex in regs[i : i + 8]])
            views = [chunk, chunk.flip(-1)] if cfg.hflip else [chunk]
            dists = [_latent_dist(vae, v).cpu() for v in views]
            for j in range(chunk.shape[0]):
                reg_dist.append(torch.stack([d[j] for d in dists]))
        captions = sorted({ex.caption for ex in regs})
        for i in range(0, len(captions), 16):
            feats = _encode_prompts(tokenizer, encoder, captions[i : i + 16], device).float().cpu()
            reg_text.update(zip(captions[i : i + 16], feats, strict=True))

    # DVAR's fixed evaluation batch: drawn once, from its own generator (training draws untouched)
    eval_batch = None
    if cfg.early_stop == "dvar":
        g = torch.Generator().manual_seed(cfg.seed * 1000 + 3)
        picks = [instances[int(i)] for i in torch.randint(0, len(instances), (cfg.eval_batch,), generator=g)]
        with torch.no_grad():
            imgs = torch.stack([load_image(ex.path, size) for _, ex in picks])
            lat = _sample_latents(_latent_dist(vae, imgs).cpu(), g, scaling)
        eval_batch = {
            "latents": lat,
            "noise": torch.randn(lat.shape, generator=g),
            "timesteps": torch.randperm(scheduler.config.num_train_timesteps, generator=g)[: cfg.eval_batch],
            "prompts": [
                templates[0].format(cfg.concepts[c_i].token) if method == TEXTUAL_INVERSION else ex.caption
                for c_i, ex in picks
            ],
        }

    step, history, losses_log = 0, [], []
    if resume:
        step, history = _load_checkpoint(run_dir, accelerator, trainable, optimizer, rng)
        if main:
            log(f"resumed {run_dir} at step {step}")
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / LOG).write_text("")
        cfg_doc = asdict(cfg)
        for c in cfg_doc["concepts"]:
            c["examples"] = [[str(e["path"]), e["caption"]] for e in c["examples"]]
            c["reg_examples"] = len(c["reg_examples"])
        (run_dir / CONFIG).write_text(
            json.dumps({"config": cfg_doc, "resume_key": _resume_key(cfg), "cdtool": __version__}, indent=1)
        )

    def predict_target(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scheduler.config.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, t)
        return noise

    stop_reason, stat, last_loss = "", None, None
    while step < cfg.steps:
        for _ in range(cfg.grad_accum):
            with accelerator.accumulate(unet_p, encoder_p):
                picks = [
                    instances[int(i)] for i in torch.randint(0, len(instances), (cfg.batch_size,), generator=rng.data)
                ]
                # augmented on the device: on a GPU the CPU's antialiased resize of a 512 px view
                # took 8 ms, more than the copy; the random draws stay on the CPU generators
                views = [
                    augment(pixels[ex.path].to(device), size, factor, rng.data, enabled=cfg.aug, hflip=cfg.hflip)
                    for _, ex in picks
                ]
                if method == TEXTUAL_INVERSION:
                    captions = []
                    for c_i, _ in picks:
                        t = templates[int(torch.randint(0, len(templates), (), generator=rng.data))]
                        captions.append(t.format(cfg.concepts[c_i].token))
                else:
                    captions = [ex.caption for _, ex in picks]
                prompts = [expand(v.prefix + c) for v, c in zip(views, captions, strict=True)]
                with torch.no_grad():  # latents stay on the device: no wait for the VAE mid-step
                    lat = _sample_latents(_latent_dist(vae, torch.stack([v.image for v in views])), rng.noise, scaling)
                mask = torch.stack([v.mask for v in views])
                cls_feats = None
                if prior:
                    rp = [int(i) for i in torch.randint(0, len(regs), (cfg.batch_size,), generator=rng.data)]
                    flips = [int(torch.randint(0, reg_dist[i].shape[0], (), generator=rng.data)) for i in rp]
                    rlat = _sample_latents(
                        torch.stack([reg_dist[i][f] for i, f in zip(rp, flips, strict=True)]), rng.noise, scaling
                    )
                    lat = torch.cat([lat, rlat.to(lat.device)])
                    cls_feats = torch.stack([reg_text[regs[i].caption] for i in rp])
                noise = torch.randn(lat.shape, generator=rng.noise).to(lat.device)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (lat.shape[0],), generator=rng.noise)
                t = t.to(lat.device)
                noisy = scheduler.add_noise(lat, noise, t)
                feats = _encode_prompts(tokenizer, encoder_p, prompts, device)
                if cls_feats is not None:
                    feats = torch.cat([feats, cls_feats.to(device, feats.dtype)])
                pred = unet_p(
                    noisy.to(device, unet_dtype), t.to(device), encoder_hidden_states=feats.to(unet_dtype)
                ).sample
                target = predict_target(lat, noise, t).to(device)
                n = cfg.batch_size
                if method == CUSTOM_DIFFUSION:  # the prior weighed as the paper's code does (see losses)
                    loss = custom_diffusion_loss(pred, target, mask.to(device), cfg.prior_weight)
                else:  # textual inversion and dreambooth use the plain mean squared error
                    loss = F.mse_loss(pred[:n].float(), target[:n].float())
                    if prior:
                        loss = loss + cfg.prior_weight * F.mse_loss(pred[n:].float(), target[n:].float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        entry: dict[str, Any] = {"step": step, "loss": last_loss, "lr": lr}
        if eval_batch is not None:
            with torch.no_grad():
                ev = eval_batch
                noisy = scheduler.add_noise(ev["latents"], ev["noise"], ev["timesteps"])
                feats = _encode_prompts(tokenizer, encoder, [expand(p) for p in ev["prompts"]], device)
                pred = unet(
                    noisy.to(device, unet_dtype),
                    ev["timesteps"].to(device),
                    encoder_hidden_states=feats.to(unet_dtype),
                ).sample
                eval_loss = float(
                    F.mse_loss(
                        pred.float(), predict_target(ev["latents"], ev["noise"], ev["timesteps"]).to(device).float()
                    )
                )
            history.append(eval_loss)
            stat = dvar(history, cfg.dvar_window)
            entry.update(eval_loss=eval_loss, dvar=stat)
        if main:
            with (run_dir / LOG).open("a") as f:
                f.write(json.dumps(entry) + "\n")
        losses_log.append(entry)
        if progress is not None and main:
            progress(step, cfg.steps, entry)
        if stat is not None and stat < cfg.dvar_eps:
            stop_reason = f"DVAR {stat:.4f} < {cfg.dvar_eps} over the last {cfg.dvar_window} evaluations"
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save_checkpoint(run_dir, accelerator, trainable, optimizer, rng, step, history, cfg.keep_checkpoints)
    if cfg.checkpoint_every and step % cfg.checkpoint_every:  # the last step too, so a run can be extended
        _save_checkpoint(run_dir, accelerator, trainable, optimizer, rng, step, history, cfg.keep_checkpoints)

    # the delta: ΔW of every trained projection, the learned rows, and what made them
    accelerator.wait_for_everyone()
    delta = Delta(base_model=cfg.model, base_fingerprint=base_fp, created_by=f"cdtool {__version__} train ({method})")
    for n in layer_names:
        component, _, path = n.partition(".")
        module = (unet if component == "unet" else encoder).get_submodule(path)
        if method == DREAMBOOTH_LORA:  # a peft LoRA layer: ΔW = scaling · B @ A
            up = module.lora_B["default"].weight.detach().float().cpu() * float(module.scaling["default"])
            delta.layers[n] = LayerDelta(up=up, down=module.lora_A["default"].weight.detach().float().cpu())
            continue
        db = None
        if n in base_biases:
            db = module.bias.detach().float().cpu() - base_biases[n].float()
        delta.layers[n] = LayerDelta(full=module.weight.detach().float().cpu() - base_weights[n].float(), bias=db)
    learned = rows.weight.detach().float().cpu() if rows is not None else torch.empty(0)
    for i, c in enumerate(new_concepts):
        delta.tokens[c.token] = learned[i * vectors : (i + 1) * vectors].clone()
    for c in cfg.concepts:
        delta.concepts.append(
            {
                "token": c.token,
                "class_noun": c.class_noun,
                "init_token": c.init_token if c in new_concepts else None,
                "prompts": list(templates[:3])
                if method == TEXTUAL_INVERSION
                else sorted({ex.caption for ex in c.examples})[:20],
                "data": c.data,
                "reg": c.reg,
                "method": method,
                **({"kind": "style"} if method == TEXTUAL_INVERSION and cfg.property == "style" else {}),
            }
        )
    delta.provenance = {
        "train": {
            "config": {k: v for k, v in asdict(cfg).items() if k != "concepts"},
            "steps_run": step,
            "stopped_early": bool(stop_reason),
            "stop_reason": stop_reason,
            "learning_rate": lr,
            "processes": accelerator.num_processes,
            "final_loss": last_loss,
            "method": method,
        }
    }
    if main:
        out = Path(cfg.output)
        save_delta(
            delta,
            out,
            {f"{n}.weight": w for n, w in base_weights.items()} | {f"{n}.bias": b for n, b in base_biases.items()},
        )
        save_delta(delta, run_dir / "delta.safetensors")
        _loss_curve(losses_log if not resume else _read_log(run_dir), run_dir / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    for h in hooks:
        h.remove()
    return TrainResult(
        step,
        bool(stop_reason),
        stop_reason or f"reached {cfg.steps} steps",
        last_loss,
        stat,
        lr,
        time.perf_counter() - started,
        cfg.output,
        str(run_dir),
        pipe if keep_pipeline else None,
    )


def _resume_key(cfg: TrainConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.fingerprint_fields(), sort_keys=True, default=str).encode()).hexdigest()


def resume_config_matches(run_dir: Path, cfg: TrainConfig) -> None:
    """A resumed run must use the settings of the run it continues (steps may grow)."""
    path = run_dir / CONFIG
    if not path.exists():
        raise CdtoolError(f"{run_dir} is not a cdtool training run (no {CONFIG})")
    saved = json.loads(path.read_text())
    if saved.get("resume_key") != _resume_key(cfg):
        raise CdtoolError(f"{run_dir} was trained with other settings; resume with the same data, model and options")
    if latest_checkpoint(run_dir) is None:
        raise CdtoolError(f"{run_dir} has no checkpoint to resume from; use --checkpoint-every N")


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / CHECKPOINTS).glob("step-*"))
    return ckpts[-1] if ckpts else None


def _save_checkpoint(
    run_dir: Path,
    accelerator: Any,
    trainable: dict[str, Any],
    optimizer: Any,
    rng: _Rng,
    step: int,
    history: list[float],
    keep: int,
) -> None:
    folder = run_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = run_dir / CHECKPOINTS / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    torch.save(rng.state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        state = {
            "step": step,
            "history": history,
            "params": {n: p.detach().cpu().clone() for n, p in trainable.items()},
            "optimizer": optimizer.state_dict(),
        }
        torch.save(state, tmp / "state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        for old in sorted((run_dir / CHECKPOINTS).glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(
    run_dir: Path, accelerator: Any, trainable: dict[str, Any], optimizer: Any, rng: _Rng
) -> tuple[int, list[float]]:
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise CdtoolError(f"{run_dir} has no checkpoint to resume from")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    if set(state["params"]) != set(trainable):
        raise CdtoolError(f"{folder} holds other parameters than this run trains; resume with the same options")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(state["params"][n])
    optimizer.load_state_dict(state["optimizer"])
    rng_file = folder / f"rng-{accelerator.process_index}.pt"
    if not rng_file.exists():
        raise CdtoolError(f"{folder} was saved with fewer processes; resume with the same number")
    rng.load(torch.load(rng_file, weights_only=True))
    step = int(state["step"])
    if accelerator.is_main_process:  # the log continues from the checkpoint
        kept = [line for line in _read_log(run_dir) if line["step"] <= step]
        (run_dir / LOG).write_text("".join(json.dumps(e) + "\n" for e in kept))
    return step, list(state["history"])


def _read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loss_curve(entries: list[dict[str, Any]], path: Path) -> None:
    """A small PNG of the training (and evaluation) loss per step, drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 320, 36
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    series = [("loss", (31, 119, 180)), ("eval_loss", (214, 39, 40))]
    values = [e[k] for e in entries for k, _ in series if e.get(k) is not None]
    if len(entries) >= 2 and values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        steps = [e["step"] for e in entries]
        s0, s1 = min(steps), max(steps)
        for key, colour in series:
            pts = [
                (
                    pad + (e["step"] - s0) / max(1, s1 - s0) * (w - 1.5 * pad),
                    h - pad - (e[key] - lo) / span * (h - 1.5 * pad),
                )
                for e in entries
                if e.get(key) is not None
            ]
            if len(pts) >= 2:
                draw.line(pts, fill=colour, width=2)
        draw.text(
            (pad, h - pad + 6), f"step {s0}..{s1}   loss {lo:.4g}..{hi:.4g}   blue: train  red: eval", fill="black"
        )
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def delta_from_run(path: Path) -> Any:
    """The delta of a training run folder (its final delta, else its latest checkpoint) or of one
    checkpoint folder; checkpoint weights are absolute, so the base is subtracted by the caller."""
    from cdtool.delta import Delta, LayerDelta, read_cdtool

    if (path / "state.pt").exists():
        ckpt, run_dir = path, path.parent.parent
    else:
        run_dir = path
        if (path / "delta.safetensors").exists():
            return read_cdtool(path / "delta.safetensors")
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CdtoolError(f"{path} holds neither a finished delta nor a checkpoint")
    config = json.loads((run_dir / CONFIG).read_text())["config"]
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    delta = Delta(
        base_model=config["model"],
        source_format="cdtool-checkpoint",
        origin=str(ckpt),
        created_by=f"cdtool {__version__} train (checkpoint step {state['step']})",
    )
    if config.get("method", "custom-diffusion") != "custom-diffusion":
        raise CdtoolError(
            f"{ckpt}: deltas are read from checkpoints of Custom Diffusion runs; use the run's final delta"
        )
    params = state["params"]
    for n, w in params.items():
        if n.startswith("unet.") and n.endswith(".weight"):
            stem = n[: -len(".weight")]
            delta.layers[stem] = LayerDelta(full=w.float(), bias=params.get(f"{stem}.bias"), absolute=True)
    rows = params.get("text_encoder.cdtool_token_rows.weight")
    for i, c in enumerate(config["concepts"]):
        if rows is not None:
            delta.tokens[c["token"]] = rows[i : i + 1].float()
        delta.concepts.append(
            {
                "token": c["token"],
                "class_noun": c["class_noun"],
                "init_token": c["init_token"],
                "prompts": sorted({e[1] for e in c["examples"]})[:20],
            }
        )
    delta.provenance = {"train": {"checkpoint": str(ckpt), "step": int(state["step"])}}
    return delta

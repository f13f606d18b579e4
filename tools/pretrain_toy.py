"""Pretrains the built-in toy text-to-image model (`--model toy`) on the toy world, on a CPU.

    python tools/pretrain_toy.py [--minutes 45] [--out cdtool/data/toy/model]

tools/README.md gives the stages of the shipped model (of the suite's world) and of the v1 toy model
(tools/checkpoints/toy1). A real diffusers StableDiffusionPipeline: AutoencoderKL (32 px images,
16x16x4 latents), a cross-attention UNet2DConditionModel and a CLIPTextModel (with the real CLIP
vocabulary, unless `--text-encoder` gives one, below), all trained from scratch here: first the VAE
(reconstruction + a small KL term), then the UNet and the text encoder together (epsilon prediction,
10% empty captions for classifier-free guidance; the saved weights are an exponential moving
average). Scenes are rendered on the fly from a seeded sampler. The result is stored in float16
(about 14 MB for the v1 toy model, 9 MB for the shipped one). The captions are varied as web captions
are (see `batch`): shrunk and zoomed-in views carry the size augmentation's words, some start with
"photo of", some leave out the size.

The VAE is the model's image codec, like Stable Diffusion's, which saw all kinds of images: a quarter
of its training scenes show two-tone patterned shapes so that it can encode and decode the personal
concepts' colours. The UNet and text encoder never see a concept: `--patterns SHARE` shows a share of
scenes with a split or checkered thing (`--world v2`: any of the suite's four kinds) in two named
colours, named in the caption ("a red and blue checkered square"), never the concepts' own tones, as
Stable Diffusion has seen every texture. The v1 toy model's last stage used 0.3 (benchmarks/RESULTS.md,
stage 4): without it, fine-tunes drew the concepts' tones as blobs, not as a patterned shape.

`--text-encoder FOLDER` uses a separately pretrained text encoder (tools/pretrain_toy_text.py),
frozen, as Stable Diffusion used CLIP; with `--init` the UNet keeps its weights and re-learns only
its cross-attention keys and values when the text width changes. The shipped model's UNet reads such
an encoder (`--world v2`, from the v1 toy model's weights); the v1 toy model's text encoder was
trained together with its UNet. Measured in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resumable import (
    Budget,
    load_checkpoint,
    load_into,
    module_tensors,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    step_generator,
    step_rng,
    trainable,
)

from cdtool.models.clip_vocab import load_clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "cdtool" / "data" / "toy" / "model"  # the shipped toy model's folder (package data)
SIZE = 32

VAE = dict(
    sample_size=SIZE,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=16,
)
UNET = dict(
    sample_size=SIZE // 2,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=77,
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def view(rng: random.Random) -> tuple[float, str]:
    """(zoom, caption prefix) of one training scene: a sixth shrunk and a sixth zoomed in, worded with
    the size augmentation's own prompt words, so that fine-tuning's augmented views (cdtool.augment)
    ask for something the model knows instead of teaching it that the concept comes small and repeated."""
    from cdtool.train.augment import FAR, NEAR

    u = rng.random()
    if u < 1 / 6:
        return rng.uniform(1 / 3, 0.6), rng.choice(FAR)
    if u < 1 / 3:
        return rng.uniform(1.2, 1.4), rng.choice(NEAR)
    return 1.0, ""


def pattern_world(world: str) -> tuple[tuple[str, ...], frozenset]:
    """(pattern kinds pretraining shows, (kind, tones) it never shows) of a world: `v1` the v1 toy
    model's (split and checker, the checker's black and white left out), `v2` the suite's (four
    kinds, every suite concept's tones left out)."""
    from cdtool.toy.world import CONCEPT_TONES, KINDS, PATTERN_WORDS, SUITE_TONES

    if world == "v1":
        return tuple(PATTERN_WORDS), frozenset(CONCEPT_TONES)
    return KINDS, SUITE_TONES


def draw(rng, share: float) -> bool:
    """True with probability `share`; no draw at all when `share` is 0, so that runs without the
    setting keep their data stream."""
    return bool(share) and rng.random() < share


def batch(
    sampler,
    n: int,
    patterned: float = 0.0,
    views: bool = False,
    named_patterns: float = 0.0,
    world: str = "v1",
    looks: float = 0.0,
    look_nouns: float = 0.0,
    look_pairs: float = 0.0,
    pattern_pairs: float = 0.0,
    unbackgrounded: float = 0.0,
) -> tuple[torch.Tensor, list[str]]:
    """N rendered scenes as [-1, 1] pixels, with their captions; a `patterned` share of them shows a
    patterned thing of any shape (used for the VAE only, see the module docstring). With `views`,
    some scenes are shrunk or zoomed in (see `view`), some captions start with "photo of", and a
    single thing's size word is left out of three captions in ten ("a red star on a blue background"
    is a caption users write). A `named_patterns` share shows a two-tone thing in named colours with
    its words in the caption (see cdtool.toy.world.PATTERN_WORDS; never the concepts' tones), a `looks`
    share a thing in one of the LOOKS, named by its one word ("a small tiger square"), a `look_nouns`
    share of those by the word alone ("a small tiger": its LOOK_SHAPES shape), and in a `look_pairs`
    share of those with two things, the second in another look ("a tiger square and a bee heart"); a
    `pattern_pairs` share of the `named_patterns` scenes with two things has both in named patterns; an
    `unbackgrounded` share of captions leaves the background out ("a small red star"), as web captions
    leave out most of what a photo shows: the UNet draws what no word names from its prior."""
    from cdtool.toy.world import PATTERNS, PHOTO_OF_SHARE, UNSIZED_SHARE, render

    rng = sampler.rng
    kinds, excluded = pattern_world(world)
    scenes = [
        sampler.scene(pattern=rng.choice(list(PATTERNS))) if rng.random() < patterned else sampler.scene()
        for _ in range(n)
    ]
    scenes = [
        sampler.with_pretraining_pattern(s, kinds, excluded, both=draw(rng, pattern_pairs))
        if rng.random() < named_patterns
        else s
        for s in scenes
    ]
    if looks:  # drawn only when asked, so that runs without looks keep their data stream
        scenes = [
            sampler.with_look(s, alone=draw(rng, look_nouns), both=draw(rng, look_pairs)) if rng.random() < looks else s
            for s in scenes
        ]
    images, captions = [], []
    for s in scenes:
        zoom, prefix = view(rng) if views else (1.0, "")
        if views and not prefix and rng.random() < PHOTO_OF_SHARE:
            prefix = "photo of "  # as many web captions start; the closed-form merge's target prompts do
        images.append(render(s, SIZE, zoom=zoom, at=(rng.random(), rng.random())))
        sized = not views or rng.random() >= UNSIZED_SHARE
        named = not unbackgrounded or rng.random() >= unbackgrounded  # drawn only when asked (the data stream)
        captions.append(prefix + s.caption(sized=sized, background=named))
    pixels = (
        torch.stack(
            [
                torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(SIZE, SIZE, 3).permute(2, 0, 1)
                for im in images
            ]
        ).float()
        / 127.5
        - 1
    )
    return pixels, captions


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdtool.toy.world import Sampler

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=45.0, help="time for the UNet/text-encoder stage")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="UNet and text-encoder learning rate")
    ap.add_argument("--ema", type=float, default=0.999, help="decay of the saved weights' moving average")
    ap.add_argument("--unet-channels", default="32,64", help="UNet block widths")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--save-minutes", type=float, default=10.0, help="how often to save the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-views", dest="views", action="store_false", help="no shrunk/zoomed views, every size word kept"
    )
    ap.add_argument(
        "--init", type=Path, help="continue from a saved model folder (its weights; the optimiser starts afresh)"
    )
    ap.add_argument(
        "--text-encoder",
        type=Path,
        help="a folder whose text_encoder/ (tools/pretrain_toy_text.py) is used frozen, as Stable Diffusion used "
        "CLIP; with --init, the UNet's other weights are kept and its cross-attention keys/values re-learned",
    )
    ap.add_argument(
        "--patterns",
        type=float,
        default=0.0,
        help="share of UNet scenes with a two-tone thing in named colours, named in the caption (never the "
        "concepts' own tones; the v1 toy model's last stage: 0.3; given with --resume, a new stage of the run)",
    )
    ap.add_argument(
        "--world",
        choices=("v1", "v2"),
        default="v1",
        help="which pattern kinds --patterns shows: v1 the v1 toy model's, v2 the suite's (the shipped model's)",
    )
    ap.add_argument(
        "--looks",
        type=float,
        default=0.0,
        help="share of UNet scenes with a thing in one of cdtool.toy.world.LOOKS, named by its word (given with "
        "--resume, a new stage of the run)",
    )
    ap.add_argument(
        "--look-nouns",
        type=float,
        default=0.0,
        help='share of --looks scenes whose word names the thing alone, as a noun ("a small tiger": '
        "cdtool.toy.world.LOOK_SHAPES; given with --resume, a new stage of the run)",
    )
    ap.add_argument(
        "--look-pairs",
        type=float,
        default=0.0,
        help="share of --looks scenes whose second thing, where there are two, takes another look (given with "
        "--resume, a new stage of the run)",
    )
    ap.add_argument(
        "--pattern-pairs",
        type=float,
        default=0.0,
        help="share of --patterns scenes with two things whose second thing takes a named pattern too (given "
        "with --resume, a new stage of the run)",
    )
    ap.add_argument(
        "--unbackgrounded",
        type=float,
        default=0.0,
        help='share of captions that leave the background out ("a small red star"), as web captions leave out '
        "most of what a photo shows (given with --resume, a new stage of the run)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=SHIPPED,
        help="the model folder to write (default: cdtool/data/toy/model, the shipped toy model's; the v1 toy "
        "model's stages write tools/checkpoints/toy1/model)",
    )
    ap.add_argument("--run", type=Path, help="a folder for resumable checkpoints (tools/resumable.py)")
    ap.add_argument("--resume", type=Path, help="a --run folder to continue, with its settings")
    ap.add_argument("--until", type=int, help="stop this run once this many steps are done since --init")
    args = ap.parse_args()
    if args.resume:
        return resume(args, ap)
    if args.world == "v1" and args.out.resolve() == SHIPPED.resolve():
        ap.error("--world v1 writes the v1 toy model, not the shipped one: give --out (tools/checkpoints/toy1/model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sampler = Sampler(random.Random(args.seed))
    t0 = time.perf_counter()
    if args.init:
        vae, unet, text, done = load_init(args.init)
        tokenizer = load_clip_tokenizer()
        if args.text_encoder:
            text, tokenizer = load_text_encoder(args.text_encoder)
            unet = with_cross_attention_dim(unet, text.config.hidden_size)
        main_stage(args, vae, unet, text, tokenizer, done, args.run)
        return

    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.vae_steps)
    for step in range(1, args.vae_steps + 1):
        x, _ = batch(sampler, args.vae_batch, patterned=0.25)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(
                f"vae {step}: recon mse {float(F.mse_loss(recon, x)):.5f} ({time.perf_counter() - t0:.0f}s)", flush=True
            )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(batch(sampler, 64)[0]).latent_dist.mean for _ in range(8)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    print(f"latent scaling factor {vae.config.scaling_factor:.4f}", flush=True)
    widths = tuple(int(c) for c in args.unet_channels.split(","))
    unet = UNet2DConditionModel(**dict(UNET, block_out_channels=widths, norm_num_groups=min(16, widths[0])))
    text, tokenizer = CLIPTextModel(CLIPTextConfig(**TEXT)), load_clip_tokenizer()
    if args.text_encoder:
        text, tokenizer = load_text_encoder(args.text_encoder)
    unet = with_cross_attention_dim(unet, text.config.hidden_size)
    main_stage(args, vae, unet, text, tokenizer, 0, args.run)


def resume(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Continues a --run folder: its settings (but --minutes, --threads, --save-minutes, --until, and the
    --text-encoder and --out folders where given, for a checkpoint moved to another machine), the model it
    started from, its weights, moving average, optimiser and step. A --looks given starts a new stage of
    the data stream (the share of scenes with a LOOKS word), as do --look-nouns, --look-pairs, --patterns,
    --pattern-pairs and --unbackgrounded."""
    tensors, meta = load_checkpoint(args.resume)
    settings = {
        k: Path(v) if k in ("init", "text_encoder", "out", "run") and v is not None else v
        for k, v in meta["settings"].items()
    }
    stages = ("looks", "look_nouns", "look_pairs", "pattern_pairs", "unbackgrounded")
    given = ("text_encoder", "out", "patterns", *stages)
    typed = ap.parse_args(namespace=argparse.Namespace(**dict.fromkeys(given)))  # None where not given
    moved = {k: getattr(typed, k) for k in given if getattr(typed, k) is not None}
    args = argparse.Namespace(
        **{
            **{k: 0.0 for k in stages},
            **settings,
            **moved,
            "minutes": args.minutes,
            "threads": args.threads,
            "save_minutes": args.save_minutes,
            "run": args.resume,
            "until": args.until,
        }
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    vae, unet, text, _ = load_init(args.init)
    tokenizer = load_clip_tokenizer()
    if args.text_encoder:
        text, tokenizer = load_text_encoder(args.text_encoder)
        unet = with_cross_attention_dim(unet, text.config.hidden_size)
    main_stage(args, vae, unet, text, tokenizer, meta["done_before"], args.run, (tensors, meta))


def load_text_encoder(folder: Path) -> tuple:
    """A separately pretrained text encoder, frozen, with its tokenizer (its folder's `tokenizer/`, else
    CLIP's)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").float().eval().requires_grad_(False)
    if (folder / "tokenizer" / "tokenizer_config.json").exists():
        return text, CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=77)
    return text, load_clip_tokenizer()


def with_cross_attention_dim(unet, dim: int):
    """`unet` itself if it reads `dim`-wide text features, else a copy built for them that keeps every
    weight whose shape still fits (all but the cross-attention keys and values, which start afresh)."""
    from diffusers import UNet2DConditionModel

    if unet.config.cross_attention_dim == dim:
        return unet
    new = UNet2DConditionModel.from_config(dict(unet.config, cross_attention_dim=dim))
    own = new.state_dict()
    kept = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
    new.load_state_dict(kept, strict=False)
    print(f"UNet re-read for {dim}-wide text: {len(own) - len(kept)} tensors start afresh", flush=True)
    return new.train().requires_grad_(True)


def load_init(folder: Path) -> tuple:
    """(vae, unet, text encoder, UNet steps so far) of a saved model, in float32."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").float().eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").float()
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").float()
    done = json.loads((folder / "pretraining.json").read_text())["unet_steps"]
    return vae, unet.train().requires_grad_(True), text.train().requires_grad_(True), done


def main_stage(args, vae, unet, text, tokenizer, done: int, run: Path | None, saved: dict | None = None) -> None:
    """The UNet and the text encoder together (the UNet alone when the text encoder is frozen), for
    --minutes; `done` UNet steps came before. With a `run` folder, a checkpoint (the trained weights,
    their moving average and the optimiser's moments) is written there at every save, and `saved`
    (such a checkpoint's tensors and meta) continues one: the data of each step is drawn from (seed,
    step), so a resumed run sees the batches an uninterrupted one would have."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from cdtool.models.tiny import SCHEDULER_CONFIG
    from cdtool.toy.world import Sampler

    scaling = vae.config.scaling_factor
    noise_sched = DDPMScheduler.from_config(DDIMScheduler(**SCHEDULER_CONFIG).config)
    parts = (("unet", unet), ("text", text))
    named = trainable(parts)
    params = list(named.values())
    text_trains = any(p.requires_grad for p in text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)

    def ema_step(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        # the usual warm-up of the decay: a plain EMA from step 1 would keep the random init for thousands of steps
        decay = min(args.ema, (1 + float(n)) / (10 + float(n)))
        return avg + (new - avg) * (1 - decay)

    averaged = torch.optim.swa_utils.AveragedModel(torch.nn.ModuleDict(dict(parts)), avg_fn=ema_step)
    step = 0
    if saved is not None:
        tensors, meta = saved
        for prefix, module in parts:
            load_into(module, prefix, tensors)
            load_into(averaged.module[prefix], prefix, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        averaged.n_averaged.fill_(meta["n_averaged"])
        step = meta["step"]
        restore_optimizer(opt, named, tensors, step)
    budget = Budget(args.minutes, args.save_minutes)
    first, ema = step, None

    def save() -> None:
        save_model(vae, averaged.module, tokenizer, args.out, done + step)
        if run is not None:
            tensors = {k: v for prefix, m in parts for k, v in module_tensors(prefix, m).items()}
            tensors |= {f"ema.{k}": v for p, m in averaged.module.items() for k, v in module_tensors(p, m).items()}
            tensors |= optimizer_tensors(opt, named)
            settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            meta = {"step": step, "done_before": done, "n_averaged": int(averaged.n_averaged), "settings": settings}
            save_checkpoint(run, tensors, meta)

    while budget.left() and (args.until is None or step < args.until):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 250)
        rng, gen = step_rng(args.seed, step), step_generator(args.seed, step)
        x, captions = batch(
            Sampler(rng),
            args.batch,
            views=args.views,
            named_patterns=args.patterns,
            world=args.world,
            looks=args.looks,
            look_nouns=args.look_nouns,
            look_pairs=args.look_pairs,
            pattern_pairs=args.pattern_pairs,
            unbackgrounded=args.unbackgrounded,
        )
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * scaling
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (z.shape[0],), generator=gen)
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.set_grad_enabled(text_trains):
            states = text(ids)[0]
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        averaged.update_parameters(torch.nn.ModuleDict(dict(parts)))
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.99 * ema + 0.01 * value
        if step % 200 == 0:
            print(f"unet {done + step}: loss {ema:.4f} ({budget.elapsed():.0f}s)", flush=True)
        if budget.save_due():
            save()
    save()
    print(f"done: {step - first} steps in {budget.elapsed():.0f}s ({done + step} in all) -> {args.out}", flush=True)


def save_model(vae, averaged, tokenizer, out: Path, step: int) -> None:
    """Writes the pipeline (moving-average UNet and text encoder) as a float16 diffusers folder."""
    import copy
    import json

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from cdtool.models.tiny import SCHEDULER_CONFIG

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae),
        text_encoder=copy.deepcopy(averaged["text"]),
        tokenizer=tokenizer,
        unet=copy.deepcopy(averaged["unet"]),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    (tmp / "pretraining.json").write_text(json.dumps({"unet_steps": step}) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


if __name__ == "__main__":
    main()

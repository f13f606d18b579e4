"""Pretrains the built-in toy text-to-image model (`--model toy`) on the toy world, on a CPU.

    python scripts/pretrain_toy.py [--minutes 45] [--out cdtool/data/toy/model]

A real diffusers StableDiffusionPipeline: AutoencoderKL (32 px images, 16x16x4 latents), a
cross-attention UNet2DConditionModel and a CLIPTextModel with the real CLIP vocabulary, all trained
from scratch here: first the VAE (reconstruction + a small KL term), then the UNet and the text
encoder together (epsilon prediction, 10% empty captions for classifier-free guidance). Scenes are
rendered on the fly from a seeded sampler. The result is stored in float16 (a few MB).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
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


def batch(sampler, n: int) -> tuple[torch.Tensor, list[str]]:
    from cdtool.toy.world import render

    scenes = [sampler.scene() for _ in range(n)]
    pixels = (
        torch.stack(
            [
                torch.frombuffer(bytearray(render(s, SIZE).tobytes()), dtype=torch.uint8)
                .reshape(SIZE, SIZE, 3)
                .permute(2, 0, 1)
                for s in scenes
            ]
        ).float()
        / 127.5
        - 1
    )
    return pixels, [s.caption() for s in scenes]


def main() -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdtool.clip_vocab import load_clip_tokenizer
    from cdtool.tiny import SCHEDULER_CONFIG
    from cdtool.toy.world import Sampler

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=45.0, help="time for the UNet/text-encoder stage")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--unet-channels", default="64,128", help="UNet block widths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "cdtool" / "data" / "toy" / "model")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    sampler = Sampler(random.Random(args.seed))
    t0 = time.perf_counter()

    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(1, args.vae_steps + 1):
        x, _ = batch(sampler, args.vae_batch)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(
                f"vae {step}: recon mse {float(F.mse_loss(recon, x)):.5f} ({time.perf_counter() - t0:.0f}s)", flush=True
            )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(batch(sampler, 64)[0]).latent_dist.mean for _ in range(8)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    scaling = vae.config.scaling_factor
    print(f"latent scaling factor {scaling:.4f}", flush=True)

    tokenizer = load_clip_tokenizer()
    widths = tuple(int(c) for c in args.unet_channels.split(","))
    unet = UNet2DConditionModel(**dict(UNET, block_out_channels=widths, norm_num_groups=min(16, widths[0])))
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    noise_sched = DDPMScheduler.from_config(DDIMScheduler(**SCHEDULER_CONFIG).config)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-2)
    deadline = time.perf_counter() + args.minutes * 60
    step = 0
    ema = None
    while time.perf_counter() < deadline:
        step += 1
        x, captions = batch(sampler, args.batch)
        captions = ["" if random.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample() * scaling
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (z.shape[0],))
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=text(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = float(loss) if ema is None else 0.99 * ema + 0.01 * float(loss)
        if step % 200 == 0:
            print(f"unet {step}: loss {ema:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if step % 2000 == 0:
            save(vae, unet, text, tokenizer, args.out, DDIMScheduler, StableDiffusionPipeline)
    save(vae, unet, text, tokenizer, args.out, DDIMScheduler, StableDiffusionPipeline)
    print(f"done: {step} steps in {time.perf_counter() - t0:.0f}s -> {args.out}", flush=True)


def save(vae, unet, text, tokenizer, out: Path, ddim, pipeline_cls) -> None:
    from cdtool.tiny import SCHEDULER_CONFIG

    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


if __name__ == "__main__":
    main()

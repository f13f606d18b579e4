"""The names the command line offers as choices, and what each stands for. No torch here: the
options read these when `--help` is drawn, which must not load the model libraries."""

from __future__ import annotations

from typing import Any

# the built-in bases: random weights for plumbing (one per kind of base), and the model pretrained
# on the toy world
TINY = "tiny"
TINY_XL = "tiny-xl"
TINY_SD2 = "tiny-sd2"
TINY_MODELS = (TINY, TINY_SD2, TINY_XL)
TOY = "toy"
BUILT_IN = (*TINY_MODELS, TOY)

# the kinds of base model, read from the model itself (cdtool.models.loading.base_kind), and their names
SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
KIND_NAMES = {SD1: "Stable Diffusion 1.x", SD2: "Stable Diffusion 2.x", SDXL: "Stable Diffusion XL"}

# sampler name -> (diffusers scheduler class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# layer set -> the suffixes of the UNet projections it holds (kv: the paper's; attn2: all of cross-attention)
LAYER_SETS: dict[str, tuple[str, ...]] = {
    "kv": ("attn2.to_k", "attn2.to_v"),
    "attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
}

# the merges `cdtool merge --method` offers (cdtool/merge/job.py): the paper's, cdtool's fit over every text row, the sum
CLOSED_FORM = "closed-form"
LEAST_SQUARES = "least-squares"
SUM = "sum"

# the storage and compute precisions, by name (cdtool.models.loading.DTYPES maps them to torch dtypes)
DTYPE_NAMES = ("fp32", "fp16", "bf16")

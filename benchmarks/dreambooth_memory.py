"""What `cdtool train --method dreambooth` needs in GPU memory on SD1.5 and SDXL, computed on the
shaped models (benchmarks/sd15.py, benchmarks/sdxl.py: the real configs) built on PyTorch's meta
device, where tensors have shapes and types but no storage, so nothing is allocated or downloaded.

Weights, gradients and optimiser states are parameter counts times bytes per parameter. Activations
are counted, not estimated: a training step's forward pass runs on the meta device while a
saved-tensor hook adds up the bytes of every tensor autograd keeps for the backward pass (each
storage once). Attention is counted as the fused kernels a GPU uses (flash / memory-efficient
attention: the query, key, value, output and log-sum-exp are kept, never the [L, L] attention
matrix). With gradient checkpointing (diffusers checkpoints each ResNet and transformer block),
what stays is the tensors saved outside the checkpointed blocks plus each block's inputs, and
during the backward pass one block's activations at a time are recomputed: the largest such block
is added.

    python benchmarks/dreambooth_memory.py            # the table RESULTS.md and docs/methods.md quote
    python benchmarks/dreambooth_memory.py --json

Not counted: the CUDA context, cuDNN workspaces and the allocator's cache, transient buffers inside
single operations, and the VAE encoding the instance image before each step (no gradients; its
activations are freed before the UNet runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

GB = 1e9
ADAM = 8.0  # AdamW: two float32 states per parameter
ADAM_8BIT = 2.0  # bitsandbytes' AdamW8bit: two 8-bit states (plus ~1% block scales, left out)


@dataclass
class Shape:
    """A base's trained and frozen parameter counts and the tensors of one training step."""

    name: str
    unet: int  # parameters of the UNet (all train)
    text: int  # parameters of the text encoder(s) (train with --train-text-encoder)
    vae: int
    latent: int  # latent side at the native resolution
    resolution: int


@dataclass
class Activations:
    """Bytes autograd keeps for the backward pass of one step."""

    plain: float  # without checkpointing
    checkpointed: float  # with: outside the blocks + the blocks' inputs + the largest block recomputed
    largest_block: float
    text: float  # the text encoder(s), when they train


class SavedBytes:
    """A saved-tensor hook that adds up the bytes of the tensors autograd keeps (each storage once;
    not the parameters, which it keeps by reference)."""

    def __init__(self, seen: dict[int, float] | None = None) -> None:
        self.seen: dict[int, float] = {} if seen is None else seen
        self._keep: list[torch.Tensor] = []  # holds the tensors so that their ids stay theirs

    def add(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter):  # the weights themselves: counted as weights
            return
        if id(base) not in self.seen:
            self.seen[id(base)] = float(base.numel() * base.element_size())
            self._keep.append(base)

    @property
    def total(self) -> float:
        return sum(self.seen.values())

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.add(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


class _FusedAttention(torch.autograd.Function):
    """Attention as flash / memory-efficient attention keeps it for the backward pass."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # never run: counting only
        raise NotImplementedError


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]


def saved_bytes(step: Callable[[], Any]) -> float:
    """The bytes `step` (a forward pass) leaves saved for the backward pass."""
    counter = SavedBytes()
    with fused_attention(), counter.hooks():
        step()
    return counter.total


def checkpointed_bytes(model: Any, step: Callable[[], Any]) -> tuple[float, float]:
    """With diffusers' gradient checkpointing on `model`: (what stays saved through the forward
    pass: tensors saved outside the checkpointed blocks and every block's inputs; the largest
    block's own saved tensors, recomputed during the backward pass)."""
    outer = SavedBytes()
    largest = [0.0]

    def counting_checkpoint(module: Any, *args: Any) -> Any:
        for a in args:
            if isinstance(a, torch.Tensor):
                outer.add(a)  # the checkpoint holds its inputs until the backward pass
        inner = SavedBytes()
        with inner.hooks():
            out = module(*args)
        largest[0] = max(largest[0], inner.total)
        return out

    model.enable_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
    model.train()
    with fused_attention(), outer.hooks():
        step()
    return outer.total, largest[0]


def measure(shape_name: str, dtype: torch.dtype = torch.float32) -> tuple[Shape, Activations]:
    """Build the shaped model on the meta device and count one step's activations: batch 2 (one
    instance image and one class image, DreamBooth's default with --reg) at the native resolution."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if shape_name == "sd15":
        from benchmarks.sd15 import TEXT, UNET, VAE

        configs, width, xl = [TEXT], 768, False
    else:
        from benchmarks.sdxl import TEXT, TEXT_2, UNET, VAE

        configs, width, xl = [TEXT, TEXT_2], 2048, True
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET).to(dtype)
        classes = [CLIPTextModel, CLIPTextModelWithProjection]
        encoders = [cls(CLIPTextConfig(**c)).to(dtype) for cls, c in zip(classes, configs, strict=False)]
        vae = AutoencoderKL(**VAE)
    side = UNET["sample_size"]
    shape = Shape(
        name=shape_name,
        unet=sum(p.numel() for p in unet.parameters()),
        text=sum(p.numel() for e in encoders for p in e.parameters()),
        vae=sum(p.numel() for p in vae.parameters()),
        latent=side,
        resolution=side * 8,
    )

    def unet_step() -> Any:
        x = torch.empty(2, 4, side, side, device="meta", dtype=dtype)
        text = torch.empty(2, 77, width, device="meta", dtype=dtype)
        extra = {}
        if xl:
            extra = {
                "added_cond_kwargs": {
                    "text_embeds": torch.empty(2, 1280, device="meta", dtype=dtype),
                    "time_ids": torch.empty(2, 6, device="meta", dtype=dtype),
                }
            }
        return unet(x, torch.zeros(2, device="meta", dtype=torch.long), encoder_hidden_states=text, **extra).sample

    def text_step() -> Any:
        ids = torch.zeros(2, 77, device="meta", dtype=torch.long)
        return [e(ids, output_hidden_states=True).hidden_states[-2] for e in encoders]

    plain = saved_bytes(unet_step)
    kept, largest = checkpointed_bytes(unet, unet_step)
    return shape, Activations(plain, kept + largest, largest, saved_bytes(text_step))


def table(shape: Shape, act: Activations, act_half: Activations) -> list[dict[str, Any]]:
    """GB per configuration: (name, weights, gradients, optimiser, autocast copies, frozen, activations, total)."""
    rows = []
    configs = [
        ("fp32, AdamW", False, ADAM, False),
        ("fp16 mixed precision, AdamW", True, ADAM, False),
        ("fp16, 8-bit AdamW", True, ADAM_8BIT, False),
        ("fp16, 8-bit AdamW, gradient checkpointing", True, ADAM_8BIT, True),
    ]
    for text_trains in (False, True):
        trained = shape.unet + (shape.text if text_trains else 0)
        frozen = shape.vae + (0 if text_trains else shape.text)
        for name, half, optimiser, ckpt in configs:
            a = act_half if half else act
            activations = (a.checkpointed if ckpt else a.plain) + (a.text if text_trains else 0.0)
            row = {
                "config": name + (", text encoder trained" if text_trains else ""),
                "weights": trained * 4 / GB,  # fp32 master weights
                "gradients": trained * 4 / GB,
                "optimiser": trained * optimiser / GB,
                "autocast_copies": trained * 2 / GB if half else 0.0,  # fp16 copies autocast caches for a step
                "frozen": frozen * (2 if half else 4) / GB,  # held in the half type under mixed precision
                "activations": activations / GB,
            }
            row["total"] = sum(v for k, v in row.items() if k != "config")
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--models", default="sd15,sdxl")
    args = parser.parse_args()
    report = {}
    for name in args.models.split(","):
        shape, act = measure(name, torch.float32)
        _, half = measure(name, torch.float16)
        report[name] = {
            "shape": asdict(shape),
            "activations_fp32": asdict(act),
            "activations_fp16": asdict(half),
            "table": table(shape, act, half),
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for name, doc in report.items():
        s = doc["shape"]
        print(f"\n{name}: UNet {s['unet'] / 1e6:.0f}M, text encoder(s) {s['text'] / 1e6:.0f}M, VAE {s['vae'] / 1e6:.0f}M; "
              f"batch 1 instance + 1 class image at {s['resolution']} px")  # fmt: skip
        print("| configuration | weights | gradients | optimiser | autocast copies | frozen | activations | total |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in doc["table"]:
            cells = [f"{r[k]:.1f}" for k in ("weights", "gradients", "optimiser", "autocast_copies", "frozen")]
            cells += [f"{r['activations']:.1f}", f"**{r['total']:.1f}**"]
            print(f"| {r['config']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

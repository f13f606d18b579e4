"""The settings of a training run: what `cdtool train` asks the trainer for, and what a run folder's
config.json records (cdtool/train/runs.py writes and reads it, and tells what a resumed run may change)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdtool.train.recipes import CUSTOM_DIFFUSION, DEFAULTS

if TYPE_CHECKING:
    from cdtool.train.concepts import ConceptSpec


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


def training_config(
    method: str,
    concepts: list[ConceptSpec],
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    scale_lr: bool | None = None,
    aug: bool | None = None,
    dvar_window: int | None = None,
    dvar_eps: float | None = None,
    **settings: Any,
) -> TrainConfig:
    """A run's settings: those given, and for those left out (None) the method's published
    defaults (cdtool.train.recipes.DEFAULTS); Custom Diffusion's default steps are per concept."""
    d = DEFAULTS[method]
    return TrainConfig(
        concepts=concepts,
        method=method,
        steps=steps or d.steps_per_concept * (len(concepts) if method == CUSTOM_DIFFUSION else 1),
        batch_size=batch_size or d.batch_size,
        lr=d.lr if lr is None else lr,
        scale_lr=d.scale_lr if scale_lr is None else scale_lr,
        aug=d.aug if aug is None else aug,
        dvar_window=dvar_window or d.dvar_window,
        dvar_eps=d.dvar_eps if dvar_eps is None else dvar_eps,
        **settings,
    )

"""How each customisation method trains: one small object per method, holding what differs between
them (which layers, how they adapt, the captions, the loss, the delta). The trainer (cdtool/train/trainer.py)
runs the steps they share; the names and published defaults are in cdtool/train/recipes.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from peft import LoraConfig

from cdtool.delta.file import LayerDelta
from cdtool.errors import CdtoolError
from cdtool.models.layers import linear_names, trainable_layer_names
from cdtool.train.attention import use_detaching_cross_attention
from cdtool.train.losses import custom_diffusion_loss
from cdtool.train.recipes import (
    CUSTOM_DIFFUSION,
    DREAMBOOTH,
    DREAMBOOTH_LORA,
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    TEXT_LORA_TARGETS,
    TEXTUAL_INVERSION,
)

if TYPE_CHECKING:
    from cdtool.dataset.folders import Example
    from cdtool.train.concepts import ConceptSpec
    from cdtool.train.config import TrainConfig


def caption_templates(cfg: TrainConfig) -> tuple[str, ...]:
    """Textual inversion's caption templates for the run's --property."""
    return STYLE_TEMPLATES if cfg.property == "style" else OBJECT_TEMPLATES


class TrainingMethod:
    """What a method trains and how; the defaults are Custom Diffusion's where the methods agree."""

    name = ""
    # the method trains the layers' own weights (ΔW, and the bias's change where a layer has one)
    trains_weights = False
    # a concept's token may be a word the vocabulary already has (DreamBooth's rare identifier)
    token_may_exist = False
    # every UNet weight trains (and, with --train-text-encoder, every text-encoder weight): the run
    # writes a whole model (a diffusers folder), not a delta
    full_model = False

    def vectors(self, cfg: TrainConfig) -> int:
        """Embedding rows per new token."""
        return 1

    def layer_names(
        self, cfg: TrainConfig, unet: torch.nn.Module, encoders: Mapping[str, torch.nn.Module]
    ) -> list[str]:
        """`unet.<path>` / `text_encoder.<path>` (SDXL: `text_encoder_2.<path>` too) of every Linear
        the method changes; `encoders` are the text encoders by component name."""
        return []

    def adapt(
        self, cfg: TrainConfig, unet: torch.nn.Module, encoders: Mapping[str, torch.nn.Module], layer_names: list[str]
    ) -> None:
        """Make the chosen layers trainable (everything starts frozen)."""

    def caption(self, cfg: TrainConfig, concept: ConceptSpec, example: Example, g: torch.Generator) -> str:
        """The caption of one training view (before the augmentation's prefix)."""
        return example.caption

    def eval_prompt(self, cfg: TrainConfig, concept: ConceptSpec, example: Example) -> str:
        """The caption of one image of DVAR's fixed evaluation batch."""
        return example.caption

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, prior_weight: float) -> torch.Tensor:
        """Plain mean squared error over the instance views (the first len(mask) rows), plus
        `prior_weight` times that of the class images that follow them."""
        n = mask.shape[0]
        loss = F.mse_loss(pred[:n].float(), target[:n].float())
        if pred.shape[0] > n:
            loss = loss + prior_weight * F.mse_loss(pred[n:].float(), target[n:].float())
        return loss

    def layer_delta(
        self, module: torch.nn.Module, base_weight: torch.Tensor, base_bias: torch.Tensor | None
    ) -> LayerDelta:
        """The trained change of one layer."""
        raise NotImplementedError(f"{self.name} trains no layers")

    def concept_record(self, cfg: TrainConfig, concept: ConceptSpec, new_token: bool) -> dict[str, Any]:
        """What the delta's metadata says about one concept."""
        return {
            "token": concept.token,
            "class_noun": concept.class_noun,
            "init_token": concept.init_token if new_token else None,
            "prompts": sorted({ex.caption for ex in concept.examples})[:20],
            "data": concept.data,
            "reg": concept.reg,
            "method": self.name,
        }


class CustomDiffusion(TrainingMethod):
    """Kumari et al. 2023: the cross-attention key/value projections (or all of cross-attention)
    and a new token per concept; the masked loss of the size augmentation."""

    name = CUSTOM_DIFFUSION
    trains_weights = True

    def layer_names(
        self, cfg: TrainConfig, unet: torch.nn.Module, encoders: Mapping[str, torch.nn.Module]
    ) -> list[str]:
        return trainable_layer_names(unet, cfg.train)

    def adapt(
        self, cfg: TrainConfig, unet: torch.nn.Module, encoders: Mapping[str, torch.nn.Module], layer_names: list[str]
    ) -> None:
        for n in layer_names:
            lin = unet.get_submodule(n[len("unet.") :])
            lin.weight.requires_grad_(True)
            if lin.bias is not None:
                lin.bias.requires_grad_(True)
        use_detaching_cross_attention(unet)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, prior_weight: float) -> torch.Tensor:
        # the prior weighed as the paper's code does (see cdtool.train.losses)
        return custom_diffusion_loss(pred, target, mask, prior_weight)

    def layer_delta(
        self, module: torch.nn.Module, base_weight: torch.Tensor, base_bias: torch.Tensor | None
    ) -> LayerDelta:
        bias = None if base_bias is None else module.bias.detach().float().cpu() - base_bias.float()
        return LayerDelta(full=module.weight.detach().float().cpu() - base_weight.float(), bias=bias)


class TextualInversion(TrainingMethod):
    """Gal et al. 2022: only the new tokens' embedding rows, on captions drawn from templates."""

    name = TEXTUAL_INVERSION

    def vectors(self, cfg: TrainConfig) -> int:
        return cfg.num_vectors

    def caption(self, cfg: TrainConfig, concept: ConceptSpec, example: Example, g: torch.Generator) -> str:
        templates = caption_templates(cfg)
        return templates[int(torch.randint(0, len(templates), (), generator=g))].format(concept.token)

    def eval_prompt(self, cfg: TrainConfig, concept: ConceptSpec, example: Example) -> str:
        return caption_templates(cfg)[0].format(concept.token)

    def concept_record(self, cfg: TrainConfig, concept: ConceptSpec, new_token: bool) -> dict[str, Any]:
        record = super().concept_record(cfg, concept, new_token)
        record["prompts"] = list(caption_templates(cfg)[:3])
        return record | ({"kind": "style"} if cfg.property == "style" else {})


class DreamBoothLoRA(TrainingMethod):
    """DreamBooth with LoRA on the UNet's attention (and optionally the text encoder's), as DVAR
    evaluates it; the identifier may be an existing rare word ("sks"), used as it is."""

    name = DREAMBOOTH_LORA
    token_may_exist = True

    def layer_names(
        self, cfg: TrainConfig, unet: torch.nn.Module, encoders: Mapping[str, torch.nn.Module]
    ) -> list[str]:
        names = linear_names(unet, "unet", tuple(f".{t}" for t in cfg.lora_targets), within=(".attn1.", ".attn2."))
        if not names:
            raise CdtoolError(f"no UNet attention projection matches --target {','.join(cfg.lora_targets)}")
        if cfg.train_text_encoder:  # every text encoder's attention (both, on SDXL)
            for component, encoder in encoders.items():
                names += linear_names(encoder, component, tuple(f".{t}" for t in TEXT_LORA_TARGETS))
        return names

    def adapt(
        self, cfg: TrainConfig, unet: torch.nn.Module, encoders: Mapping[str, torch.nn.Module], layer_names: list[str]
    ) -> None:
        for component, model in (("unet", unet), *encoders.items()):
            targets = [n[len(component) + 1 :] for n in layer_names if n.startswith(f"{component}.")]
            if targets:
                model.add_adapter(
                    LoraConfig(
                        r=cfg.rank,
                        lora_alpha=cfg.lora_alpha or cfg.rank,
                        init_lora_weights="gaussian",
                        target_modules=targets,
                    )
                )

    def layer_delta(
        self, module: torch.nn.Module, base_weight: torch.Tensor, base_bias: torch.Tensor | None
    ) -> LayerDelta:
        # a peft LoRA layer: ΔW = scaling · B @ A
        up = module.lora_B["default"].weight.detach().float().cpu() * float(module.scaling["default"])
        return LayerDelta(up=up, down=module.lora_A["default"].weight.detach().float().cpu())


class DreamBooth(TrainingMethod):
    """Ruiz et al. 2023, as published: every UNet weight fine-tuned (the text encoders frozen, or
    trained too with --train-text-encoder, as diffusers' train_dreambooth.py offers) on captions
    that put a rare existing token before the class noun ("a sks dog"); the identifier's row is
    used as it is, no row is added or trained. The loss is the base class's: the plain mean squared
    error of the instance images plus the prior weight times that of the class images (the paper's
    class-specific prior preservation, as diffusers' script computes it)."""

    name = DREAMBOOTH
    trains_weights = True
    token_may_exist = True
    full_model = True

    def adapt(
        self, cfg: TrainConfig, unet: torch.nn.Module, encoders: Mapping[str, torch.nn.Module], layer_names: list[str]
    ) -> None:
        unet.requires_grad_(True)
        if cfg.train_text_encoder:  # every text encoder (both, on SDXL)
            for encoder in encoders.values():
                encoder.requires_grad_(True)
                encoder.train()  # as diffusers' script (CLIP's dropout is 0; checkpointing acts in training mode)
                if cfg.gradient_checkpointing:  # transformers 5's name, else 4's
                    getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()


_METHODS = {m.name: m for m in (CustomDiffusion(), TextualInversion(), DreamBoothLoRA(), DreamBooth())}


def method_for(name: str) -> TrainingMethod:
    """The method object of a `--method` name."""
    if name not in _METHODS:
        raise CdtoolError(f"unknown method {name!r}: use {', '.join(_METHODS)}")
    return _METHODS[name]

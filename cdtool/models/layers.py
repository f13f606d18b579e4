"""Layer selection: the Linear layers of a model that a method trains or a delta holds, by name
(`<component>.<module path>`, the names a delta's keys use)."""

from __future__ import annotations

import torch

from cdtool.choices import LAYER_SETS


def linear_names(
    model: torch.nn.Module, component: str, suffixes: tuple[str, ...], within: tuple[str, ...] = ("",)
) -> list[str]:
    """`<component>.<path>` of every Linear of `model` whose path ends in one of `suffixes` and
    contains one of `within`."""
    return [
        f"{component}.{name}"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(suffixes) and any(w in name for w in within)
    ]


def trainable_layer_names(unet: torch.nn.Module, layers: str = "kv") -> list[str]:
    """`unet.<path>` of every Linear Custom Diffusion trains in this mode."""
    return linear_names(unet, "unet", LAYER_SETS[layers])

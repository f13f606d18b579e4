"""A ready-to-run pipeline: base model + applied deltas, on the chosen device and dtype."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cdtool import console
from cdtool.delta.file import Delta
from cdtool.models.apply import apply_deltas
from cdtool.models.loading import load_pipeline, resolve_device, resolve_dtype


def load_with_deltas(
    model: str,
    deltas: Sequence[tuple[Delta, float]],
    *,
    device: str = "auto",
    dtype: str = "auto",
    ignore_base_mismatch: bool = False,
    on_base: Callable[[Any], None] | None = None,
) -> Any:
    """Load `model`, apply the deltas in float32 on the CPU, then move to device/dtype.
    `on_base` sees the base pipeline before any delta changes it."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    console.log(f"loading {model}")
    pipe = load_pipeline(model)
    if on_base is not None:
        on_base(pipe)
    if deltas:
        apply_deltas(pipe, deltas, ignore_base_mismatch=ignore_base_mismatch, warn=console.warn, model=model)
        for d, scale in deltas:
            console.log(
                f"applied {d.origin} (scale {scale:g}): {len(d.layers)} layers, tokens {', '.join(d.tokens) or '-'}"
            )
    pipe.to(dev, dt)
    pipe.set_progress_bar_config(disable=True)
    return pipe

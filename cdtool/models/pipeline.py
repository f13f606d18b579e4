"""A ready-to-run pipeline: base model + applied deltas, on the chosen device and dtype."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cdtool import console
from cdtool.delta.file import Delta
from cdtool.errors import CdtoolError, UsageError
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
    encoder: Path | None = None,
) -> Any:
    """Load `model`, apply the deltas in float32 on the CPU, then move to device/dtype.
    `on_base` sees the base pipeline before any delta changes it. A personalised concept
    (InstantBooth) among the deltas brings its encoder's adapters (from the folder it names, or
    `encoder`), attached as `pipe.cdtool_concept` with its scale as their strength."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    personal = [(d, scale) for d, scale in deltas if d.visual]
    if len(personal) > 1:
        raise CdtoolError(
            f"{personal[0][0].origin} and {personal[1][0].origin} are both InstantBooth concepts; InstantBooth puts "
            "one concept in an image: sample them apart"
        )
    if encoder is not None and not personal:
        raise UsageError("--encoder is for a personalised concept (cdtool personalize); no --delta is one")
    if personal:
        from cdtool.instant.personal import encoder_for

        enc = encoder_for(personal[0][0], encoder)
    console.log(f"loading {model}")
    pipe = load_pipeline(model)
    if on_base is not None:
        on_base(pipe)
    if personal:
        from cdtool.instant.personal import check_encoder_base

        check_encoder_base(enc, pipe, model)
    if deltas:
        apply_deltas(pipe, deltas, ignore_base_mismatch=ignore_base_mismatch, warn=console.warn, model=model)
        for d, scale in deltas:
            console.log(
                f"applied {d.origin} (scale {scale:g}): {len(d.layers)} layers, tokens {', '.join(d.tokens) or '-'}"
            )
    pipe.to(dev, dt)
    pipe.set_progress_bar_config(disable=True)
    if personal:
        from cdtool.instant.personal import attach_concept

        pipe.cdtool_concept = attach_concept(pipe, personal[0][0], enc, personal[0][1])
        console.log(f"attached the adapters of {enc.path} (strength {personal[0][1]:g})")
    return pipe

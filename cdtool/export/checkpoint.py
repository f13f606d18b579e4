"""`cdtool export --to checkpoint`: the base model with a delta applied, as one single-file
checkpoint in the original Stable Diffusion layout (AUTOMATIC1111, ComfyUI and diffusers'
`from_single_file` load it).

A whole model's diffusers folder (`train --method dreambooth`) is written as it is: its delta is the
record of how it was made, without layers or tokens. A delta is applied the way `cdtool sample` applies it (cdtool.models.apply: W += ΔW in float32, the base
fingerprint checked), then the pipeline is written in its architecture's layout. The token table
keeps the base's rows: the UIs build the text encoder at the base vocabulary's size from the
checkpoint and take new tokens from embedding files, which the export writes beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cdtool import __version__
from cdtool.delta.file import Delta, save_safetensors
from cdtool.errors import CdtoolError
from cdtool.export.single_file import sd1_state

# architecture -> the function that writes a pipeline in its single-file layout
LAYOUTS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"sd1": sd1_state}
CHECKPOINT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def _check_kind(kind: str, whole: bool = False) -> None:
    from cdtool.choices import KIND_NAMES, SD1

    if kind != SD1:  # SD 2.x's file names OpenCLIP's modules, SDXL's two `conditioner.` embedders
        instead = (
            "use its diffusers folder as it is, or extract its key/value delta with `cdtool get-deltas`"
            if whole
            else "export its delta --to diffusers-lora or kohya instead"
        )
        what = "the model" if whole else "the base"
        raise CdtoolError(
            f"export --to checkpoint writes the Stable Diffusion 1.x single-file layout; {what} is "
            f"{KIND_NAMES[kind]}: {instead}"
        )


def architecture(pipe: Any) -> str:
    """The single-file layout a pipeline is written in: `sd1` for a UNet conditioned on one CLIP text encoder."""
    from cdtool.models.loading import pipeline_kind

    _check_kind(pipeline_kind(pipe))
    if type(pipe.text_encoder).__name__ != "CLIPTextModel":
        raise CdtoolError(
            f"the base's text encoder is a {type(pipe.text_encoder).__name__}; the SD1.x single-file layout "
            "holds a CLIPTextModel"
        )
    return "sd1"


def checkpoint_state(pipe: Any, delta: Delta, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """`delta` applied to `pipe` (the base, float32, changed in place), as a single-file state dict
    in `dtype` whose token table has the base's rows only."""
    from cdtool.models.apply import apply_deltas

    layout = LAYOUTS[architecture(pipe)]
    vocab = len(pipe.tokenizer)
    if delta.layers or delta.tokens:  # else a whole model's record: the pipeline is written as it is
        apply_deltas(pipe, [(delta, 1.0)])
    target = CHECKPOINT_DTYPES[dtype]
    return {k: v.detach().to(target).contiguous() for k, v in layout(pipe, vocab_size=vocab).items()}


def checkpoint_metadata(delta: Delta, model: str, dtype: str) -> dict[str, str]:
    """What the file says about itself (safetensors metadata: strings only)."""
    import json

    return {
        "format": "cdtool.checkpoint",
        "base_model": model,
        "concepts": json.dumps(delta.concepts),
        "tokens": json.dumps(sorted(delta.tokens)),
        "dtype": dtype,
        "created_by": f"cdtool {__version__} export --to checkpoint",
    }


def write_checkpoint(delta: Delta, model: str, path: Path, dtype: str = "fp16") -> None:
    """Load `model`, apply `delta`, write the single-file checkpoint at `path`."""
    from cdtool.models.loading import base_kind, load_pipeline

    # from the model's configs or keys, before loading it whole
    _check_kind(base_kind(model), whole=not (delta.layers or delta.tokens))
    state = checkpoint_state(load_pipeline(model), delta, dtype)
    save_safetensors(state, path, checkpoint_metadata(delta, model, dtype))

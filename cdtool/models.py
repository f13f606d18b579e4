"""Loading a Stable Diffusion base: `tiny`, `toy`, a hub id, a local diffusers folder or one checkpoint file.

`tiny` is built in code from configs (random weights: for tests of the plumbing); `toy` is a small
model pretrained on the toy world (cdtool/toy/world.py) by tools/pretrain_toy.py and shipped as a
float16 diffusers folder inside the package: it follows captions, so quality can be measured on a CPU.

Models load in float32 on the CPU; deltas are applied there (in full precision) and the pipeline is
then moved to the requested device and dtype.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cdtool.choices import DTYPE_NAMES, TINY, TOY
from cdtool.errors import CdtoolError, UsageError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))


def resolve_device(device: str) -> torch.device:
    """The one rule for --device in every command: `auto` picks CUDA when available, else the
    CPU; an unknown device, or one this machine does not have, is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown --device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu (or auto)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}: use auto, {', '.join(DTYPE_NAMES)}")
    return DTYPES[dtype]


def toy_model_folder() -> Path:
    """The built-in toy model's diffusers folder (package data)."""
    from importlib import resources

    return Path(str(resources.files("cdtool") / "data" / "toy" / "model"))


def local_path(model: str) -> Path:
    """Where a `folder` or `file` model lies: the toy model's package folder, or the user's path."""
    return toy_model_folder() if model == TOY else Path(model).expanduser()


def model_reference(model: str) -> str:
    """How a delta records its base: a local folder or file by its absolute path (so that the delta
    finds it from any working folder), anything else (`tiny`, `toy`, a hub id) as given."""
    if model in (TINY, TOY):
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def is_missing_path(model: str) -> bool:
    """A model written as a local path (or a checkpoint file name) that is not there."""
    if model in (TINY, TOY) or Path(model).expanduser().exists():
        return False
    return Path(model).suffix in SINGLE_FILE_SUFFIXES or model.startswith((".", "/", "~"))


def model_kind(model: str) -> str:
    """'tiny', 'folder', 'file' or 'hub' (`toy` is a folder inside the package)."""
    if model == TINY:
        return "tiny"
    if model == TOY:
        if not (toy_model_folder() / "model_index.json").is_file():
            raise CdtoolError(
                f"the toy model is missing from {toy_model_folder()}; reinstall cdtool, or rebuild it "
                "with tools/pretrain_toy.py of the source repository"
            )
        return "folder"
    path = Path(model).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if is_missing_path(model):
        raise CdtoolError(f"model {model}: no such file or folder")
    return "hub"


def _offline_hint(model: str) -> str:
    return (
        f"download it where there is network (`hf download {model} --local-dir DIR`) and pass "
        "--model DIR, or pass a local diffusers folder or a .safetensors/.ckpt checkpoint"
    )


def check_available(model: str, source: str = "--model") -> None:
    """Fail now, before a command makes any output, when `model` cannot be loaded from where it is
    named: a local folder that is not a diffusers model, or a hub id that is neither in the local
    Hugging Face cache nor downloadable (offline). `source` says where the name came from."""
    kind = model_kind(model)
    if kind == "folder" and not (local_path(model) / "model_index.json").is_file():
        raise CdtoolError(
            f"{model} ({source}) is not a diffusers model folder (no model_index.json); pass --model with a "
            "diffusers folder, a .safetensors/.ckpt checkpoint, or a hub id"
        )
    if kind != "hub":
        return
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return
    if _hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            hf_hub_download(model, "model_index.json")
            return
        except Exception as e:  # offline, no such repository, no access
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CdtoolError(
        f"the model {model} ({source}) is not on this machine and could not be downloaded ({reason}); "
        f"{_offline_hint(model)} (`--model toy` is built in)"
    )


def _no_loading_bars() -> None:
    """transformers 5 and diffusers draw "Loading weights" bars on stderr; cdtool has its own output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def load_pipeline(model: str) -> Any:
    """The full StableDiffusionPipeline (float32, CPU, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    _no_loading_bars()

    kind = model_kind(model)
    if kind == "tiny":
        from cdtool.tiny import build_tiny_pipeline

        return build_tiny_pipeline()
    kwargs: dict[str, Any] = dict(safety_checker=None, requires_safety_checker=False)
    try:
        if kind == "file":
            pipe = StableDiffusionPipeline.from_single_file(str(local_path(model)), **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(local_path(model)) if kind == "folder" else model,
                local_files_only=kind == "folder" or _hub_offline(),
                **kwargs,
            )
    except (OSError, ValueError) as e:
        raise CdtoolError(_load_failure(model, kind, e)) from e
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe.to(torch.float32)


def load_text_side(model: str) -> tuple[Any, Any]:
    """(tokenizer, text encoder) without loading the UNet or VAE where the source allows it."""
    kind = model_kind(model)
    if kind in ("tiny", "file"):
        pipe = load_pipeline(model)
        return pipe.tokenizer, pipe.text_encoder
    from transformers import CLIPTextModel, CLIPTokenizer

    _no_loading_bars()
    source = str(local_path(model)) if kind == "folder" else model
    local = kind == "folder" or _hub_offline()
    try:
        tok = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local)
        enc = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", local_files_only=local)
    except (OSError, ValueError) as e:
        raise CdtoolError(_load_failure(model, kind, e)) from e
    return tok, enc.float().eval().requires_grad_(False)


def default_resolution(model: str) -> int:
    """The model's native image size: UNet sample size x VAE factor (read from configs where cheap)."""
    import json

    kind = model_kind(model)
    if kind == "tiny":
        from cdtool.tiny import TINY_RESOLUTION

        return TINY_RESOLUTION
    if kind == "folder":
        folder = local_path(model)
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, KeyError, ValueError):
            pass
    return 512


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _load_failure(model: str, kind: str, e: Exception) -> str:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if kind == "folder":
        return f"could not load the diffusers folder {model} ({reason}); it needs model_index.json and unet/, vae/, text_encoder/, tokenizer/"
    if kind == "file":
        return (
            f"could not load the checkpoint {model} ({reason}); single-file loading also fetches the "
            "model's config from the hub: run once with network, or convert it to a diffusers folder"
        )
    return f"could not load {model!r} from the Hugging Face hub ({reason}); {_offline_hint(model)}"

"""Loading a Stable Diffusion base: a built-in one, a hub id, a local diffusers folder or one checkpoint file.

The kind of base (Stable Diffusion 1.x, 2.x or XL) is read from the model itself, never from an
option: the folder's model_index.json, or the checkpoint's keys; it decides the pipeline class.

`tiny`, `tiny-sd2` and `tiny-xl` are built in code from configs (random weights: for tests of the
plumbing, one per kind); `toy` is a small
model pretrained on the toy world (cdtool/toy/world.py) by tools/pretrain_toy.py and shipped as a
float16 diffusers folder inside the package: it follows captions, so quality can be measured on a CPU.

Models load in float32 on the CPU; deltas are applied there (in full precision) and the pipeline is
then moved to the requested device and dtype.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cdtool.choices import BUILT_IN, DTYPE_NAMES, SD1, SD2, SDXL, TINY, TINY_MODELS, TINY_SD2, TINY_XL, TOY
from cdtool.errors import CdtoolError, UsageError, first_line

if TYPE_CHECKING:
    from cdtool.models.conditioning import TextSide

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
_TINY_KINDS = {TINY: SD1, TINY_SD2: SD2, TINY_XL: SDXL}
_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # the classes cdtool loads


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
    if model in BUILT_IN:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def is_missing_path(model: str) -> bool:
    """A model written as a local path (or a checkpoint file name) that is not there."""
    if model in BUILT_IN or Path(model).expanduser().exists():
        return False
    return Path(model).suffix in SINGLE_FILE_SUFFIXES or model.startswith((".", "/", "~"))


def model_location(model: str) -> str:
    """'tiny', 'folder', 'file' or 'hub' (where the model lies; `toy` is a folder inside the package).
    What kind of base it is (SD 1.x, 2.x, XL) is `base_kind`."""
    if model in TINY_MODELS:
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


def base_kind(model: str) -> str:
    """SD1, SD2 or SDXL (cdtool.choices), read from the model itself: a diffusers folder's or hub
    repository's model_index.json (and UNet config), or a single checkpoint's keys."""
    where = model_location(model)
    if where == "tiny":
        return _TINY_KINDS[model]
    if where == "file":
        return _checkpoint_kind(local_path(model))
    class_name = str(_config(model, where, "model_index.json").get("_class_name"))
    if class_name not in _PIPELINES:
        raise CdtoolError(
            f"{model} is a {class_name}; cdtool works with StableDiffusionPipeline (Stable Diffusion 1.x, 2.x) "
            "and StableDiffusionXLPipeline models"
        )
    unet = {} if class_name == _PIPELINES[1] else _config(model, where, "unet/config.json")
    return kind_from_configs(class_name, unet)


def kind_from_configs(class_name: str, unet_config: Mapping[str, Any]) -> str:
    """The kind of base a pipeline class (one of _PIPELINES) and UNet config make: SD 2.x is told from
    1.x by its linear projections (and 1024-wide text features)."""
    if class_name == _PIPELINES[1]:
        return SDXL
    sd2 = bool(unet_config.get("use_linear_projection")) or unet_config.get("cross_attention_dim") == 1024
    return SD2 if sd2 else SD1


def pipeline_kind(pipe: Any) -> str:
    """The kind of base of a loaded pipeline."""
    return kind_from_configs(type(pipe).__name__, dict(pipe.unet.config))


def _checkpoint_kind(path: Path) -> str:
    """The kind of a single-file checkpoint, from its keys (as the original repositories name them)."""
    keys = _checkpoint_keys(path)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP's text encoder
        return SD2
    return SD1


def _checkpoint_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise CdtoolError(f"could not read the checkpoint {path} ({e}); is it truncated?") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return [str(k) for k in state]


def _config(model: str, where: str, name: str) -> dict[str, Any]:
    """A JSON config of a diffusers folder or hub repository (`model_index.json`, `unet/config.json`)."""
    import json

    try:
        if where == "folder":
            path = local_path(model) / name
            if not path.is_file():
                raise OSError(f"no {name}")
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, name))
        return dict(json.loads(path.read_text()))
    except Exception as e:  # missing file, offline, unknown repository, not JSON
        raise CdtoolError(_load_failure(model, where, e)) from e


def offline_hint(model: str) -> str:
    return (
        f"download it where there is network (`hf download {model} --local-dir DIR`) and pass "
        "--model DIR, or pass a local diffusers folder or a .safetensors/.ckpt checkpoint"
    )


def check_available(model: str, source: str = "--model") -> None:
    """Fail now, before a command makes any output, when `model` cannot be loaded from where it is
    named: a local folder that is not a diffusers model, or a hub id that is neither in the local
    Hugging Face cache nor downloadable (offline). `source` says where the name came from."""
    where = model_location(model)
    if where == "folder" and not (local_path(model) / "model_index.json").is_file():
        raise CdtoolError(
            f"{model} ({source}) is not a diffusers model folder (no model_index.json); pass --model with a "
            "diffusers folder, a .safetensors/.ckpt checkpoint, or a hub id"
        )
    if where != "hub":
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
            reason = first_line(e)
    raise CdtoolError(
        f"the model {model} ({source}) is not on this machine and could not be downloaded ({reason}); "
        f"{offline_hint(model)} (`--model toy` is built in)"
    )


def _no_loading_bars() -> None:
    """transformers 5 and diffusers draw "Loading weights" bars on stderr; cdtool has its own output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def load_pipeline(model: str) -> Any:
    """The full pipeline, of the class the model's kind calls for: StableDiffusionPipeline (SD 1.x,
    2.x) or StableDiffusionXLPipeline (float32, CPU, no safety checker or watermark)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    _no_loading_bars()
    where = model_location(model)
    if where == "tiny":
        from cdtool.models.tiny import build_tiny

        return build_tiny(model)
    xl = base_kind(model) == SDXL
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    kwargs: dict[str, Any] = (
        dict(add_watermarker=False) if xl else dict(safety_checker=None, requires_safety_checker=False)
    )
    try:
        if where == "file":
            pipe = cls.from_single_file(str(local_path(model)), **kwargs)
        else:
            pipe = cls.from_pretrained(
                str(local_path(model)) if where == "folder" else model,
                local_files_only=where == "folder" or _hub_offline(),
                **kwargs,
            )
    except (OSError, ValueError) as e:
        raise CdtoolError(_load_failure(model, where, e)) from e
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    return pipe.to(torch.float32)


def load_text_side(model: str) -> TextSide:
    """The base's tokenizer(s) and text encoder(s), without loading the UNet or VAE where the
    source allows it."""
    from cdtool.models.conditioning import TextSide

    where = model_location(model)
    if where in ("tiny", "file"):
        return TextSide.of(load_pipeline(model))
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _no_loading_bars()
    parts = [("tokenizer", "text_encoder", CLIPTextModel)]
    if base_kind(model) == SDXL:
        parts.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    source = str(local_path(model)) if where == "folder" else model
    local = where == "folder" or _hub_offline()
    tokenizers, encoders = [], []
    try:
        for tok_dir, enc_dir, enc_cls in parts:
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder=tok_dir, local_files_only=local))
            # read straight into float32: no float16 copy beside it (1.6 GB for SDXL's two encoders)
            enc = enc_cls.from_pretrained(source, subfolder=enc_dir, local_files_only=local, dtype=torch.float32)
            encoders.append(enc.float().eval().requires_grad_(False))
    except (OSError, ValueError) as e:
        raise CdtoolError(_load_failure(model, where, e)) from e
    return TextSide(tokenizers, encoders)


def unet_config(model: str) -> dict[str, Any]:
    """The model's UNet config, read from its config file (a single checkpoint: loaded)."""
    where = model_location(model)
    if where == "tiny":
        from cdtool.models import tiny

        return dict({TINY: tiny.UNET_CONFIG, TINY_SD2: tiny.SD2_UNET_CONFIG, TINY_XL: tiny.XL_UNET_CONFIG}[model])
    if where in ("folder", "hub"):
        return _config(model, where, "unet/config.json")
    return dict(load_pipeline(model).unet.config)


def default_resolution(model: str) -> int:
    """The model's native image size: UNet sample size x VAE factor, read from the configs where
    there are configs (1024 for SDXL, 512 or 768 for SD 1.x/2.x); for a single checkpoint, 1024 for
    SDXL and 512 otherwise."""
    where = model_location(model)
    if where == "tiny":
        from cdtool.models.tiny import TINY_RESOLUTION

        return TINY_RESOLUTION
    if where == "file":
        return 1024 if base_kind(model) == SDXL else 512
    try:
        unet = _config(model, where, "unet/config.json")
        vae = _config(model, where, "vae/config.json")
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (CdtoolError, KeyError, TypeError, ValueError):
        return 1024 if base_kind(model) == SDXL else 512


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _load_failure(model: str, where: str, e: Exception) -> str:
    reason = first_line(e)
    if where == "folder":
        return f"could not load the diffusers folder {model} ({reason}); it needs model_index.json and unet/, vae/, text_encoder/, tokenizer/"
    if where == "file":
        return (
            f"could not load the checkpoint {model} ({reason}); single-file loading also fetches the "
            "model's config from the hub: run once with network, or convert it to a diffusers folder"
        )
    return f"could not load {model!r} from the Hugging Face hub ({reason}); {offline_hint(model)}"

"""The base model's weights that a delta touches, and the fingerprint that ties a delta to its base."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from cdtool.delta import Delta
from cdtool.errors import CdtoolError
from cdtool.models import load_pipeline, local_path, model_kind

# Canonical name of the token embedding table (transformers 4 nests it under `text_model.`, 5 does not).
TOKEN_EMBEDDING = "text_encoder.token_embedding.weight"
_TOKEN_EMBEDDING_KEYS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
_COMPONENT_FILES = {
    "unet": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"),
}


def fingerprint_names(delta: Delta) -> list[str]:
    """The base parameters a delta's fingerprint covers: the weights (and biases) of its layers,
    and the token embedding table when it adds tokens."""
    names = []
    for name, layer in delta.layers.items():
        names.append(f"{name}.weight")
        if layer.bias is not None:
            names.append(f"{name}.bias")
    if delta.tokens:
        names.append(TOKEN_EMBEDDING)
    return sorted(names)


def fingerprint(params: Mapping[str, torch.Tensor], names: Iterable[str], vocab_size: int | None = None) -> str:
    """sha256 over the named base parameters, cast to float16 so that a model loaded in fp32 or
    fp16 (or stored in either) gives the same fingerprint."""
    h = hashlib.sha256()
    for name in sorted(names):
        if name not in params:
            raise CdtoolError(f"the base model has no parameter {name}; is the delta for another base?")
        t = params[name].detach()
        if name == TOKEN_EMBEDDING and vocab_size is not None:
            t = t[:vocab_size]  # rows added for new tokens are not part of the base
        t = t.to("cpu", torch.float16).contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def pipeline_params(pipe: Any) -> dict[str, torch.Tensor]:
    """`unet.<name>` and `text_encoder.<name>` -> parameter tensor, without copies."""
    out = {f"unet.{n}": p for n, p in pipe.unet.named_parameters()}
    out.update({f"text_encoder.{n}": p for n, p in pipe.text_encoder.named_parameters()})
    out[TOKEN_EMBEDDING] = pipe.text_encoder.get_input_embeddings().weight
    return out


def load_base_params(model: str, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named base parameters (float32), reading only those tensors where the model is a
    diffusers folder with safetensors weights; otherwise the whole model is loaded."""
    wanted = sorted(set(names))
    kind = model_kind(model)
    if kind == "folder":
        got = _read_selected(local_path(model), wanted)
        if got is not None:
            return got
    if kind == "hub":
        got = _read_selected_from_hub(model, wanted)
        if got is not None:
            return got
    params = pipeline_params(load_pipeline(model))
    missing = [n for n in wanted if n not in params]
    if missing:
        raise CdtoolError(f"the base model {model} has no parameter {missing[0]}; is the delta for another base?")
    return {n: params[n].detach().float() for n in wanted}


def unet_param_names(model: str) -> list[str]:
    """`unet.<name>` of every UNet parameter, from the file's index where possible."""
    if model_kind(model) == "folder":
        from safetensors import safe_open

        folder = local_path(model)
        files = [folder / f for f in _COMPONENT_FILES["unet"] if (folder / f).exists()]
        if files:
            with safe_open(str(files[0]), framework="pt") as f:
                return [f"unet.{k}" for k in f.keys()]
    return [n for n in pipeline_params(load_pipeline(model)) if n.startswith("unet.")]


def _read_selected_from_hub(repo: str, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Fetch only the safetensors files of the components the names touch (into the hub cache),
    then read the named tensors from them; None when the repository has no such files."""
    import tempfile

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    components = sorted({n.partition(".")[0] for n in names})
    folder = Path(tempfile.mkdtemp(prefix="cdtool-hub-"))
    for comp in components:
        for filename in _COMPONENT_FILES.get(comp, ()):
            try:
                local = hf_hub_download(repo, filename)
            except EntryNotFoundError:
                continue
            except Exception as e:  # offline, unknown repository, no access
                from cdtool.models import _offline_hint

                raise CdtoolError(
                    f"could not read {filename} of {repo!r} from the Hugging Face hub ({str(e).splitlines()[0]}); {_offline_hint(repo)}"
                ) from e
            (folder / comp).mkdir(exist_ok=True)
            (folder / filename).symlink_to(local)
            break
        else:
            return None
    return _read_selected(folder, names)


def _read_selected(folder: Path, names: list[str]) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_component: dict[str, list[str]] = {}
    for n in names:
        comp, _, rest = n.partition(".")
        by_component.setdefault(comp, []).append(rest)
    for comp, keys in by_component.items():
        files = [folder / f for f in _COMPONENT_FILES.get(comp, ()) if (folder / f).exists()]
        if not files:
            return None
        with safe_open(str(files[0]), framework="pt") as f:
            available = set(f.keys())
            for k in keys:
                if f"{comp}.{k}" == TOKEN_EMBEDDING:
                    k = next((c for c in _TOKEN_EMBEDDING_KEYS if c in available), k)
                    out[TOKEN_EMBEDDING] = f.get_tensor(k).float()
                    continue
                if k not in available:
                    raise CdtoolError(
                        f"the base model {folder} has no parameter {comp}.{k}; is the delta for another base?"
                    )
                out[f"{comp}.{k}"] = f.get_tensor(k).float()
    return out


def check_token_width(delta: Delta, params: Mapping[str, torch.Tensor], model: str) -> None:
    """Every token's embedding is as wide as the base's token table (in `params`, when read)."""
    table = params.get(TOKEN_EMBEDDING)
    if table is None:
        return
    for token, emb in delta.tokens.items():
        if emb.shape[-1] != table.shape[1]:
            raise CdtoolError(
                f"{delta.origin}: token {token} is {emb.shape[-1]} numbers wide; the token table of {model} "
                f"is {table.shape[1]}; is the file for another base model (or not a token embedding)?"
            )


def model_fingerprint(model: str, pipe: Any = None) -> str:
    """What tells one base model from another: the fingerprint of its UNet's cross-attention key
    weights, read from `pipe` (unmodified) when given, else from the model's files where it can."""
    if pipe is None and model_kind(model) != "folder":
        pipe = load_pipeline(model)
    if pipe is not None:
        params = pipeline_params(pipe)
        names = sorted(n for n in params if n.endswith(".attn2.to_k.weight"))
    else:
        names = sorted(n for n in unet_param_names(model) if n.endswith(".attn2.to_k.weight"))
        params = load_base_params(model, names)
    return fingerprint(params, names)

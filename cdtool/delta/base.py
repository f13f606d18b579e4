"""The base model's weights that a delta touches, and the fingerprint that ties a delta to its base."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from cdtool.delta.file import FORMAT, Delta
from cdtool.errors import CdtoolError, first_line
from cdtool.models.loading import load_pipeline, local_path, model_location

# Canonical names of the token embedding tables (transformers 4 nests them under `text_model.`, 5
# does not for CLIPTextModel): the text encoder's, and SDXL's second text encoder's.
TOKEN_EMBEDDING = "text_encoder.token_embedding.weight"
TOKEN_EMBEDDING_2 = "text_encoder_2.token_embedding.weight"
TOKEN_TABLES = (TOKEN_EMBEDDING, TOKEN_EMBEDDING_2)
_TOKEN_EMBEDDING_KEYS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
_COMPONENT_FILES = {
    "unet": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"),
    "text_encoder_2": ("text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors"),
}


def fingerprint_names(delta: Delta) -> list[str]:
    """The base parameters a delta's fingerprint covers: the weights (and biases) of its layers,
    and the token embedding table when it adds tokens (both tables when it adds them to both)."""
    names = []
    for name, layer in delta.layers.items():
        names.append(f"{name}.weight")
        if layer.bias is not None:
            names.append(f"{name}.bias")
    if delta.tokens:
        names.append(TOKEN_EMBEDDING)
    if delta.tokens_2:
        names.append(TOKEN_EMBEDDING_2)
    return sorted(names)


def fingerprint(params: Mapping[str, torch.Tensor], names: Iterable[str], vocab_size: int | None = None) -> str:
    """sha256 over the named base parameters, cast to float16 so that a model loaded in fp32 or
    fp16 (or stored in either) gives the same fingerprint."""
    h = hashlib.sha256()
    for name in sorted(names):
        if name not in params:
            raise CdtoolError(f"the base model has no parameter {name}; is the delta for another base?")
        t = params[name].detach()
        if name in TOKEN_TABLES and vocab_size is not None:
            t = t[:vocab_size]  # rows added for new tokens are not part of the base
        t = t.to("cpu", torch.float16).contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def pipeline_params(pipe: Any) -> dict[str, torch.Tensor]:
    """`unet.<name>`, `text_encoder.<name>` (and SDXL's `text_encoder_2.<name>`) -> parameter
    tensor, without copies; the token tables under their canonical names too."""
    out = {f"unet.{n}": p for n, p in pipe.unet.named_parameters()}
    for component, table in (("text_encoder", TOKEN_EMBEDDING), ("text_encoder_2", TOKEN_EMBEDDING_2)):
        encoder = getattr(pipe, component, None)
        if encoder is not None:
            out.update({f"{component}.{n}": p for n, p in encoder.named_parameters()})
            out[table] = encoder.get_input_embeddings().weight
    return out


def check_kind(
    delta: Delta, base_kind: str, model: str, ignore: bool = False, warn: Callable[[str], None] | None = None
) -> None:
    """A delta made for one kind of base (SD 1.x, 2.x, XL) is refused on another, naming both."""
    from cdtool.choices import KIND_NAMES

    kind = delta.kind
    if not kind or kind == base_kind:
        return
    base = f"the base model {model}" if model else "the base model"
    msg = f"{delta.origin or 'the delta'} is a delta for {KIND_NAMES[kind]}, but {base} is {KIND_NAMES[base_kind]}"
    if ignore and warn is not None:
        warn(f"{msg}; applying anyway (--ignore-base-mismatch)")
        return
    raise CdtoolError(f"{msg}; pass --model with the {KIND_NAMES[kind]} base it was made for")


def load_base_params(model: str, names: Iterable[str], *, as_stored: bool = False) -> dict[str, torch.Tensor]:
    """The named base parameters (float32), reading only those tensors where the model is a
    diffusers folder with safetensors weights; otherwise the whole model is loaded. `as_stored`
    keeps a folder's tensors in the dtype of its files (half the memory of float16 files, for
    callers that compute in float64 anyway)."""
    wanted = sorted(set(names))
    where = model_location(model)
    if where == "folder":
        got = _read_selected(local_path(model), wanted, as_stored)
        if got is not None:
            return got
    if where == "hub":
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
    if model_location(model) == "folder":
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
                from cdtool.models.loading import offline_hint

                raise CdtoolError(
                    f"could not read {filename} of {repo!r} from the Hugging Face hub ({first_line(e)}); {offline_hint(repo)}"
                ) from e
            (folder / comp).mkdir(exist_ok=True)
            (folder / filename).symlink_to(local)
            break
        else:
            return None
    return _read_selected(folder, names)


def _read_selected(folder: Path, names: list[str], as_stored: bool = False) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    def read(f: Any, key: str) -> torch.Tensor:
        t = f.get_tensor(key)
        return t if as_stored else t.float()

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
                if f"{comp}.{k}" in TOKEN_TABLES:
                    key = next((c for c in _TOKEN_EMBEDDING_KEYS if c in available), k)
                    out[f"{comp}.{k}"] = read(f, key)
                    continue
                if k not in available:
                    raise CdtoolError(
                        f"the base model {folder} has no parameter {comp}.{k}; is the delta for another base?"
                    )
                out[f"{comp}.{k}"] = read(f, k)
    return out


def check_fits(delta: Delta, params: Mapping[str, torch.Tensor], model: str) -> None:
    """Every layer of the delta has the shape of the base's (those whose weights are in `params`),
    and every token the width of the base's token table(s)."""
    for name, layer in sorted(delta.layers.items()):
        w = params.get(f"{name}.weight")
        if w is not None and tuple(w.shape) != layer.shape:
            out, inp = layer.shape
            raise CdtoolError(
                f"{delta.origin or 'the delta'}: layer {name} is {out}x{inp}; in the base model {model} it is "
                f"{w.shape[0]}x{w.shape[1]}; is the delta for another base model?"
            )
    check_token_width(delta, params, model)


def check_token_width(delta: Delta, params: Mapping[str, torch.Tensor], model: str) -> None:
    """Every token's embedding is as wide as the base's token table(s) (in `params`, when read)."""
    for name, rows in ((TOKEN_EMBEDDING, delta.tokens), (TOKEN_EMBEDDING_2, delta.tokens_2)):
        table = params.get(name)
        if table is None:
            continue
        for token, emb in rows.items():
            if emb.shape[-1] != table.shape[1]:
                raise CdtoolError(
                    f"{delta.origin}: token {token} is {emb.shape[-1]} numbers wide; the token table of {model} "
                    f"is {table.shape[1]}; is the file for another base model (or not a token embedding)?"
                )


def resolve_on_base(
    delta: Delta, model: str, *, extra: Iterable[str] = (), record: bool = False
) -> tuple[Delta, dict[str, torch.Tensor]]:
    """Read the base weights `delta` touches (and the `extra` names) from `model`, and make the
    delta relative to them where it holds fine-tuned weights (official and diffusers files, run
    checkpoints). With `record`, for a file cdtool did not write or one without a fingerprint, the
    delta is first checked against the base (its kind, its tokens' width) and then records the
    base: its kind, its name and its fingerprint. Every layer and token is checked to fit the base
    (check_fits). Returns the delta and the weights read."""
    vocab = None
    if record:
        from cdtool.models.loading import base_kind

        kind = base_kind(model)
        check_kind(delta, kind, model)
        delta.base_kind = kind
    names = fingerprint_names(delta)
    params = load_base_params(model, [*names, *(n for n in extra if n not in names)])
    if record and delta.tokens:
        from cdtool.models.loading import load_text_side

        check_token_width(delta, params, model)
        vocab = len(load_text_side(model).tokenizer)
    if delta.needs_base:
        delta = delta.relative_to(params)
    check_fits(delta, params, model)
    if record and (not delta.base_fingerprint or delta.source_format != FORMAT):
        record_base(delta, model, params, vocab)
    return delta, params


def record_base(delta: Delta, model: str, params: Mapping[str, torch.Tensor], vocab: int | None) -> None:
    """Tie `delta` to its base: the base's name and the fingerprint of the weights it touches
    (`vocab`: the base tokenizer's size, where the delta adds tokens)."""
    delta.base_model = model
    delta.base_fingerprint = fingerprint(params, fingerprint_names(delta), vocab)


def model_fingerprint(model: str, pipe: Any = None) -> str:
    """What tells one base model from another: the fingerprint of its UNet's cross-attention key
    weights, read from `pipe` (unmodified) when given, else from the model's files where it can."""
    if pipe is None and model_location(model) != "folder":
        pipe = load_pipeline(model)
    if pipe is not None:
        params = pipeline_params(pipe)
        names = sorted(n for n in params if n.endswith(".attn2.to_k.weight"))
    else:
        names = sorted(n for n in unet_param_names(model) if n.endswith(".attn2.to_k.weight"))
        params = load_base_params(model, names)
    return fingerprint(params, names)

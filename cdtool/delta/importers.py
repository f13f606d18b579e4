"""Reading any delta a user may have, by content; writing the official `.bin` layout.

Accepted: cdtool `.safetensors`; the official Custom Diffusion outputs (diffusers-style `delta.bin`
with `unet` + `modifier_token`, CompVis `.ckpt` with `state_dict` + `embed`, and their compressed
`u`/`v` variants); diffusers' `pytorch_custom_diffusion_weights.{safetensors,bin}` with the
`<token>.{safetensors,bin}` files beside it; and bare token-embedding files. Pickles are opened only
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from cdtool.atomic import atomic_path
from cdtool.choices import SDXL
from cdtool.delta.file import (
    Delta,
    LayerDelta,
    base_param,
    check_finite_output,
    check_numbers,
    check_tensor,
    check_token_pairs,
    is_cdtool_safetensors,
    read_cdtool,
    safetensors_metadata,
    write_cdtool,
)
from cdtool.delta.naming import compvis_to_diffusers
from cdtool.errors import CdtoolError, UsageError
from cdtool.models.clip_vocab import CLIP_VOCAB_SIZE
from cdtool.models.tokens import check_token_name

DIFFUSERS_WEIGHTS = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
OFFICIAL_DELTA = "delta.bin"
COMPVIS_TOKEN_TABLE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_CD_SUFFIX = {
    "to_k_custom_diffusion.weight": ("to_k", "weight"),
    "to_v_custom_diffusion.weight": ("to_v", "weight"),
    "to_q_custom_diffusion.weight": ("to_q", "weight"),
    "to_out_custom_diffusion.0.weight": ("to_out.0", "weight"),
    "to_out_custom_diffusion.0.bias": ("to_out.0", "bias"),
}


def read_delta(path: Path) -> Delta:
    """Read any supported delta file or output folder, sniffing its content."""
    path = Path(path)
    if not path.exists():
        raise CdtoolError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path)
    if path.stat().st_size == 0:
        raise CdtoolError(f"{path}: the file is empty")
    if is_cdtool_safetensors(path):
        return read_cdtool(path)
    kind = _sniff(path)
    if kind == "safetensors":
        return _checked(_from_state(_load_safetensors(path), path))
    if kind == "pickle":
        return _checked(_from_state(load_pickle(path), path))
    raise CdtoolError(f"{path}: not a delta file (neither safetensors nor a PyTorch checkpoint); is it truncated?")


def _checked(delta: Delta) -> Delta:
    """Token names from a stranger's file are checked where they enter (they become file names),
    and so is every number (cdtool.delta.file.check_numbers)."""
    for token in delta.tokens:
        check_token_name(token, delta.origin)
    check_numbers(delta, delta.origin)
    return delta


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") > 1 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CdtoolError(f"{path}: cannot read this safetensors file ({e}); is it truncated?") from e


def load_pickle(path: Path) -> Any:
    """A PyTorch pickle, opened only with `weights_only=True`; anything else is refused in one line
    of cdtool's own (never torch's advice to allow arbitrary code)."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for cdtool's users
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CdtoolError(
            f"{path}: refused: the pickle holds more than tensors (possibly code), and cdtool opens "
            "pickles only as plain tensors; convert it to safetensors where you trust it"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CdtoolError(f"{path}: cannot read this PyTorch file ({e}); is it truncated?") from e


def _read_folder(path: Path) -> Delta:
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).exists():
            return read_delta(path / name)
    if (path / OFFICIAL_DELTA).exists():
        return read_delta(path / OFFICIAL_DELTA)
    if (path / "model_index.json").is_file():  # a whole model (train --method dreambooth, or any diffusers model)
        raise CdtoolError(
            f"{path} is a whole model (a diffusers folder), not a delta: pass it as --model {path}, or extract "
            f"its cross-attention delta with `cdtool get-deltas {path} --model BASE -o DELTA.safetensors`"
        )
    raise CdtoolError(
        f"{path}: a folder without {DIFFUSERS_WEIGHTS[0]}, {DIFFUSERS_WEIGHTS[1]} or {OFFICIAL_DELTA}; "
        "pass the delta file itself"
    )


def _from_state(state: Any, path: Path) -> Delta:
    if not isinstance(state, dict):
        raise CdtoolError(f"{path}: not a delta (the file holds a {type(state).__name__}, not a dict)")
    if "unet" in state and isinstance(state["unet"], dict):
        return _from_official(state, path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        return _from_compvis(state["state_dict"], path)
    if any("_custom_diffusion" in k for k in state):
        return _from_diffusers(state, path)
    if _is_sdxl_embedding(state):
        tokens, tokens_2 = _sdxl_embedding(state, path)
        return Delta(
            tokens=tokens, tokens_2=tokens_2, base_kind=SDXL, source_format="token-embeddings", origin=str(path)
        )
    tokens = _token_file(state, path)
    if tokens:
        return Delta(tokens=tokens, source_format="token-embeddings", origin=str(path))
    raise CdtoolError(
        f"{path}: not a delta: {_looks_like(state)}, in none of the cdtool, official Custom Diffusion, "
        "diffusers or token-embedding layouts"
    )


def _looks_like(state: dict[str, Any]) -> str:
    """What a file that is not a delta holds, in a few words."""
    keys = sorted(state)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a whole Stable Diffusion checkpoint (`cdtool get-deltas FILE --base BASE` extracts its delta)"
    if any(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in keys):
        return "a LoRA (cdtool reads Custom Diffusion deltas; `cdtool export` writes LoRAs)"

    def one(k: str) -> str:
        v = state[k]
        return f"{k} {list(v.shape)}" if isinstance(v, torch.Tensor) else f"{k} ({type(v).__name__})"

    more = f", and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{len(keys)} entries ({', '.join(one(k) for k in keys[:3])}{more})"


def _layer(value: Any, key: str, path: Path) -> LayerDelta:
    if isinstance(value, dict) and "u" in value and "v" in value:
        check_tensor(value["u"], str(path), f"{key}.u", "up")  # before the cast, which would hide an integer type
        check_tensor(value["v"], str(path), f"{key}.v", "down")
        return LayerDelta(up=value["u"].float(), down=value["v"].float())
    if isinstance(value, torch.Tensor):
        return LayerDelta(full=value, absolute=True)  # kept in its dtype until the base is subtracted
    raise CdtoolError(f"{path}: entry {key!r} is neither a weight nor a u/v pair")


def _merge_param(layers: dict[str, LayerDelta], name: str, kind: str, layer: LayerDelta) -> None:
    if kind == "bias":
        if name not in layers:
            raise CdtoolError(f"bias of {name} without its weight")
        layers[name].bias = layer.full
    else:
        layers[name] = layer


def _from_official(state: dict[str, Any], path: Path) -> Delta:
    layers: dict[str, LayerDelta] = {}
    # weights before biases, so a bias finds its layer
    for key in sorted(state["unet"], key=lambda k: k.endswith(".bias")):
        stem, _, kind = key.rpartition(".")
        if kind not in ("weight", "bias"):
            raise CdtoolError(f"{path}: unexpected entry {key!r} under 'unet'")
        _merge_param(layers, f"unet.{stem}", kind, _layer(state["unet"][key], key, path))
    delta = Delta(layers=layers, source_format="official-diffusers", origin=str(path))
    for token, rows in (state.get("modifier_token") or {}).items():
        if isinstance(rows, (list, tuple)):  # the SDXL script's: [row in text_encoder, row in text_encoder_2]
            if len(rows) != 2 or not all(isinstance(r, torch.Tensor) for r in rows):
                raise CdtoolError(f"{path}: modifier_token {token!r} holds {len(rows)} entries, not a pair of rows")
            delta.tokens[token] = _checked_rows(rows[0], path, f"modifier_token.{token}[0]")
            delta.tokens_2[token] = _checked_rows(rows[1], path, f"modifier_token.{token}[1]")
            delta.base_kind = SDXL
        elif isinstance(rows, torch.Tensor):
            delta.tokens[token] = _checked_rows(rows, path, f"modifier_token.{token}")
        else:
            raise CdtoolError(f"{path}: modifier_token {token!r} is neither a row nor a pair of rows")
    check_token_pairs(delta, str(path))
    return delta


def _from_compvis(sd: dict[str, Any], path: Path) -> Delta:
    """Official CompVis deltas, or whole CompVis checkpoints (whose cross-attention layers and added
    token rows are taken, as the official get_deltas.py does)."""
    layers: dict[str, LayerDelta] = {}
    for key in sorted(sd, key=lambda k: k.endswith(".bias")):
        weight_key = key[: -len("bias")] + "weight" if key.endswith(".bias") else key
        name = compvis_to_diffusers(weight_key)
        if name is None or ".attn2." not in name:
            continue
        _merge_param(layers, name, "bias" if key.endswith(".bias") else "weight", _layer(sd[key], key, path))
    if not layers and "embed" not in sd:
        raise CdtoolError(f"{path}: a CompVis checkpoint with no SD1.x cross-attention layers")
    tokens = {}
    table = sd.get(COMPVIS_TOKEN_TABLE)
    embed = sd.get("embed")
    if embed is None and isinstance(table, torch.Tensor) and table.shape[0] > CLIP_VOCAB_SIZE:
        embed = table[CLIP_VOCAB_SIZE:]
    if embed is not None:
        embed = _checked_rows(embed, path, "embed")
        # The official CompVis code stores the new rows in the order <new1>, <new2>, ...
        tokens = {f"<new{i + 1}>": embed[i : i + 1] for i in range(embed.shape[0])}
    return Delta(layers=layers, tokens=tokens, source_format="official-compvis", origin=str(path))


def _from_diffusers(state: dict[str, Any], path: Path) -> Delta:
    layers: dict[str, LayerDelta] = {}
    for key in sorted(state, key=lambda k: k.endswith(".bias")):
        value = state[key]
        if isinstance(value, dict) and not value:
            continue  # diffusers stores empty entries for untouched processors
        proc, _, sub = key.partition(".processor.")
        if sub not in _CD_SUFFIX:
            raise CdtoolError(f"{path}: unexpected entry {key!r} in Custom Diffusion weights")
        module, kind = _CD_SUFFIX[sub]
        _merge_param(layers, f"unet.{proc}.{module}", kind, LayerDelta(full=value, absolute=True))
    delta = Delta(layers=layers, source_format="diffusers-custom-diffusion", origin=str(path))
    _add_tokens_beside(delta, path)
    check_token_pairs(delta, str(path))  # an SD 1.x token file beside an SDXL one
    return delta


def _add_tokens_beside(delta: Delta, weights: Path) -> None:
    """The token files in the folder of diffusers' Custom Diffusion weights, found by content: named
    `<token>.safetensors` as diffusers writes them, or `new1.safetensors` as cdtool exports them;
    an SDXL file's two encoders' rows (`clip_l`, `clip_g`) go to both token tables."""
    for token_file in sorted(weights.parent.iterdir()):
        if token_file.suffix not in (".safetensors", ".bin") or token_file.name in DIFFUSERS_WEIGHTS:
            continue
        state = _load_safetensors(token_file) if token_file.suffix == ".safetensors" else load_pickle(token_file)
        if not isinstance(state, dict):
            continue
        if _is_sdxl_embedding(state):
            tokens, tokens_2 = _sdxl_embedding(state, token_file)
            delta.tokens.update(tokens)
            delta.tokens_2.update(tokens_2)
            delta.base_kind = SDXL
        else:
            delta.tokens.update(_token_file(state, token_file))


def _is_sdxl_embedding(state: dict[str, Any]) -> bool:
    """An SDXL embedding file: a token's rows for both text encoders, `clip_l` and `clip_g`."""
    return set(state) == {"clip_l", "clip_g"} and all(_is_embedding(v) for v in state.values())


def _sdxl_embedding(state: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """{token: rows} for each encoder; the token is the metadata's `token` (as cdtool writes it), else
    the file's name, as AUTOMATIC1111 reads it."""
    meta = (safetensors_metadata(path) or {}) if path.suffix == ".safetensors" else {}
    token = meta.get("token") or path.stem
    return {token: _as_rows(state["clip_l"])}, {token: _as_rows(state["clip_g"])}


def _checked_rows(t: Any, path: Path, name: str) -> torch.Tensor:
    """A token's rows from a file, checked before they are cast to float32."""
    check_tensor(t, str(path), name, "token")
    return _as_rows(t)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return (t.reshape(1, -1) if t.dim() == 1 else t).float()


# A prompt holds at most 75 tokens between its start and end: no embedding has more vectors.
MAX_TOKEN_VECTORS = 75
_PARAMETER_NAMES = {"weight", "bias", "emb_params", "state_dict", "params"}


def _token_file(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """{token: [n, dim]} from a token-embedding file, or {} when `state` is not one: A1111's
    `string_to_param` (.pt) or `emb_params` (.safetensors; the token is the metadata's `token`, as
    cdtool writes it, else the file's name, as the UI reads it), or diffusers' {token: embedding},
    whose keys are token names (not parameter names) and whose values are floating-point vectors
    of one width, at most MAX_TOKEN_VECTORS of them."""
    if "string_to_param" in state and isinstance(state["string_to_param"], dict):  # A1111 .pt
        name = state.get("name")
        param = next(iter(state["string_to_param"].values()), None)
        return {str(name) if name else path.stem: _as_rows(param)} if _is_embedding(param) else {}
    if set(state) == {"emb_params"} and _is_embedding(state["emb_params"]):  # A1111 .safetensors
        meta = (safetensors_metadata(path) or {}) if path.suffix == ".safetensors" else {}
        return {meta.get("token") or path.stem: _as_rows(state["emb_params"])}
    if not state or len(state) > 64:
        return {}
    names_ok = all(isinstance(k, str) and "." not in k and k not in _PARAMETER_NAMES for k in state)
    values = list(state.values())
    if not names_ok or not all(_is_embedding(v) for v in values):
        return {}
    if len({v.shape[-1] for v in values}) != 1:
        return {}
    return {k: _as_rows(v) for k, v in state.items()}


def _is_embedding(v: Any) -> bool:
    return (
        isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and v.dim() in (1, 2)
        and (v.dim() == 1 or 1 <= v.shape[0] <= MAX_TOKEN_VECTORS)
        and v.shape[-1] > 1
    )


DELTA_SUFFIXES = (".safetensors", ".bin")


def check_delta_output(path: Path) -> None:
    """A delta is written as .safetensors (cdtool) or .bin (the official layout)."""
    if path.suffix not in DELTA_SUFFIXES:
        raise UsageError(f"{path}: write a .safetensors (cdtool) or a .bin (official layout) file")


def save_delta(delta: Delta, path: Path, base: dict[str, torch.Tensor] | None = None, *, replace: bool = True) -> None:
    """Write by extension: `.safetensors` is the cdtool format, `.bin` the official layout
    (which stores fine-tuned weights, so it needs the base weights). Without `replace`, an
    existing `path` is a conflict (see cdtool.atomic)."""
    if path.suffix == ".safetensors":
        write_cdtool(delta, path, replace=replace)
    elif path.suffix == ".bin":
        if base is None:
            raise CdtoolError("writing the official .bin layout needs the base model's weights")
        write_official(delta, path, base, replace=replace)
    else:
        check_delta_output(path)


def official_state(delta: Delta, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The official diffusers-style `delta.bin` dict: fine-tuned weights, or u/v for low-rank; for
    SDXL each modifier token holds its pair of rows (text_encoder's, text_encoder_2's), as the
    official SDXL script writes them.

    Deliberate difference: fine-tuned weights are stored in float64. W0 + ΔW of two float32 tensors
    is exact in float64, so cdtool -> .bin -> cdtool gives back ΔW bit for bit; the official
    loaders copy the weights into the model's parameters, which casts them."""
    delta.refuse_personal(
        "the official .bin layout cannot hold it (no InstantBooth adapters there); write .safetensors"
    )
    unet: dict[str, Any] = {}
    for name, layer in sorted(delta.layers.items()):
        if not name.startswith("unet."):
            raise CdtoolError(f"the official layout holds only UNet layers, not {name}")
        stem = name[len("unet.") :]
        if layer.full is not None:
            w0 = base_param(base, f"{name}.weight", layer.full.shape)
            unet[f"{stem}.weight"] = w0.double() + layer.full.double()
        else:
            unet[f"{stem}.weight"] = {"u": layer.up, "v": layer.down}
        if layer.bias is not None:
            b0 = base_param(base, f"{name}.bias", layer.bias.shape)
            unet[f"{stem}.bias"] = b0.double() + layer.bias.double()
    tokens: dict[str, Any] = {t: _official_rows(e) for t, e in delta.tokens.items()}
    for t, e in delta.tokens_2.items():  # the SDXL script's pair of rows
        tokens[t] = [tokens[t], _official_rows(e)]
    return {"unet": unet, "modifier_token": tokens}


def _official_rows(e: torch.Tensor) -> torch.Tensor:
    """A token's rows as the official code stores them: one row as a vector."""
    return (e[0] if e.shape[0] == 1 else e).clone()


def write_official(delta: Delta, path: Path, base: dict[str, torch.Tensor], *, replace: bool = True) -> None:
    """Write the official `.bin` layout atomically."""
    state = official_state(delta, base)
    check_finite_output(state, path)
    with atomic_path(path, replace=replace) as tmp, tmp.open("wb") as f:
        torch.save(state, f)  # to a file object: the archive is named `archive`, not after the temporary file

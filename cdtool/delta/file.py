"""The delta file: what every cdtool command reads and writes (every key: docs/design.md).

In memory a `Delta` holds, per trained Linear, either a full difference ΔW or a low-rank pair
(up, down) with ΔW = up @ down, plus the learned embeddings of modifier tokens and the metadata.
Files imported from other tools may hold fine-tuned weights instead of differences; such layers are
marked `absolute` until `Delta.relative_to(base)` subtracts the base weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cdtool import __version__
from cdtool.atomic import atomic_path
from cdtool.choices import SD1, SDXL
from cdtool.errors import CdtoolError

FORMAT = "cdtool.delta"
FORMAT_VERSION = "1"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# the kind of base a file without `base_kind` metadata was made for: every Stable Diffusion 1.x
# delta (whose files are as they were before there were kinds)
DEFAULT_KIND = SD1


@dataclass
class LayerDelta:
    """One Linear's change: `full` ([out, in]) or `up` [out, r] @ `down` [r, in], and maybe a bias."""

    full: torch.Tensor | None = None
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # change of the bias, where one was trained ([out])
    absolute: bool = False  # `full` and `bias` hold fine-tuned weights, not differences

    def __post_init__(self) -> None:
        if (self.full is None) == (self.up is None or self.down is None):
            raise ValueError("a layer delta is either full or an up/down pair")

    def dense(self) -> torch.Tensor:
        """ΔW as one [out, in] matrix."""
        if self.absolute:
            raise ValueError("absolute weights: call Delta.relative_to(base) first")
        if self.full is not None:
            return self.full
        assert self.up is not None and self.down is not None
        return self.up.float() @ self.down.float()

    @property
    def rank(self) -> int | None:
        """The factor rank, or None for a full matrix."""
        return None if self.up is None else int(self.up.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        if self.full is not None:
            return (int(self.full.shape[0]), int(self.full.shape[1]))
        assert self.up is not None and self.down is not None
        return (int(self.up.shape[0]), int(self.down.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return (self.full if self.full is not None else self.up).dtype  # type: ignore[union-attr]


@dataclass
class Delta:
    """Everything one delta file holds."""

    layers: dict[str, LayerDelta] = field(default_factory=dict)  # "unet.<module path>" -> change
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> [n_vectors, dim]
    # SDXL: token -> its rows in the second text encoder [n_vectors, dim_2] (the same tokens as `tokens`)
    tokens_2: dict[str, torch.Tensor] = field(default_factory=dict)
    # InstantBooth: token -> the visual tokens of its concept [M, D], which its encoder's adapters
    # inject (one concept per file); `encoder` names that encoder (path, sha256, base fingerprint)
    visual: dict[str, torch.Tensor] = field(default_factory=dict)
    encoder: dict[str, Any] | None = None
    base_kind: str = ""  # the kind of base (cdtool.choices: sd1, sd2, sdxl); "" where unknown (imports)
    base_model: str = ""
    base_fingerprint: str = ""
    concepts: list[dict[str, Any]] = field(default_factory=list)
    created_by: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    source_format: str = FORMAT
    origin: str = ""  # the path it was read from, for messages

    @property
    def needs_base(self) -> bool:
        """True while some layer still holds absolute weights."""
        return any(layer.absolute for layer in self.layers.values())

    def relative_to(self, base: Mapping[str, torch.Tensor]) -> Delta:
        """Turn absolute (fine-tuned) weights into differences against `base`
        (parameter name such as `unet.<path>.weight` -> tensor)."""
        layers = {}
        for name, layer in self.layers.items():
            if layer.absolute:
                assert layer.full is not None
                # in float64, so W - W0 is exact before the one rounding to float32
                w0 = base_param(base, f"{name}.weight", layer.full.shape)
                w = (layer.full.double() - w0.double()).float()
                b = None
                if layer.bias is not None:
                    b0 = base_param(base, f"{name}.bias", layer.bias.shape)
                    b = (layer.bias.double() - b0.double()).float()
                layer = LayerDelta(full=w, bias=b)
            layers[name] = layer
        return replace(self, layers=layers)

    @property
    def kind(self) -> str:
        """The kind of base, as recorded or as the content shows (rows for two encoders: SDXL)."""
        return self.base_kind or (SDXL if self.tokens_2 else "")

    def refuse_personal(self, why: str) -> None:
        """A personalised concept (InstantBooth: visual tokens for its encoder's adapters) is refused
        where it cannot go, in one line that says `why`."""
        if self.visual:
            raise CdtoolError(
                f"{self.origin or 'the delta'} is an InstantBooth concept (visual tokens for its encoder's adapters); {why}"
            )

    def concept_for(self, token: str) -> dict[str, Any] | None:
        for concept in self.concepts:
            if concept.get("token") == token:
                return concept
        return None


def describe(delta: Delta, path: Path) -> dict[str, Any]:
    """A JSON-ready summary of a delta read from `path` (what `cdtool info` shows)."""
    ranks = [layer.rank for layer in delta.layers.values()]
    return {
        "path": str(path),
        "format": delta.source_format,
        "size_bytes": path.stat().st_size if path.is_file() else None,
        "base_model": delta.base_model or None,
        "base_fingerprint": delta.base_fingerprint or None,
        "needs_base": delta.needs_base,
        "created_by": delta.created_by or None,
        "base_kind": delta.kind or None,
        "tokens": {t: _token_doc(delta, t) for t in delta.tokens},
        "visual": {t: {"tokens": int(v.shape[0]), "dim": int(v.shape[1])} for t, v in delta.visual.items()},
        "encoder": delta.encoder,
        "concepts": delta.concepts,
        "layers": {
            name: {
                "shape": list(layer.shape),
                "rank": layer.rank,
                "dtype": str(layer.dtype).removeprefix("torch."),
                "bias": layer.bias is not None,
                "absolute": layer.absolute,
            }
            for name, layer in sorted(delta.layers.items())
        },
        "layer_count": len(delta.layers),
        "low_rank_layers": sum(r is not None for r in ranks),
        "provenance": delta.provenance,
    }


def _token_doc(delta: Delta, token: str) -> dict[str, int]:
    """A token's rows: how many, and their width (in each text encoder: `dim_2` for SDXL's second)."""
    e = delta.tokens[token]
    doc = {"vectors": int(e.shape[0]), "dim": int(e.shape[1])}
    if token in delta.tokens_2:
        doc["dim_2"] = int(delta.tokens_2[token].shape[1])
    return doc


def base_param(base: Mapping[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """`base[name]`, checked against the shape the delta expects."""
    if name not in base:
        raise CdtoolError(f"{name} of the delta does not exist in the base model; is it for another base?")
    w0 = base[name]
    if tuple(w0.shape) != tuple(shape):
        raise CdtoolError(
            f"{name}: the delta's shape {tuple(shape)} does not fit the base model's "
            f"{tuple(w0.shape)}; is this delta for another base model?"
        )
    return w0


# ---- numbers checked where they enter -----------------------------------------------------------

# The number types a delta's tensors may hold (what every writer and reader of these files uses).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DIMS = {"delta": (2,), "weight": (2,), "up": (2,), "down": (2,), "bias": (1,), "token": (1, 2), "token_2": (1, 2)}
_SHAPES = {
    "delta": "[out, in]",
    "weight": "[out, in]",
    "up": "[out, rank]",
    "down": "[rank, in]",
    "bias": "[out]",
    "token": "[vectors, width]",
    "token_2": "[vectors, width]",
}


def check_tensor(t: Any, where: str, name: str, part: str) -> None:
    """A tensor read from a file: of a floating-point type, with the dimensions the delta format
    gives its `part` (`delta`, `up`, `down`, `bias`, `weight`, `token`), not empty, every number
    finite. A failure is one error naming the file, the tensor and what is wrong."""
    if not isinstance(t, torch.Tensor):
        raise CdtoolError(f"{where}: {name} is a {type(t).__name__}, not a tensor")
    if t.dtype not in FLOAT_DTYPES:
        raise CdtoolError(
            f"{where}: tensor {name} holds {str(t.dtype).removeprefix('torch.')} numbers; a delta holds "
            "floating-point numbers (float16, bfloat16, float32 or float64)"
        )
    if t.dim() not in _DIMS[part]:
        raise CdtoolError(
            f"{where}: tensor {name} has shape {list(t.shape)}; the format gives it the shape {_SHAPES[part]}"
        )
    if t.numel() == 0:
        raise CdtoolError(f"{where}: tensor {name} is empty (shape {list(t.shape)})")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan = int(torch.isnan(t).sum())
        inf = int(t.numel() - int(finite.sum()) - nan)
        what = " and ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if x)
        raise CdtoolError(
            f"{where}: tensor {name} holds {what} value{'s' if nan + inf > 1 else ''} (of {t.numel()}); "
            "the file is damaged or its training diverged: retrain or re-export it"
        )


def check_numbers(delta: Delta, where: str) -> None:
    """Every tensor of a delta as read (`check_tensor`), and their shapes consistent: a layer's up
    and down of one rank, its bias as long as its output, a token's rows one width per encoder."""
    for name, layer in sorted(delta.layers.items()):
        parts = {"weight" if layer.absolute else "delta": layer.full, "up": layer.up, "down": layer.down}
        for part, t in [*parts.items(), ("bias", layer.bias)]:
            if t is not None:
                check_tensor(t, where, f"{name}.{part}", part)
        if layer.up is not None and layer.down is not None and layer.up.shape[1] != layer.down.shape[0]:
            raise CdtoolError(
                f"{where}: layer {name}: up {list(layer.up.shape)} and down {list(layer.down.shape)} are of "
                "different ranks"
            )
        if layer.bias is not None and layer.bias.shape[0] != layer.shape[0]:
            raise CdtoolError(
                f"{where}: tensor {name}.bias has {layer.bias.shape[0]} numbers; its layer has {layer.shape[0]} outputs"
            )
    for family, rows in (("token", delta.tokens), ("token_2", delta.tokens_2)):
        widths = set()
        for token, t in sorted(rows.items()):
            check_tensor(t, where, f"{family}.{token}", family)
            widths.add(int(t.shape[-1]))
        if len(widths) > 1:
            raise CdtoolError(
                f"{where}: the {family} rows are of different widths ({', '.join(map(str, sorted(widths)))}); "
                "the tokens of one delta are for one text encoder"
            )


def check_finite_output(tensors: Mapping[str, Any], path: Path) -> None:
    """Nothing non-finite is written: a result that overflowed is refused before it reaches `path`."""
    for key, t in tensors.items():
        if isinstance(t, Mapping):
            check_finite_output(t, path)
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CdtoolError(
                f"refusing to write {path}: its tensor {key} would hold non-finite values (an overflow: the "
                "inputs or their scales are too large); nothing was written"
            )


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, checked finite first, with its header written in one order
    (the library writes the metadata in an order that changes from run to run), so that equal
    contents give equal bytes."""
    from safetensors.torch import save_file

    check_finite_output(tensors, path)
    save_file(tensors, str(path), metadata=metadata)
    _canonical_header(Path(path))


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted (same length: only
    the order of the keys changes)."""
    with path.open("r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # another escaping than the library's: keep its header
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def is_cdtool_safetensors(path: Path) -> bool:
    """True when `path` is a safetensors file whose metadata says it is a cdtool delta."""
    meta = safetensors_metadata(path)
    return meta is not None and meta.get("format") == FORMAT


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file, or None when it is not one."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n <= 1 or n > 100_000_000:
                return None
            header = f.read(n)
        if len(header) < n or not header.lstrip().startswith(b"{"):
            return None
        parsed = json.loads(header)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, dict):
        return None
    return dict(parsed.get("__metadata__") or {})


def read_cdtool(path: Path) -> Delta:
    """Read a cdtool-format `.safetensors` delta."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CdtoolError(f"{path}: cannot read this safetensors file ({e}); is it truncated?") from e
    if meta.get("format") != FORMAT:
        raise CdtoolError(f"{path}: not a cdtool delta (no format={FORMAT} metadata)")
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise CdtoolError(
            f"{path}: delta format version {meta.get('format_version')} is not supported by cdtool "
            f"{__version__} (expects {FORMAT_VERSION}); upgrade cdtool"
        )
    delta = Delta(
        origin=str(path),
        base_kind=_base_kind(meta, path),
        base_model=meta.get("base_model", ""),
        base_fingerprint=meta.get("base_fingerprint", ""),
        concepts=_json(meta, "concepts", [], path),
        created_by=meta.get("created_by", ""),
        provenance=_json(meta, "provenance", {}, path),
        encoder=_json(meta, "encoder", None, path),
    )
    from cdtool.models.tokens import check_token_name  # token names are data from strangers

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(("token.", "token_2.")):
            family, _, token = key.partition(".")
            check_token_name(token, path)
            check_tensor(tensor, str(path), key, family)
            rows = delta.tokens if family == "token" else delta.tokens_2
            rows[token] = tensor if tensor.dim() == 2 else tensor.reshape(1, -1)
            continue
        if key.startswith("visual."):
            token = key.partition(".")[2]
            check_token_name(token, path)
            delta.visual[token] = tensor
            continue
        stem, _, kind = key.rpartition(".")
        if kind not in ("delta", "up", "down", "bias") or stem.split(".", 1)[0] not in COMPONENTS:
            raise CdtoolError(f"{path}: unexpected tensor {key!r} in a cdtool delta")
        parts.setdefault(stem, {})[kind] = tensor
    for stem, p in sorted(parts.items()):
        try:
            delta.layers[stem] = LayerDelta(full=p.get("delta"), up=p.get("up"), down=p.get("down"), bias=p.get("bias"))
        except ValueError as e:
            raise CdtoolError(f"{path}: layer {stem} is incomplete ({e})") from e
    check_token_pairs(delta, str(path))
    check_numbers(delta, str(path))
    check_visual(delta, str(path))
    delta.base_kind = delta.base_kind or (SDXL if delta.tokens_2 else DEFAULT_KIND)
    return delta


def check_visual(delta: Delta, where: str) -> None:
    """A personalised concept: one token with its visual tokens [M, D], its encoder named."""
    if not delta.visual:
        return
    token = sorted(delta.visual)[0]
    if len(delta.visual) > 1 or token not in delta.tokens:
        raise CdtoolError(
            f"{where}: visual tokens for {', '.join(sorted(delta.visual))}; a personalised concept holds one "
            "token's, beside that token's row (one concept per image)"
        )
    if delta.visual[token].dim() != 2 or delta.layers or delta.tokens_2 or len(delta.tokens) != 1:
        raise CdtoolError(f"{where}: not a personalised concept as cdtool personalize writes one")
    if not isinstance(delta.encoder, dict) or not delta.encoder.get("sha256"):
        raise CdtoolError(f"{where}: visual tokens without the encoder they are for (no encoder metadata)")
    if not (bool(torch.isfinite(delta.visual[token]).all()) and bool(torch.isfinite(delta.tokens[token]).all())):
        raise CdtoolError(f"{where}: the concept's numbers are not all finite; the file is damaged")


def _base_kind(meta: dict[str, str], path: Path) -> str:
    """The recorded kind of base, one cdtool knows (a file for another is refused by name)."""
    from cdtool.choices import KIND_NAMES

    kind = meta.get("base_kind", "")
    if kind and kind not in KIND_NAMES:
        raise CdtoolError(
            f"{path}: a delta for a base of kind {kind!r}; this cdtool reads {', '.join(KIND_NAMES)} "
            "(a newer cdtool may have written it)"
        )
    return kind


def check_token_pairs(delta: Delta, where: str) -> None:
    """A delta with second-encoder rows has them for every token, and only for its tokens."""
    if delta.tokens_2 and set(delta.tokens_2) != set(delta.tokens):
        odd = sorted(set(delta.tokens_2) ^ set(delta.tokens))[0]
        raise CdtoolError(
            f"{where}: token {odd} has rows for one of the two text encoders only (token.{odd} and token_2.{odd} go together)"
        )


def _json(meta: Mapping[str, str], key: str, default: Any, path: Path) -> Any:
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CdtoolError(f"{path}: metadata {key!r} is not valid JSON") from e


def delta_tensors(delta: Delta) -> dict[str, torch.Tensor]:
    """The tensors of the cdtool file layout."""
    if delta.needs_base:
        raise CdtoolError("internal: absolute weights must be made relative before writing")
    out: dict[str, torch.Tensor] = {}
    for name, layer in sorted(delta.layers.items()):
        if layer.full is not None:
            out[f"{name}.delta"] = layer.full
        else:
            out[f"{name}.up"] = layer.up  # type: ignore[assignment]
            out[f"{name}.down"] = layer.down  # type: ignore[assignment]
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias
    for family, rows in (("token", delta.tokens), ("token_2", delta.tokens_2)):
        for token, emb in sorted(rows.items()):
            out[f"{family}.{token}"] = emb if emb.dim() == 2 else emb.reshape(1, -1)
    for token, tokens in sorted(delta.visual.items()):
        out[f"visual.{token}"] = tokens
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def delta_metadata(delta: Delta) -> dict[str, str]:
    """The string-to-string `__metadata__` of the cdtool file layout (`base_kind` for the bases
    other than Stable Diffusion 1.x, whose files stay as they were)."""
    kind = {} if delta.base_kind in ("", DEFAULT_KIND) else {"base_kind": delta.base_kind}
    encoder = {} if delta.encoder is None else {"encoder": json.dumps(delta.encoder)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **kind,
        "base_model": delta.base_model,
        "base_fingerprint": delta.base_fingerprint,
        "concepts": json.dumps(delta.concepts),
        "created_by": delta.created_by or f"cdtool {__version__}",
        "provenance": json.dumps(delta.provenance, default=str),
        **encoder,
    }


def write_cdtool(delta: Delta, path: Path, *, replace: bool = True) -> None:
    """Write `delta` atomically as a cdtool `.safetensors` file."""
    tensors = delta_tensors(delta)
    with atomic_path(path, replace=replace) as tmp:
        save_safetensors(tensors, tmp, delta_metadata(delta))

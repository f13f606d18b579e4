"""The encoder folder: what `cdtool train-encoder` writes and `personalize` and `sample` read.

    ENC/encoder.json          the settings, the base it was trained for, progress (the step reached)
    ENC/encoder.safetensors   the weights: concept encoder, patch encoder, adapters (float32; float16
                              in a compact copy, `compact`)
    ENC/optimizer.pt          AdamW's state at that step (what --resume continues)
    ENC/data.json             the training images and their captions, identifier inserted, in order
    ENC/log.jsonl, loss.png   one line per step; the loss curve

Every checkpoint rewrites the weights, the optimiser state and encoder.json (each atomically,
encoder.json last), and each records the step, so a folder is always a usable encoder and a
checkpoint cut short by a kill is recognised. The encoder's fingerprint is the sha256 of its
weights file: a personalised concept names its encoder by path and by that fingerprint.

The base the encoder was trained for is fingerprinted by the scheme deltas use (cdtool/delta/base.py),
over the weights the encoder depends on most directly: the token embedding table (cut to the
base's vocabulary) and every parameter of the UNet's transformer blocks the adapters attach to.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cdtool import __version__
from cdtool.errors import CdtoolError

FORMAT = "cdtool.encoder"
FORMAT_VERSION = 1
SETTINGS = "encoder.json"
WEIGHTS = "encoder.safetensors"
OPTIMIZER = "optimizer.pt"
DATA = "data.json"
LOG = "log.jsonl"
LOSS_CURVE = "loss.png"
FILES = (SETTINGS, WEIGHTS, OPTIMIZER, DATA, LOG, LOSS_CURVE)


@dataclass
class EncoderSettings:
    """How an encoder was made, and for which base."""

    model: str
    class_noun: str
    identifier: str  # the token V-hat stands for in training captions (the default token of a concept)
    backbone: str
    data: str
    base_kind: str = ""
    base_fingerprint: str = ""  # the encoder's base (the token table and the adapted transformer blocks)
    token_fingerprint: str = ""  # the delta scheme over the token table: what a personalised file records
    vocab_size: int = 0
    init_token: str = ""
    text_dim: int = 0
    visual_dim: int = 0
    blocks: list[list[Any]] = field(default_factory=list)  # [path, width, heads] per adapter
    resolution: int = 512
    batch_size: int = 4
    lr: float = 1e-4
    backbone_lr: float | None = None  # None: lr / 10 for a pretrained open_clip tower, lr for toy-cnn
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    steps: int | None = None
    minutes: float | None = None
    checkpoint_minutes: float = 10.0
    device: str = "auto"


@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0  # training time over all sessions
    processes: int = 1
    final_loss: float | None = None


@dataclass
class EncoderFolder:
    path: Path
    settings: EncoderSettings
    progress: Progress

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def is_encoder_folder(path: Path) -> bool:
    return path.is_dir() and (path / SETTINGS).is_file() and (path / WEIGHTS).is_file()


def foreign_files(folder: Path) -> list[str] | None:
    """What an encoder folder holds that training does not write (symbolic links and empty folders
    included, as for a run folder); None when it is not one."""
    from cdtool.atomic import folder_entries

    if not (folder / SETTINGS).is_file():
        return None
    files, others = folder_entries(folder)
    return sorted([f for f in files if f not in FILES and not (f.startswith(".") and f.endswith(".tmp"))] + others)


def read_encoder(path: Path) -> EncoderFolder:
    """An encoder folder's settings and progress; refused with one line when it is not one."""
    path = Path(path)
    if not is_encoder_folder(path):
        raise CdtoolError(
            f"{path} is not an InstantBooth encoder folder (no {SETTINGS} and {WEIGHTS}); make one with "
            "`cdtool train-encoder DATA --class-noun NOUN -o DIR`, or pass --encoder with its folder"
        )
    try:
        doc = json.loads((path / SETTINGS).read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise CdtoolError(
                f"{path}: encoder format version {doc.get('format_version')} is not this cdtool's "
                f"({FORMAT_VERSION}); upgrade cdtool"
            )
        known = {f.name for f in fields(EncoderSettings)}
        settings = EncoderSettings(**{k: v for k, v in doc["settings"].items() if k in known})
        progress = Progress(**doc["progress"])
    except (ValueError, KeyError, TypeError) as e:
        raise CdtoolError(f"{path / SETTINGS} does not describe an encoder this cdtool reads ({e})") from e
    return EncoderFolder(path, settings, progress)


def write_settings(path: Path, settings: EncoderSettings, progress: Progress) -> None:
    """encoder.json, atomically."""
    from cdtool.atomic import atomic_path

    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cdtool": __version__,
        "settings": asdict(settings),
        "progress": asdict(progress),
    }
    with atomic_path(path / SETTINGS) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def write_data(path: Path, examples: list[tuple[str, str]]) -> None:
    from cdtool.atomic import atomic_path

    with atomic_path(path / DATA) as tmp:
        tmp.write_text(json.dumps(examples, indent=0) + "\n", encoding="utf-8")


def read_data(path: Path) -> list[tuple[str, str]]:
    try:
        return [(str(p), str(c)) for p, c in json.loads((path / DATA).read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError) as e:
        raise CdtoolError(f"{path / DATA}: cannot read the training images of this encoder ({e})") from e


def compact(src: Path, dest: Path) -> None:
    """A copy of encoder folder `src` in `dest` at half the size, as a repository keeps one between
    machines: the weights in float16, AdamW's moments in bfloat16 (float16 would flush its second
    moments to zero); `--resume` reads it as any (torch casts the moments back to float32 on loading),
    continuing with those values rounded once. Each file is written atomically, encoder.json last, as
    training writes a checkpoint."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cdtool.atomic import atomic_path
    from cdtool.delta.importers import load_pickle

    read_encoder(src)
    if dest.resolve() == src.resolve():
        raise CdtoolError(f"{dest} is the encoder folder itself; give the compact copy another folder")
    dest.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / WEIGHTS), framework="pt") as f, atomic_path(dest / WEIGHTS) as tmp:
        save_file({k: f.get_tensor(k).half() for k in f.keys()}, str(tmp), metadata=f.metadata())
    state = load_pickle(src / OPTIMIZER)
    for moments in state["optimizer"]["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = moments[key].to(torch.bfloat16)
    with atomic_path(dest / OPTIMIZER) as tmp:
        torch.save(state, str(tmp))
    for name in (DATA, LOG, LOSS_CURVE, SETTINGS):
        if (src / name).is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(src / name, tmp)


def encoder_sha256(path: Path) -> str:
    """The encoder's fingerprint: the sha256 of its weights file."""
    from cdtool.hashing import file_sha256

    return file_sha256(Path(path) / WEIGHTS)

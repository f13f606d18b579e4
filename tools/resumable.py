"""Pretraining that outlives a session: budgeted by wall clock, saved at least every few minutes,
resumed exactly where it stopped.

A run's folder holds `checkpoint.safetensors` (what trains and the optimiser's moments, in float32)
and `checkpoint.json` (the step, the seed, the settings). The data of step s is drawn from generators
seeded by (seed, s) alone, so a resumed run draws the batches the uninterrupted run would have drawn,
and on the CPU continues it bit for bit. Both files are replaced atomically, so a run killed at any
moment leaves the last complete checkpoint.

A checkpoint kept in the repository between machines is the compact copy `python tools/resumable.py
compact RUN DEST` writes (given an InstantBooth encoder folder, it writes that folder's compact copy:
`cdtool.instant.folder.compact`): the weights in float16 and the moments in bfloat16 (float16 would flush
Adam's second moments to zero), half the size; a run resumed from it continues with those values
rounded once.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.safetensors"
META = "checkpoint.json"


def step_rng(seed: int, step: int) -> random.Random:
    """The data generator of one step: the same for a resumed run as for an uninterrupted one."""
    return random.Random(seed * 1_000_003 + step)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A torch generator for one step's noise and draws, seeded by (seed, step) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Budget:
    """`minutes` of wall clock from now, and a save due every `save_minutes`."""

    def __init__(self, minutes: float, save_minutes: float = 10.0) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + minutes * 60
        self.every = save_minutes * 60
        self.next_save = self.start + self.every

    def left(self) -> bool:
        return time.perf_counter() < self.deadline

    def save_due(self) -> bool:
        if time.perf_counter() < self.next_save:
            return False
        self.next_save = time.perf_counter() + self.every
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's trainable parameters in float16, named `prefix.name`."""
    return {f"{prefix}.{n}": p.detach().float() for n, p in module.named_parameters() if p.requires_grad}


def optimizer_tensors(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """AdamW's moments of each named parameter."""
    out = {}
    for name, p in named.items():
        state = opt.state.get(p)
        if state:
            out[f"adam.{name}.exp_avg"] = state["exp_avg"].float()
            out[f"adam.{name}.exp_avg_sq"] = state["exp_avg_sq"].float()
    return out


def restore_optimizer(
    opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor], step: int
) -> None:
    """Puts the saved moments back for every named parameter (AdamW's own step count is `step`)."""
    for name, p in named.items():
        if f"adam.{name}.exp_avg" in tensors:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[f"adam.{name}.exp_avg"].float().clone(),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].float().clone(),
            }


def load_into(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copies the saved `prefix.` tensors into the module's parameters of the same names."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            key = f"{prefix}.{n}"
            if key in tensors:
                p.copy_(tensors[key].float())


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Writes both files through temporary names and renames, the tensors first."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / CHECKPOINT)
    tmp_meta = folder / f".{META}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_meta, folder / META)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a run folder's checkpoint."""
    from safetensors.torch import load_file

    meta = json.loads((folder / META).read_text())
    return load_file(str(folder / CHECKPOINT)), meta


def compact(src: Path, dest: Path) -> None:
    """The checkpoint of run folder `src` in float16 (weights) and bfloat16 (Adam's moments), with its
    meta, into `dest` (the copy a repository keeps)."""
    tensors, meta = load_checkpoint(src)
    small = {k: v.to(torch.bfloat16 if k.startswith("adam.") else torch.float16) for k, v in tensors.items()}
    save_checkpoint(dest, small, meta)


def relative_data(folder: Path, root: Path) -> None:
    """An encoder folder's training images (data.json, and the data folder encoder.json records) named
    relative to `root` where they lie under it, so that a copy kept in the repository resumes from the
    repository root on any machine."""

    def relative(path: str) -> str:
        p = Path(path)
        return str(p.relative_to(root)) if p.is_absolute() and p.is_relative_to(root) else path

    data = folder / "data.json"
    rows = [[relative(image), caption] for image, caption in json.loads(data.read_text())]
    data.write_text(json.dumps(rows, indent=0) + "\n")
    settings = folder / "encoder.json"
    doc = json.loads(settings.read_text())
    doc["settings"]["data"] = relative(doc["settings"]["data"])
    settings.write_text(json.dumps(doc, indent=1) + "\n")


def trainable(modules: Iterable[tuple[str, torch.nn.Module]]) -> dict[str, torch.nn.Parameter]:
    """Every trainable parameter of the named modules, as `prefix.name`."""
    return {f"{m}.{n}": p for m, mod in modules for n, p in mod.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "compact":
        sys.exit("usage: python tools/resumable.py compact RUN DEST  (a run folder, or an InstantBooth encoder folder)")
    src, dest = Path(sys.argv[2]), Path(sys.argv[3])
    if (src / META).is_file():
        compact(src, dest)
    else:  # an encoder folder: cdtool's own format knows how to halve it
        root = Path(__file__).resolve().parent.parent
        sys.path.insert(0, str(root))
        from cdtool.instant.folder import compact as compact_encoder

        compact_encoder(src, dest)
        relative_data(dest, root)

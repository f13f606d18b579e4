"""The layout of a training run folder (what `cdtool train` writes beside its delta, and what
`--resume` and `cdtool get-deltas` read):

    RUN/config.json                   the run's settings (a resumed run must match them)
    RUN/log.jsonl                     one line per step: loss, learning rate, eval loss, DVAR
    RUN/loss.png                      the loss curve
    RUN/samples.png                   the concepts' prompts sampled with the final delta (train --samples)
    RUN/delta.safetensors             the final delta
    RUN/checkpoints/step-NNNNNN/      state.pt (step, trained tensors, optimiser) and rng-<process>.pt
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.json"
LOG = "log.jsonl"
LOSS_CURVE = "loss.png"
SAMPLES = "samples.png"
DELTA = "delta.safetensors"
CHECKPOINTS = "checkpoints"
STATE = "state.pt"


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    return sorted((run_dir / CHECKPOINTS).glob("step-*"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def rng_file(checkpoint: Path, process: int) -> Path:
    return checkpoint / f"rng-{process}.pt"


def is_run_folder(path: Path) -> bool:
    """A training run folder, or one of its checkpoint folders."""
    return path.is_dir() and (((path / CONFIG).exists() and (path / LOG).exists()) or (path / STATE).exists())

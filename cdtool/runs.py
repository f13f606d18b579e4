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

import re
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


# Every file a run writes (and the temporary ones an interrupted write may leave).
_RUN_FILE = re.compile(
    r"(config\.json|log\.jsonl|loss\.png|samples\.png|delta\.safetensors|\.[^/]+\.tmp"
    r"|checkpoints/\.?step-\d{6}(\.tmp)?/(state\.pt|rng-\d+\.pt))"
)


_RUN_FOLDER = re.compile(r"checkpoints/(\.?step-\d{6}(\.tmp)?/)?")


def foreign_files(folder: Path) -> list[str] | None:
    """What a run folder holds that a run does not write (symbolic links and empty folders other
    than its checkpoints' included); None when `folder` is not a run folder."""
    from cdtool.atomic import folder_entries

    if not (folder / CONFIG).is_file():
        return None
    files, others = folder_entries(folder)
    return sorted(
        [f for f in files if not _RUN_FILE.fullmatch(f)] + [o for o in others if not _RUN_FOLDER.fullmatch(o)]
    )


def has_checkpoint(run_dir: Path) -> bool:
    return latest_checkpoint(run_dir) is not None


def is_run_delta(path: Path, run_dir: Path) -> bool:
    """True when `path` is the delta this run wrote: a cdtool file with the metadata of the run
    folder's copy (which records the run's settings, steps and final loss)."""
    from cdtool.delta import safetensors_metadata

    own = run_dir / DELTA
    if not (path.is_file() and own.is_file()):
        return False
    meta = safetensors_metadata(path)
    return meta is not None and meta.get("format") == "cdtool.delta" and meta == safetensors_metadata(own)

"""The layout of a training run folder (what `cdtool train` writes beside its delta, and what
`--resume` and `cdtool get-deltas` read):

    RUN/config.json                   the run's settings (a resumed run must match them)
    RUN/log.jsonl                     one line per step: loss, learning rate, eval loss, DVAR
    RUN/loss.png                      the loss curve
    RUN/samples.png                   the concepts' prompts sampled with the final delta (train --samples)
    RUN/delta.safetensors             the final delta (not for a whole model: that is the output folder)
    RUN/checkpoints/step-NNNNNN/      state.pt (step, trained tensors, optimiser) and rng-<process>.pt

and what reads and writes one: the settings (config.json, and what a resumed run may change), the
step log, the checkpoints, and the delta of a run or of one of its checkpoints. The trainer
(cdtool/train/trainer.py) runs the steps; the loss curve is drawn by cdtool/preview.py. Importing
this module loads no torch (`get-deltas --help` asks it what a run folder is).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdtool import __version__
from cdtool.errors import CdtoolError
from cdtool.train.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from cdtool.delta.file import Delta

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
    from cdtool.delta.file import safetensors_metadata

    own = run_dir / DELTA
    if not (path.is_file() and own.is_file()):
        return False
    meta = safetensors_metadata(path)
    return meta is not None and meta.get("format") == "cdtool.delta" and meta == safetensors_metadata(own)


def is_run_model(path: Path, run_dir: Path) -> bool:
    """True when `path` is the model folder this run wrote (a whole model, as DreamBooth's): its
    record names this run folder."""
    from cdtool.models.finetuned import read_model_record

    try:
        record = read_model_record(path)
    except CdtoolError:
        return False
    config = ((record.provenance.get("train") or {}).get("config") or {}) if record is not None else {}
    return bool(config.get("run_dir")) and Path(config["run_dir"]).resolve() == run_dir.resolve()


# Resuming: the run folder's config.json holds every setting, so a run continues from it alone.
# What may differ in a resumed run: how far it goes, how it checkpoints, where it runs and writes.
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "device", "output", "run_dir")


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """`cfg` as config.json records it (examples as [path, caption] pairs)."""
    doc = asdict(cfg)
    for c in doc["concepts"]:
        for key in ("examples", "reg_examples"):
            c[key] = [[str(e["path"]), e["caption"]] for e in c[key]]
    return json.loads(json.dumps(doc, default=str))


def load_run_config(run_dir: Path) -> TrainConfig:
    """The settings a run folder was trained with; refused when it cannot be resumed."""
    from cdtool.dataset.folders import Example
    from cdtool.train.concepts import ConceptSpec

    path = run_dir / CONFIG
    if not path.exists():
        raise CdtoolError(f"{run_dir} is not a cdtool training run (no {CONFIG})")
    try:
        doc = dict(json.loads(path.read_text(encoding="utf-8"))["config"])
        concepts = [
            ConceptSpec(
                token=c["token"],
                class_noun=c["class_noun"],
                init_token=c["init_token"],
                examples=[Example(Path(p), t) for p, t in c["examples"]],
                reg_examples=[Example(Path(p), t) for p, t in c["reg_examples"]],
                data=c.get("data", ""),
                reg=c.get("reg"),
            )
            for c in doc.pop("concepts")
        ]
        doc["lora_targets"] = tuple(doc["lora_targets"])
        cfg = TrainConfig(concepts=concepts, **doc)
    except (ValueError, KeyError, TypeError) as e:
        raise CdtoolError(f"{path} does not hold the settings of a run this cdtool can resume ({e})") from e
    if latest_checkpoint(run_dir) is None:
        raise CdtoolError(f"{run_dir} has no checkpoint to resume from; use --checkpoint-every N")
    return cfg


def resume_differences(saved: TrainConfig, asked: TrainConfig, given: set[str]) -> list[tuple[str, Any, Any]]:
    """(setting, asked, saved) for each setting in `given` (TrainConfig field names) that a resumed
    run may not change and `asked` changes."""
    a, b = _settings(asked), _settings(saved)
    return [(k, a[k], b[k]) for k in sorted(given) if k in a and k not in RESUMABLE and a[k] != b[k]]


def resumed_config(saved: TrainConfig, asked: TrainConfig, given: set[str]) -> TrainConfig:
    """The saved settings, with those a resumed run may change taken from `asked` where `given`."""
    changes = {k: getattr(asked, k) for k in RESUMABLE if k in given}
    return replace(saved, **changes, run_dir=asked.run_dir)


def start_run(run_dir: Path, cfg: TrainConfig) -> None:
    """A new run folder: an empty log and the settings (what a resumed run must match)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOG).write_text("")
    (run_dir / CONFIG).write_text(json.dumps({"config": _settings(cfg), "cdtool": __version__}, indent=1))


def log_step(run_dir: Path, entry: dict[str, Any]) -> None:
    """One line of the step log."""
    with (run_dir / LOG).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The step log's entries."""
    path = run_dir / LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(
    run_dir: Path,
    accelerator: Any,
    trainable: dict[str, Any],
    optimizer: Any,
    rng_state: dict[str, torch.Tensor],
    step: int,
    history: list[float],
    keep: int,
) -> None:
    """A checkpoint at `step` (the trained tensors, the optimiser, the DVAR history and every process's
    `rng_state`), moved into place whole; only the newest `keep` are kept."""
    import torch

    folder = checkpoint_folder(run_dir, step)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state, rng_file(tmp, accelerator.process_index))
    if accelerator.is_main_process:
        state = {
            "step": step,
            "history": history,
            "params": {n: p.detach().cpu().clone() for n, p in trainable.items()},
            "optimizer": optimizer.state_dict(),
        }
        torch.save(state, tmp / STATE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(
    run_dir: Path, accelerator: Any, trainable: dict[str, Any], optimizer: Any
) -> tuple[int, list[float], dict[str, torch.Tensor]]:
    """Continue from the run's latest checkpoint: the trained tensors and the optimiser restored in
    place, the log cut back to the checkpoint's step; returns (step, DVAR history, this process's
    random generators' state)."""
    import torch

    from cdtool.delta.importers import load_pickle

    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise CdtoolError(f"{run_dir} has no checkpoint to resume from")
    state = load_pickle(folder / STATE)
    if set(state["params"]) != set(trainable):
        raise CdtoolError(f"{folder} holds other parameters than this run trains; resume with the same options")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(state["params"][n])
    optimizer.load_state_dict(state["optimizer"])
    rng_path = rng_file(folder, accelerator.process_index)
    if not rng_path.exists():
        raise CdtoolError(f"{folder} was saved with fewer processes; resume with the same number")
    rng_state = load_pickle(rng_path)
    step = int(state["step"])
    if accelerator.is_main_process:  # the log continues from the checkpoint
        kept = [line for line in read_log(run_dir) if line["step"] <= step]
        (run_dir / LOG).write_text("".join(json.dumps(e) + "\n" for e in kept))
    return step, list(state["history"]), rng_state


def delta_from_run(path: Path) -> Delta:
    """The delta of a training run folder (its final delta, else its latest checkpoint) or of one
    checkpoint folder; checkpoint weights are absolute, so the base is subtracted by the caller."""
    from cdtool.delta.file import Delta, LayerDelta, read_cdtool
    from cdtool.delta.importers import load_pickle
    from cdtool.delta.provenance import checkpoint_entry, stamp

    run_dir = path.parent.parent if (path / STATE).exists() else path
    config = json.loads((run_dir / CONFIG).read_text())["config"]
    if config.get("method") == "dreambooth":
        raise CdtoolError(
            f"{path}: a DreamBooth run trains the whole model; extract a delta from the model it wrote "
            f"(`cdtool get-deltas {config['output']} --model {config['model']} -o OUT.safetensors`)"
        )
    if (path / STATE).exists():
        ckpt = path
    else:
        if (path / DELTA).exists():
            return read_cdtool(path / DELTA)
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CdtoolError(f"{path} holds neither a finished delta nor a checkpoint")
    state = load_pickle(ckpt / STATE)
    delta = Delta(
        base_model=config["model"],
        source_format="cdtool-checkpoint",
        origin=str(ckpt),
    )
    if config.get("method", "custom-diffusion") != "custom-diffusion":
        raise CdtoolError(
            f"{ckpt}: deltas are read from checkpoints of Custom Diffusion runs; use the run's final delta"
        )
    params = state["params"]
    for n, w in params.items():
        if n.startswith("unet.") and n.endswith(".weight"):
            stem = n[: -len(".weight")]
            delta.layers[stem] = LayerDelta(full=w.float(), bias=params.get(f"{stem}.bias"), absolute=True)
    rows = params.get("text_encoder.cdtool_token_rows.weight")
    rows_2 = params.get("text_encoder_2.cdtool_token_rows.weight")  # SDXL's second encoder
    for i, c in enumerate(config["concepts"]):
        if rows is not None:
            delta.tokens[c["token"]] = rows[i : i + 1].float()
        if rows_2 is not None:
            delta.tokens_2[c["token"]] = rows_2[i : i + 1].float()
        delta.concepts.append(
            {
                "token": c["token"],
                "class_noun": c["class_noun"],
                "init_token": c["init_token"],
                "prompts": sorted({e[1] for e in c["examples"]})[:20],
            }
        )
    step = int(state["step"])
    stamp(delta, "train", checkpoint_entry(ckpt, step), command=f"train (checkpoint step {step})", new=True)
    return delta

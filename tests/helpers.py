"""Helpers the tests share (plain functions and classes; the fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from cdtool.delta.base import fingerprint, fingerprint_names, pipeline_params
from cdtool.delta.file import Delta, LayerDelta
from cdtool.models.layers import trainable_layer_names


def random_delta(pipe, token: str = "<new1>", seed: int = 0, scale: float = 1e-2, layers: str = "kv") -> Delta:
    """A random kv delta with one token, fingerprinted against `pipe` (unmodified)."""
    g = torch.Generator().manual_seed(seed)
    delta = Delta(base_model="tiny")
    for name in trainable_layer_names(pipe.unet, layers):
        w = pipe.unet.get_submodule(name[len("unet.") :]).weight
        delta.layers[name] = LayerDelta(full=torch.randn(w.shape, generator=g) * scale)
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    delta.tokens[token] = torch.randn(1, dim, generator=g)
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: the token's row in the second encoder
        delta.tokens_2[token] = torch.randn(1, pipe.text_encoder_2.get_input_embeddings().weight.shape[1], generator=g)
        delta.base_kind, delta.base_model = "sdxl", "tiny-xl"
    delta.concepts = [
        {"token": token, "class_noun": "cat", "init_token": "ktn", "prompts": [f"photo of a {token} cat"]}
    ]
    delta.base_fingerprint = fingerprint(pipeline_params(pipe), fingerprint_names(delta), len(pipe.tokenizer))
    return delta


class Cli:
    """Runs cdtool in-process with stdout and stderr kept apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int | None = 0):
        from cdtool.cli import app

        result = self.runner.invoke(app, [str(a) for a in args], prog_name="cdtool")
        if code is not None and result.exit_code != code:
            raise AssertionError(
                f"cdtool {' '.join(map(str, args))} exited {result.exit_code}, expected {code}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
            )
        return result


def write_concept_folder(
    path: Path, n: int = 4, size: int = 80, colour=(200, 60, 40), captions: str | None = None
) -> Path:
    """A small data folder: coloured squares on grey, optionally with metadata.jsonl captions."""
    import json

    import numpy as np
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a = np.full((size, size, 3), 128, np.uint8)
        o = 8 + 4 * i
        a[o : o + size // 2, o : o + size // 2] = colour
        Image.fromarray(a).save(path / f"{i:02d}.png")
        if captions:
            rows.append({"file_name": f"{i:02d}.png", "text": captions.format(i=i)})
    if rows:
        (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_error(result) -> str:
    """The single `Error:` line of a failed run (logs may precede it; no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def train_config(tmp_path: Path, raw: list[dict], method: str = "custom-diffusion", **kw):
    """A TrainConfig on a tiny model (`model=`, default `tiny`) at 64 px for the given concept dicts
    (as --concept parses)."""
    from cdtool.train.concepts import build_concepts
    from cdtool.train.config import TrainConfig

    kw = {"resolution": 64, "batch_size": 2, "model": "tiny", **kw}
    return TrainConfig(
        concepts=build_concepts(raw, kw["resolution"], method),
        method=method,
        output=str(tmp_path / "out.safetensors"),
        run_dir=str(tmp_path / "run"),
        **kw,
    )

"""Every command on the SD 2.x and SDXL tiny models, chained through the CLI: regset, train (with
prior preservation), merge (both solvers), compress, info, get-deltas, sample, score."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_concept_folder

from cdtool.delta.file import read_cdtool

CLIP = ("--clip-model", "cdtool-tiny", "--clip-pretrained", "none")
KIND = {"tiny-sd2": "sd2", "tiny-xl": "sdxl"}


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-xl"])
def test_train_merge_compress_sample_score(cli, tmp_path, model):
    m = ("--model", model)
    reg = tmp_path / "reg"
    cli("regset", "cat", "-o", reg, "--n", "2", "--steps", "1", *m, "-q")
    cat = write_concept_folder(tmp_path / "cat")
    dog = write_concept_folder(tmp_path / "dog", colour=(20, 200, 20))
    train = ("--reg", reg, *m, "--steps", "2", "--batch-size", "1", "-q")
    cli("train", cat, "--class-noun", "cat", "-o", tmp_path / "cat.safetensors", *train)
    cli("train", dog, "--class-noun", "dog", "--token", "<new2>", "-o", tmp_path / "dog.safetensors", *train)
    for f in ("cat", "dog"):
        d = read_cdtool(tmp_path / f"{f}.safetensors")
        assert d.base_kind == KIND[model] and d.base_model == model
        assert bool(d.tokens_2) == (model == "tiny-xl")
    pets = tmp_path / "pets.safetensors"
    doc = json.loads(
        cli("merge", tmp_path / "cat.safetensors", tmp_path / "dog.safetensors", "-o", pets, "--json").stdout
    )
    assert doc["total"]["max_constraint_residual"] < 1e-4
    ls = tmp_path / "pets-ls.safetensors"
    cli("merge", tmp_path / "cat.safetensors", tmp_path / "dog.safetensors", "--method", "least-squares", "-o", ls)
    small = tmp_path / "pets.r2.safetensors"
    cli("compress", pets, "--rank", "2", "-o", small)
    info = json.loads(cli("info", small, "--json").stdout)
    assert info["base_kind"] == KIND[model] and info["low_rank_layers"] == info["layer_count"] > 0
    assert sorted(info["tokens"]) == ["<new1>", "<new2>"]
    cli("get-deltas", small, "-o", tmp_path / "pets.bin")  # the official layout, and back
    back = read_cdtool(cli("get-deltas", tmp_path / "pets.bin", *m, "-o", tmp_path / "back.safetensors").stdout.strip())
    compressed = read_cdtool(small)
    assert back.base_kind == KIND[model]
    for t in compressed.tokens_2:
        assert torch.equal(back.tokens_2[t], compressed.tokens_2[t])
    out = tmp_path / "samples"
    cli("sample", "a <new1> cat and a <new2> dog", "-d", small, "-o", out, "--n", "1", "--steps", "2", "-q")
    (png,) = sorted(out.glob("*.png"))
    score = json.loads(cli("score", out, "--ref", cat, *CLIP, "--metrics", "clip-t,clip-i", "--json").stdout)
    overall = score["runs"][0]["overall"]
    assert overall["clip_i"]["n"] == 1 and overall["clip_t"]["n"] == 1
    assert png.name.startswith("000-a-new1-cat-and-a-new2-dog")
    r = cli("export", small, "--to", "checkpoint", *m, "-o", tmp_path / "ckpt", code=1)  # SD 1.x's layout only
    name = {"tiny-sd2": "Stable Diffusion 2.x", "tiny-xl": "Stable Diffusion XL"}[model]
    assert r.stderr.strip().splitlines() == [
        f"Error: export --to checkpoint writes the Stable Diffusion 1.x single-file layout; the base is {name}: "
        "export its delta --to diffusers-lora or kohya instead"
    ]
    assert not (tmp_path / "ckpt").exists()


def test_sd2_trains_on_the_velocity(tiny_sd2_pipe, tiny_pipe):
    """v-prediction (SD 2.x at 768 px): the UNet learns v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0."""
    from cdtool.train.config import TrainConfig
    from cdtool.train.trainer import prediction_target, training_parts

    g = torch.Generator().manual_seed(0)
    x0, noise, t = (
        torch.randn(3, 4, 8, 8, generator=g),
        torch.randn(3, 4, 8, 8, generator=g),
        torch.tensor([10, 500, 990]),
    )
    cfg = TrainConfig(concepts=[], model="tiny-sd2", output="x", run_dir="x", resolution=64)
    scheduler = training_parts(cfg, tiny_sd2_pipe, torch.device("cpu")).scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(
        prediction_target(scheduler, x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6
    )
    sd1 = training_parts(cfg, tiny_pipe, torch.device("cpu")).scheduler
    assert torch.equal(prediction_target(sd1, x0, noise, t), noise)  # SD 1.x: the noise

"""`train --method dreambooth`: every UNet weight trained on the rare identifier with the class prior,
written as a whole model that diffusers, `sample`, `info`, `get-deltas`, `merge` and `export` take."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Cli, one_error, train_config, write_concept_folder
from safetensors.torch import load_file

from cdtool.delta.base import pipeline_params
from cdtool.delta.file import read_cdtool, write_cdtool
from cdtool.models.finetuned import RECORD, read_model_record, unet_fingerprint
from cdtool.models.tiny import build_tiny_pipeline
from cdtool.train.methods import method_for

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"


def _state(folder, component_file):
    return load_file(str(folder / component_file))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("db-data")
    cat = write_concept_folder(root / "cat")
    reg = write_concept_folder(root / "reg", n=5, size=64, colour=(40, 90, 200), captions="photo of a cat, view {i}")
    return cat, reg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One DreamBooth run on the tiny model through the CLI: (model folder, stdout, stderr)."""
    cat, reg = data
    out = tmp_path_factory.mktemp("db") / "cat-model"
    r = Cli()("train", cat, "--class-noun", "cat", "--reg", reg, "--method", "dreambooth", "--model", "tiny",
              "--steps", "2", "--lr", "1e-3", "-o", out, "--no-samples")  # fmt: skip
    return out, r.stdout, r.stderr


def test_every_unet_weight_moves_and_the_text_encoder_stays(trained):
    out, stdout, _ = trained
    assert stdout.split() == [str(out)]
    base = build_tiny_pipeline()
    unet = _state(out, UNET_FILE)
    base_unet = base.unet.state_dict()
    assert set(unet) == set(base_unet)
    unchanged = [n for n, w in unet.items() if torch.equal(w, base_unet[n])]
    assert not unchanged, unchanged[:5]
    text = _state(out, TEXT_FILE)
    base_text = base.text_encoder.state_dict()
    assert set(text) == set(base_text) and all(torch.equal(text[n], base_text[n]) for n in text)  # bit-identical
    # the identifier is an existing word: no row is added to the vocabulary or the table
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None)
    assert len(pipe.tokenizer) == len(base.tokenizer) == 49408
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    assert pipe.tokenizer("sks", add_special_tokens=False).input_ids == [pipe.tokenizer.get_vocab()["sks</w>"]]
    for n, w in pipe.unet.state_dict().items():
        assert torch.equal(w, unet[n]), n


def test_the_record_says_how_it_was_made(trained, cli):
    out, _, _ = trained
    doc = json.loads((out / RECORD).read_text())
    assert doc["format"] == "cdtool.model" and doc["method"] == "dreambooth" and doc["trained"] == ["unet"]
    assert doc["base_model"] == "tiny" and doc["base_kind"] == "sd1"
    assert doc["base_fingerprint"] == unet_fingerprint(pipeline_params(build_tiny_pipeline()))
    [concept] = doc["concepts"]
    assert concept["token"] == "sks" and concept["class_noun"] == "cat" and concept["init_token"] is None
    assert concept["prompts"] == ["photo of a sks cat"]
    train = doc["provenance"]["train"]
    assert train["config"]["method"] == "dreambooth" and train["steps_run"] == 2 and train["learning_rate"] == 1e-3
    assert train["config"]["batch_size"] == 1 and train["config"]["prior_weight"] == 1.0  # the paper's defaults
    assert "dreambooth" in (out / "README.md").read_text()
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["format"] == "cdtool.model" and info["trained"] == ["unet"] and info["concepts"][0]["token"] == "sks"
    assert "every weight of unet" in cli("info", out).stdout


def test_sample_from_the_model_folder(trained, cli, tmp_path):
    out, _, _ = trained
    cli("sample", "photo of a sks cat", "--model", out, "--n", "1", "--steps", "2", "-o", tmp_path / "s")
    assert len(list((tmp_path / "s").glob("*.png"))) == 1
    r = cli("sample", "photo of a sks cat", "--delta", out, "--model", "tiny", "-o", tmp_path / "t", code=1)
    assert f"is a whole model (a diffusers folder), not a delta: pass it as --model {out}" in one_error(r)


def test_get_deltas_gives_every_key_value_change_and_merges(trained, cli, tmp_path, make_delta):
    out, _, _ = trained
    kv = tmp_path / "kv.safetensors"
    cli("get-deltas", out, "-o", kv)  # the base is the one the model records
    d = read_cdtool(kv)
    base = build_tiny_pipeline()
    tuned = _state(out, UNET_FILE)
    names = [n for n, m in base.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert sorted(d.layers) == sorted(f"unet.{n}" for n in names) and len(names) == 14
    for n in names:
        expect = tuned[f"{n}.weight"] - base.unet.get_submodule(n).weight.detach()
        assert torch.allclose(d.layers[f"unet.{n}"].full, expect, atol=1e-7), n
    assert not d.tokens and d.concepts[0]["token"] == "sks" and d.concepts[0]["class_noun"] == "cat"
    assert d.provenance["train"]["config"]["method"] == "dreambooth"
    # merged in closed form with a Custom Diffusion concept: the model's keys and values on its own
    # target rows ("sks cat") are kept
    cd = make_delta(seed=3, scale=0.05)
    cd.concepts[0]["class_noun"] = "dog"
    write_cdtool(cd, tmp_path / "cd.safetensors")
    merged = tmp_path / "m.safetensors"
    doc = json.loads(cli("merge", kv, tmp_path / "cd.safetensors", "-o", merged, "--json").stdout)
    assert doc["total"]["max_constraint_residual"] < 1e-4
    m = read_cdtool(merged)
    assert [c["token"] for c in m.concepts] == ["sks", "<new1>"] and sorted(m.tokens) == ["<new1>"]
    cli("sample", "photo of a sks cat and a <new1> dog", "-d", merged, "--n", "1", "--steps", "1", "-o", tmp_path / "s")
    # a base other than the recorded one is refused by its fingerprint
    r = cli("get-deltas", out, "--model", "toy", "-o", tmp_path / "x.safetensors", code=1)
    assert "whose UNet is not that of toy" in one_error(r) and not (tmp_path / "x.safetensors").exists()


def test_export_checkpoint_loads_with_from_single_file(trained, cli, tmp_path, tiny_folder):
    from diffusers import StableDiffusionPipeline

    out, _, _ = trained
    files = cli("export", out, "--to", "checkpoint", "--dtype", "fp32", "-o", tmp_path / "ck").stdout.split()
    ckpt = tmp_path / "ck" / "ck.safetensors"
    assert str(ckpt) in files and str(tmp_path / "ck" / "README.md") in files
    back = StableDiffusionPipeline.from_single_file(
        str(ckpt), config=str(tiny_folder), local_files_only=True, safety_checker=None
    )
    ours = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None)
    for component in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, component).state_dict(), getattr(back, component).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), component
    r = cli("export", out, "--to", "kohya", "-o", tmp_path / "k", code=1)
    assert "cdtool get-deltas" in one_error(r) and not (tmp_path / "k").exists()


def test_loss_is_instance_plus_weighted_prior():
    """The paper's objective on a batch of instance rows then class rows: the mean squared error of
    each part, the class part times the prior weight."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    mask = torch.ones(3, 8, 8)
    loss = method_for("dreambooth").loss(pred, target, mask, 0.3)
    by_hand = ((pred[:3] - target[:3]) ** 2).mean() + 0.3 * ((pred[3:] - target[3:]) ** 2).mean()
    assert torch.allclose(loss, by_hand, rtol=1e-6)
    alone = method_for("dreambooth").loss(pred[:3], target[:3], mask, 0.3)  # no class images: no prior term
    assert torch.allclose(alone, ((pred[:3] - target[:3]) ** 2).mean(), rtol=1e-6)


def test_one_steps_loss_has_the_prior_term(tmp_path, data, monkeypatch):
    """A real step with a regularisation batch: the logged loss is the instance rows' error plus the
    prior weight times the class rows' error, on the predictions the UNet made."""
    import cdtool.train.trainer as trainer

    cat, reg = data
    seen = []
    real = trainer._predict

    def spy(*args, **kwargs):
        pred, target = real(*args, **kwargs)
        seen.append((pred.detach().clone(), target.detach().clone()))
        return pred, target

    monkeypatch.setattr(trainer, "_predict", spy)
    raw = [{"data": str(cat), "class": "cat", "reg": str(reg)}]
    cfg = train_config(tmp_path, raw, "dreambooth", steps=1, batch_size=2, prior_weight=0.25, device="cpu")
    cfg.output = str(tmp_path / "model")
    trainer.train(cfg, log=lambda m: None)
    [(pred, target)] = seen
    assert pred.shape[0] == 4  # two instance images, then two class images
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["loss"]
    by_hand = F.mse_loss(pred[:2], target[:2]) + 0.25 * F.mse_loss(pred[2:], target[2:])
    assert logged == pytest.approx(float(by_hand), rel=1e-6)
    assert logged != pytest.approx(float(F.mse_loss(pred[:2], target[:2])), rel=1e-3)


def test_seeded_cpu_run_is_reproducible(tmp_path, data):
    from cdtool.train.trainer import train

    cat, reg = data
    raw = [{"data": str(cat), "class": "cat", "reg": str(reg)}]
    states = []
    for name in ("a", "b"):
        cfg = train_config(tmp_path / name, raw, "dreambooth", steps=2, lr=1e-3, seed=7, device="cpu")
        cfg.output = str(tmp_path / name / "model")
        train(cfg, log=lambda m: None)
        states.append(_state(tmp_path / name / "model", UNET_FILE))
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
    assert not torch.equal(states[0]["conv_in.weight"], build_tiny_pipeline().unet.conv_in.weight.detach())


def test_resume_gives_the_same_model(cli, tmp_path, data):
    cat, reg = data
    common = (cat, "--class-noun", "cat", "--reg", reg, "--method", "dreambooth", "--model", "tiny", "--lr", "1e-3",
              "--device", "cpu", "--no-samples")  # fmt: skip
    cli("train", *common, "-o", tmp_path / "straight", "--steps", "4")
    cli("train", *common, "-o", tmp_path / "half", "--steps", "2", "--checkpoint-every", "2")
    r = cli("train", *common, "-o", tmp_path / "half", "--steps", "4", "--resume", tmp_path / "half.run")
    assert "resumed" in r.stderr
    a, b = _state(tmp_path / "straight", UNET_FILE), _state(tmp_path / "half", UNET_FILE)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert read_model_record(tmp_path / "half").provenance["train"]["steps_run"] == 4
    r = cli("get-deltas", tmp_path / "half.run", "-o", tmp_path / "x.safetensors", code=1)
    assert f"cdtool get-deltas {tmp_path / 'half'} --model tiny" in one_error(r)


def test_text_encoder_trains_with_the_option(cli, tmp_path, data):
    cat, reg = data
    out = tmp_path / "m"
    cli("train", cat, "--class-noun", "cat", "--reg", reg, "--method", "dreambooth", "--model", "tiny",
        "--steps", "2", "--lr", "1e-3", "--train-text-encoder", "--gradient-checkpointing", "-o", out,
        "--no-samples")  # fmt: skip
    text, base = _state(out, TEXT_FILE), build_tiny_pipeline().text_encoder.state_dict()
    moved = [n for n in text if not torch.equal(text[n], base[n])]
    assert "embeddings.token_embedding.weight" in " ".join(moved) and len(moved) > len(text) // 2
    assert read_model_record(out).provenance["train"]["config"]["train_text_encoder"]
    assert json.loads((out / RECORD).read_text())["trained"] == ["unet", "text_encoder"]
    r = cli("get-deltas", out, "-o", tmp_path / "kv.safetensors")
    assert "also trained text_encoder" in r.stderr


def test_mixed_precision_writes_the_frozen_parts_as_loaded(cli, tmp_path, data):
    """Under --mixed-precision the frozen VAE (and text encoder) are held in the half type while
    training; the model folder holds them as the base has them."""
    cat, reg = data
    out = tmp_path / "m"
    cli("train", cat, "--class-noun", "cat", "--reg", reg, "--method", "dreambooth", "--model", "tiny",
        "--steps", "1", "--mixed-precision", "bf16", "--device", "cpu", "-o", out, "--no-samples")  # fmt: skip
    base = build_tiny_pipeline()
    for file, module in ((TEXT_FILE, base.text_encoder), ("vae/diffusion_pytorch_model.safetensors", base.vae)):
        state, ref = _state(out, file), module.state_dict()
        assert all(state[n].dtype == torch.float32 and torch.equal(state[n], ref[n]) for n in ref), file
    assert all(w.dtype == torch.float32 for w in _state(out, UNET_FILE).values())


def test_prep_folder_captions_take_the_identifier(cli, tmp_path):
    """prep writes its modifier token into the captions; DreamBooth puts its identifier in its place."""
    photos = write_concept_folder(tmp_path / "photos")
    cli("prep", photos, "--class-noun", "cat", "--size", "64", "-o", tmp_path / "data")
    assert "<new1>" in (tmp_path / "data" / "metadata.jsonl").read_text()
    out = tmp_path / "m"
    cli("train", tmp_path / "data", "--method", "dreambooth", "--model", "tiny", "--steps", "1", "-o", out,
        "--no-samples", "--token", "ohwx")  # fmt: skip
    assert read_model_record(out).concepts[0]["prompts"] == ["photo of a ohwx cat"]
    out2 = tmp_path / "m2"
    cli(
        "train",
        tmp_path / "data",
        "--method",
        "dreambooth",
        "--model",
        "tiny",
        "--steps",
        "1",
        "-o",
        out2,
        "--no-samples",
    )
    assert read_model_record(out2).concepts[0]["token"] == "sks"
    # any method: the run's token takes the place of the one prep wrote
    from cdtool.train.concepts import build_concepts

    [spec] = build_concepts([{"data": str(tmp_path / "data"), "token": "<new2>"}], 64)
    assert {e.caption for e in spec.examples} == {"photo of a <new2> cat"}


@pytest.mark.parametrize(
    ("extra", "out", "code", "text"),
    [
        (
            ["--token", "<new1>"],
            "m",
            1,
            "Error: --token <new1> is 4 vocabulary tokens (<, new, 1, >), not one existing",
        ),
        (["--token", "sks dog"], "m", 1, "Error: --token sks dog holds white space; DreamBooth binds the subject"),
        ([], "m.safetensors", 2, "writes a whole model as a diffusers folder; give a folder name"),
    ],
)
def test_bad_input(cli, tmp_path, data, extra, out, code, text):
    cat, _ = data
    r = cli("train", cat, "--class-noun", "cat", "--method", "dreambooth", "--model", "tiny", *extra,
            "-o", tmp_path / out, code=code)  # fmt: skip
    assert text in (one_error(r) if code == 1 else r.stderr)
    assert not list(tmp_path.iterdir())


def test_the_8bit_optimiser_is_asked_for_by_name(cli, tmp_path, data):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed: the CUDA tests train with it")
    cat, _ = data
    r = cli("train", cat, "--class-noun", "cat", "--method", "dreambooth", "--model", "tiny", "--use-8bit-adam",
            "-o", tmp_path / "m", code=1)  # fmt: skip
    assert one_error(r) == "Error: --use-8bit-adam needs bitsandbytes: pip install bitsandbytes"
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-xl"])
def test_sd2_and_sdxl(cli, tmp_path, data, model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cat, reg = data
    out = tmp_path / "m"
    cli("train", cat, "--class-noun", "cat", "--reg", reg, "--method", "dreambooth", "--model", model,
        "--steps", "1", "--lr", "1e-3", "-o", out, "--no-samples")  # fmt: skip
    cls = StableDiffusionXLPipeline if model == "tiny-xl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(out), local_files_only=True)
    assert read_model_record(out).base_kind == ("sdxl" if model == "tiny-xl" else "sd2")
    assert len(pipe.tokenizer) == 49408
    d = read_cdtool(Path(cli("get-deltas", out, "-o", tmp_path / "kv.safetensors").stdout.strip()))
    assert d.layers and not d.tokens and not d.tokens_2
    r = cli("export", out, "--to", "checkpoint", "-o", tmp_path / "ck", code=1)
    name = "Stable Diffusion XL" if model == "tiny-xl" else "Stable Diffusion 2.x"
    assert one_error(r) == (
        f"Error: export --to checkpoint writes the Stable Diffusion 1.x single-file layout; the model is {name}: "
        "use its diffusers folder as it is, or extract its key/value delta with `cdtool get-deltas`"
    )
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(("model", "extra"), [("tiny", []), ("tiny-xl", ["--train-text-encoder"])])
def test_accelerate_two_processes(tmp_path, data, model, extra):
    cat, reg = data
    out = tmp_path / "mp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cdtool", "train",
           str(cat), "--class-noun", "cat", "--reg", str(reg), "-o", str(out), "--method", "dreambooth",
           "--model", model, "--steps", "2", "--batch-size", "1", *extra]  # fmt: skip
    # two CPU processes, also where a GPU is present (two ranks on one GPU is not a NCCL setup)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(out)]  # only the main process prints its result
    record = read_model_record(out)
    assert record.provenance["train"]["processes"] == 2 and record.provenance["train"]["learning_rate"] == 5e-6
    assert (tmp_path / "mp.run" / "samples.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp", "mp.run"]

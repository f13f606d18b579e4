"""The CUDA paths: half-precision SDPA cross-attention, fp16/bf16 mixed-precision training, and
half-precision sampling judged by the oracle. Skipped where no GPU is present (CI has none; they
pass on an H100, see benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import pytest
import torch

from cdtool.train.attention import use_detaching_cross_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_detaching_attention_in_half_precision(fresh_tiny, dtype):
    unet = fresh_tiny.unet.to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).to("cuda", dtype)
    ehs = torch.randn(2, 77, 32, generator=g).to("cuda", dtype)
    t = torch.tensor([10, 500], device="cuda")
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ehs).sample.float()
    use_detaching_cross_attention(unet)
    ehs.requires_grad_(True)
    out = unet(x, t, encoder_hidden_states=ehs).sample
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    out.float().square().sum().backward()
    assert float(ehs.grad[:, 0].abs().sum()) == 0.0
    assert float(ehs.grad[:, 1].abs().sum()) > 0.0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(cli, tmp_path, concept_dirs, precision):
    from cdtool.delta.file import read_cdtool

    cat, reg = concept_dirs
    out = tmp_path / "cat.safetensors"
    r = cli(
        "train", cat, "--class-noun", "cat", "--reg", reg, "-o", out, "--model", "tiny", "--batch-size", "2",
        "--steps", "30", "--lr", "2e-3", "--no-scale-lr", "--no-aug", "--mixed-precision", precision,
        "--early-stop", "dvar", "--dvar-window", "1000", "--json", "-q",
    )  # fmt: skip
    assert json.loads(r.stdout)["steps"] == 30
    log = [json.loads(x) for x in (tmp_path / "cat.run" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(row["eval_loss"])) for row in log)
    assert log[-1]["eval_loss"] < 0.97 * log[0]["eval_loss"]
    delta = read_cdtool(out)
    # trainable weights stay fp32 under mixed precision; the file holds fp32 deltas
    for layer in delta.layers.values():
        full = layer.dense()
        assert full.dtype == torch.float32 and torch.isfinite(full).all()
    assert any(float(layer.dense().abs().max()) > 0 for layer in delta.layers.values())


@pytest.mark.parametrize("method", ["textual-inversion", "dreambooth-lora"])
def test_mixed_precision_baselines_on_cuda(cli, tmp_path, concept_dirs, method):
    """The UNet runs in the half type without autocast: peft's LoRA layers (UNet and text encoder)
    and the new token rows must still train in fp32 and give finite deltas."""
    from cdtool.delta.file import read_cdtool

    cat, _ = concept_dirs
    out = tmp_path / "cat.safetensors"
    extra = ["--train-text-encoder"] if method == "dreambooth-lora" else []
    r = cli(
        "train", cat, "--class-noun", "cat", "-o", out, "--model", "tiny", "--batch-size", "2", "--steps", "10",
        "--method", method, "--no-aug", "--mixed-precision", "bf16", *extra, "--json", "-q",
    )  # fmt: skip
    assert json.loads(r.stdout)["steps"] == 10
    delta = read_cdtool(out)
    tensors = [t for layer in delta.layers.values() for t in (layer.dense(),)] + list(delta.tokens.values())
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors)
    assert any(float(t.abs().max()) > 0 for t in tensors)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("adam", ["adamw", "8bit"])
def test_dreambooth_mixed_precision_on_cuda(cli, tmp_path, concept_dirs, precision, adam):
    """Every UNet weight trains in fp32 under autocast (with checkpointing, and bitsandbytes' 8-bit
    AdamW where installed); the frozen text encoder and VAE, held in the half type while training,
    are written as the base has them."""
    from safetensors.torch import load_file

    from cdtool.models.tiny import build_tiny_pipeline

    if adam == "8bit":
        pytest.importorskip("bitsandbytes")
    cat, reg = concept_dirs
    out = tmp_path / "m"
    extra = ["--use-8bit-adam"] if adam == "8bit" else []
    r = cli(
        "train", cat, "--class-noun", "cat", "--reg", reg, "-o", out, "--model", "tiny", "--method", "dreambooth",
        "--steps", "10", "--lr", "1e-4", "--mixed-precision", precision, "--gradient-checkpointing", *extra,
        "--json", "-q",
    )  # fmt: skip
    assert json.loads(r.stdout)["steps"] == 10
    base = build_tiny_pipeline()
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in unet.values())
    ref = base.unet.state_dict()
    assert sum(not torch.equal(unet[n], ref[n]) for n in ref) > 0.9 * len(ref)
    for file, module in (("text_encoder/model.safetensors", base.text_encoder),
                         ("vae/diffusion_pytorch_model.safetensors", base.vae)):  # fmt: skip
        state, ref = load_file(str(out / file)), module.state_dict()
        assert all(torch.equal(state[n], ref[n]) for n in ref), file


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_sampling_follows_prompts(cli, tmp_path, dtype):
    """The toy model sampled in half precision on the GPU still draws what the prompt asks for."""
    from PIL import Image

    from cdtool.toy.judge import judge, parse_prompt
    from cdtool.toy.oracle import load_oracle, read

    prompts = ["a large red circle on a blue background", "a large yellow square on a green background"]
    out = tmp_path / dtype
    cli("sample", *prompts, "--model", "toy", "-o", out, "--n", "8", "--steps", "20", "--guidance", "4",
        "--device", "cuda", "--dtype", dtype, "--batch-size", "8", "-q")  # fmt: skip
    names = json.loads((out / "prompts.json").read_text())
    images = [Image.open(out / name).convert("RGB") for name in names]
    seen = read(load_oracle(), images)
    verdicts = [judge(parse_prompt(names[name]), s) for name, s in zip(names, seen, strict=True)]
    assert sum(v["prompt"] for v in verdicts) >= 0.75 * len(verdicts)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_instantbooth_encoder_on_cuda(cli, tmp_path, precision):
    """train-encoder under mixed precision (the base held in the half type, the encoders and adapters
    in fp32), then personalise and sample in half precision: finite weights, the gates opened."""
    from helpers import write_concept_folder
    from safetensors.torch import load_file

    cats = write_concept_folder(tmp_path / "cats", n=4, size=64, captions="photo of a cat, view {i}")
    enc = tmp_path / "enc"
    cli("train-encoder", cats, "--class-noun", "cat", "--model", "tiny", "--backbone", "cdtool-tiny", "--batch-size",
        "2", "--steps", "3", "--lr", "1e-3", "--device", "cuda", "--mixed-precision", precision, "-o", enc, "-q")  # fmt: skip
    weights = load_file(str(enc / "encoder.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert all(float(t) != 0 for k, t in weights.items() if k.endswith(".gate"))
    concept = tmp_path / "c.safetensors"
    cli("personalize", cats, "--encoder", enc, "--device", "cuda", "-o", concept, "-q")
    cli("sample", "photo of a <new1> cat", "--delta", concept, "--n", "2", "--steps", "3", "--device", "cuda",
        "--dtype", precision, "-o", tmp_path / "out", "-q")  # fmt: skip
    assert len(list((tmp_path / "out").glob("*.png"))) == 2

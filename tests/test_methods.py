"""`train --method textual-inversion|dreambooth-lora`: what trains, and diffusers' loaders agree."""

from __future__ import annotations

import json

import torch
from helpers import train_config

from cdtool.delta.file import read_cdtool
from cdtool.delta.importers import read_delta
from cdtool.models.apply import apply_deltas
from cdtool.models.tiny import build_tiny_pipeline
from cdtool.train.trainer import train


def _unet_out(pipe, prompt: str) -> torch.Tensor:
    text = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([300]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


def _ours(delta_path, prompt):
    pipe = build_tiny_pipeline()
    apply_deltas(pipe, [(read_delta(delta_path), 1.0)])
    return _unet_out(pipe, prompt)


def test_textual_inversion_trains_only_its_rows(tmp_path, concept_dirs):
    cat, _ = concept_dirs
    cfg = train_config(
        tmp_path, [{"data": str(cat)}], "textual-inversion", steps=3, lr=5e-2, scale_lr=False, aug=False, num_vectors=3
    )
    result = train(cfg, log=lambda m: None, keep_pipeline=True)
    base = build_tiny_pipeline()
    for (n, a), (_, b) in zip(result.pipeline.unet.named_parameters(), base.unet.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    te_base = dict(base.text_encoder.named_parameters())
    for n, p in result.pipeline.text_encoder.named_parameters():
        if n.endswith("token_embedding.weight"):
            assert torch.equal(p[:49408], te_base[n])  # every other row bit-identical
        elif n != "cdtool_token_rows.weight":
            assert torch.equal(p, te_base[n]), n
    d = read_cdtool(tmp_path / "out.safetensors")
    assert not d.layers and d.tokens["<new1>"].shape == (3, 32)
    init = base.text_encoder.get_input_embeddings().weight[42170]
    assert all(not torch.allclose(row, init) for row in d.tokens["<new1>"])
    assert d.concepts[0]["method"] == "textual-inversion"


def test_textual_inversion_export_loads_in_diffusers(cli, tmp_path, concept_dirs):
    cat, _ = concept_dirs
    out = tmp_path / "ti.safetensors"
    cli(
        "train",
        cat,
        "--method",
        "textual-inversion",
        "--num-vectors",
        "2",
        "-o",
        out,
        "--model",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--lr",
        "1e-2",
        "-q",
    )
    files = cli("export", out, "--to", "textual-inversion", "-o", tmp_path / "ti").stdout.split()
    assert str(tmp_path / "ti" / "learned_embeds.safetensors") in files
    assert str(tmp_path / "ti" / "embeddings" / "new1.safetensors") in files
    pipe = build_tiny_pipeline()
    pipe.load_textual_inversion(str(tmp_path / "ti" / "learned_embeds.safetensors"))
    a1111 = build_tiny_pipeline()
    a1111.load_textual_inversion(str(tmp_path / "ti" / "embeddings" / "new1.safetensors"), token="<new1>")
    ours = _ours(out, "a photo of a <new1>")
    assert torch.allclose(_unet_out(pipe, "a photo of a <new1>"), ours, atol=1e-5)
    assert torch.allclose(_unet_out(a1111, "a photo of a <new1>"), ours, atol=1e-5)


def test_dreambooth_lora(cli, tmp_path, concept_dirs):
    cat, reg = concept_dirs
    out = tmp_path / "db.safetensors"
    r = cli(
        "train",
        cat,
        "--method",
        "dreambooth-lora",
        "--class-noun",
        "cat",
        "--reg",
        reg,
        "-o",
        out,
        "--model",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "1",
        "--lr",
        "1e-2",
        "--rank",
        "2",
        "--train-text-encoder",
        "--json",
    )
    assert json.loads(r.stdout)["learning_rate"] == 1e-2  # dreambooth-lora does not scale the rate
    d = read_cdtool(out)
    assert not d.tokens and d.concepts[0]["token"] == "sks"  # the rare identifier, used as it is
    unet_layers = [n for n in d.layers if n.startswith("unet.")]
    te_layers = [n for n in d.layers if n.startswith("text_encoder.")]
    assert len(unet_layers) == 4 * 14 and len(te_layers) == 4 * 2  # q,k,v,out of every attention; 2 text layers
    assert all(layer.rank == 2 for layer in d.layers.values())
    assert any(float(layer.dense().abs().max()) > 0 for layer in d.layers.values())
    # exported as a diffusers LoRA, diffusers' own loader gives cdtool's outputs
    cli("export", out, "--to", "diffusers-lora", "-o", tmp_path / "lora")
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    assert torch.allclose(_unet_out(pipe, "a photo of sks cat"), _ours(out, "a photo of sks cat"), atol=1e-5)
    # the closed-form merge refuses it, naming a layer; the sum accepts it
    ti = tmp_path / "ti.safetensors"
    cli(
        "train",
        cat,
        "--method",
        "textual-inversion",
        "-o",
        ti,
        "--model",
        "tiny",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "-q",
    )
    r = cli("merge", out, ti, "-o", tmp_path / "m.safetensors", "--classes", "cat+cat", code=1)
    assert "use --method sum" in r.stderr and "text_encoder.encoder.layers.0.self_attn.k_proj" in r.stderr
    assert "regularisation features" not in r.stderr  # refused before any work
    cli("merge", out, ti, "-o", tmp_path / "m.safetensors", "--method", "sum")
    cli(
        "sample",
        "a photo of sks cat with a <new1>",
        "-d",
        tmp_path / "m.safetensors",
        "-o",
        tmp_path / "s",
        "--n",
        "1",
        "--steps",
        "1",
    )


def test_dreambooth_lora_changes_only_lora_parameters(tmp_path, concept_dirs):
    cat, reg = concept_dirs
    cfg = train_config(
        tmp_path,
        [{"data": str(cat), "class": "cat", "reg": str(reg)}],
        "dreambooth-lora",
        steps=2,
        batch_size=1,
        lr=1e-2,
        scale_lr=False,
        aug=False,
    )
    pipe = train(cfg, log=lambda m: None, keep_pipeline=True).pipeline
    base = dict(build_tiny_pipeline().unet.named_parameters())
    lora = {n for n in dict(pipe.unet.named_parameters()) if "lora_" in n}
    assert lora
    for n, p in pipe.unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    assert len(tokenizer_vocab := pipe.tokenizer.get_vocab()) == 49408 and "sks</w>" in tokenizer_vocab

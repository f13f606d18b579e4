"""`cdtool train` on SDXL (tiny-xl): the conditioning the UNet trains on is the pipeline's, the token
trains in both text encoders, all three methods, prior preservation, augmentation, DVAR, resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import train_config

from cdtool.delta.file import read_cdtool
from cdtool.models.apply import apply_deltas
from cdtool.models.tiny import build_tiny_xl_pipeline
from cdtool.train import trainer
from cdtool.train.augment import Augmented
from cdtool.train.trainer import train

XL = ("--model", "tiny-xl", "--batch-size", "1", "-q")


def _concept(concept_dirs, **kw):
    cat, reg = concept_dirs
    return [{"data": str(cat), "reg": str(reg), "class": "cat", **kw}]


def test_the_unet_trains_on_the_pipelines_own_conditioning(tmp_path, concept_dirs, monkeypatch):
    """Every prompt the trainer encodes (class captions, instance views) gives the UNet what
    StableDiffusionXLPipeline.encode_prompt gives it, with the token's rows as they then are; the
    time ids come with every step's views (class images: whole at 64 px)."""
    calls, ids_seen = [], []
    real_encode, real_inputs = trainer.encode, trainer.unet_inputs

    def spy(text, prompts, device=None):
        out = real_encode(text, prompts, device)
        # the token's rows as they are at this call: the trained rows (cdtool.models.tokens.TokenRows)
        rows = [getattr(e, "module", e).cdtool_token_rows.weight.detach()[0].clone() for e in text.encoders]
        calls.append((list(prompts), out.hidden.detach().clone(), out.pooled.detach().clone(), rows))
        return out

    def spy_inputs(encoded, ids, dtype=None):
        ids_seen.append(ids.clone())
        return real_inputs(encoded, ids, dtype)

    monkeypatch.setattr(trainer, "encode", spy)
    monkeypatch.setattr(trainer, "unet_inputs", spy_inputs)
    cfg = train_config(tmp_path, _concept(concept_dirs), steps=3, model="tiny-xl", keep_checkpoints=1)
    train(cfg, log=lambda m: None)
    assert len(calls) == 1 + 3  # the class captions once, then each step's instance prompts
    pipe = build_tiny_xl_pipeline()
    pipe.tokenizer.add_tokens(["<new1>"])
    pipe.tokenizer_2.add_tokens(["<new1>"])
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        enc.resize_token_embeddings(49409, mean_resizing=False)
    for prompts, hidden, pooled, rows in calls:
        with torch.no_grad():
            for enc, row in zip((pipe.text_encoder, pipe.text_encoder_2), rows, strict=True):
                enc.get_input_embeddings().weight[49408] = row
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        assert hidden.shape[-1] == 80
        assert torch.allclose(hidden, theirs, atol=1e-6) and torch.allclose(pooled, theirs_pooled, atol=1e-6)
    assert len({tuple(r.tolist()) for *_, (r, _r2) in calls}) == 3  # the rows trained between the steps
    assert len(ids_seen) == 3
    for ids in ids_seen:  # 2 views, then 2 class images
        assert ids[2:].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
        for s, s2, top, left, h, w in ids[:2].tolist():
            zoomed = s > 64  # a 64 px crop of the view zoomed to s px, else the whole image
            assert s == s2 and (h, w) == (64, 64) and (0 <= top <= s - 64 and 0 <= left <= s - 64 if zoomed else
                                                         (s, top, left) == (64, 0, 0))  # fmt: skip


def test_time_ids_follow_the_size_augmentation(tiny_xl_pipe, tiny_pipe):
    parts = trainer.training_parts(train_config_for_parts(), tiny_xl_pipe, torch.device("cpu"))
    zoomed = Augmented(torch.zeros(3, 64, 64), torch.ones(8, 8), "close up ", 80, (5, 11))
    shrunk = Augmented(torch.zeros(3, 64, 64), torch.ones(8, 8), "very small ", 30, (0, 0))
    ids = trainer.batch_time_ids(parts, [zoomed, shrunk], 2, 64)
    assert ids.tolist() == [
        [80, 80, 5, 11, 64, 64],  # a 64 px crop at (5, 11) of the view zoomed to 80 px
        [64, 64, 0, 0, 64, 64],  # pasted small onto a whole 64 px image
        [64, 64, 0, 0, 64, 64],  # class images: whole, as when sampling
        [64, 64, 0, 0, 64, 64],
    ]
    sd1 = trainer.training_parts(train_config_for_parts(), tiny_pipe, torch.device("cpu"))
    assert trainer.batch_time_ids(sd1, [zoomed], 0, 64) is None  # SD 1.x and 2.x have no time ids


def train_config_for_parts():
    from cdtool.train.config import TrainConfig

    return TrainConfig(concepts=[], model="tiny-xl", output="x", run_dir="x", resolution=64)


def test_custom_diffusion_trains_kv_and_both_token_rows(tmp_path, concept_dirs):
    cfg = train_config(tmp_path, _concept(concept_dirs), steps=3, lr=1e-3, model="tiny-xl", early_stop="dvar",
                       dvar_window=2, dvar_eps=0.0)  # fmt: skip
    result = train(cfg, log=lambda m: None, keep_pipeline=True)
    base = build_tiny_xl_pipeline()
    trained = dict(result.pipeline.unet.named_parameters())
    for n, p in base.unet.named_parameters():
        changed = not torch.equal(trained[n], p)
        assert changed == n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")), n
    for enc, base_enc, width in ((result.pipeline.text_encoder, base.text_encoder, 32),
                                 (result.pipeline.text_encoder_2, base.text_encoder_2, 48)):  # fmt: skip
        table = enc.get_input_embeddings().weight
        assert torch.equal(table[:49408], base_enc.get_input_embeddings().weight)  # every other row bit-identical
        assert table.shape == (49409, width)
    d = read_cdtool(tmp_path / "out.safetensors")
    assert d.base_kind == "sdxl" and len(d.layers) == 16
    assert all(layer.shape[1] == 80 for layer in d.layers.values())  # both encoders' features
    init = [e.get_input_embeddings().weight[42170] for e in (base.text_encoder, base.text_encoder_2)]
    assert not torch.allclose(d.tokens["<new1>"][0], init[0]) and not torch.allclose(d.tokens_2["<new1>"][0], init[1])
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("dvar" in e and "eval_loss" in e for e in log)
    apply_deltas(base, [(d, 1.0)])  # the fingerprint is tiny-xl's, both tables included
    assert torch.equal(base.text_encoder_2.get_input_embeddings().weight[49408], d.tokens_2["<new1>"][0])


def test_textual_inversion_trains_rows_in_both_encoders_only(tmp_path, concept_dirs):
    cat, _ = concept_dirs
    cfg = train_config(tmp_path, [{"data": str(cat)}], "textual-inversion", steps=2, lr=5e-2, scale_lr=False,
                       aug=False, num_vectors=2, model="tiny-xl")  # fmt: skip
    result = train(cfg, log=lambda m: None, keep_pipeline=True)
    base = build_tiny_xl_pipeline()
    for (n, a), (_, b) in zip(result.pipeline.unet.named_parameters(), base.unet.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    d = read_cdtool(tmp_path / "out.safetensors")
    assert not d.layers and d.tokens["<new1>"].shape == (2, 32) and d.tokens_2["<new1>"].shape == (2, 48)
    # diffusers' SDXL pipeline reads the two-vector token as "<new1> <new1>_1" in both tokenizers
    apply_deltas(base, [(d, 1.0)])
    assert base.tokenizer_2.convert_tokens_to_ids(["<new1>", "<new1>_1"]) == [49408, 49409]
    assert base.maybe_convert_prompt("a <new1>", base.tokenizer_2) == "a <new1> <new1>_1"


def test_dreambooth_lora_on_both_text_encoders_applies_as_it_trained(tmp_path, concept_dirs):
    cfg = train_config(tmp_path, _concept(concept_dirs, token="sks"), "dreambooth-lora", steps=2, lr=1e-2,
                       model="tiny-xl", train_text_encoder=True)  # fmt: skip
    result = train(cfg, log=lambda m: None, keep_pipeline=True)
    d = read_cdtool(tmp_path / "out.safetensors")
    assert {n.split(".")[0] for n in d.layers} == {"unet", "text_encoder", "text_encoder_2"} and not d.tokens
    ours = build_tiny_xl_pipeline()
    apply_deltas(ours, [(d, 1.0)])
    from cdtool.models.conditioning import TextSide, encode, time_ids, unet_inputs

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = time_ids((64, 64), (0, 0), (64, 64))[None]
    with torch.no_grad():
        outs = [
            p.unet(x, torch.tensor([500]), **unet_inputs(encode(TextSide.of(p), ["a sks cat"]), ids)).sample
            for p in (result.pipeline, ours)
        ]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_resume_on_sdxl_gives_the_same_delta(cli, tmp_path, concept_dirs):
    cat, reg = concept_dirs
    common = [cat, "--class-noun", "cat", "--reg", reg, *XL, "--checkpoint-every", "2", "--device", "cpu"]
    cli("train", *common, "-o", tmp_path / "full.safetensors", "--steps", "4")
    cli("train", *common, "-o", tmp_path / "half.safetensors", "--steps", "2")
    cli("train", *common, "-o", tmp_path / "half.safetensors", "--steps", "4", "--resume", tmp_path / "half.run")
    a, b = read_cdtool(tmp_path / "full.safetensors"), read_cdtool(tmp_path / "half.safetensors")
    assert torch.equal(a.tokens_2["<new1>"], b.tokens_2["<new1>"])
    for name in a.layers:
        assert torch.equal(a.layers[name].full, b.layers[name].full), name
    ckpt = tmp_path / "half.run" / "checkpoints" / "step-000004"  # a checkpoint keeps both rows too
    cli("get-deltas", ckpt, "-o", tmp_path / "ckpt.safetensors")
    assert torch.equal(read_cdtool(tmp_path / "ckpt.safetensors").tokens_2["<new1>"], a.tokens_2["<new1>"])


def test_default_resolution_is_the_models(tmp_path):
    from cdtool.models.loading import default_resolution

    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 128}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert default_resolution(str(folder)) == 1024
    assert default_resolution("tiny-xl") == 64


@pytest.mark.parametrize("method", ["custom-diffusion"])
def test_accelerate_two_processes_on_sdxl(tmp_path, concept_dirs, method):
    import os
    import subprocess
    import sys

    cat, reg = concept_dirs
    out = tmp_path / "mp.safetensors"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cdtool", "train",
           str(cat), "--class-noun", "cat", "--reg", str(reg), "-o", str(out), "--method", method, "--steps", "2",
           *XL]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = read_cdtool(out)
    assert d.provenance["train"]["processes"] == 2 and d.tokens_2["<new1>"].shape == (1, 48)

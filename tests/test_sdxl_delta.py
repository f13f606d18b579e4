"""The delta file on SDXL: the second encoder's rows (`token_2.`), the kind of base, applying to both
encoders, the official SDXL delta.bin; and SD 1.x files exactly as they were."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_error

from cdtool.delta.base import fingerprint, fingerprint_names, pipeline_params
from cdtool.delta.file import read_cdtool, safetensors_metadata, write_cdtool
from cdtool.delta.importers import official_state, read_delta
from cdtool.errors import CdtoolError
from cdtool.models.apply import apply_deltas
from cdtool.models.tiny import build_tiny_xl_pipeline

SD1_METADATA = ["format", "format_version", "base_model", "base_fingerprint", "concepts", "created_by", "provenance"]


def test_sd1_files_are_as_before(tmp_path, make_delta):
    from safetensors import safe_open

    d = make_delta()
    write_cdtool(d, tmp_path / "a.safetensors")
    assert sorted(safetensors_metadata(tmp_path / "a.safetensors")) == sorted(SD1_METADATA)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted([f"{n}.delta" for n in d.layers] + ["token.<new1>"])
    back = read_cdtool(tmp_path / "a.safetensors")
    assert back.base_kind == "sd1" and not back.tokens_2
    write_cdtool(back, tmp_path / "b.safetensors")  # read and written again: the same metadata
    assert safetensors_metadata(tmp_path / "b.safetensors") == safetensors_metadata(tmp_path / "a.safetensors")


def test_sdxl_delta_keeps_both_encoders_rows(tmp_path, make_xl_delta, cli):
    from safetensors import safe_open

    d = make_xl_delta()
    path = tmp_path / "xl.safetensors"
    write_cdtool(d, path)
    meta = safetensors_metadata(path)
    assert meta["base_kind"] == "sdxl" and sorted(meta) == sorted([*SD1_METADATA, "base_kind"])
    with safe_open(str(path), framework="pt") as f:
        assert {k for k in f.keys() if k.startswith("token")} == {"token.<new1>", "token_2.<new1>"}
        assert f.get_tensor("token_2.<new1>").shape == (1, 48)
    back = read_cdtool(path)
    assert back.base_kind == "sdxl" and torch.equal(back.tokens_2["<new1>"], d.tokens_2["<new1>"])
    doc = json.loads(cli("info", path, "--json").stdout)
    assert doc["base_kind"] == "sdxl" and doc["tokens"] == {"<new1>": {"vectors": 1, "dim": 32, "dim_2": 48}}
    text = cli("info", path).stdout
    assert "tokens:      <new1> (1x32 + 1x48)" in text
    assert "base:        tiny-xl (Stable Diffusion XL, fingerprint" in text


def test_a_token_needs_both_encoders_rows(tmp_path, make_xl_delta):
    from safetensors.torch import save_file

    from cdtool.delta.file import delta_metadata, delta_tensors

    d = make_xl_delta()
    tensors = delta_tensors(d)
    del tensors["token.<new1>"]
    save_file(tensors, str(tmp_path / "half.safetensors"), metadata=delta_metadata(d))
    with pytest.raises(CdtoolError) as e:
        read_cdtool(tmp_path / "half.safetensors")
    assert str(e.value) == (
        f"{tmp_path / 'half.safetensors'}: token <new1> has rows for one of the two text encoders only "
        "(token.<new1> and token_2.<new1> go together)"
    )


def test_applying_puts_the_token_into_both_encoders_at_one_id(make_xl_delta):
    d = make_xl_delta()
    pipe = build_tiny_xl_pipeline()
    before = {n: p.clone() for n, p in pipeline_params(pipe).items()}
    apply_deltas(pipe, [(d, 0.5)])
    ids = (pipe.tokenizer.convert_tokens_to_ids("<new1>"), pipe.tokenizer_2.convert_tokens_to_ids("<new1>"))
    assert ids == (49408, 49408)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[49408], d.tokens["<new1>"][0])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[49408], d.tokens_2["<new1>"][0])
    for name, layer in d.layers.items():
        w = pipe.unet.get_submodule(name[len("unet.") :]).weight
        assert torch.allclose(w, before[f"{name}.weight"] + 0.5 * layer.full)
        assert w.shape[1] == 80  # the key/value projections read both encoders' features


def test_the_fingerprint_covers_both_token_tables(make_xl_delta, tiny_xl_pipe):
    d = make_xl_delta()
    assert "text_encoder_2.token_embedding.weight" in fingerprint_names(d)
    params = dict(pipeline_params(tiny_xl_pipe))
    table = params["text_encoder_2.token_embedding.weight"].clone()
    table[5] += 1
    params["text_encoder_2.token_embedding.weight"] = table
    assert fingerprint(params, fingerprint_names(d), 49408) != d.base_fingerprint


def test_a_delta_for_another_kind_of_base_is_one_clear_error(cli, tmp_path, make_delta, make_xl_delta):
    write_cdtool(make_delta(), tmp_path / "sd1.safetensors")
    write_cdtool(make_xl_delta(), tmp_path / "xl.safetensors")
    r = cli("sample", "a <new1> cat", "-d", tmp_path / "sd1.safetensors", "--model", "tiny-xl", "-o", tmp_path / "s",
            "--steps", "1", "--n", "1", code=1)  # fmt: skip
    assert one_error(r) == (
        f"Error: {tmp_path / 'sd1.safetensors'} is a delta for Stable Diffusion 1.x, but the base model tiny-xl is "
        "Stable Diffusion XL; pass --model with the Stable Diffusion 1.x base it was made for"
    )
    r = cli("merge", tmp_path / "xl.safetensors", tmp_path / "sd1.safetensors", "--model", "tiny", "-o",
            tmp_path / "m.safetensors", code=1)  # fmt: skip
    assert one_error(r) == (
        f"Error: {tmp_path / 'xl.safetensors'} is a delta for Stable Diffusion XL, but the base model tiny is "
        "Stable Diffusion 1.x; pass --model with the Stable Diffusion XL base it was made for"
    )
    assert not (tmp_path / "s").exists() and not (tmp_path / "m.safetensors").exists()


def _official_sdxl_state(d, base):
    """The official SDXL script's delta.bin: fine-tuned kv weights under `unet` and, per modifier
    token, the list [text_encoder row, text_encoder_2 row] (CustomDiffusionXLPipeline.save_pretrained)."""
    unet = {n[len("unet.") :] + ".weight": base[f"{n}.weight"] + layer.full for n, layer in d.layers.items()}
    return {"unet": unet, "modifier_token": {"<new1>": [d.tokens["<new1>"][0], d.tokens_2["<new1>"][0]]}}


def test_the_official_sdxl_delta_bin_is_read_and_written(tmp_path, make_xl_delta, tiny_xl_pipe, cli):
    d = make_xl_delta()
    base = {k: v.detach().clone() for k, v in pipeline_params(tiny_xl_pipe).items()}
    torch.save(_official_sdxl_state(d, base), tmp_path / "delta.bin")
    got = read_delta(tmp_path / "delta.bin")
    assert got.base_kind == "sdxl" and got.source_format == "official-diffusers"
    assert torch.equal(got.tokens["<new1>"], d.tokens["<new1>"])
    assert torch.equal(got.tokens_2["<new1>"], d.tokens_2["<new1>"])
    out = tmp_path / "conv.safetensors"
    cli("get-deltas", tmp_path / "delta.bin", "--model", "tiny-xl", "-o", out)
    conv = read_cdtool(out)
    assert conv.base_fingerprint == d.base_fingerprint and conv.base_kind == "sdxl"
    for name, layer in d.layers.items():
        assert torch.allclose(conv.layers[name].full, layer.full, atol=1e-6)
    state = official_state(conv, base)  # written back as the official script writes it
    rows = state["modifier_token"]["<new1>"]
    assert isinstance(rows, list) and [r.shape for r in rows] == [(32,), (48,)]


def test_get_deltas_from_a_fine_tuned_sdxl_model(cli, tmp_path):
    """A fully fine-tuned SDXL folder: the kv changes, and the added token's rows in both encoders."""
    tuned = build_tiny_xl_pipeline()
    for tok, enc in ((tuned.tokenizer, tuned.text_encoder), (tuned.tokenizer_2, tuned.text_encoder_2)):
        tok.add_tokens(["<new1>"])
        enc.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            enc.get_input_embeddings().weight[49408] = torch.arange(enc.config.hidden_size, dtype=torch.float32)
    layer = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v"
    with torch.no_grad():
        tuned.unet.get_submodule(layer).weight.add_(0.5)
    tuned.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    out = tmp_path / "d.safetensors"
    cli("get-deltas", tmp_path / "tuned", "--model", "tiny-xl", "-o", out)
    d = read_cdtool(out)
    assert list(d.layers) == [f"unet.{layer}"] and torch.allclose(
        d.layers[f"unet.{layer}"].full, torch.full((64, 80), 0.5)
    )
    assert d.base_kind == "sdxl" and torch.equal(d.tokens_2["<new1>"][0], torch.arange(48, dtype=torch.float32))
    assert torch.equal(d.tokens["<new1>"][0], torch.arange(32, dtype=torch.float32))


def test_a_kind_cdtool_does_not_know_is_one_error(cli, tmp_path, make_xl_delta):
    from safetensors.torch import load_file, save_file

    write_cdtool(make_xl_delta(), tmp_path / "xl.safetensors")
    meta = safetensors_metadata(tmp_path / "xl.safetensors") | {"base_kind": "sd3"}
    save_file(load_file(str(tmp_path / "xl.safetensors")), str(tmp_path / "sd3.safetensors"), metadata=meta)
    r = cli("info", tmp_path / "sd3.safetensors", code=1)
    assert one_error(r) == (
        f"Error: {tmp_path / 'sd3.safetensors'}: a delta for a base of kind 'sd3'; this cdtool reads sd1, sd2, sdxl "
        "(a newer cdtool may have written it)"
    )

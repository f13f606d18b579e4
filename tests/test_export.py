"""`cdtool export`: diffusers' own loaders give the same UNet outputs as cdtool's application."""

from __future__ import annotations

import pytest
import torch
from conftest import one_error

from cdtool.apply import apply_deltas
from cdtool.delta import read_cdtool, write_cdtool
from cdtool.importers import read_delta
from cdtool.tiny import build_tiny_pipeline

PROMPT = "photo of a <new1> cat"


def _unet_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(
        pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([400]), encoder_hidden_states=cond).sample


@pytest.fixture(params=["full", "rank4"])
def delta_file(request, tmp_path, make_delta, cli):
    path = tmp_path / "d.safetensors"
    write_cdtool(make_delta(scale=0.05), path)
    if request.param == "rank4":
        cli("compress", path, "-o", tmp_path / "d4.safetensors", "--rank", "4")
        return tmp_path / "d4.safetensors"
    return path


def _ours(delta_file) -> torch.Tensor:
    pipe = build_tiny_pipeline()
    apply_deltas(pipe, [(read_delta(delta_file), 1.0)])
    return _unet_out(pipe)


def test_diffusers_lora(cli, tmp_path, delta_file):
    out = tmp_path / "lora"
    files = cli("export", delta_file, "--to", "diffusers-lora", "-o", out).stdout.split()
    assert files == [str(out / "pytorch_lora_weights.safetensors"), str(out / "<new1>.safetensors")]
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.load_textual_inversion(str(out), weight_name="<new1>.safetensors")
    assert torch.allclose(_unet_out(pipe), _ours(delta_file), atol=1e-5)


def test_kohya(cli, tmp_path, delta_file):
    out = tmp_path / "kohya"
    cli("export", delta_file, "--to", "kohya", "-o", out)
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(out), weight_name="lora.safetensors")
    pipe.load_textual_inversion(str(out / "embeddings" / "<new1>.safetensors"), token="<new1>")
    assert torch.allclose(_unet_out(pipe), _ours(delta_file), atol=1e-5)


def test_diffusers_custom_diffusion(cli, tmp_path, delta_file):
    out = tmp_path / "cd"
    cli("export", delta_file, "--to", "diffusers-custom-diffusion", "-o", out)
    pipe = build_tiny_pipeline()
    # diffusers 0.4x: without `_pipeline`, load_attn_procs silently sets no processors
    pipe.unet.load_attn_procs(str(out), weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)
    pipe.load_textual_inversion(str(out), weight_name="<new1>.safetensors")
    assert torch.allclose(_unet_out(pipe), _ours(delta_file), atol=1e-5)
    # and cdtool reads the export back
    back = read_delta(out).relative_to({f"unet.{n}": p for n, p in build_tiny_pipeline().unet.named_parameters()})
    src = read_delta(delta_file)
    for name, layer in src.layers.items():
        assert torch.allclose(back.layers[name].full, layer.dense(), atol=1e-6)


def test_official(cli, tmp_path, delta_file):
    cli("export", delta_file, "--to", "official", "-o", tmp_path / "delta.bin")
    state = torch.load(tmp_path / "delta.bin", weights_only=True)
    assert set(state) == {"unet", "modifier_token"} and "<new1>" in state["modifier_token"]
    cli("export", delta_file, "--to", "official", "-o", tmp_path / "delta.safetensors", code=2)


def test_existing_output_needs_force(cli, tmp_path, delta_file):
    (tmp_path / "lora").mkdir()  # an empty folder is as good as none
    cli("export", delta_file, "--to", "diffusers-lora", "-o", tmp_path / "lora")
    r = cli("export", delta_file, "--to", "diffusers-lora", "-o", tmp_path / "lora", code=1)
    assert one_error(r) == f"Error: {tmp_path / 'lora'} already exists; pass --force to replace it"
    cli("export", delta_file, "--to", "diffusers-lora", "-o", tmp_path / "lora", "--force")
    assert read_cdtool(delta_file).tokens

"""`cdtool export`: diffusers' own loaders give the same UNet outputs as cdtool's application."""

from __future__ import annotations

import pytest
import torch
from helpers import one_error

from cdtool.delta.file import read_cdtool, write_cdtool
from cdtool.delta.importers import read_delta
from cdtool.models.apply import apply_deltas
from cdtool.models.tiny import build_tiny_pipeline

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
    assert files == [str(out / f) for f in ("pytorch_lora_weights.safetensors", "new1.safetensors", "README.md")]
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.load_textual_inversion(str(out), weight_name="new1.safetensors")  # the token comes from inside the file
    assert torch.allclose(_unet_out(pipe), _ours(delta_file), atol=1e-5)


def test_kohya(cli, tmp_path, delta_file):
    out = tmp_path / "kohya"
    cli("export", delta_file, "--to", "kohya", "-o", out)
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(out), weight_name="lora.safetensors")
    pipe.load_textual_inversion(str(out / "embeddings" / "new1.safetensors"), token="<new1>")
    assert torch.allclose(_unet_out(pipe), _ours(delta_file), atol=1e-5)


def test_diffusers_custom_diffusion(cli, tmp_path, delta_file):
    out = tmp_path / "cd"
    cli("export", delta_file, "--to", "diffusers-custom-diffusion", "-o", out)
    pipe = build_tiny_pipeline()
    # diffusers 0.4x: without `_pipeline`, load_attn_procs silently sets no processors
    pipe.unet.load_attn_procs(str(out), weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)
    pipe.load_textual_inversion(str(out), weight_name="new1.safetensors")
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


def _text_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(
        pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_checkpoint_loads_in_from_single_file(cli, tmp_path, delta_file, tiny_folder):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    out = tmp_path / "cat-sd"
    files = cli("export", delta_file, "--to", "checkpoint", "--dtype", "fp32", "-o", out).stdout.split()
    assert files == [str(out / f) for f in ("cat-sd.safetensors", "embeddings/new1.safetensors", "README.md")]
    with safe_open(str(out / "cat-sd.safetensors"), "pt") as f:
        keys = list(f.keys())
        table = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        assert f.metadata()["format"] == "cdtool.checkpoint"
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert table.shape == (49408, 32)  # the base's rows: the token comes from the embedding file
    # diffusers reads it with the configs of a local folder, without network
    loaded = StableDiffusionPipeline.from_single_file(
        str(out / "cat-sd.safetensors"), config=str(tiny_folder), local_files_only=True, safety_checker=None
    )
    loaded.load_textual_inversion(str(out / "embeddings" / "new1.safetensors"), token="<new1>")
    ours = build_tiny_pipeline()
    apply_deltas(ours, [(read_delta(delta_file), 1.0)])
    assert torch.allclose(_text_out(loaded), _text_out(ours), atol=1e-6)
    assert torch.allclose(_unet_out(loaded), _unet_out(ours), atol=1e-6)
    # the untouched parts are the base's, bit for bit
    base = build_tiny_pipeline()
    theirs, own = loaded.vae.state_dict(), base.vae.state_dict()
    assert set(theirs) == set(own) and all(torch.equal(theirs[k], own[k]) for k in own)


def test_checkpoint_is_fp16_by_default(cli, tmp_path, make_delta):
    from safetensors import safe_open

    path = tmp_path / "d.safetensors"
    write_cdtool(make_delta(), path)
    cli("export", path, "--to", "checkpoint", "-o", tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "ck.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    r = cli("export", path, "--to", "diffusers-lora", "--dtype", "fp32", "-o", tmp_path / "x", code=2)
    assert "Error: --dtype is for --to checkpoint" in r.stderr


def test_exports_read_back_with_their_tokens(cli, tmp_path, delta_file):
    """The token inside each file, whatever the file is named; old `<token>.safetensors` names too."""
    import shutil

    src = read_delta(delta_file)
    for target, path in (
        ("diffusers-custom-diffusion", "cd"),  # the folder: weights and new1.safetensors beside them
        ("kohya", "kohya/embeddings/new1.safetensors"),  # A1111's file: the token from its metadata
        ("diffusers-lora", "diffusers-lora/new1.safetensors"),
    ):
        cli("export", delta_file, "--to", target, "-o", tmp_path / path.split("/")[0])
        back = read_delta(tmp_path / path)
        assert list(back.tokens) == ["<new1>"] and torch.equal(back.tokens["<new1>"], src.tokens["<new1>"])
    shutil.move(tmp_path / "cd" / "new1.safetensors", tmp_path / "cd" / "<new1>.safetensors")
    assert list(read_delta(tmp_path / "cd").tokens) == ["<new1>"]


def test_the_base_weights_an_export_reads(make_delta):
    from cdtool.export.folder import base_names

    d = make_delta(layers="attn2")
    outs = sorted(n for n in d.layers if n.endswith("to_out.0"))
    assert outs and sorted(base_names(d, "official", "tiny")) == [f"{n}.bias" for n in outs]
    names = base_names(d, "diffusers-custom-diffusion", "tiny")
    queries = [n for n in names if n.endswith(".to_q.weight")]
    assert len(queries) == 2 * len(outs)  # every attention's query, self- and cross-attention: the processors
    assert all(n.startswith("unet.") for n in queries) and sorted(names[: len(outs)]) == [f"{n}.bias" for n in outs]

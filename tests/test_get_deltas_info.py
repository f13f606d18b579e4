"""`get-deltas` (from fine-tuned models and from other formats) and `info`."""

from __future__ import annotations

import json

import pytest
import torch

from cdtool.delta.base import pipeline_params
from cdtool.delta.file import read_cdtool, write_cdtool
from cdtool.delta.importers import official_state
from cdtool.models.apply import apply_deltas


def test_from_fine_tuned_folder(cli, tmp_path, tiny_folder, make_delta):
    from cdtool.models.tiny import build_tiny_pipeline

    d = make_delta()
    tuned = build_tiny_pipeline()
    apply_deltas(tuned, [(d, 1.0)])
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "x.safetensors"
    r = cli("get-deltas", tmp_path / "tuned", "--model", tiny_folder, "-o", out, "--json")
    doc = json.loads(r.stdout)
    assert doc["layers_matched"] == 14 and doc["tokens"] == ["<new1>"]
    got = read_cdtool(out)
    assert got.base_model == str(tiny_folder)
    for name, layer in d.layers.items():
        assert torch.allclose(got.layers[name].full, layer.full, atol=1e-6)
    assert torch.equal(got.tokens["<new1>"], d.tokens["<new1>"])
    # the fingerprint computed from the folder's files equals the in-memory one
    assert got.base_fingerprint == d.base_fingerprint


def test_identical_model_is_an_error(cli, tmp_path, tiny_folder):
    r = cli("get-deltas", tiny_folder, "--base", tiny_folder, "-o", tmp_path / "x.safetensors", code=1)
    assert "does not differ" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_official_bin_then_info(cli, tmp_path, tiny_pipe, make_delta):
    d = make_delta()
    base = {k: v.detach().clone() for k, v in pipeline_params(tiny_pipe).items()}
    torch.save(official_state(d, base), tmp_path / "delta.bin")
    out = tmp_path / "conv.safetensors"
    cli("get-deltas", tmp_path / "delta.bin", "--model", "tiny", "-o", out)
    got = read_cdtool(out)
    assert got.base_fingerprint == d.base_fingerprint and got.base_model == "tiny"
    for name, layer in d.layers.items():
        assert torch.equal(got.layers[name].full, layer.full)
    r = cli("info", out, "--json")
    doc = json.loads(r.stdout)
    assert doc["layer_count"] == 14 and doc["tokens"] == {"<new1>": {"vectors": 1, "dim": 32}}
    assert doc["provenance"]["get_deltas"]["source_format"] == "official-diffusers"
    text = cli("info", out).stdout
    assert "tokens:      <new1> (1x32)" in text and "layers:      14, all full" in text
    # existing output is kept without --force
    r = cli("get-deltas", tmp_path / "delta.bin", "--base", "tiny", "-o", out, code=1)
    assert "--force" in r.stderr


def test_export_bin_and_reimport(cli, tmp_path, make_delta):
    d = make_delta()
    src = tmp_path / "a.safetensors"
    write_cdtool(d, src)
    cli("get-deltas", src, "-o", tmp_path / "a.bin")
    cli("get-deltas", tmp_path / "a.bin", "--base", "tiny", "-o", tmp_path / "b.safetensors")
    back = read_cdtool(tmp_path / "b.safetensors")
    for name, layer in d.layers.items():
        assert torch.equal(back.layers[name].full, layer.full)


def test_a_local_base_is_recorded_by_its_absolute_path(cli, tmp_path, tiny_pipe, tiny_folder, make_delta, monkeypatch):
    d = make_delta()
    base = {k: v.detach().clone() for k, v in pipeline_params(tiny_pipe).items()}
    torch.save(official_state(d, base), tmp_path / "delta.bin")
    monkeypatch.chdir(tiny_folder.parent)
    out = tmp_path / "conv.safetensors"
    cli("get-deltas", tmp_path / "delta.bin", "--model", f"./{tiny_folder.name}", "-o", out)
    assert read_cdtool(out).base_model == str(tiny_folder.resolve())
    # a recorded base that is not there (moved, or another machine): the error says what to pass
    gone = make_delta()
    gone.base_model = str(tmp_path / "moved-away")
    write_cdtool(gone, tmp_path / "gone.safetensors")
    r = cli("export", tmp_path / "gone.safetensors", "--to", "official", "-o", tmp_path / "x.bin", code=1)
    assert r.stderr == (
        f"Error: the base model recorded in the delta, {tmp_path / 'moved-away'}, is not there; "
        "pass --model with the base it was trained on\n"
    )


def test_resolve_on_base_makes_fine_tuned_weights_relative_and_records_the_base(tmp_path, tiny_pipe, make_delta):
    from cdtool.delta.base import resolve_on_base
    from cdtool.delta.importers import read_delta

    d = make_delta()
    base = {k: v.detach().clone() for k, v in pipeline_params(tiny_pipe).items()}
    torch.save(official_state(d, base), tmp_path / "delta.bin")
    imported = read_delta(tmp_path / "delta.bin")
    assert imported.needs_base and not imported.base_fingerprint
    bias = next(n for n in pipeline_params(tiny_pipe) if n.endswith("attn1.to_out.0.bias"))
    plain, params = resolve_on_base(read_delta(tmp_path / "delta.bin"), "tiny", extra=[bias])
    assert not plain.needs_base and not plain.base_fingerprint  # without `record` nothing is recorded
    assert torch.equal(params[bias], base[bias]) and "text_encoder.token_embedding.weight" in params
    recorded, _ = resolve_on_base(imported, "tiny", record=True)
    # W0 + ΔW in float64, minus W0 in float64, rounded once: ΔW bit for bit
    assert all(torch.equal(recorded.layers[n].full, layer.full) for n, layer in d.layers.items())
    assert recorded.base_model == "tiny" and recorded.base_kind == "sd1"
    assert recorded.base_fingerprint == d.base_fingerprint  # the token table cut at the base's vocabulary


def test_resolve_on_base_refuses_a_delta_for_another_kind(make_xl_delta):
    from cdtool.delta.base import resolve_on_base
    from cdtool.errors import CdtoolError

    d = make_xl_delta()
    d.origin = "xl.safetensors"
    with pytest.raises(CdtoolError) as e:
        resolve_on_base(d, "tiny", record=True)
    assert str(e.value) == (
        "xl.safetensors is a delta for Stable Diffusion XL, but the base model tiny is Stable Diffusion 1.x; "
        "pass --model with the Stable Diffusion XL base it was made for"
    )


def test_resolve_on_base_checks_every_layer_fits_the_base(make_delta):
    from cdtool.delta.base import resolve_on_base
    from cdtool.delta.file import LayerDelta
    from cdtool.errors import CdtoolError

    d = make_delta()
    name = sorted(d.layers)[0]
    out, inp = d.layers[name].shape
    d.layers[name] = LayerDelta(full=torch.zeros(out, inp + 1))
    d.origin = "wide.safetensors"
    with pytest.raises(CdtoolError) as e:
        resolve_on_base(d, "tiny")
    assert str(e.value) == (
        f"wide.safetensors: layer {name} is {out}x{inp + 1}; in the base model tiny it is {out}x{inp}; "
        "is the delta for another base model?"
    )


def test_delta_from_source_reads_a_fine_tuned_model_or_a_file(tmp_path, tiny_pipe, make_delta):
    from cdtool.delta.extract import delta_from_source, is_full_model
    from cdtool.models.tiny import build_tiny_pipeline

    d = make_delta()
    tuned = build_tiny_pipeline()
    apply_deltas(tuned, [(d, 1.0)])
    tuned.save_pretrained(tmp_path / "tuned")
    asked, logged = [], []

    def choose(recorded: list[str]) -> str:
        asked.append(recorded)
        return "tiny"

    assert is_full_model(tmp_path / "tuned") and not is_full_model(tmp_path)
    got = delta_from_source(tmp_path / "tuned", choose, "kv", read_base=False, log=logged.append)
    assert asked == [[]] and got.source_format == "fine-tuned-model" and got.matched == 14
    assert logged[-1] == "14 layers matched, 14 changed, 1 new tokens"
    assert got.delta.base_fingerprint == d.base_fingerprint and got.base is not None
    assert got.delta.concepts == [{"token": "<new1>", "class_noun": None, "init_token": None, "prompts": []}]
    assert got.delta.provenance["get_deltas"]["source_format"] == "fine-tuned-model"
    write_cdtool(d, tmp_path / "d.safetensors")
    again = delta_from_source(tmp_path / "d.safetensors", choose, "kv", read_base=False, log=logged.append)
    assert asked[-1] == ["tiny"] and again.base is None  # fingerprinted already: the base is not read
    assert again.delta.concepts == d.concepts and again.delta.base_fingerprint == d.base_fingerprint
    assert delta_from_source(tmp_path / "d.safetensors", choose, "kv", read_base=True, log=logged.append).base


def test_describe_summarises_a_delta(tmp_path):
    from cdtool.delta.file import Delta, LayerDelta, describe

    d = Delta(
        layers={
            "unet.b.attn2.to_v": LayerDelta(up=torch.zeros(4, 2), down=torch.zeros(2, 3), bias=torch.zeros(4)),
            "unet.a.attn2.to_k": LayerDelta(full=torch.zeros(4, 3, dtype=torch.float16)),
        },
        tokens={"<new1>": torch.zeros(2, 3)},
        tokens_2={"<new1>": torch.zeros(2, 5)},
        base_kind="sdxl",
        base_model="tiny-xl",
    )
    write_cdtool(d, tmp_path / "d.safetensors")
    doc = describe(d, tmp_path / "d.safetensors")
    assert doc["size_bytes"] == (tmp_path / "d.safetensors").stat().st_size
    assert doc["tokens"] == {"<new1>": {"vectors": 2, "dim": 3, "dim_2": 5}}
    assert list(doc["layers"]) == ["unet.a.attn2.to_k", "unet.b.attn2.to_v"]
    assert doc["layers"]["unet.b.attn2.to_v"] == {
        "shape": [4, 3],
        "rank": 2,
        "dtype": "float32",
        "bias": True,
        "absolute": False,
    }
    assert doc["layers"]["unet.a.attn2.to_k"]["dtype"] == "float16"
    assert (doc["layer_count"], doc["low_rank_layers"], doc["base_kind"], doc["base_fingerprint"]) == (
        2,
        1,
        "sdxl",
        None,
    )
    assert describe(d, tmp_path)["size_bytes"] is None

"""`get-deltas` (from fine-tuned models and from other formats) and `info`."""

from __future__ import annotations

import json

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

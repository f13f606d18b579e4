"""The delta file: cdtool format, every import format, the official export, and bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cdtool.delta.base import pipeline_params
from cdtool.delta.file import FORMAT, Delta, LayerDelta, read_cdtool, safetensors_metadata, write_cdtool
from cdtool.delta.importers import official_state, read_delta, save_delta
from cdtool.delta.naming import diffusers_to_sgm
from cdtool.errors import CdtoolError


def _base(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipeline_params(pipe).items()}


def assert_same(a: Delta, b: Delta) -> None:
    assert sorted(a.layers) == sorted(b.layers)
    for name in a.layers:
        la, lb = a.layers[name], b.layers[name]
        for part in ("full", "up", "down", "bias"):
            ta, tb = getattr(la, part), getattr(lb, part)
            assert (ta is None) == (tb is None), (name, part)
            if ta is not None:
                assert torch.equal(ta, tb), (name, part)
    assert sorted(a.tokens) == sorted(b.tokens)
    for t in a.tokens:
        assert torch.equal(a.tokens[t], b.tokens[t])


def test_cdtool_roundtrip_keeps_tensors_and_metadata(tmp_path, make_delta):
    d = make_delta()
    d.provenance = {"seed": 3, "steps": 10}
    path = tmp_path / "a.safetensors"
    write_cdtool(d, path)
    meta = safetensors_metadata(path)
    assert meta["format"] == FORMAT and meta["base_model"] == "tiny"
    back = read_delta(path)
    assert_same(d, back)
    assert back.base_fingerprint == d.base_fingerprint
    assert back.concepts == d.concepts and back.provenance == {"seed": 3, "steps": 10}
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_low_rank_and_bias_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(1)
    d = Delta(
        layers={
            "unet.a.attn2.to_k": LayerDelta(up=torch.randn(8, 2, generator=g), down=torch.randn(2, 6, generator=g)),
            "unet.a.attn2.to_out.0": LayerDelta(full=torch.randn(8, 8, generator=g), bias=torch.randn(8, generator=g)),
        }
    )
    write_cdtool(d, tmp_path / "x.safetensors")
    back = read_cdtool(tmp_path / "x.safetensors")
    assert_same(d, back)
    assert back.layers["unet.a.attn2.to_k"].rank == 2
    assert torch.allclose(
        back.layers["unet.a.attn2.to_k"].dense(), d.layers["unet.a.attn2.to_k"].up @ d.layers["unet.a.attn2.to_k"].down
    )


def test_cdtool_to_official_bin_and_back_is_exact(tmp_path, tiny_pipe, make_delta):
    d = make_delta()
    base = _base(tiny_pipe)
    save_delta(d, tmp_path / "delta.bin", base)
    state = torch.load(tmp_path / "delta.bin", weights_only=True)
    assert set(state) == {"unet", "modifier_token"}
    name = next(iter(d.layers))
    key = name[len("unet.") :] + ".weight"
    # the official layout stores fine-tuned weights
    assert torch.allclose(state["unet"][key].float(), base[f"{name}.weight"] + d.layers[name].full, atol=1e-7)
    back = read_delta(tmp_path / "delta.bin")
    assert back.source_format == "official-diffusers" and back.needs_base
    assert_same(d, back.relative_to(base))


def test_official_compressed_and_full_import(tmp_path, tiny_pipe, make_delta):
    d = make_delta()
    base = _base(tiny_pipe)
    names = sorted(d.layers)
    u, v = torch.randn(32, 3), torch.randn(3, 32)
    state = official_state(d, base)
    state["unet"][names[0][5:] + ".weight"] = {"u": u, "v": v}
    torch.save(state, tmp_path / "compressed_delta.bin")
    back = read_delta(tmp_path / "compressed_delta.bin")
    assert back.layers[names[0]].rank == 3
    assert torch.equal(back.layers[names[0]].up, u) and torch.equal(back.layers[names[0]].down, v)
    rel = back.relative_to(base)
    for n in names[1:]:
        assert torch.equal(rel.layers[n].full, d.layers[n].full)


def test_compvis_ckpt_import_maps_names(tmp_path, tiny_pipe, make_delta):
    d = make_delta()
    base = _base(tiny_pipe)
    sd = {}
    for name, layer in d.layers.items():
        w0 = base[f"{name}.weight"]
        sd[f"model.diffusion_model.{diffusers_to_sgm(name)}.weight"] = w0.double() + layer.full.double()
    sd["embed"] = torch.cat([d.tokens["<new1>"], torch.ones(1, 32)])
    # the tiny UNet's block layout is not SD1.x, but the name mapping is the SD1.x one both ways
    torch.save({"state_dict": sd}, tmp_path / "delta_epoch=000004.ckpt")
    back = read_delta(tmp_path / "delta_epoch=000004.ckpt")
    assert back.source_format == "official-compvis"
    assert sorted(back.tokens) == ["<new1>", "<new2>"]
    assert torch.equal(back.tokens["<new1>"], d.tokens["<new1>"])
    assert_same(Delta(layers=d.layers), Delta(layers=back.relative_to(base).layers))


def _diffusers_state(d: Delta, base) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in d.layers.items():
        proc, _, proj = name[len("unet.") :].rpartition(".")
        out[f"{proc}.processor.{proj}_custom_diffusion.weight"] = base[f"{name}.weight"].double() + layer.full.double()
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_diffusers_custom_diffusion_files(tmp_path, tiny_pipe, make_delta, suffix):
    d = make_delta()
    base = _base(tiny_pipe)
    state = _diffusers_state(d, base)
    weights = tmp_path / f"pytorch_custom_diffusion_weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, weights)
        save_file({"<new1>": d.tokens["<new1>"][0].contiguous()}, tmp_path / "<new1>.safetensors")
    else:
        torch.save(state, weights)
        torch.save({"<new1>": d.tokens["<new1>"][0]}, tmp_path / "<new1>.bin")
    for source in (weights, tmp_path):  # the file, or the training output folder
        back = read_delta(source)
        assert back.source_format == "diffusers-custom-diffusion"
        assert_same(Delta(layers=d.layers, tokens=d.tokens), back.relative_to(base))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "delta.bin"
    with path.open("wb") as f:
        pickle.dump({"unet": Evil()}, f)
    with pytest.raises(CdtoolError, match="refused"):
        read_delta(path)
    assert not marker.exists()
    torch.save({"unet": {}, "x": Evil()}, tmp_path / "zip.bin")
    with pytest.raises(CdtoolError, match="refused"):
        read_delta(tmp_path / "zip.bin")
    assert not marker.exists()


def test_bad_files(tmp_path, make_delta):
    with pytest.raises(CdtoolError, match="no such file"):
        read_delta(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    write_cdtool(make_delta(), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CdtoolError, match="truncated"):
        read_delta(truncated)
    other = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.zeros(3)}, other)
    with pytest.raises(CdtoolError, match="not a delta"):
        read_delta(other)
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a model")
    with pytest.raises(CdtoolError, match="not a delta"):
        read_delta(tmp_path / "junk.bin")

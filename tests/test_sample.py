"""`cdtool sample` end to end on the tiny model."""

from __future__ import annotations

import json

from helpers import one_error
from PIL import Image

from cdtool.delta.file import write_cdtool


def _pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_sample_with_and_without_delta(cli, tmp_path, make_delta):
    delta = tmp_path / "cat.safetensors"
    write_cdtool(make_delta(scale=0.2), delta)
    args = ("--model", "tiny", "--n", "2", "--steps", "3", "--seed", "7")
    r = cli("sample", "a photo of a <new1> cat", "-o", tmp_path / "a", *args, "--delta", delta, "--grid")
    assert r.stdout.strip() == str(tmp_path / "a")
    cli("sample", "a photo of a <new1> cat", "-o", tmp_path / "b", *args, "--delta", delta)
    cli("sample", "a photo of a cat", "-o", tmp_path / "c", *args)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _pngs(a) == [
        "000-a-photo-of-a-new1-cat-14e2062a-s7.png",
        "000-a-photo-of-a-new1-cat-14e2062a-s8.png",
        "grid.png",
    ]
    for name in _pngs(b):
        assert (a / name).read_bytes() == (b / name).read_bytes()  # same seed: byte-identical
        with Image.open(a / name) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    with Image.open(a / "grid.png") as im:
        assert im.size == (128, 64)
    first = "000-a-photo-of-a-new1-cat-14e2062a-s7.png"
    assert (a / first).read_bytes() != (c / "000-a-photo-of-a-cat-ba792b3f-s7.png").read_bytes()
    assert (a / first).read_bytes() != (a / "000-a-photo-of-a-new1-cat-14e2062a-s8.png").read_bytes()
    prompts = json.loads((a / "prompts.json").read_text())
    assert prompts[first] == "a photo of a <new1> cat"


def test_rerun_skips_existing_and_force_regenerates(cli, tmp_path):
    out = tmp_path / "s"
    cli("sample", "x", "-o", out, "--model", "tiny", "--n", "1", "--steps", "2")
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--n", "2", "--steps", "2", "--json")
    doc = json.loads(r.stdout)
    assert doc["skipped"] == ["000-x-2d711642-s0.png"] and doc["generated"] == ["000-x-2d711642-s1.png"]
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--n", "2", "--steps", "2", "--json", "--force")
    assert len(json.loads(r.stdout)["generated"]) == 2


def test_prompts_file_and_scale(cli, tmp_path, make_delta):
    (tmp_path / "p.txt").write_text("# comment\none\n\ntwo\n")
    delta = tmp_path / "d.safetensors"
    write_cdtool(make_delta(), delta)
    out = tmp_path / "o"
    cli(
        "sample",
        "--prompts",
        tmp_path / "p.txt",
        "-o",
        out,
        "--model",
        "tiny",
        "--n",
        "1",
        "--steps",
        "2",
        "--delta",
        f"{delta}:0.5",
        "--scheduler",
        "euler-a",
    )
    assert _pngs(out) == ["000-one-7692c3ad-s0.png", "001-two-3fc4ccfe-s0.png"]


def test_bad_inputs_write_nothing(cli, tmp_path, make_delta):
    out = tmp_path / "never"
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--delta", tmp_path / "missing.safetensors", code=1)
    assert "missing.safetensors" in one_error(r)
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--scheduler", "bogus", code=2)
    existing = tmp_path / "existing.safetensors"
    write_cdtool(make_delta(token="cat"), existing)
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--delta", existing, code=1)
    assert "already exists" in one_error(r)
    other = make_delta()
    other.base_fingerprint = "0" * 64
    write_cdtool(other, tmp_path / "other.safetensors")
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--delta", tmp_path / "other.safetensors", code=1)
    assert "--ignore-base-mismatch" in one_error(r)
    cli("sample", "-o", out, "--model", "tiny", code=2)
    assert not out.exists()

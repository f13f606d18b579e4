"""`cdtool sample` end to end on the tiny model."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import one_error
from PIL import Image

from cdtool.delta.file import write_cdtool
from cdtool.errors import CdtoolError, UsageError
from cdtool.sampling.folder import gather_prompts, write_samples


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


def _delta_file(make_delta, path, **kw):
    d = make_delta(**kw.pop("delta", {}))
    for key, value in kw.items():
        setattr(d, key, value)
    write_cdtool(d, path)
    return path


# (the arguments after the prompt and -o, given the tmp folder and make_delta; the exit code; a phrase of the error)
BAD_SAMPLE_INPUT = {
    "missing-delta": (lambda t, make: ["--delta", t / "missing.safetensors"], 1, "missing.safetensors"),
    "unknown-scheduler": (lambda t, make: ["--scheduler", "bogus"], 2, "'bogus' is not one of"),
    "token-in-the-vocabulary": (
        lambda t, make: ["--delta", _delta_file(make, t / "existing.safetensors", delta={"token": "cat"})],
        1,
        "already exists",
    ),
    "another-base": (
        lambda t, make: ["--delta", _delta_file(make, t / "other.safetensors", base_fingerprint="0" * 64)],
        1,
        "--ignore-base-mismatch",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLE_INPUT))
def test_bad_inputs_write_nothing(cli, tmp_path, make_delta, case):
    setup, code, phrase = BAD_SAMPLE_INPUT[case]
    out = tmp_path / "never"
    r = cli("sample", "x", "-o", out, "--model", "tiny", *setup(tmp_path, make_delta), code=code)
    assert phrase in (one_error(r) if code == 1 else r.stderr)
    assert not out.exists()


def test_no_prompt_is_a_usage_error(cli, tmp_path):
    r = cli("sample", "-o", tmp_path / "never", "--model", "tiny", code=2)
    assert one_error(r) == "Error: give at least one prompt, or --prompts FILE"
    assert not (tmp_path / "never").exists()


def test_write_samples_keeps_what_the_same_request_made(tmp_path, make_delta):
    path = tmp_path / "cat.safetensors"
    d = make_delta(scale=0.2)
    write_cdtool(d, path)
    out = tmp_path / "out"
    out.mkdir()
    settings = dict(
        n=2, steps=2, guidance=6.0, scheduler="ddim", seed=5, height=None, width=None, batch_size=2,
        negative_prompt=None, device="cpu", dtype="fp32",
    )  # fmt: skip
    run = write_samples(out, ["a <new1> cat"], [(path, d, 1.0)], "tiny", grid=True, **settings)
    names = ["000-a-new1-cat-257ab73f-s5.png", "000-a-new1-cat-257ab73f-s6.png"]
    assert [j.file_name for j in run.generated] == names and run.kept == []
    assert json.loads((out / "prompts.json").read_text()) == dict.fromkeys(names, "a <new1> cat")
    with Image.open(out / "grid.png") as im:
        assert im.size == (128, 64)
    with Image.open(out / names[0]) as im:
        recorded = json.loads(im.text["parameters"])
    assert (
        recorded["deltas"] == [{"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "scale": 1.0}]
        and recorded["seed"] == 5
    )
    again = write_samples(out, ["a <new1> cat", "a dog"], [(path, d, 1.0)], "tiny", **settings)
    assert again.kept == names and [j.prompt for j in again.generated] == ["a dog", "a dog"]
    with pytest.raises(CdtoolError, match="made by another request"):
        write_samples(out, ["a <new1> cat"], [(path, d, 0.5)], "tiny", **settings)


def test_gather_prompts_from_arguments_a_file_and_dreambench(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\none\n\ntwo\n")
    (tmp_path / "p.json").write_text('["three", " ", "four "]')
    assert gather_prompts(["zero"], tmp_path / "p.txt", None, None, "<new1>") == ["zero", "one", "two"]
    assert gather_prompts([], tmp_path / "p.json", None, None, "<new1>") == ["three", "four"]
    bench = tmp_path / "prompts_and_classes.txt"
    bench.write_text(
        "Classes\n\nsubject_name,class\nrex,dog\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} on a table'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} running'.format(unique_token, class_token)\n]\n"
    )
    assert gather_prompts([], None, bench, "rex", "<new1>") == ["a <new1> dog running"]
    with pytest.raises(UsageError, match="go together"):
        gather_prompts([], None, bench, None, "<new1>")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CdtoolError, match="not valid JSON"):
        gather_prompts([], tmp_path / "bad.json", None, None, "<new1>")

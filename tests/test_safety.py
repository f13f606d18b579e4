"""What cdtool promises about a user's files: `--force` replaces only what the command wrote, names
from files never leave the output folder, interrupted or failed runs leave nothing behind, outputs
respect the umask, and an output written meanwhile by another command is a conflict."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import numpy as np
import pytest
import torch
from conftest import one_error, write_concept_folder
from PIL import Image
from safetensors.torch import save_file

from cdtool.atomic import MANIFEST, atomic_path, claim_output, inside
from cdtool.delta import Delta, write_cdtool
from cdtool.errors import CdtoolError


def _photos(folder, n=3):
    folder.mkdir(parents=True)
    for i in range(n):
        a = np.full((40, 40, 3), 30 * i, np.uint8)
        a[5 + i : 25 + i, 8:30] = (200, 40 + 50 * i, 90)
        Image.fromarray(a).save(folder / f"p{i}.png")
    return folder


def _tree(folder):
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PREP = ("--class-noun", "cat", "--size", "32")


# ---- --force replaces only what the command wrote ----------------------------------------------


def test_prep_into_the_current_folder_deletes_nothing(cli, tmp_path, monkeypatch):
    _photos(tmp_path / "photos")
    (tmp_path / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = cli("prep", "photos", "-o", ".", *PREP, "--force", code=1)
    assert one_error(r) == "Error: --output . is the current folder or holds it; give a new folder for the output"
    assert _tree(tmp_path) == before


def test_prep_never_replaces_its_inputs(cli, tmp_path):
    photos = _photos(tmp_path / "photos")
    before = _tree(photos)
    r = cli("prep", photos, "-o", photos, *PREP, "--force", code=1)
    assert one_error(r) == f"Error: --output {photos} is also an input; write the output somewhere else"
    r = cli("prep", photos, "-o", photos / "prepped", *PREP, "--force", code=1)
    assert "is inside the input" in one_error(r)
    r = cli("prep", f"{photos}/*.png", "-o", photos, *PREP, "--force", code=1)
    assert "holds the input" in one_error(r)
    assert _tree(photos) == before


def test_force_refuses_a_folder_the_command_did_not_write(cli, tmp_path):
    photos = _photos(tmp_path / "photos")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for force in ((), ("--force",)):
        r = cli("prep", photos, "-o", mine, *PREP, *force, code=1)
        assert one_error(r) == (
            f"Error: {mine} exists and was not written by cdtool prep, which replaces only a folder it "
            "wrote itself; choose another --output"
        )
    assert _tree(mine) == {"thesis.tex": b"years of work"}


def test_force_replaces_an_earlier_output_but_not_files_added_to_it(cli, tmp_path):
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "data"
    cli("prep", photos, "-o", out, *PREP)
    assert json.loads((out / MANIFEST).read_text())["command"] == "prep"
    r = cli("prep", photos, "-o", out, "--class-noun", "dog", "--size", "32", code=1)
    assert one_error(r) == f"Error: {out} already exists with other contents; pass --force to replace it"
    (out / "my-notes.txt").write_text("keep me")
    r = cli("prep", photos, "-o", out, "--class-noun", "dog", "--size", "32", "--force", code=1)
    assert "holds files cdtool prep did not write (my-notes.txt)" in one_error(r)
    (out / "my-notes.txt").unlink()
    cli("prep", photos, "-o", out, "--class-noun", "dog", "--size", "32", "--force")
    assert json.loads((out / "concept.json").read_text())["class_noun"] == "dog"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside it


def test_export_force_keeps_unrelated_files(cli, tmp_path, make_delta):
    src = tmp_path / "cat.safetensors"
    write_cdtool(make_delta(), src)
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "other.safetensors").write_bytes(b"someone else's")
    r = cli("export", src, "--to", "diffusers-lora", "-o", folder, "--force", code=1)
    assert "was not written by cdtool export" in one_error(r)
    assert _tree(folder) == {"other.safetensors": b"someone else's"}


def test_demo_force_refuses_a_folder_it_did_not_write(cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("a")
    r = cli("demo", "-o", tmp_path / "out", "--force", code=1)
    assert "was not written by cdtool demo" in one_error(r)
    assert _tree(tmp_path / "out") == {"a.txt": b"a"}


def test_regset_force_keeps_the_old_set_when_the_model_fails(cli, tmp_path):
    out = tmp_path / "reg"
    cli("regset", "cat", "-o", out, "--n", "2", "--steps", "1", "--model", "tiny")
    before = _tree(out)
    r = cli("regset", "cat", "-o", out, "--n", "2", "--force", "--model", str(tmp_path / "no-model"), code=1)
    assert "no such file or folder" in one_error(r)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg"]


@pytest.mark.parametrize(
    "args",
    [
        ("--device", "tpu"),
        ("--from", "/no/such/collection"),
        ("--model", "/no/such/model"),
    ],
)
def test_regset_early_failures_leave_no_folder(cli, tmp_path, args):
    out = tmp_path / "deep" / "reg"
    cli("regset", "cat", "-o", out, "--n", "1", "--model", "tiny", *args, code=None)
    assert not (tmp_path / "deep").exists()


# ---- names from files stay inside the output ----------------------------------------------------


@pytest.mark.parametrize("name", ["../victim/rel", "/tmp/cdtool-escape/model", ".hidden", "a b"])
def test_crafted_token_names_are_refused_where_they_enter(cli, tmp_path, make_delta, name):
    d = make_delta()
    tensors = {f"token.{name}" if k.startswith("token.") else k: v for k, v in _tensors(d).items()}
    crafted = tmp_path / "crafted.safetensors"
    save_file(tensors, crafted, metadata={"format": "cdtool.delta", "format_version": "1"})
    out = tmp_path / "sub" / "out"
    r = cli("export", crafted, "--to", "diffusers-lora", "-o", out, code=1)
    assert one_error(r).startswith(f"Error: {crafted}: token name {name!r} ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.safetensors"]
    # the official layout's own token table is read through the same rule
    torch.save({"unet": {}, "modifier_token": {name: torch.zeros(32)}}, tmp_path / "delta.bin")
    r = cli("info", tmp_path / "delta.bin", code=1)
    assert f"token name {name!r}" in one_error(r)


def _tensors(delta):
    from cdtool.delta import delta_tensors

    return delta_tensors(delta)


def test_export_keeps_every_file_inside_the_output_whatever_the_name(tmp_path, make_delta):
    from cdtool.export import export

    d = make_delta()
    d.tokens = {"../escape": d.tokens["<new1>"]}
    (tmp_path / "out").mkdir()
    with pytest.raises(CdtoolError, match="a name taken from an input must be a plain file name"):
        export(d, "diffusers-lora", tmp_path / "out", None)
    assert not (tmp_path / "escape.safetensors").exists()
    assert inside(tmp_path, "<new1>.safetensors") == tmp_path / "<new1>.safetensors"
    for bad in ("/etc/x", "..", "a/b", ""):
        with pytest.raises(CdtoolError):
            inside(tmp_path, bad)


def test_token_options_are_checked(cli, tmp_path):
    photos = _photos(tmp_path / "photos")
    r = cli("prep", photos, "-o", tmp_path / "d", *PREP, "--token", "../x", code=2)
    assert "Error: token '../x' holds a path separator; use one word such as <new1>" in r.stderr
    cat = write_concept_folder(tmp_path / "cat")
    r = cli(
        "train",
        cat,
        "--class-noun",
        "cat",
        "--token",
        "<a/b>",
        "-o",
        tmp_path / "x.safetensors",
        "--model",
        "tiny",
        code=2,
    )
    assert "holds a path separator" in r.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "x.safetensors").exists()


# ---- results that match the request ------------------------------------------------------------

SAMPLE = ("--model", "tiny", "--n", "1", "--steps", "2")


def test_sample_keeps_images_only_for_the_same_request(cli, tmp_path, make_delta):
    delta = tmp_path / "cat.safetensors"
    write_cdtool(make_delta(scale=0.2), delta)
    out = tmp_path / "s"
    cli("sample", "a <new1> cat", "-o", out, *SAMPLE)  # the base model's image
    name = "000-a-new1-cat-257ab73f-s0.png"
    base_image = (out / name).read_bytes()
    for extra, differ in (
        (("--delta", delta), "deltas"),
        (("--steps", "3"), "steps"),
        (("--guidance", "2"), "guidance"),
        (("--scheduler", "euler"), "scheduler"),
        (("--height", "32"), "height"),
        (("--negative-prompt", "blurry"), "negative_prompt"),
    ):
        r = cli("sample", "a <new1> cat", "-o", out, *SAMPLE, *extra, code=1)
        assert one_error(r) == (
            f"Error: {out / name} was made by another request ({differ} differ); pass --force to "
            "regenerate it, or choose another --output"
        )
    r = cli("sample", "a <new1> cat", "-o", out, *SAMPLE, "--delta", f"{delta}:0.5", code=1)
    assert "(deltas differ)" in one_error(r)
    assert (out / name).read_bytes() == base_image
    r = cli("sample", "a <new1> cat", "-o", out, *SAMPLE, "--json")  # the same request keeps it
    assert json.loads(r.stdout)["skipped"] == [name]
    cli("sample", "a <new1> cat", "-o", out, *SAMPLE, "--delta", delta, "--force")
    assert (out / name).read_bytes() != base_image
    with Image.open(out / name) as im:
        recorded = json.loads(im.text["parameters"])
    assert recorded["deltas"][0]["scale"] == 1.0 and len(recorded["deltas"][0]["sha256"]) == 64
    assert len(recorded["base_fingerprint"]) == 64 and recorded["prompt"] == "a <new1> cat"
    r = cli("sample", "a <new1> cat", "-o", out, *SAMPLE, "--model", "toy", code=1)
    assert "(base_fingerprint, deltas, model differ)" in one_error(r)


def test_prompt_file_names_never_collide(cli, tmp_path):
    out = tmp_path / "s"
    cli("sample", "a red cat", "-o", out, *SAMPLE)
    cli("sample", "a red cat!", "-o", out, *SAMPLE)
    cli("sample", "ein Kätzchen", "日本の猫", "-o", out, *SAMPLE)
    prompts = json.loads((out / "prompts.json").read_text())
    assert sorted(prompts.values()) == ["a red cat", "a red cat!", "ein Kätzchen", "日本の猫"]
    assert len(set(prompts)) == 4
    assert "000-ein-kätzchen-" in " ".join(prompts) and "001-日本の猫-" in " ".join(prompts)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--height", "20000"), "--height 20000 is more than 4096 pixels"),
        (("--width", "36"), "--width 36 is not a multiple of 8"),
        (("--device", "tpu"), "unknown --device 'tpu'"),
    ],
)
def test_sample_refuses_what_the_model_cannot_do_up_front(cli, tmp_path, args, error):
    r = cli("sample", "x", "-o", tmp_path / "s", "--model", "tiny", *args, code=2)
    assert error in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "sample", "regset"])
@pytest.mark.parametrize("device", ["cuda", "tpu"])
def test_one_device_rule_for_every_command(cli, tmp_path, concept_dirs, command, device):
    cat, _ = concept_dirs
    args = {
        "train": ("train", cat, "--class-noun", "cat", "-o", tmp_path / "x.safetensors"),
        "sample": ("sample", "x", "-o", tmp_path / "x"),
        "regset": ("regset", "cat", "-o", tmp_path / "x"),
    }[command]
    r = cli(*args, "--model", "tiny", "--device", device, code=2)
    assert ("CUDA is not available here" if device == "cuda" else "unknown --device 'tpu'") in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_regset_and_sample_report_progress_off_a_terminal(cli, tmp_path):
    r = cli("regset", "cat", "-o", tmp_path / "r", "--n", "3", "--steps", "1", "--batch-size", "1", "--model", "tiny")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("generating ")]
    assert [ln.split(" it/s")[0].rsplit(" ", 1)[0] for ln in lines] == [
        "generating 1/3",
        "generating 2/3",
        "generating 3/3",
    ]
    r = cli("sample", "x", "-o", tmp_path / "s", "--model", "tiny", "--n", "2", "--steps", "1")
    assert [ln.split(" ")[1] for ln in r.stderr.splitlines() if ln.startswith("sampling ")] == ["1/2", "2/2"]


def test_a_safetensors_that_is_not_a_delta_says_what_it_is(cli, tmp_path):
    linear = torch.nn.Linear(100, 10)
    path = tmp_path / "linear.safetensors"
    save_file({k: v.detach().contiguous() for k, v in linear.state_dict().items()}, path)
    expected = (
        f"Error: {path}: not a delta: 2 entries (bias [10], weight [10, 100]), in none of the cdtool, "
        "official Custom Diffusion, diffusers or token-embedding layouts"
    )
    assert one_error(cli("info", path, code=1)) == expected
    assert one_error(cli("get-deltas", path, "-o", tmp_path / "d.safetensors", code=1)) == expected
    save_file({"x": torch.zeros(3, 4), "y": torch.zeros(7)}, tmp_path / "mixed.safetensors")
    assert "not a delta: 2 entries" in one_error(cli("info", tmp_path / "mixed.safetensors", code=1))
    # a real token embedding still reads, but must fit the base it is converted for
    save_file({"<new1>": torch.zeros(100)}, tmp_path / "wide.safetensors")
    r = cli("get-deltas", tmp_path / "wide.safetensors", "-o", tmp_path / "d.safetensors", "--base", "tiny", code=1)
    assert "token <new1> is 100 numbers wide; the token table of tiny is 32" in one_error(r)
    assert not (tmp_path / "d.safetensors").exists()


def test_a_file_without_layers_is_a_runtime_error(cli, tmp_path):
    save_file({"<new1>": torch.zeros(32)}, tmp_path / "emb.safetensors")
    r = cli("compress", tmp_path / "emb.safetensors", "-o", tmp_path / "c.safetensors", code=1)
    assert one_error(r) == f"Error: {tmp_path / 'emb.safetensors'} has no layers to compress (tokens only)"

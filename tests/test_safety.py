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
from helpers import one_error, write_concept_folder
from PIL import Image
from safetensors.torch import save_file

from cdtool.delta.file import write_cdtool
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


# (the input, the output, the error line; given the photos folder)
OUTPUTS_ON_INPUTS = {
    "the-input": (
        lambda p: p,
        lambda p: p,
        lambda p: f"Error: --output {p} is also an input; write the output somewhere else",
    ),
    "inside-the-input": (
        lambda p: p,
        lambda p: p / "prepped",
        lambda p: f"Error: --output {p / 'prepped'} is inside the input {p}; write the output somewhere else",
    ),
    "holding-the-input": (
        lambda p: f"{p}/*.png",
        lambda p: p,
        lambda p: f"Error: --output {p} holds the input {p / 'p0.png'}; write the output somewhere else",
    ),
}


@pytest.mark.parametrize("case", list(OUTPUTS_ON_INPUTS))
def test_prep_never_replaces_its_inputs(cli, tmp_path, case):
    given, output, error = OUTPUTS_ON_INPUTS[case]
    photos = _photos(tmp_path / "photos")
    before = _tree(photos)
    r = cli("prep", given(photos), "-o", output(photos), *PREP, "--force", code=1)
    assert one_error(r) == error(photos)
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
    assert json.loads((out / ".cdtool-output.json").read_text())["command"] == "prep"
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
    from cdtool.delta.file import delta_tensors

    return delta_tensors(delta)


def test_export_keeps_every_file_inside_the_output_whatever_the_name(tmp_path, make_delta):
    from cdtool.export.folder import export

    d = make_delta()
    d.tokens = {"../escape": d.tokens["<new1>"]}
    (tmp_path / "out").mkdir()
    export(d, "diffusers-lora", tmp_path / "out", None)  # the token's file is named from a safe stem
    assert (tmp_path / "out" / "escape.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    from cdtool.atomic import inside

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


# ---- training runs -------------------------------------------------------------------------------

TRAIN = ("--model", "tiny", "--batch-size", "1", "--device", "cpu", "-q", "--checkpoint-every", "1")


def _steps(run):
    return [p.name for p in sorted((run / "checkpoints").iterdir())]


def test_a_stale_run_folder_is_replaced_never_continued(cli, tmp_path, concept_dirs):
    cat, _ = concept_dirs
    run = tmp_path / "shared.run"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cli("train", cat, "--class-noun", "cat", "-o", a, *TRAIN, "--steps", "4", "--run-dir", run)
    assert _steps(run) == ["step-000003", "step-000004"]
    (run / "notes.txt").write_text("mine")
    r = cli("train", cat, "--class-noun", "dog", "-o", b, *TRAIN, "--steps", "2", "--run-dir", run, "--force", code=1)
    assert "holds files cdtool train did not write (notes.txt)" in one_error(r)
    (run / "notes.txt").unlink()
    cli("train", cat, "--class-noun", "dog", "-o", b, *TRAIN, "--steps", "2", "--run-dir", run, "--force")
    assert _steps(run) == ["step-000001", "step-000002"]  # the new run's, not the old one's
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "config.json").read_text())["config"]["output"] == str(b)
    # the run folder alone is enough to continue it; the delta it wrote is its own to replace
    before = b.read_bytes()
    r = cli("train", "--resume", run, "--steps", "3", "--json")
    assert json.loads(r.stdout)["steps"] == 3 and b.read_bytes() != before
    assert len((run / "log.jsonl").read_text().splitlines()) == 3
    r = cli("train", "--resume", run, "--steps", "4", "--lr", "0.01", "--class-noun", "cat", code=2)
    assert "--class-noun" in r.stderr  # --class-noun describes DATA, which is not given
    r = cli("train", "--resume", run, "--steps", "4", "--lr", "0.01", "--batch-size", "3", code=1)
    assert one_error(r) == (
        f"Error: {run} was trained with other settings: --batch-size 3 (the run: 1); --lr 0.01 (the run: 1e-05); "
        "leave them out to continue the run as it was"
    )
    # a delta this run did not write is not replaced on resume without --force
    a_bytes = a.read_bytes()
    r = cli("train", "--resume", run, "--steps", "4", "-o", a, code=1)
    assert one_error(r) == f"Error: {a} already exists; pass --force to overwrite it"
    assert a.read_bytes() == a_bytes


def test_a_malicious_checkpoint_is_refused_in_one_line(cli, tmp_path, concept_dirs):
    import pickle

    cat, _ = concept_dirs
    out = tmp_path / "c.safetensors"
    cli("train", cat, "--class-noun", "cat", "-o", out, *TRAIN, "--steps", "1")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = tmp_path / "c.run" / "checkpoints" / "step-000001" / "state.pt"
    state.write_bytes(pickle.dumps({"step": 1, "params": Evil()}))
    r = cli("train", "--resume", tmp_path / "c.run", "--steps", "2", code=1)
    assert one_error(r) == (
        f"Error: {state}: refused: the pickle holds more than tensors (possibly code), and cdtool opens "
        "pickles only as plain tensors; convert it to safetensors where you trust it"
    )
    assert "weights_only" not in r.stderr and not marker.exists()
    r = cli("get-deltas", state.parent, "-o", tmp_path / "x.safetensors", code=1)
    assert "refused: the pickle holds more than tensors" in one_error(r) and not marker.exists()


# ---- every image reader names the file -----------------------------------------------------------


def test_corrupt_and_oversized_images_are_named(cli, tmp_path, concept_dirs, monkeypatch):
    cat, _ = concept_dirs
    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (32, 32), "red").save(samples / "a.png")
    (samples / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 64)
    (samples / "prompts.json").write_text(json.dumps({"a.png": "a red square", "b.jpg": "a red square"}))
    score = ("score", samples, "--metrics", "clip-t", "--clip-model", "cdtool-tiny", "--clip-pretrained", "none")
    r = cli(*score, code=1)
    assert one_error(r).startswith(f"Error: {samples / 'b.jpg'}: not a readable image (")
    (samples / "b.jpg").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 and 80x80 images are now "bombs"
    r = cli(*score, code=1)
    assert one_error(r).startswith(
        f"Error: {samples / 'a.png'}: not a readable image (refused as a possible decompression bomb"
    )
    r = cli("train", cat, "--class-noun", "cat", "-o", tmp_path / "x.safetensors", "--model", "tiny", code=1)
    assert one_error(r).startswith(f"Error: {cat / '00.png'}: not a readable image (refused as a possible")


# ---- how outputs are written ---------------------------------------------------------------------


def test_outputs_respect_the_umask(cli, tmp_path, make_delta):
    from cdtool.atomic import atomic_path

    src = tmp_path / "d.safetensors"
    write_cdtool(make_delta(), src)
    old = os.umask(0o027)
    try:
        cli("compress", src, "-o", tmp_path / "c.safetensors", "--rank", "2")
        cli("export", src, "--to", "diffusers-lora", "-o", tmp_path / "lora")
        with atomic_path(tmp_path / "plain.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "lora").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "lora" / "pytorch_lora_weights.safetensors").stat().st_mode) == 0o640


def test_an_output_written_meanwhile_is_a_conflict(cli, tmp_path, make_delta, monkeypatch):
    from cdtool.merge import deltas as merge_lib

    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_cdtool(make_delta(seed=1), a)
    write_cdtool(make_delta(token="<new2>", seed=2), b)
    original = merge_lib.sum_deltas

    def the_other_merge_finishes_first(*args, **kwargs):  # a second `cdtool merge -o m.safetensors`
        out.write_bytes(b"the other merge's result")
        return original(*args, **kwargs)

    monkeypatch.setattr(merge_lib, "sum_deltas", the_other_merge_finishes_first)
    for force in ((), ("--force",)):
        out.unlink(missing_ok=True)
        r = cli("merge", a, b, "-o", out, "--method", "sum", *force, code=1)
        assert one_error(r) == (
            f"Error: {out} was written by another command while this one ran; it was kept and nothing was "
            "replaced (run again with --force to replace it)"
        )
        assert out.read_bytes() == b"the other merge's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "m.safetensors"]


def test_claims_refuse_before_the_work(tmp_path):
    from cdtool.atomic import claim_output

    out = claim_output(tmp_path / "new" / "x.safetensors", "merge", False)
    assert not out.existed and not (tmp_path / "new").exists()  # nothing is created before the end
    with out.staged() as tmp:
        tmp.write_bytes(b"1")
    assert (tmp_path / "new" / "x.safetensors").read_bytes() == b"1"
    with pytest.raises(CdtoolError, match="already exists; pass --force to overwrite it"):
        claim_output(tmp_path / "new" / "x.safetensors", "merge", False)
    with pytest.raises(CdtoolError, match="is a folder; give a file name"):
        claim_output(tmp_path / "new", "merge", True)
    with pytest.raises(RuntimeError):  # a failure inside leaves no empty folders behind
        with claim_output(tmp_path / "a" / "b", "export", False, folder=True).staged() as stage:
            (stage / "f").write_text("x")
            raise RuntimeError
    assert not (tmp_path / "a").exists()
    # a folder output holding another command's output (demo's prep folders) is still its own
    with claim_output(tmp_path / "demo", "demo", False, folder=True).staged() as stage:
        with claim_output(stage / "data", "prep", False, folder=True).staged() as inner:
            (inner / "x.png").write_bytes(b"x")
    assert claim_output(tmp_path / "demo", "demo", True, folder=True).existed


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write into, root included (chattr +i where available)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("needs chattr to make a folder read-only for root")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_a_read_only_output_is_named_before_the_work(cli, tmp_path, make_delta, read_only):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_cdtool(make_delta(seed=1), a)
    write_cdtool(make_delta(token="<new2>", seed=2), b)
    out = read_only / "m.safetensors"
    for args in (("merge", a, b, "-o", out), ("compress", a, "-o", out, "--rank", "2")):
        r = cli(*args, code=1)
        assert one_error(r).startswith(f"Error: cannot write {out}: {read_only} is not writable (")
        assert "reading" not in r.stderr  # refused before any base weight was read
    r = cli("sample", "x", "-o", read_only / "s", "--model", "tiny", code=1)
    assert one_error(r).startswith(f"Error: cannot write {read_only / 's' / 'prompts.json'}: {read_only} is not")


def test_moving_into_place_never_replaces_without_renameat2(tmp_path, monkeypatch):
    import cdtool.atomic as atomic

    monkeypatch.setattr(atomic, "_renameat2_noreplace", lambda src, dst: False)  # the portable way
    for make in (lambda p: p.write_text("new"), lambda p: p.mkdir()):
        src, dst = tmp_path / "src", tmp_path / "dst"
        make(src)
        dst.write_text("theirs")
        with pytest.raises(FileExistsError):
            atomic.rename_noreplace(src, dst)
        assert dst.read_text() == "theirs" and src.exists()
        dst.unlink()
        atomic.rename_noreplace(src, dst)
        assert dst.exists() and not src.exists()
        if dst.is_dir():
            dst.rmdir()
        else:
            dst.unlink()

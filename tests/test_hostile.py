"""cdtool against hostile inputs and hostile conditions: numbers that are not finite or of the wrong
shape, signals sent to real processes, concurrent commands on one output, `--force` next to the
user's own entries, a full disk, names with control characters, and merges that must give the same
bytes twice. Every failure is one line naming what is wrong, and nothing is left half-written."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import one_error, write_concept_folder
from PIL import Image
from safetensors.torch import save_file

from cdtool.delta.file import delta_metadata, delta_tensors, write_cdtool
from cdtool.errors import CdtoolError

LAYER = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # 64x32 in the tiny model


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _no_unexpected(result) -> None:
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def _crafted(path: Path, make_delta, change) -> Path:
    """A cdtool delta whose tensors `change` rewrote (the metadata kept)."""
    d = make_delta()
    tensors = delta_tensors(d)
    change(tensors)
    save_file(tensors, str(path), metadata=delta_metadata(d))
    return path


def _set(key: str, value):
    return lambda t: t.__setitem__(key, value)


def _poke(key: str, value: float):
    def change(t):
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value

    return change


def _low_rank(rank_up: int, rank_down: int):
    def change(t):
        w = t.pop(f"{LAYER}.delta")
        t[f"{LAYER}.up"] = torch.randn(w.shape[0], rank_up)
        t[f"{LAYER}.down"] = torch.randn(rank_down, w.shape[1])

    return change


# ---- 1. numbers are checked where they enter ----------------------------------------------------

# (change, the error after "Error: FILE: ")
BAD_TENSORS = {
    "nan-layer": (_poke(f"{LAYER}.delta", float("nan")), f"tensor {LAYER}.delta holds 1 NaN value (of 2048)"),
    "inf-layer": (_poke(f"{LAYER}.delta", float("inf")), f"tensor {LAYER}.delta holds 1 infinite value (of 2048)"),
    "nan-token": (_poke("token.<new1>", float("nan")), "tensor token.<new1> holds 1 NaN value (of 32)"),
    "int8-layer": (
        _set(f"{LAYER}.delta", torch.ones(64, 32, dtype=torch.int8)),
        f"tensor {LAYER}.delta holds int8 numbers; a delta holds floating-point numbers",
    ),
    "3d-layer": (
        _set(f"{LAYER}.delta", torch.zeros(2, 64, 32)),
        f"tensor {LAYER}.delta has shape [2, 64, 32]; the format gives it the shape [out, in]",
    ),
    "3d-token": (
        _set("token.<new1>", torch.zeros(1, 1, 32)),
        "tensor token.<new1> has shape [1, 1, 32]; the format gives it the shape [vectors, width]",
    ),
    "ranks-differ": (_low_rank(4, 3), f"layer {LAYER}: up [64, 4] and down [3, 32] are of different ranks"),
    "bias-length": (
        _set(f"{LAYER}.bias", torch.zeros(7)),
        f"tensor {LAYER}.bias has 7 numbers; its layer has 64 outputs",
    ),
}


def _command(name: str, src: Path, good: Path, out: Path) -> tuple:
    return {
        "merge": ("merge", good, src, "-o", out / "m.safetensors", "--method", "sum"),
        "compress": ("compress", src, "-o", out / "c.safetensors", "--rank", "2", "--json"),
        "export": ("export", src, "--to", "diffusers-lora", "-o", out / "lora"),
        "sample": ("sample", "a <new1> cat", "-d", src, "-o", out / "s", "--model", "tiny", "--steps", "1"),
        "get-deltas": ("get-deltas", src, "-o", out / "g.safetensors"),
        "info": ("info", src, "--json"),
    }[name]


@pytest.fixture
def good_delta(tmp_path, make_delta):
    path = tmp_path / "in" / "good.safetensors"
    path.parent.mkdir()
    write_cdtool(make_delta(token="<new2>", seed=5), path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
@pytest.mark.parametrize("command", ["merge", "compress", "export", "sample", "get-deltas", "info"])
def test_bad_numbers_are_one_error_naming_file_and_tensor(cli, tmp_path, make_delta, good_delta, case, command):
    change, error = BAD_TENSORS[case]
    src = _crafted(tmp_path / "in" / f"{case}.safetensors", make_delta, change)
    out = tmp_path / "out"
    out.mkdir()
    r = cli(*_command(command, src, good_delta, out), code=1)
    assert one_error(r).startswith(f"Error: {src}: {error}")
    assert r.stdout == "" and _listing(out) == []  # nothing on stdout (not even --json), nothing written
    _no_unexpected(r)


def test_an_official_file_is_checked_before_its_numbers_are_cast(cli, tmp_path):
    path = tmp_path / "delta.bin"
    torch.save({"unet": {}, "modifier_token": {"<new1>": torch.ones(32, dtype=torch.int8)}}, path)
    r = cli("info", path, code=1)
    assert one_error(r) == (
        f"Error: {path}: tensor modifier_token.<new1> holds int8 numbers; a delta holds floating-point numbers "
        "(float16, bfloat16, float32 or float64)"
    )
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    torch.save({"unet": {f"{name}.weight": torch.full((64, 32), float("inf"))}, "modifier_token": {}}, path)
    r = cli("get-deltas", path, "-o", tmp_path / "x.safetensors", "--model", "tiny", code=1)
    assert one_error(r).startswith(f"Error: {path}: tensor unet.{name}.weight holds 2048 infinite values")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("command", ["merge", "sample", "get-deltas", "export", "compress"])
@pytest.mark.parametrize("case", ["layer", "token"])
def test_shapes_are_checked_against_the_base(cli, tmp_path, make_delta, good_delta, command, case):
    if case == "layer":
        change, error = _set(f"{LAYER}.delta", torch.zeros(16, 32)), f"layer {LAYER} is 16x32; in the base model"
    else:
        change, error = _set("token.<new1>", torch.zeros(1, 48)), "token <new1> is 48 numbers wide; the token table"
    src = _crafted(tmp_path / "in" / "wrong.safetensors", make_delta, change)
    out = tmp_path / "out"
    out.mkdir()
    args = {  # the commands where the base is loaded (compress: for a .bin; export: for its official layout)
        "merge": ("merge", good_delta, src, "-o", out / "m.safetensors"),
        "sample": ("sample", "x", "-d", src, "-o", out / "s", "--model", "tiny", "--steps", "1"),
        "get-deltas": ("get-deltas", src, "-o", out / "g.bin"),
        "export": ("export", src, "--to", "official", "-o", out / "delta.bin"),
        "compress": ("compress", src, "-o", out / "c.bin", "--rank", "2"),
    }[command]
    r = cli(*args, code=1)
    line = one_error(r)
    assert line.startswith(f"Error: {src}: {error}"), line
    assert _listing(out) == []
    _no_unexpected(r)


# options with a range (click's) refuse NaN for being out of it; the others name what is wrong
NUMBER_OPTIONS = [
    (("sample", "x", "--guidance", "nan"), "Error: Invalid value for '--guidance': Input should be greater than"),
    (("sample", "x", "--guidance", "inf"), "Error: --guidance inf: give a finite number"),
    (("sample", "x", "--guidance", "-1"), "Error: Invalid value for '--guidance'"),
    (("regset", "cat", "--guidance", "inf"), "Error: --guidance inf: give a finite number"),
    (("train", "DATA", "--lr", "nan"), "Error: --lr nan: give a finite number"),
    (("train", "DATA", "--lr", "0"), "Error: --lr 0: give a number above zero"),
    (("train", "DATA", "--lr", "-1e-5"), "Error: --lr -1e-05: give a number above zero"),
    (("train", "DATA", "--text-encoder-lr", "inf"), "Error: --text-encoder-lr inf: give a finite number"),
    (("train", "DATA", "--lora-alpha", "nan"), "Error: --lora-alpha nan: give a finite number"),
    (("train", "DATA", "--prior-weight", "nan"), "Error: Invalid value for '--prior-weight'"),
    (("train", "DATA", "--prior-weight", "inf"), "Error: --prior-weight inf: give a finite number"),
    (("train", "DATA", "--dvar-eps", "0"), "Error: --dvar-eps 0: give a number above zero"),
    (("demo", "--lr", "nan"), "Error: --lr nan: give a finite number"),
    (("compress", "IN", "--energy", "nan"), "Error: Invalid value for '--energy'"),
    (("merge", "IN", "IN2", "--method", "least-squares", "--base-weight", "inf"), "Error: --base-weight inf: give a"),
]


@pytest.mark.parametrize(("args", "error"), NUMBER_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in NUMBER_OPTIONS])
def test_number_options_are_usage_errors(cli, tmp_path, concept_dirs, good_delta, args, error):
    subst = {"DATA": concept_dirs[0], "IN": good_delta, "IN2": good_delta.with_name("x.safetensors")}
    args = tuple(subst.get(a, a) for a in args)
    out = tmp_path / "out"
    r = cli(*args, "-o", out / ("x.safetensors" if args[0] in ("train", "compress", "merge") else "x"), code=2)
    assert error in r.stderr, r.stderr
    assert not out.exists()
    _no_unexpected(r)


SCALES = [
    ("nan", "Error: {f}:nan: the scale nan is not a finite number"),
    ("inf", "Error: {f}:inf: the scale inf is not a finite number"),
    ("-inf", "Error: {f}:-inf: the scale -inf is not a finite number"),
    ("abc", "Error: {f}:abc: the scale after the colon must be a number, as in {f}:0.8"),
    ("", "Error: {f}: ends in a colon; give a scale after it, as in {f}:0.8"),
]


@pytest.mark.parametrize(("scale", "error"), SCALES, ids=[s or "empty" for s, _ in SCALES])
@pytest.mark.parametrize("command", ["merge", "merge+", "sample"])
def test_file_weights_are_usage_errors(cli, tmp_path, good_delta, command, scale, error):
    other = tmp_path / "in" / "other.safetensors"
    other.write_bytes(b"")
    spec = f"{good_delta}:{scale}"
    args = {
        "merge": ("merge", spec, other, "-o", tmp_path / "m.safetensors"),
        "merge+": ("merge", f"{spec}+{other}", "-o", tmp_path / "m.safetensors"),
        "sample": ("sample", "x", "-d", spec, "-o", tmp_path / "s", "--model", "tiny"),
    }[command]
    r = cli(*args, code=2)
    assert one_error(r) == error.format(f=good_delta)
    assert _listing(tmp_path) == ["in"]


def test_a_least_squares_weight_must_be_above_zero(cli, tmp_path, good_delta, make_delta):
    other = tmp_path / "in" / "cat.safetensors"
    write_cdtool(make_delta(seed=3), other)
    r = cli("merge", f"{good_delta}:0", other, "--method", "least-squares", "-o", tmp_path / "m.safetensors", code=2)
    assert one_error(r) == f"Error: {good_delta}:0: a least-squares weight must be above zero"


def test_overflowing_scales_write_nothing(cli, tmp_path, good_delta, make_delta):
    other = tmp_path / "in" / "cat.safetensors"
    write_cdtool(make_delta(seed=3), other)
    out = tmp_path / "out"
    out.mkdir()
    r = cli("merge", f"{good_delta}:1e300", other, "--method", "sum", "-o", out / "m.safetensors", code=1)
    assert one_error(r).startswith(f"Error: refusing to write {out / 'm.safetensors'}: its tensor unet.")
    assert "would hold non-finite values" in r.stderr
    r = cli("sample", "x", "-d", f"{good_delta}:1e300", "-o", out / "s", "--model", "tiny", "--steps", "1", code=1)
    assert one_error(r).startswith(f"Error: {good_delta} at scale 1e+300: the weights of layer unet.")
    assert "would overflow (the change reaches 3.38e+298); use a smaller scale" in r.stderr
    assert _listing(out) == []


def test_sample_never_draws_non_finite_pixels(tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from cdtool.sampling.generate import generate, plan_jobs

    def pipe(**kw):  # a model whose output overflowed
        return SimpleNamespace(images=np.full((len(kw["prompt"]), 8, 8, 3), np.nan, np.float32))

    pipe.unet = SimpleNamespace(device="cpu", dtype=torch.float32, config=SimpleNamespace(in_channels=4))
    pipe.vae_scale_factor = 8
    with pytest.raises(CdtoolError, match=r"the model made non-finite pixels for 'x' \(seed 0\); nothing was written"):
        next(generate(pipe, plan_jobs(["x"], 1, 0), steps=1, guidance=1, height=8, width=8, batch_size=1,
                      negative_prompt=None))  # fmt: skip


# ---- real processes: a command paused at a chosen call, then signalled or raced ------------------

# Runs `cdtool ARGS` with MODULE.FUNCTION paused before its CALL-th call: it touches READY, then
# waits for GO (or a signal) before making that call. Ctrl-C reaches it as it reaches a command typed
# in a terminal, even when the tests themselves run in the background, where SIGINT starts ignored.
PAUSED = """
import importlib, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
module, name, call, ready, go = sys.argv[1:6]
target = importlib.import_module(module)
original = getattr(target, name)
calls = [0]

def paused(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(call):
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.02)
    return original(*args, **kwargs)

setattr(target, name, paused)
sys.argv = ["cdtool", *sys.argv[6:]]
from cdtool.cli import main
main()
"""


class Paused:
    """`cdtool ARGS` in a process of its own, paused at `where` (module.function) until `go()`."""

    def __init__(self, tmp_path: Path, where: str, *args, call: int = 1) -> None:
        module, _, name = where.rpartition(".")
        self.ready, self.go_file = tmp_path / f"ready-{id(self)}", tmp_path / f"go-{id(self)}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        argv = [sys.executable, "-c", PAUSED, module, name, str(call), str(self.ready), str(self.go_file)]
        self.proc = subprocess.Popen(
            [*argv, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"ended before the pause ({self.proc.returncode}):\n{self.proc.stderr.read()}")
            assert time.monotonic() < deadline, "never reached the pause"
            time.sleep(0.05)

    def go(self) -> None:
        self.go_file.touch()

    def end(self, sig: int | None = None) -> tuple[int, str, str]:
        if sig is not None:
            self.proc.send_signal(sig)
        else:
            self.go()
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, out, err


@pytest.fixture
def paused(tmp_path):
    """Starts `Paused` commands and waits for their pause; kills any still running at the end."""
    runs: list[Paused] = []

    def start(where: str, *args, call: int = 1) -> Paused:
        runs.append(Paused(tmp_path, where, *args, call=call))
        runs[-1].wait_ready()
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def _dot_files(folder: Path) -> list[str]:
    """Hidden entries under `folder` (temporaries, locks, set-aside outputs), manifests aside."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".cdtool-output.json")


# ---- 2. every ending signal cleans up; the next command removes what a kill left -----------------


@pytest.fixture
def two_deltas(tmp_path, make_delta):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_cdtool(make_delta(seed=1), a)
    write_cdtool(make_delta(token="<new2>", seed=2), b)
    return a, b


@pytest.mark.parametrize(
    ("sig", "line"),
    [
        (signal.SIGTERM, "Interrupted (SIGTERM)."),
        (signal.SIGHUP, "Interrupted (SIGHUP)."),
        (signal.SIGINT, "Interrupted."),
    ],
)
def test_ending_signals_clean_up_like_ctrl_c(paused, tmp_path, two_deltas, sig, line):
    a, b = two_deltas
    out = tmp_path / "out" / "m.safetensors"
    run = paused("cdtool.atomic.publish", "merge", a, b, "--method", "sum", "-o", out)
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # the staged file is there
    code, stdout, stderr = run.end(sig)
    assert (code, stdout) == (128 + sig, "")
    assert stderr.splitlines()[-1] == line and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # not even the folder it made


@pytest.mark.parametrize("command", ["export", "prep"])
def test_sigterm_leaves_no_staged_folder(paused, tmp_path, two_deltas, command):
    a, _ = two_deltas
    photos = write_concept_folder(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    args = {
        "export": ("export", a, "--to", "checkpoint", "-o", out / "ckpt", "--model", "tiny"),
        "prep": ("prep", photos, "-o", out / "data", "--class-noun", "cat", "--size", "32"),
    }[command]
    run = paused("cdtool.atomic.publish", *args)
    assert _dot_files(out)
    code, _, stderr = run.end(signal.SIGTERM)
    assert code == 143 and stderr.splitlines()[-1] == "Interrupted (SIGTERM)."
    assert _listing(out) == []


def test_an_interrupted_demo_leaves_no_folder_and_says_so_once(paused, tmp_path):
    """The demo runs its steps as commands in its process: the step that was running reports the
    signal, the demo ends with it, and its half-built folder is gone."""
    out = tmp_path / "demo"
    run = paused("cdtool.atomic.publish", "demo", "-o", out, "--reg-images", 1, "--steps", 1)
    code, stdout, stderr = run.end(signal.SIGTERM)
    assert code == 143 and stdout == ""
    assert stderr.count("Interrupted (SIGTERM).") == 1 and "Traceback" not in stderr
    assert not out.exists() and _dot_files(tmp_path) == []


def test_what_a_killed_command_left_is_removed_by_the_next(paused, cli, tmp_path, two_deltas):
    a, b = two_deltas
    out = tmp_path / "m.safetensors"
    run = paused("cdtool.atomic.publish", "merge", a, b, "--method", "sum", "-o", out)
    code, _, _ = run.end(signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".m.safetensors.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and (tmp_path / ".m.safetensors.lock").exists()
    r = cli("merge", a, b, "--method", "sum", "-o", out)
    assert f"Warning: removed {left[0]}, left by an interrupted command" in r.stderr
    assert out.is_file() and _dot_files(tmp_path) == []


def test_an_output_set_aside_by_a_killed_command_is_put_back(cli, tmp_path, two_deltas):
    a, _ = two_deltas
    out = tmp_path / "lora"
    cli("export", a, "--to", "diffusers-lora", "-o", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    aside = tmp_path / ".lora.old-abcd1234"
    out.rename(aside)  # where a command killed between its two renames leaves it
    r = cli("export", a, "--to", "diffusers-lora", "-o", out, code=1)
    assert f"Warning: {out}: put back from .lora.old-abcd1234" in r.stderr
    assert one_error(r) == f"Error: {out} already exists; pass --force to replace it"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _dot_files(tmp_path) == []


SAMPLE4 = ("sample", "a red cat", "--model", "tiny", "--n", "4", "--steps", "1")


def test_an_interrupted_sample_folder_records_what_it_made_and_resumes(paused, cli, tmp_path):
    out = tmp_path / "s"
    run = paused("cdtool.sampling.generate.save_png", *SAMPLE4, "-o", out, call=3)  # two images made
    code, _, stderr = run.end(signal.SIGTERM)
    assert code == 143 and "Traceback" not in stderr
    assert f"Warning: {out}: 2 of 4 images made; prompts.json records them; the same command makes the rest" in stderr
    images = sorted(p.name for p in out.glob("*.png"))
    assert len(images) == 2 and sorted(json.loads((out / "prompts.json").read_text())) == images
    r = cli(*SAMPLE4, "-o", out, "--json")
    doc = json.loads(r.stdout)
    assert doc["skipped"] == images and len(doc["generated"]) == 2
    assert len(json.loads((out / "prompts.json").read_text())) == 4 and _dot_files(out) == []


def test_a_killed_sample_leaves_nothing_the_next_run_keeps(paused, cli, tmp_path):
    out = tmp_path / "s"
    run = paused("cdtool.atomic.publish", *SAMPLE4, "-o", out, call=2)  # the second image, staged
    run.end(signal.SIGKILL)
    (left,) = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    r = cli(*SAMPLE4, "-o", out, "--json")
    assert f"Warning: removed {left}, left by an interrupted command" in r.stderr
    assert len(json.loads(r.stdout)["skipped"]) == 1 and _dot_files(out) == []


# ---- 3. one command per output: the second is a conflict, the first's output stays ---------------


def _conflict(path: Path, pid: int) -> str:
    return (
        f"Error: {path} is being written by another cdtool command (process {pid}); wait for it to end, or "
        "choose another --output"
    )


def test_two_compress_force_to_one_output(paused, cli, tmp_path, two_deltas):
    a, _ = two_deltas
    out = tmp_path / "c.safetensors"
    cli("compress", a, "-o", out, "--rank", "1")
    earlier = out.read_bytes()
    first = paused("cdtool.atomic.publish", "compress", a, "-o", out, "--rank", "2", "--force")
    r = cli("compress", a, "-o", out, "--rank", "3", "--force", code=1)
    assert one_error(r) == _conflict(out, first.proc.pid)
    assert out.read_bytes() == earlier  # the second touched nothing
    code, stdout, _ = first.end()
    assert (code, stdout) == (0, f"{out}\n")
    from cdtool.delta.importers import read_delta

    assert {layer.rank for layer in read_delta(out).layers.values()} == {2} and _dot_files(tmp_path) == []


TRAIN1 = ("--class-noun", "cat", "--model", "tiny", "--steps", "1", "--batch-size", "1", "--no-samples", "-q")


@pytest.mark.parametrize("shared", ["output", "run-dir", "run-dir-force"])
def test_two_trainings_on_one_output_or_run_folder(paused, cli, tmp_path, concept_dirs, shared):
    cat, _ = concept_dirs
    run_dir = tmp_path / "shared.run"
    first_args = ("-o", tmp_path / "a.safetensors", "--run-dir", run_dir)
    second_args = {
        "output": ("-o", tmp_path / "a.safetensors", "--run-dir", tmp_path / "other.run"),
        "run-dir": ("-o", tmp_path / "b.safetensors", "--run-dir", run_dir),
        "run-dir-force": ("-o", tmp_path / "b.safetensors", "--run-dir", run_dir, "--force"),
    }[shared]
    first = paused("cdtool.atomic.publish", "train", cat, *TRAIN1, *first_args)  # its first file
    r = cli("train", cat, *TRAIN1, *second_args, code=1)
    assert one_error(r) == _conflict(tmp_path / "a.safetensors" if shared == "output" else run_dir, first.proc.pid)
    code, _, stderr = first.end()
    assert code == 0, stderr
    assert {"config.json", "log.jsonl", "delta.safetensors"} <= set(_listing(run_dir))
    assert (tmp_path / "a.safetensors").is_file() and not (tmp_path / "other.run").exists()


def test_two_samples_into_one_folder(paused, cli, tmp_path):
    out = tmp_path / "s"
    first = paused("cdtool.sampling.generate.save_png", *SAMPLE4, "-o", out)
    r = cli(*SAMPLE4, "-o", out, code=1)
    assert one_error(r) == _conflict(out, first.proc.pid)
    code, _, _ = first.end()
    assert code == 0 and len(list(out.glob("*.png"))) == 4


def test_a_lock_names_its_holder_and_is_gone_after(tmp_path):
    from cdtool import locks
    from cdtool.atomic import claim_output

    out = tmp_path / "new" / "x.safetensors"
    hold = (
        "import sys, time; from pathlib import Path; from cdtool import locks; "
        "locks.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(CdtoolError) as e:
        claim_output(out, "merge", False)
    assert f"Error: {e.value}" == _conflict(out, holder.pid)
    holder.communicate("")  # it ends without releasing: the system drops its lock, its file stays
    assert _listing(tmp_path) == [".new.lock"]
    claim = claim_output(out, "merge", False)
    with claim.staged() as tmp:
        tmp.write_bytes(b"x")
    assert _listing(tmp_path) == ["new"] and _listing(tmp_path / "new") == ["x.safetensors"]
    assert locks.held() == 0


# ---- 4. --force and outputs never touch what the user put there ----------------------------------


def test_force_refuses_links_and_empty_folders_added_to_an_output(cli, tmp_path, two_deltas):
    a, _ = two_deltas
    out = tmp_path / "lora"
    cli("export", a, "--to", "diffusers-lora", "-o", out)
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (out / "my-link").symlink_to(elsewhere)
    (out / "my-file-link").symlink_to(a)
    (out / "keep").mkdir()
    r = cli("export", a, "--to", "diffusers-lora", "-o", out, "--force", code=1)
    assert one_error(r) == (
        f"Error: {out} holds files cdtool export did not write (keep/, my-file-link, my-link); move them away "
        "or choose another --output"
    )
    assert (out / "my-link").is_symlink() and (out / "keep").is_dir() and (out / "my-file-link").is_symlink()


def test_a_run_folder_with_links_added_is_not_a_run_folder_to_replace(tmp_path):
    from cdtool.train.runs import foreign_files

    run = tmp_path / "x.run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert foreign_files(run) == []
    (run / "data").symlink_to(tmp_path)
    (run / "empty").mkdir()
    assert foreign_files(run) == ["data", "empty/"]


def test_an_encoder_folder_with_links_added_is_not_an_encoder_folder_to_replace(tmp_path):
    from cdtool.instant.folder import SETTINGS, WEIGHTS, foreign_files

    folder = tmp_path / "cat-encoder"
    folder.mkdir()
    (folder / SETTINGS).write_text("{}")
    (folder / WEIGHTS).write_bytes(b"")
    (folder / f".{WEIGHTS}.x.tmp").write_bytes(b"")
    assert foreign_files(folder) == []
    (folder / "data").symlink_to(tmp_path)
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("mine")
    assert foreign_files(folder) == ["data", "empty/", "notes.txt"]


def test_export_force_through_a_link_leaves_nothing_aside(cli, tmp_path, two_deltas):
    a, b = two_deltas
    real, link = tmp_path / "v1", tmp_path / "latest"
    cli("export", a, "--to", "diffusers-lora", "-o", real)
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    link.symlink_to(real)
    cli("export", b, "--to", "diffusers-lora", "-o", link, "--force")
    assert link.is_dir() and not link.is_symlink()  # the link gave way to the new folder
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before  # what it pointed to is kept
    assert _dot_files(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"my-photo.png": "my caption"}', "names images that cdtool sample did not make"),
        ('["a", "b"]', "holds a JSON list; it should map image file names to prompts"),
        ("{not json", "not valid JSON"),
    ],
)
def test_sample_keeps_a_prompts_json_it_did_not_write(cli, tmp_path, content, why):
    out = tmp_path / "s"
    out.mkdir()
    (out / "prompts.json").write_text(content)
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--n", "1", "--steps", "1", code=1)
    line = one_error(r)
    assert line.startswith(f"Error: {out / 'prompts.json'}: ") and why in line
    assert line.endswith(
        "cdtool sample keeps its own prompts.json there: move that file away, pass --force to replace it, or "
        "choose another --output"
    )
    assert _listing(out) == ["prompts.json"] and (out / "prompts.json").read_text() == content
    r = cli("sample", "x", "-o", out, "--model", "tiny", "--n", "1", "--steps", "1", "--force")
    assert "was not written by cdtool sample; replacing it (--force)" in r.stderr
    assert list(json.loads((out / "prompts.json").read_text()).values()) == ["x"]


# ---- 5. errors that say what to do ---------------------------------------------------------------


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A small tmpfs filled to the last byte (root and mount(2) needed: skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path_factory.mktemp("full")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("this machine does not let tests mount a tmpfs")
    try:
        with (where / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


FULL = "the disk is full; free some space or choose another --output"
SCORE_CLIP = ("--metrics", "clip-t", "--clip-model", "cdtool-tiny", "--clip-pretrained", "none")


def _ten_commands(tmp_path, a, b, concept, samples):
    return {
        "merge": (("merge", a, b, "--method", "sum", "-o", "{D}/m.safetensors"), "{D}/m.safetensors"),
        "compress": (("compress", a, "-o", "{D}/c.safetensors", "--rank", "2"), "{D}/c.safetensors"),
        "export": (("export", a, "--to", "diffusers-lora", "-o", "{D}/lora"), "{D}/lora"),
        "get-deltas": (("get-deltas", a, "-o", "{D}/g.bin", "--model", "tiny"), "{D}/g.bin"),
        "prep": (("prep", concept, "-o", "{D}/data", "--class-noun", "cat", "--size", "32"), "{D}/data"),
        "regset": (("regset", "cat", "-o", "{D}/reg", "--n", "1", "--steps", "1", "--model", "tiny"), "{D}/reg"),
        "train": (("train", concept, "--class-noun", "cat", "-o", "{D}/t.safetensors", *TRAIN1[2:]), "{D}/t."),
        "sample": (("sample", "x", "-o", "{D}/s", "--model", "tiny", "--n", "1", "--steps", "1"), "{D}/s/"),
        "score": (("score", samples, *SCORE_CLIP, "--report", "{D}/r.html"), "{D}/r.html"),
        "demo": (("demo", "-o", "{D}/demo", "--photos-only"), "{D}/demo"),
    }


@pytest.mark.parametrize(
    "command", ["merge", "compress", "export", "get-deltas", "prep", "regset", "train", "sample", "score", "demo"]
)
def test_a_full_disk_is_named_for_every_command(cli, tmp_path, two_deltas, concept_dirs, full_disk, command):
    a, b = two_deltas
    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (32, 32), "red").save(samples / "a.png")
    (samples / "prompts.json").write_text(json.dumps({"a.png": "a red square"}))
    args, named = _ten_commands(tmp_path, a, b, concept_dirs[0], samples)[command]
    args = [str(x).replace("{D}", str(full_disk)) for x in args]
    r = cli(*args, code=1)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert lines[0].startswith(f"Error: cannot write {named.replace('{D}', str(full_disk))}"), r.stderr
    assert lines[0].endswith(FULL) and "Traceback" not in r.stderr
    assert all("unexpected" not in ln for ln in lines)
    assert _listing(full_disk) == ["filler"]  # nothing half-written, no lock files, no folders


def test_text_files_that_are_not_utf8_are_named(cli, tmp_path, two_deltas):
    a, b = two_deltas
    captions = tmp_path / "captions.txt"
    captions.write_bytes("une photo d'un caf\xe9\n".encode("latin-1"))
    r = cli("merge", a, b, "--reg-captions", captions, "-o", tmp_path / "m.safetensors", code=1)
    assert one_error(r) == (
        f"Error: {captions}: the captions file is not UTF-8 text (byte 0xe9 at offset 18); save it as UTF-8"
    )
    r = cli("sample", "--prompts", captions, "-o", tmp_path / "s", "--model", "tiny", code=1)
    assert one_error(r).startswith(f"Error: {captions}: the prompts file is not UTF-8 text")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "s").exists()


def test_one_delta_given_twice_is_refused(cli, tmp_path, two_deltas, monkeypatch):
    a, b = two_deltas
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.safetensors").symlink_to(a)
    os.link(a, tmp_path / "hard.safetensors")
    (tmp_path / "copy.safetensors").write_bytes(a.read_bytes())
    out = tmp_path / "m.safetensors"
    for other, error in (
        (a, f"Error: {a} is given twice; merge each delta once (to weigh one more, give it a scale: {a}:2)"),
        (Path("a.safetensors"), f"Error: a.safetensors is given twice (as {a} and a.safetensors); merge each delta"),
        (tmp_path / "link.safetensors", f"Error: {tmp_path / 'link.safetensors'} is given twice (as {a} and"),
        (tmp_path / "hard.safetensors", f"Error: {tmp_path / 'hard.safetensors'} is given twice (as {a} and"),
        (tmp_path / "copy.safetensors", f"Error: {a} and {tmp_path / 'copy.safetensors'} are copies of one delta"),
    ):
        r = cli("merge", f"{a}+{b}", other, "-o", out, code=2)
        assert one_error(r).startswith(error)
    assert not out.exists()


def test_a_very_large_image_is_named_in_one_warning(cli, tmp_path, monkeypatch):
    photos = write_concept_folder(tmp_path / "photos", n=2)  # 80x80: between PIL's limit and twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    r = cli("prep", photos, "-o", tmp_path / "data", "--class-noun", "cat", "--size", "32")
    warnings = [ln for ln in r.stderr.splitlines() if "very large image" in ln]
    assert warnings == [
        f"Warning: {photos / n}: a very large image (80x80, 0 megapixels); reading it takes much memory and time"
        for n in ("00.png", "01.png")
    ]
    assert "DecompressionBomb" not in r.stderr


def test_names_with_control_characters_are_escaped(cli, tmp_path, make_delta):
    evil = tmp_path / "evil\nError: forged\x1b[2J.safetensors"
    _crafted(evil, make_delta, _poke(f"{LAYER}.delta", float("nan")))
    r = cli("info", evil, code=1)
    line = one_error(r)  # one Error: line, not two
    assert line.startswith(f"Error: {tmp_path}/evil\\nError: forged\\x1b[2J.safetensors: tensor ")
    assert "\x1b" not in r.stderr
    good = tmp_path / "a:cat:b\tc.safetensors"
    write_cdtool(make_delta(), good)
    r = cli("compress", good, "-o", tmp_path / "x:cat:\n.safetensors", "--rank", "1")
    assert r.stdout == f"{tmp_path}/x:cat:\\n.safetensors\n"  # one line, no emoji


# ---- 6. the same merge gives the same bytes ------------------------------------------------------


@pytest.mark.parametrize("method", ["closed-form", "least-squares", "sum"])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_merge_gives_the_same_bytes_twice(tmp_path, two_deltas, method, suffix):
    a, b = two_deltas
    outs = [tmp_path / f"m{i}{suffix}" for i in (1, 2)]
    for out in outs:  # separate processes: the order safetensors writes its metadata in varies between them
        done = subprocess.run(
            [sys.executable, "-m", "cdtool", "merge", a, b, "--method", method, "-o", out, "-q"],
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert done.returncode == 0, done.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_compress_and_export_give_the_same_bytes_twice(cli, tmp_path, two_deltas):
    a, _ = two_deltas
    for i in ("1", "2"):  # folders of one name (the model card names its folder)
        cli("compress", a, "-o", tmp_path / i / "c.safetensors", "--rank", "2")
        cli("export", a, "--to", "kohya", "-o", tmp_path / i / "k")
        cli("export", a, "--to", "diffusers-custom-diffusion", "-o", tmp_path / i / "d", "--model", "tiny")
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*") if p.is_file())
    assert len(files) == 9
    assert all((tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes() for f in files)


def test_a_signal_in_a_held_block_arrives_as_the_block_ends():
    import os
    import signal

    from cdtool.errors import signals_held

    got: list[str] = []
    previous = signal.signal(signal.SIGHUP, lambda *_: got.append("hup"))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(1000):  # bytecodes run, and the handler still waits
                pass
            assert got == []
            got.append("end of block")
        assert got == ["end of block", "hup"]
    finally:
        signal.signal(signal.SIGHUP, previous)

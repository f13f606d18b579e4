"""The command list, every command's --help, the version, and the exit-code conventions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdtool import __version__
from cdtool.delta.file import write_cdtool

COMMANDS = [
    "demo",
    "prep",
    "regset",
    "train",
    "train-encoder",
    "personalize",
    "sample",
    "score",
    "get-deltas",
    "merge",
    "compress",
    "export",
    "info",
]
WITH_EXAMPLES = [
    "prep", "regset", "train", "train-encoder", "personalize", "sample", "score", "get-deltas", "merge", "compress", "export", "info", "demo"
]  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent


def test_root_help_lists_every_command(cli):
    out = cli("--help").stdout
    listed = out.split("\nCommands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed if line.strip()] == COMMANDS


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help(cli, name):
    out = cli(name, "--help").stdout
    assert out.splitlines()[0].startswith(f"Usage: cdtool {name} [OPTIONS]")
    assert "  -h, --help" in out


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_command_help_ends_with_examples(cli, name):
    out = cli(name, "--help").stdout
    examples = out.rstrip().split("\n  Examples:\n\n", 1)[1].splitlines()
    assert 2 <= len(examples) <= 3
    assert all(line.startswith(f"    cdtool {name} ") for line in examples), examples


def test_version(cli):
    assert cli("--version").stdout == f"cdtool {__version__}\n"


def test_usage_errors_exit_2(cli):
    r = cli("sample", "--n", "0", "x", code=2)
    assert r.stderr.splitlines() == [
        "Usage: cdtool sample [OPTIONS] [PROMPT...]...",
        "Try 'cdtool sample -h' for help.",
        "",
        "Error: Invalid value for '--n': Input should be greater than or equal to 1",
    ]
    assert cli("no-such-command", code=2).stderr.splitlines()[-1] == "Error: No such command 'no-such-command'."


def test_an_option_and_its_other_name_must_agree(cli, tmp_path):
    r = cli(
        "get-deltas", tmp_path / "x.bin", "--model", "tiny", "--base", "toy", "-o", tmp_path / "y.safetensors", code=2
    )
    assert r.stderr == "Error: --base is another name of --model; give one of them\n"
    assert r.stdout == ""


def test_runtime_error_is_one_line_exit_1(cli, tmp_path):
    r = cli("info", tmp_path / "missing.safetensors", code=1)
    assert r.stderr == f"Error: {tmp_path / 'missing.safetensors'}: no such file or folder\n"
    assert r.stdout == ""


def test_a_closed_stdout_is_a_normal_end(tmp_path, make_delta):
    """`cdtool info FILE | head`: the reader goes away before cdtool writes; no error, exit 0."""
    path = tmp_path / "cat.safetensors"
    write_cdtool(make_delta(), path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdtool", "info", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()  # the pipe's only reader
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=300), err) == (0, "")


def test_progress_bar_shows_rate_on_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    from cdtool import console

    term = Console(file=io.StringIO(), force_terminal=True, width=150)
    monkeypatch.setattr(console, "_err", term)
    console.set_quiet(False)
    with console.progress("training", 3) as bar:
        for _ in range(3):
            bar.advance(1, "loss 0.5")
    assert "it/s" in term.file.getvalue() and "3/3" in term.file.getvalue()

"""Every registered command's --help, the version, and the exit-code conventions."""

from __future__ import annotations

import pytest

from cdtool.cli import app

COMMANDS = sorted(c.name for c in app.registered_commands)


def test_root_help_lists_every_command(cli):
    out = cli("--help").stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help(cli, name):
    result = cli(name, "--help")
    assert result.stdout.startswith(f"Usage: cdtool {name}")
    assert "--help" in result.stdout


def test_no_stub_commands():
    # every registered command is one of these (a command is registered only once it works)
    assert set(COMMANDS) <= {
        "prep",
        "regset",
        "train",
        "get-deltas",
        "merge",
        "compress",
        "export",
        "sample",
        "score",
        "info",
        "demo",
    }


def test_version(cli):
    assert cli("--version").stdout.startswith("cdtool ")


def test_usage_error_exits_2(cli):
    r = cli("sample", "--n", "0", "x", code=2)
    assert "Usage:" in r.stderr
    cli("no-such-command", code=2)


def test_runtime_error_is_one_line_exit_1(cli, tmp_path):
    r = cli("info", tmp_path / "missing.safetensors", code=1)
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("Error: ") and "missing.safetensors" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


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

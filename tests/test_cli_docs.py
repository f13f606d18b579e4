"""docs/cli.md holds every command's --help; a change to the CLI shows up as a change to that file.

Regenerate after an intended change: CDTOOL_UPDATE_DOCS=1 pytest tests/test_cli_docs.py
"""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from cdtool.cli import COMMANDS, app

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    runner = CliRunner()
    parts = [
        "# cdtool command reference\n",
        "Generated from `--help` by tests/test_cli_docs.py; do not edit by hand.\n",
    ]
    names = [None, *sorted(COMMANDS)]
    for name in names:
        args = ["--help"] if name is None else [name, "--help"]
        result = runner.invoke(app, args, prog_name="cdtool", env={"COLUMNS": "100", "TERM": "dumb"})
        assert result.exit_code == 0, result.output
        parts.append(f"## cdtool{' ' + name if name else ''}\n\n```\n{result.stdout.rstrip()}\n```\n")
    return "\n".join(parts)


def test_cli_reference_is_current():
    text = render()
    if os.environ.get("CDTOOL_UPDATE_DOCS"):
        DOCS.parent.mkdir(exist_ok=True)
        DOCS.write_text(text)
    assert DOCS.exists(), "run CDTOOL_UPDATE_DOCS=1 pytest tests/test_cli_docs.py"
    assert DOCS.read_text() == text, (
        "the CLI changed: regenerate docs/cli.md (CDTOOL_UPDATE_DOCS=1) and review the diff"
    )

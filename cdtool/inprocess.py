"""Running cdtool commands inside this Python process, as scripts would run them in a shell: used by
`cdtool demo` and the quality benchmark, so both exercise exactly the commands a user types."""

from __future__ import annotations

import io
import json
import shlex
import time
from contextlib import redirect_stdout
from typing import Any

import typer

from cdtool import console
from cdtool.errors import CdtoolError, Interrupted


class InProcess:
    """Runs `cdtool ARGS --json` in this process, logs the command line, returns its JSON result;
    `timings` collects each command's seconds."""

    def __init__(self, quiet: bool = False, timings: dict[str, float] | None = None) -> None:
        self.quiet = quiet
        self.timings = {} if timings is None else timings

    def __call__(self, *args: Any) -> Any:
        from typer.exceptions import TyperException  # typer >= 0.26 embeds click: its errors derive from this

        from cdtool.cli import app

        argv = [str(a) for a in args]
        console.set_quiet(self.quiet)
        console.log("$ cdtool " + shlex.join(argv))
        command = typer.main.get_command(app)
        out = io.StringIO()
        start = time.perf_counter()
        with redirect_stdout(out):
            try:
                code = command.main(
                    args=[*argv, "--json", *(["-q"] if self.quiet else [])],
                    prog_name="cdtool",
                    standalone_mode=False,
                )
            except typer.Exit as e:
                code = e.exit_code
            except TyperException as e:
                raise CdtoolError(f"`cdtool {shlex.join(argv)}`: {e.format_message()}") from e
        console.set_quiet(self.quiet)
        key = (
            argv[0]
            if argv[0] not in self.timings
            else f"{argv[0]} {sum(k.startswith(argv[0]) for k in self.timings) + 1}"
        )
        self.timings[key] = round(time.perf_counter() - start, 1)
        if isinstance(code, int) and code > 128:  # the command was interrupted: so is this one
            raise Interrupted(code - 128, reported=True)  # its line is already on stderr
        if code not in (None, 0):
            raise CdtoolError(f"stopped at `cdtool {shlex.join(argv)}` (its error is above)")
        return json.loads(out.getvalue()) if out.getvalue().strip() else None

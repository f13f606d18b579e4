"""The `cdtool` command: one typer app, one module per subcommand."""

from __future__ import annotations

from typing import Annotated

import typer

from cdtool import __version__
from cdtool.commands import compress, demo, export, get_deltas, info, merge, prep, regset, sample, score, train

app = typer.Typer(
    name="cdtool",
    help="Custom Diffusion from the command line: prepare data, train concepts, merge, compress, sample, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cdtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Custom Diffusion from the command line."""


def quiet_libraries() -> None:
    """diffusers and transformers log advice meant for library users; keep stderr for cdtool."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


quiet_libraries()
for module in (demo, prep, regset, train, sample, score, get_deltas, merge, compress, export, info):
    module.register(app)


def main() -> None:
    app(prog_name="cdtool")

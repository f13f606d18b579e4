"""The `cdtool` command: one typer app, one module per subcommand.

A command's module is imported only when that command runs or shows its help, so `cdtool --help`,
`cdtool --version` and `cdtool COMMAND --help` start without loading torch or the model libraries
(the command modules import those inside their functions)."""

from __future__ import annotations

import importlib
import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from cdtool import __version__

# command -> (its module in cdtool.commands, the line `cdtool --help` shows for it)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "Run the main job end to end on the built-in toy model."),
    "prep": ("prep", "Prepare a concept's photos for training."),
    "regset": ("regset", "Build a regularisation set: class images with captions."),
    "train": ("train", "Teach the model new concepts (Custom Diffusion and baselines)."),
    "train-encoder": ("train_encoder", "Train an InstantBooth encoder for one category."),
    "personalize": ("personalize", "Personalise from photos in one forward pass (InstantBooth)."),
    "sample": ("sample", "Generate images with the base model and any deltas applied."),
    "score": ("score", "Score samples the way the customisation papers do."),
    "get-deltas": ("get_deltas", "Extract a delta from a fine-tuned model, or convert one."),
    "merge": ("merge", "Merge concepts into one delta."),
    "compress": ("compress", "Compress each layer's ΔW to low rank by truncated SVD."),
    "export": ("export", "Export a delta for other tools."),
    "info": ("info", "Show what a delta holds."),
}
SETTINGS: dict[str, Any] = dict(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class LazyCommands(TyperGroup):
    """The subcommands, each imported the first time it is asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            module = importlib.import_module(f"cdtool.commands.{COMMANDS[cmd_name][0]}")
            one = typer.Typer(**SETTINGS)
            module.register(one)
            self.commands[cmd_name] = typer.main.get_command(one)
        return self.commands[cmd_name]

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])


app = typer.Typer(
    name="cdtool",
    cls=LazyCommands,
    help="Custom Diffusion from the command line: prepare data, train concepts, merge, compress, sample, score.",
    no_args_is_help=True,
    **SETTINGS,
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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


quiet_libraries()


def main() -> None:
    app(prog_name="cdtool")

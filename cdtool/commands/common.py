"""Option definitions and error handling shared by every command."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cdtool import console
from cdtool.choices import DTYPE_NAMES, LAYER_SETS, SCHEDULERS
from cdtool.errors import CdtoolError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


Layers = Enum("Layers", {name: name for name in LAYER_SETS}, type=str)  # type: ignore[misc]
Dtype = Enum("Dtype", {name: name for name in DTYPE_NAMES}, type=str)  # type: ignore[misc]
Scheduler = Enum("Scheduler", {name: name for name in SCHEDULERS}, type=str)  # type: ignore[misc]

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# The options every command spells the same way.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Base model (Stable Diffusion 1.x, 2.x or XL, read from the model): `tiny`, `tiny-sd2`, `tiny-xl` or "
        "`toy` (built in), a hub id, a local diffusers folder or a .safetensors/.ckpt file. Default: the base a "
        f"delta records, else $CDTOOL_MODEL, else {DEFAULT_MODEL}.",
        show_default=False,
    ),
]
BaseAliasOpt = Annotated[str | None, typer.Option("--base", hidden=True, help="Another name of --model.")]
DeltaOutputOpt = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="The delta to write: .safetensors (cdtool's format), or .bin (the official layout)."
    ),
]
FolderOutputOpt = Annotated[Path, typer.Option("--output", "-o", help="The folder to write.")]
LayersOpt = Annotated[
    Layers | None,
    typer.Option(
        "--layers",
        help="kv: attn2.to_k/to_v (the paper); attn2: all cross-attention projections.",
        show_default="kv",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp16 on CUDA, else fp32), fp32, fp16 or bf16.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed; noise is drawn on the CPU, so a seed means the same on any device.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No logs or progress on stderr (warnings stay).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
DeltaOpt = Annotated[
    list[str] | None,
    typer.Option("--delta", "-d", help="A delta to apply, optionally with a scale: `cat.safetensors:0.8`. Repeatable."),
]
IgnoreBaseOpt = Annotated[
    bool,
    typer.Option(
        "--ignore-base-mismatch", help="Apply deltas even when their recorded base fingerprint differs (warns)."
    ),
]


def pick_model(model: str | None, recorded: list[str] | None = None) -> str:
    """--model if given, else the base the deltas recorded, else $CDTOOL_MODEL or the default;
    local paths made absolute, as deltas record them."""
    from cdtool.models.loading import is_missing_path, model_reference  # at run time: --help stays light

    if model:
        return model_reference(model)
    for base in recorded or []:
        if base and is_missing_path(base):
            raise CdtoolError(
                f"the base model recorded in the delta, {base}, is not there; pass --model with the base it was trained on"
            )
        if base:
            return base
    return model_reference(os.environ.get("CDTOOL_MODEL", DEFAULT_MODEL))


def model_source(model: str | None, recorded: list[str] | None = None) -> str:
    """Where `pick_model` takes the base from, as an error message names it."""
    if model:
        return "--model"
    if any(recorded or []):
        return "the base the delta records"
    if os.environ.get("CDTOOL_MODEL"):
        return "$CDTOOL_MODEL"
    return "the default: no --model given"


def pick_available_model(model: str | None, recorded: list[str] | None = None) -> str:
    """`pick_model`, checked to be loadable now (before the command makes any output)."""
    from cdtool.models.loading import check_available

    model_id = pick_model(model, recorded)
    check_available(model_id, model_source(model, recorded))
    return model_id


def pick_alias(value: Any, alias: Any, name: str, alias_name: str) -> Any:
    """An option given under its name or its other name (not both, with different values)."""
    if value is not None and alias is not None and value != alias:
        raise UsageError(f"{alias_name} is another name of {name}; give one of them")
    return value if value is not None else alias


def examples(*command_lines: str) -> str:
    """A command's --help epilog: its example command lines, kept as written."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in command_lines)


def parse_scaled(spec: str) -> tuple[Path, float]:
    """`path[:scale]` -> (path, scale); a colon followed by a non-number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def cdtool_command(func: F) -> F:
    """Turn CdtoolError into `Error: ...` on stderr and its exit code; hide tracebacks unless
    CDTOOL_DEBUG=1. Ctrl-C and a closed stdout end the command quietly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "quiet" in kwargs:
            console.set_quiet(bool(kwargs["quiet"]))
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except CdtoolError as e:
            if _debug():
                traceback.print_exc()
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader of stdout stopped reading (`cdtool info X | head`): a normal end
            _discard_stdout()
            raise typer.Exit(0) from None
        except Exception as e:  # an unexpected failure: still one line, unless debugging
            if _debug():
                raise
            typer.echo(f"Error: unexpected {type(e).__name__}: {e} (set CDTOOL_DEBUG=1 for a traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _discard_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush of what is still
    buffered does not fail on the closed pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture stdout)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _debug() -> bool:
    return os.environ.get("CDTOOL_DEBUG", "") not in ("", "0")

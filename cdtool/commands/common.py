"""Option definitions and error handling shared by every command."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cdtool import console
from cdtool.choices import DTYPE_NAMES, LAYER_SETS, SCHEDULERS
from cdtool.errors import CdtoolError, Interrupted, UsageError, first_line, write_failure

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
    """`path[:scale]` -> (path, scale). An existing path is never split; otherwise what follows the
    last colon is the scale, a finite number (a usage error if not), unless it holds a path separator."""
    head, sep, tail = spec.rpartition(":")
    if not (sep and head) or "/" in tail or Path(spec).exists():
        return Path(spec), 1.0
    try:
        scale = float(tail)
    except ValueError:
        if not tail:
            raise UsageError(f"{spec} ends in a colon; give a scale after it, as in {head}:0.8") from None
        raise UsageError(f"{spec}: the scale after the colon must be a number, as in {head}:0.8") from None
    if not math.isfinite(scale):
        raise UsageError(f"{spec}: the scale {tail} is not a finite number")
    return Path(head), scale


# Options whose value must be above zero (a learning rate, a threshold, a time limit). Every number
# option must be finite: one with a range refuses NaN itself, but infinity passes a lower bound.
POSITIVE_OPTIONS = ("lr", "text_encoder_lr", "lora_alpha", "dvar_eps", "timeout")


def check_option_numbers(options: dict[str, Any]) -> None:
    """Every number option is finite, and those of POSITIVE_OPTIONS above zero: usage errors."""
    for name, value in options.items():
        if not isinstance(value, float):
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise UsageError(f"{flag} {value}: give a finite number")
        if name in POSITIVE_OPTIONS and value <= 0:
            raise UsageError(f"{flag} {value:g}: give a number above zero")


def cdtool_command(func: F) -> F:
    """Turn CdtoolError into `Error: ...` on stderr and its exit code; hide tracebacks unless
    CDTOOL_DEBUG=1. Ctrl-C, SIGTERM and SIGHUP end the command alike (its cleanup runs; exit code
    128 + the signal's number: 130, 143, 129); a closed stdout ends it quietly. The outputs it
    locked are released at the end, whatever the end."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cdtool import locks

        if "quiet" in kwargs:
            console.set_quiet(bool(kwargs["quiet"]))
        held = locks.held()
        try:
            with _signals_end_like_ctrl_c():
                check_option_numbers(kwargs)
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except CdtoolError as e:
            if _debug():
                traceback.print_exc()
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                if not getattr(e, "reported", False):
                    typer.echo(f"Interrupted{name}.", err=True)
            raise typer.Exit(128 + signum) from None
        except BrokenPipeError:  # the reader of stdout stopped reading (`cdtool info X | head`): a normal end
            _discard_stdout()
            raise typer.Exit(0) from None
        except Exception as e:  # an unexpected failure: still one line, unless debugging
            if _debug():
                raise
            _fail(_explain(e, locks.targets(since=held)), 1)
        finally:
            locks.release(since=held)

    return wrapper  # type: ignore[return-value]


def _fail(message: str, code: int) -> None:
    typer.echo(f"Error: {console.shown(message)}", err=True)
    raise typer.Exit(code) from None


def _explain(e: Exception, outputs: list[Path]) -> str:
    """The one line for a failure no check foresaw: a write that ran out of room names the outputs;
    a solver that could not factorise says so; anything else is unexpected."""
    detail = first_line(e)
    why = write_failure(e, outputs[0] if outputs else None)
    if why is not None:
        where = ", ".join(str(p) for p in outputs) or "the output"
        return f"cannot write {where}: {why}"
    if type(e).__name__ in ("LinAlgError", "_LinAlgError"):
        return (
            f"the linear algebra failed ({detail}): the inputs hold values too large or too degenerate to solve "
            "with; check them with `cdtool info`"
        )
    return f"unexpected {type(e).__name__}: {e} (set CDTOOL_DEBUG=1 for a traceback)"


_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_end_like_ctrl_c() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP raise `Interrupted` as Ctrl-C raises
    KeyboardInterrupt, so every staged output is cleaned up; a second one during the cleanup is
    ignored. Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _ENDING_SIGNALS}

    def end(signum: int, frame: Any) -> None:
        for s in _ENDING_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in _ENDING_SIGNALS:
        signal.signal(s, end)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


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

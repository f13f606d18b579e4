"""Output conventions: results on stdout, everything else on stderr; progress only on a terminal."""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")

# emoji off: rich would print a file named `a:cat:b` with a cat in it
_err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
_state = {"quiet": False}


def shown(text: str) -> str:
    """`text` with its control characters escaped as Python writes them (a newline as \\n, the escape
    character as \\x1b), so that no name taken from a file or an argument can break a message into lines,
    forge an `Error:` line or drive the terminal. Every line cdtool prints goes through here."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _CONTROL else c for c in text)


_CONTROL = ("Cc", "Zl", "Zp")  # control characters, line and paragraph separators


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def log(message: str) -> None:
    """An informational line on stderr (silenced by --quiet)."""
    if not _state["quiet"]:
        _err.print(shown(message), markup=False)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet."""
    _err.print(f"Warning: {shown(message)}", markup=False, style="yellow")


def summary(message: str) -> None:
    """The one line that sums up what a command did, on stderr; shown even with --quiet (which
    hides the logs and progress leading up to it)."""
    _err.print(shown(message), markup=False)


def result(line: str) -> None:
    """One line of the command's result on stdout."""
    sys.stdout.write(f"{shown(line)}\n")
    sys.stdout.flush()


def result_json(doc: Any) -> None:
    """The command's result as one JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_table(table: Any) -> None:
    """A rich table on stderr, with the logs (silenced by --quiet)."""
    if not _state["quiet"]:
        _err.print(table)


def interactive() -> bool:
    return not _state["quiet"] and _err.is_terminal


@contextmanager
def progress(description: str, total: int | None, plain: bool = False) -> Iterator[Any]:
    """A rich progress bar on a terminal. Elsewhere nothing, or with `plain` a log line now and
    then (about every twentieth of `total`, and at the end), as `train` prints its steps."""
    if not interactive():
        yield _PlainProgress(description, total) if plain and total and not _state["quiet"] else _NoProgress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """Items per second, as the plain log lines show it."""

        def render(self, task: Any) -> Text:
            return Text("" if task.speed is None else f"{task.speed:.2f} it/s")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_err,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total, info="")
        yield _Bar(bar, task)


class _NoProgress:
    def advance(self, n: int = 1, info: str = "") -> None:
        pass


class _PlainProgress:
    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.done = description, total, 0
        self.every = max(1, total // 20)
        self.start = time.perf_counter()

    def advance(self, n: int = 1, info: str = "") -> None:
        before, self.done = self.done, self.done + n
        if self.done // self.every == before // self.every and self.done < self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate else 0.0
        log(f"{self.description} {self.done}/{self.total} {rate:.2f} it/s ETA {eta:.0f}s")
        sys.stderr.flush()


class _Bar:
    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def advance(self, n: int = 1, info: str = "") -> None:
        self.bar.update(self.task, advance=n, info=info)

"""Errors that reach the user as one line and an exit code."""

from __future__ import annotations

import contextlib
import errno
import signal
from collections.abc import Iterator
from pathlib import Path


class CdtoolError(Exception):
    """A runtime failure the user can fix: printed as `Error: ...`, exit code 1."""

    exit_code = 1


class UsageError(CdtoolError):
    """Arguments that do not fit together: exit code 2."""

    exit_code = 2


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for
    the one-line errors that name what a library said."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Interrupted(KeyboardInterrupt):
    """A signal that ends the command as Ctrl-C does (SIGTERM, SIGHUP): every `finally` and cleanup
    runs, and the command exits with 128 + the signal's number. `reported`: a command run inside this
    one has already said so."""

    def __init__(self, signum: int, reported: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.reported = reported


_HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A block that Ctrl-C, SIGTERM and SIGHUP do not cut into: one arriving meanwhile is delivered
    as the block ends (where the platform can hold signals; elsewhere nothing changes)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def read_text(path: Path, what: str = "file") -> str:
    """A text file given by the user, as UTF-8; a missing file or one in another encoding is one
    error naming it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CdtoolError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise CdtoolError(f"{path}: a folder, not a {what}") from None
    except OSError as e:
        raise CdtoolError(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CdtoolError(
            f"{path}: the {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


# What a write that ran out of room raises: the errno, or the words a library puts in its message
# (safetensors' IoError; torch.save's "enforce fail at inline_container.cc", which drops the errno).
_FULL = "the disk is full; free some space or choose another --output"
_QUOTA = "the disk quota is used up; free some space or choose another --output"
_TOO_LARGE = "the file is larger than this system lets a process write (see `ulimit -f`)"
_FULL_ERRNOS = {errno.ENOSPC: _FULL, errno.EDQUOT: _QUOTA, errno.EFBIG: _TOO_LARGE}
_FULL_WORDS = {"No space left on device": _FULL, "Disk quota exceeded": _QUOTA, "File too large": _TOO_LARGE}


def write_failure(e: BaseException, where: Path | None = None) -> str | None:
    """Why a write to `where` failed for lack of room (the disk is full, a quota, a file-size
    limit) and what to do, or None for any other failure."""
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return _FULL_ERRNOS[e.errno]
    text = str(e)
    for words, why in _FULL_WORDS.items():
        if words in text:
            return why
    if "inline_container.cc" in text and where is not None and _nearly_full(where):
        return _FULL  # torch.save could not write its archive, and the disk has no room left
    cause = e.__cause__ or e.__context__
    return write_failure(cause, where) if cause is not None and cause is not e else None


def _nearly_full(path: Path) -> bool:
    """Whether the file system `path` is on (or would be on) has less than 1 MiB free."""
    import shutil

    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False

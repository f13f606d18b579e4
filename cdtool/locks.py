"""One command at a time per output: a lock file beside each output (`.NAME.lock`), locked with
flock for the whole command and removed at its end.

A second command that claims the same output (or run folder) is refused at once with a conflict
naming the process that holds it; the first one's output is never touched. A lock file left by a
killed command locks nothing (the system drops the lock with the process) and is reused. Where the
system has no flock (Windows), outputs are not locked; the move into place still refuses to replace
an output that appeared meanwhile (cdtool.atomic).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cdtool.errors import CdtoolError, write_failure

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".lock"


@dataclass
class Lock:
    target: Path  # the output it guards
    path: Path  # the lock file
    fd: int
    count: int = 1  # claims of it in this process (two outputs under one folder still to be made)


_held: list[Lock] = []


def lock_path(target: Path) -> Path:
    """`.NAME.lock` beside `target`; for a target whose folder does not exist yet, beside the
    first missing folder (which the command will create)."""
    target = Path(os.path.abspath(target))
    missing = target
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    return missing.parent / f".{missing.name}{SUFFIX}"


def acquire(target: Path) -> Lock | None:
    """Lock `target` for this process until `release`; a conflict (CdtoolError) when another
    command holds it. None where the system cannot lock."""
    if fcntl is None:
        return None
    path = lock_path(target)
    for lock in _held:
        if lock.path == path:  # this process holds it already
            lock.count += 1
            return lock
    while True:
        fd = _open(path, target)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise CdtoolError(
                f"{target} is being written by another cdtool command{holder}; wait for it to end, "
                "or choose another --output"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and our lock: take the new one
    _note_pid(fd)
    lock = Lock(Path(target), path, fd)
    _held.append(lock)
    return lock


def _open(path: Path, target: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        why = write_failure(e, target) or e.strerror or str(e)
        raise CdtoolError(f"cannot write {target}: {why}") from e


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _note_pid(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return ""
    return f" (process {pid})"


def held() -> int:
    """A mark of the locks held now; `release(since=mark)` releases those taken after it."""
    return len(_held)


def targets(since: int = 0) -> list[Path]:
    """The outputs locked since the mark."""
    return [lock.target for lock in _held[since:]]


def release(lock: Lock | None = None, *, since: int | None = None) -> None:
    """Release one lock, or every lock taken since a mark (`held()`): its file is removed, then
    unlocked."""
    chosen = [lock] if lock is not None else list(_held[since or 0 :]) if since is not None else []
    for one in reversed(chosen):
        if one not in _held:
            continue
        one.count -= 1
        if one.count > 0 and since is None:
            continue
        _held.remove(one)
        with contextlib.suppress(OSError):
            if _same_file(one.fd, one.path):
                os.unlink(one.path)
        os.close(one.fd)

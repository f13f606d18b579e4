"""How every command writes: outputs appear complete or not at all, replace only what cdtool wrote,
never hold or sit inside an input, and respect the umask.

A command claims its output before the work (`claim_output`): that checks the output can be written
(naming the output, not a temporary file), refuses a folder that holds or is inside an input, and
refuses to replace anything it did not write. The result is written beside the output
(`Output.staged`) and moved into place only when complete. A folder output carries a manifest
(`MANIFEST`) naming the command and the files it wrote; `--force` replaces only such a folder, and
only while it holds nothing else. An output that did not exist when the command started and exists
when it ends was written by someone else meanwhile: that is a conflict, never a replacement.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cdtool import locks
from cdtool.errors import CdtoolError, write_failure

F = TypeVar("F", bound=Callable[..., Any])

MANIFEST = ".cdtool-output.json"
# Decides whether an existing folder belongs to a command: returns the files in it the command did
# not write, or None when the folder is not one of the command's outputs at all.
Ownership = Callable[[Path], "list[str] | None"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions a plain `open()` would give a new file (temporary files start at 0600)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The permissions a plain `mkdir()` would give a new folder (temporary folders start at 0700)."""
    return 0o777 & ~_umask()


# ---- moving a finished file or folder into place ----------------------------------------------


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """Linux's atomic rename that fails when `dst` exists; False where the system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if call(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST or err == errno.ENOTEMPTY:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; FileExistsError when `dst` exists. Atomic with renameat2 (Linux) or, for
    files, a hard link; elsewhere a folder is checked for, then renamed (a narrow race)."""
    if _renameat2_noreplace(src, dst):
        return
    if not src.is_dir():
        try:
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links here: fall through to the check-then-rename
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _replace(src: Path, dst: Path) -> None:
    """Move `src` over `dst`: a file atomically; a folder by moving the old one aside first (it is
    put back if the new one cannot take its place) and deleting it after."""
    if not src.is_dir() or not os.path.lexists(dst):
        os.replace(src, dst)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}{ASIDE}", dir=dst.parent))
    os.rmdir(aside)
    os.rename(dst, aside)
    try:
        rename_noreplace(src, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    remove(aside)


def remove(path: Path) -> None:
    """Delete a file, a folder with what it holds, or a symbolic link (never what it points to)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish(src: Path, dst: Path, *, replace: bool) -> None:
    """Move a finished `src` to `dst`. Without `replace`, an existing `dst` is a conflict: it was
    written by another command while this one ran, and is kept."""
    if replace:
        _replace(src, dst)
        return
    try:
        rename_noreplace(src, dst)
    except FileExistsError:
        raise CdtoolError(
            f"{dst} was written by another command while this one ran; it was kept and nothing was "
            "replaced (run again with --force to replace it)"
        ) from None


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above `path`; returns them, deepest first, so a failure can
    remove them again (no empty folders are left behind)."""
    created = []
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            break
        created.append(parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CdtoolError(f"cannot write {path}: {e.strerror or e}") from e
    return created


def _apply_umask(folder: Path) -> None:
    """Give a finished folder and everything in it the umask's permissions (some writers, such as
    safetensors, and every temporary file or folder start private)."""
    files, dirs = file_mode(), dir_mode()
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, dirs if p.is_dir() else files)
    os.chmod(folder, dirs)


def _remove_empty(folders: Iterable[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_path(path: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path`, with the umask's permissions, only
    if the block succeeds. An existing `path` is replaced only with `replace` (else a conflict)."""
    path = Path(path)
    created = _make_parents(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _remove_empty(created)
        raise CdtoolError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    done = False
    try:
        with naming_write_failures(path, tmp):
            yield tmp
            os.chmod(tmp, file_mode())
        publish(tmp, path, replace=replace)
        done = True
    except OSError as e:
        if e.filename is not None and Path(e.filename) == tmp:
            raise CdtoolError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            _remove_empty(created)


@contextlib.contextmanager
def naming_write_failures(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """A write into `path` that runs out of room (a full disk, a quota, a size limit), whichever
    library reports it and however, is one error naming `path` and saying so; an error that names
    the temporary `tmp` names `path` instead."""
    try:
        yield
    except CdtoolError as e:
        if tmp is None or str(tmp) not in str(e):
            raise
        named = CdtoolError(str(e).replace(str(tmp), str(path)))
        named.exit_code = e.exit_code
        raise named from e
    except Exception as e:
        why = write_failure(e, path)
        if why is None:
            raise
        raise CdtoolError(f"cannot write {path}: {why}") from e


# ---- what a killed command leaves ---------------------------------------------------------------

ASIDE = ".old-"  # an earlier output set aside while the new one takes its place
# beside NAME: `.NAME.XXXXXXXX.tmp` (a file or folder being written) and `.NAME.old-XXXXXXXX`
_LEFTOVER = r"\.{name}(\.[a-z0-9_]{{8}}\.tmp|\.old-[a-z0-9_]{{8}})"


def leftovers(path: Path) -> list[Path]:
    """What commands killed while writing `path` left beside it (temporary files and folders named
    after it, and an earlier output set aside)."""
    pattern = re.compile(_LEFTOVER.format(name=re.escape(path.name)))
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n))


def clear_leftovers(path: Path, say: Callable[[str], None]) -> None:
    """Remove what a killed command left beside `path` (called with `path` locked, so no running
    command is writing them). An earlier output that was set aside while nothing took its place is
    put back."""
    for item in leftovers(path):
        if ASIDE in item.name[len(path.name) + 1 :] and not os.path.lexists(path):
            os.rename(item, path)
            say(f"{path}: put back from {item.name}, where an interrupted command had set it aside")
            continue
        remove(item)
        say(f"removed {item}, left by an interrupted command")


def clear_leftovers_inside(folder: Path, say: Callable[[str], None]) -> None:
    """Remove the temporary files a killed command left inside an output folder it writes in
    place (`.NAME.XXXXXXXX.tmp`)."""
    pattern = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        if pattern.fullmatch(name):
            remove(folder / name)
            say(f"removed {folder / name}, left by an interrupted command")


# ---- names from files ---------------------------------------------------------------------------


def inside(folder: Path, name: str) -> Path:
    """`folder / name` for a name that comes from a file (a token, a layer): refused unless it is
    one plain file name, so nothing a stranger's file says is written outside the output folder."""
    plain = (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not Path(name).is_absolute()
    )
    if not plain or (folder / name).parent != folder:
        raise CdtoolError(f"refusing to write {name!r}: a name taken from an input must be a plain file name")
    return folder / name


# ---- claiming an output before the work ---------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a folder cdtool wrote, or None."""
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), list) else None


def write_manifest(folder: Path, command: str) -> None:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    doc = {"written_by": "cdtool", "command": command, "files": files}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def manifest_ownership(command: str) -> Ownership:
    """A folder is `command`'s output when its manifest says so; anything it does not list is
    foreign (files, and also symbolic links, empty folders and special files)."""

    def foreign(folder: Path) -> list[str] | None:
        doc = read_manifest(folder)
        if doc is None or doc.get("command") != command:
            return None
        listed = set(doc["files"]) | {MANIFEST}
        files, others = folder_entries(folder)
        return sorted([f for f in files if f not in listed] + others)

    return foreign


def folder_entries(folder: Path) -> tuple[list[str], list[str]]:
    """What a folder holds, relative to it: (its plain files, everything else that is not a
    folder holding something: symbolic links, empty folders as `NAME/`, special files). Links are
    never followed."""
    files: list[str] = []
    others: list[str] = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        for name in dirs:
            p = here / name
            if p.is_symlink():
                others.append(str(p.relative_to(folder)))
            elif not any(p.iterdir()):
                others.append(f"{p.relative_to(folder)}/")
        for name in names:
            p = here / name
            rel = str(p.relative_to(folder))
            (files if p.is_file() and not p.is_symlink() else others).append(rel)
    return files, others


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def probe_writable(path: Path) -> None:
    """The nearest existing folder at or above where `path` goes must be a writable folder."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CdtoolError(f"cannot write {path}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CdtoolError(f"cannot write {path}: {folder} is not writable ({e.strerror or e})") from e


def _check_inputs(path: Path, folder: bool, inputs: Iterable[Path]) -> None:
    """An output is never one of the inputs; a folder output never holds one or sits inside one."""
    out = path.resolve()
    if folder:
        here = Path.cwd().resolve()
        if out == here or out in here.parents or out == Path.home().resolve():
            raise CdtoolError(f"--output {path} is the current folder or holds it; give a new folder for the output")
    for item in inputs:
        src = Path(item).resolve()
        if out == src:
            raise CdtoolError(f"--output {path} is also an input; write the output somewhere else")
        if folder and out in src.parents:
            raise CdtoolError(f"--output {path} holds the input {item}; write the output somewhere else")
        if folder and src in out.parents:
            raise CdtoolError(f"--output {path} is inside the input {item}; write the output somewhere else")


@dataclass
class Output:
    """An output a command has claimed; see `claim_output`."""

    path: Path
    command: str
    force: bool
    folder: bool
    existed: bool = False
    ownership: Ownership | None = None
    manifest: bool = False  # a folder output carrying MANIFEST (the default ownership)
    changed: bool = True  # False when a re-run left the output as it was
    lock: locks.Lock | None = None  # held from the claim until the output is in place

    def check_owned(self) -> None:
        """An existing folder may be replaced only when the command wrote it and nothing else is in it."""
        assert self.ownership is not None
        foreign = self.ownership(self.path)
        cmd = f"cdtool {self.command}"
        if foreign is None:
            raise CdtoolError(
                f"{self.path} exists and was not written by {cmd}, which replaces only a folder it wrote "
                "itself; choose another --output"
            )
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise CdtoolError(
                f"{self.path} holds files {cmd} did not write ({', '.join(foreign[:3])}{more}); move them "
                "away or choose another --output"
            )

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """Where to write: a fresh folder (folder outputs) or a file path in one (file outputs)
        beside the output, which becomes the output when the block succeeds. A folder identical to
        the existing output leaves that one as it is (`changed` False)."""
        created = _make_parents(self.path)
        here = None
        try:
            here = locks.acquire(self.path)  # now beside the output, where its folder was missing at the claim
            stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        except (OSError, CdtoolError) as e:
            locks.release(here)
            _remove_empty(created)
            if isinstance(e, CdtoolError):
                raise
            raise CdtoolError(f"cannot write {self.path}: {write_failure(e, self.path) or e.strerror or e}") from e
        done = False
        try:
            with naming_write_failures(self.path, stage / self.path.name if not self.folder else stage):
                if self.folder:
                    yield stage
                    if self.manifest:
                        write_manifest(stage, self.command)
                    _apply_umask(stage)
                    if self._settle(stage):
                        publish(stage, self.path, replace=self.existed)
                else:
                    yield stage / self.path.name
                    os.chmod(stage / self.path.name, file_mode())
                    publish(stage / self.path.name, self.path, replace=self.existed)
            done = True
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            locks.release(here)
            if not done:
                _remove_empty(created)
            locks.release(self.lock)
            self.lock = None

    def _settle(self, stage: Path) -> bool:
        """Whether the finished folder is to take the output's place (False: it is the same)."""
        if _is_empty_dir(self.path):
            os.rmdir(self.path)
        if not os.path.lexists(self.path):
            return True
        if not self.existed:
            raise CdtoolError(
                f"{self.path} was written by another command while this one ran; it was kept and nothing "
                "was replaced (run again with --force to replace it)"
            )
        if same_tree(stage, self.path):
            self.changed = False
            return False
        if not self.force:
            raise CdtoolError(f"{self.path} already exists with other contents; pass --force to replace it")
        self.check_owned()
        return True

    @contextlib.contextmanager
    def in_place(self, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
        """For a command that builds its folder where it stands (every path it logs or records is
        the final one): an earlier output is set aside and deleted only when the new one is
        complete. On failure the partial folder goes and the earlier one comes back, unless `keep`
        says the partial one is worth more (a training run that can be resumed)."""
        created = _make_parents(self.path)
        aside = None
        if self.existed:
            aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}{ASIDE}", dir=self.path.parent))
            os.rmdir(aside)
            os.rename(self.path, aside)
        was_empty = self.path.is_dir()
        try:
            self.path.mkdir(exist_ok=was_empty)
            yield self.path
            if self.manifest:
                write_manifest(self.path, self.command)
            _apply_umask(self.path)
        except BaseException:
            if keep is None or not keep(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
                if aside is not None:
                    os.rename(aside, self.path)
                    aside = None
                elif was_empty:
                    self.path.mkdir()
                _remove_empty(created)
            raise
        finally:
            if aside is not None:
                remove(aside)


def claim_output(
    path: Path,
    command: str,
    force: bool,
    *,
    folder: bool = False,
    inputs: Iterable[Path] = (),
    defer: bool = False,
    ownership: Ownership | None = None,
) -> Output:
    """Check, before the work, that `command` may write `path`; returns the claim to write it with.

    Refused: an output that is an input (a folder output that holds or is inside one, or is the
    current folder); a place that cannot be written; an existing output without `force` (with
    `defer`, only at the end and only when the new output differs: re-running with the same result
    changes nothing); an existing folder the command did not write (its manifest, or `ownership`),
    or that holds files it did not write, even with `force`. An empty folder counts as absent.
    """
    path = Path(path)
    _check_inputs(path, folder, inputs)
    probe_writable(path)
    lock = locks.acquire(path)
    try:
        return _claim(path, command, force, folder, defer, ownership, lock)
    except BaseException:
        locks.release(lock)
        raise


def _claim(
    path: Path,
    command: str,
    force: bool,
    folder: bool,
    defer: bool,
    ownership: Ownership | None,
    lock: locks.Lock | None,
) -> Output:
    from cdtool import console

    clear_leftovers(path, console.warn)
    out = Output(path, command, force, folder, lock=lock)
    if folder:
        out.ownership = ownership or manifest_ownership(command)
        out.manifest = ownership is None
    if not os.path.lexists(path) or (folder and _is_empty_dir(path)):
        return out
    out.existed = True
    if not folder:
        if path.is_dir():
            raise CdtoolError(f"{path} is a folder; give a file name for the output")
        if not force:
            raise CdtoolError(f"{path} already exists; pass --force to overwrite it")
        return out
    if not path.is_dir():
        raise CdtoolError(f"{path} exists and is not a folder; choose another --output")
    out.check_owned()
    if not (force or defer):
        raise CdtoolError(f"{path} already exists; pass --force to replace it")
    return out


def same_tree(a: Path, b: Path) -> bool:
    """True when two folders hold the same files with the same bytes."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def builds_folder(command: str) -> Callable[[F], F]:
    """Decorate a command that builds its `output` folder in place (its `output` and `force`
    arguments): claimed before it runs, built with `Output.in_place`."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = claim_output(kwargs["output"], command, bool(kwargs.get("force")), folder=True)
            with out.in_place():
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate

"""Writing files: whole or not at all, and a failed write told in one line.

Every file the project writes (checkpoints, history.json, plots, evaluate.py's report and figures,
export.py's files, tune.py's table and plots) goes through `replaced`: it is written to a temporary
file in the same folder and moved over the real name with `os.replace`, so the real name holds the
old file or the new one, never a part. A write that fails (a full disk, a read-only or
permission-denied folder, a file where a folder is needed) removes its temporary file and raises
WriteError, whose text is the line to print: what could not be written, where, why (on a full disk:
the free space and about what the file needs) and what to do.

Folders are made when a file is about to be written into them. `check_folder` tells at start-up
whether a folder can be written and has room, and removes the folders it made to find out, so a
command that stops before it writes anything leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path

# errno values that mean "this file cannot be written here", as opposed to a bug or a network error
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST, errno.EFBIG, errno.EIO, errno.ENAMETOOLONG}
# torch.save's zip writer reports a short write as a RuntimeError ("unexpected pos", "file write failed"),
# raised while the OSError of that write is handled, or alone when torch opened the file itself
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos")
FREE_SOME = "free some space there"
_TEMP_NAME = re.compile(r"\.(.+)\.(\d+)\.[0-9a-f]{8}\.tmp")  # what `temporary_name` makes


class WriteError(Exception):
    """A file could not be written. str() is the one line to show: what, where, why, what to do.
    `kept` (what is still intact) and `then` (how to go on) are added by the caller that knows them;
    `disk_full` says whether making room there is the fix."""

    def __init__(self, what: str, path: str | os.PathLike, why: str, remedy: str, kept: str = "",
                 then: str = "", disk_full: bool = False) -> None:
        super().__init__(what, path, why, remedy, kept, then, disk_full)  # all in args: it pickles
        self.what, self.path, self.why, self.remedy = what, Path(path), why, remedy
        self.kept, self.then, self.disk_full = kept, then, disk_full

    def __str__(self) -> str:
        kept = f"{self.kept}; " if self.kept else ""
        then = f", then {self.then}" if self.then else ""
        return f"cannot write {self.what} {self.path}: {self.why}; {kept}{self.remedy}{then}"

    def explained(self, kept: str = "", then: str = "") -> WriteError:
        """The same failure, saying what is kept and how to go on."""
        return WriteError(self.what, self.path, self.why, self.remedy, kept or self.kept, then or self.then,
                          self.disk_full)


def size_text(n: int) -> str:
    """Bytes in words, decimal units: 312 KB, 39.3 MB, 1.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} bytes"


def _existing(path: Path) -> Path:
    """The nearest folder at or above `path` that exists (the one whose disk a new file would go to)."""
    path = Path(os.path.abspath(path))
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free for this user on the disk that `path` (or the nearest existing folder above it) is on."""
    try:
        return shutil.disk_usage(_existing(Path(path))).free
    except OSError:
        return None


def _blocking_file(path: Path) -> Path | None:
    """The first thing at or above `path` that exists but is not a folder, where one is needed."""
    for above in (path, *path.parents):
        if os.path.lexists(above):
            return None if above.is_dir() else above
    return None


def causes(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from or while handling, newest first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def os_error(e: BaseException) -> OSError | None:
    """The OSError of a failed write behind `e` (torch's RuntimeError follows one), or None."""
    for cause in causes(e):
        if isinstance(cause, OSError) and not isinstance(cause, urllib.error.URLError) and cause.errno in WRITE_ERRNOS:
            return cause
    return None


def reason(e: OSError | None, path: Path, needed: int | None = None) -> tuple[str, str]:
    """Why a write to `path` failed, in words, and what to do about it (on a full disk: `FREE_SOME`)."""
    code = e.errno if e is not None else None
    free = free_bytes(path)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and needed and free < needed):
        what = "the disk quota is used up" if code == errno.EDQUOT else "no space left on its disk"
        numbers = ([f"{size_text(free)} free"] if free is not None else []) + \
            ([f"about {size_text(needed)} needed"] if needed else [])
        return what + (f" ({', '.join(numbers)})" if numbers else ""), FREE_SOME
    if code == errno.EROFS:
        return "its file system is read-only", "pick a writable folder (or make this one writable)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied", "pick a writable folder (or allow writing to this one)"
    blocker = _blocking_file(path) if code in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        return f"{blocker} is a file, where a folder is needed", "move that file away or pick a writable folder"
    if code == errno.EISDIR:
        return f"{path} is a folder", "move that folder away or give another file name"
    if e is None:
        return "the write failed", "check the disk"
    return (e.strerror or str(e)).lower(), "check the disk and the path"


def write_error(e: BaseException, path: str | os.PathLike, what: str, needed: int | None = None) -> WriteError | None:
    """The WriteError for an exception raised while writing `path`, or None if it is no failed write."""
    found = os_error(e)
    if found is None and not (isinstance(e, RuntimeError) and _TORCH_WRITE_FAILED.search(str(e))):
        return None
    why, remedy = reason(found, Path(path), needed)
    return WriteError(what, path, why, remedy, disk_full=remedy == FREE_SOME)


def temporary_name(path: Path) -> Path:
    """A temporary file next to `path` (the same disk), named for the process that writes it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def replaced(path: str | os.PathLike, what: str, *, needed: int | None = None, sync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write the file to; when the block ends, move it over
    `path` (after an fsync with `sync`). Its folder is made if missing. On any failure the temporary
    file is removed; a failed write raises WriteError (`needed`: about how many bytes the file takes,
    said when the disk is full), anything else passes through."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()  # first: the free space said is the space without it
        error = write_error(e, path, what, needed) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from None


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """`path` and the folders above it that do not exist yet, deepest first."""
    missing, path = [], Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders (deepest first) where they are empty; keep any that holds something."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_folder(folder: str | os.PathLike, needed: int = 0, purpose: str = "") -> None:
    """Raise WriteError unless a file can be made in `folder` and its disk has `needed` bytes free
    (for `purpose`, said when it has not). A missing folder is made to find out and removed again."""
    folder = Path(folder)
    made = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        why, remedy = reason(e, folder)
        raise WriteError("to", folder, why, remedy) from None
    finally:
        remove_empty(made)
    if free < needed:
        raise WriteError("to", folder, f"only {size_text(free)} free on its disk, about {size_text(needed)} needed"
                         + (f" for {purpose}" if purpose else ""), f"{FREE_SOME} or pick a folder on another disk",
                         disk_full=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers killed in the middle of a write left in `folder`
    (their process is gone); return them. A live process's are left alone."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            found = _TEMP_NAME.fullmatch(entry.name)
            if not found or not entry.is_file(follow_symlinks=False) or _alive(int(found.group(2))):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True

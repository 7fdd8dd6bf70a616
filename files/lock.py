"""One writer per folder: a command that writes into a folder holds `<folder>/.lock` while it runs.

The lock is `fcntl.flock` on that file: the kernel releases it when the holder's process ends in
any way (exit, crash, SIGKILL, power cut), so no folder is left locked by a process that is gone
and no stale pid needs detecting. The holder writes its pid, host and command into the file, so
that a command refused can say who holds the folder, and removes the file when it is done (a
process that locked a file removed under it locks the new one instead). Forked children (the
DataLoader's workers) close their copy, so the lock ends with the command, not with its workers.

Where the filesystem has no working flock (some network mounts), the command says so in one line
and goes on without the lock (docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from files.writes import missing_folders, remove_empty

LOCK_NAME = ".lock"
# What flock raises on a filesystem that cannot lock (NFS without a lock manager, some FUSE mounts).
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: set[int] = set()  # descriptors of the locks this process holds
_fork_hook = []  # [True] once the hook that closes them in forked children is registered


class FolderInUse(Exception):
    """Another live process holds the folder; the message names it and what to do."""


def holder_of(folder: str | os.PathLike) -> str:
    """Who holds a folder's lock, in words, from what the holder wrote into the lock file."""
    try:
        info = json.loads((Path(folder) / LOCK_NAME).read_text() or "{}")
        return f"process {int(info['pid'])} on {info['host']} ({str(info.get('command', ''))[:80]})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


def _acquire(path: Path, flag: str, wait: bool) -> int:
    """A descriptor of `path` locked by this process (after its holder ends, with `wait`), or FolderInUse.
    The descriptor is read-only where the filesystem allows: a disk with a file open for writing
    cannot be remounted read-only (NFS locks exclusively only what may be written: there, read-write)."""
    mode = os.O_RDONLY
    while True:
        fd = os.open(path, mode | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{flag} {path.parent} is in use by {holder_of(path.parent)}; wait for it to end, "
                              f"or choose another {flag}") from None
        except FileNotFoundError:
            pass
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBADF and mode == os.O_RDONLY:
                mode = os.O_RDWR
                continue
            raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed the file between our open and our lock: lock the new one


@contextlib.contextmanager
def hold(folder: str | os.PathLike, flag: str, wait: bool = False) -> Iterator[bool]:
    """Hold `folder` (made if missing) while the block runs, or raise FolderInUse at once if a live
    process holds it (with `wait`, wait for it instead: for writers that share a folder by design,
    one at a time); `flag` is the option that named the folder, for the message. Yields whether
    the lock is held: not where the filesystem cannot lock, nor where the folder cannot be written
    at all (the command's own check of the folder then says so in its words)."""
    folder = Path(folder)
    path, made, fd = folder / LOCK_NAME, missing_folders(folder), None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, flag, wait)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            print(f"note: {folder}: this filesystem cannot lock files ({os.strerror(e.errno)}); going on "
                  "without the one-writer lock: start no second command on this folder", file=sys.stderr)
            with contextlib.suppress(OSError):
                path.unlink()
    if fd is None:
        try:
            yield False
        finally:
            remove_empty(made)
        return
    if not _fork_hook:
        os.register_at_fork(after_in_child=_close_in_child)
        _fork_hook.append(True)
    _held.add(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError), open(path, "w") as record:  # for the message only: the lock is what counts
        record.write(json.dumps(info))
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a process waiting on this file then locks a new one
        _held.discard(fd)
        os.close(fd)
        remove_empty(made)

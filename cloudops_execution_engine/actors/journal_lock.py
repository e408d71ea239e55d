"""One engine per journal: an exclusive `flock` on a sidecar file that holds the owner's pid.

The lock belongs to the open file description, which the kernel closes when
its process dies however it dies, so a SIGKILLed owner never leaves the
journal locked. The descriptor is close-on-exec, and workers are started by
spawning a fresh interpreter, so no child inherits the lock; a child the
host forks closes its copy at once (`after_fork`), or the journal would stay
locked for as long as that child outlived its parent. The pid written
in the file is only for the message a second engine gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path

from ..errors import IoError, map_errors
from . import after_fork

__all__ = ["JournalLock", "letting_go", "lock_path_for"]

_EXITING_HOLDER_WAIT = 2.0
_PF_EXITING = 0x4

# Journals whose lock this process holds for an engine's start that was
# cancelled, and lets go of when that open ends: a lock of this process
# meanwhile waits for it, as for a holder that is exiting, rather than be refused.
_letting_go: set[Path] = set()


def letting_go(journal: Path, going: bool) -> None:
    """Say that this process's lock of `journal` is being let go of (`going`), or no longer."""
    if going:
        _letting_go.add(journal)
    else:
        _letting_go.discard(journal)


def lock_path_for(journal: Path) -> Path:
    return journal.with_name(journal.name + ".lock")


class JournalLock:
    """Held from `acquire` to `release`."""

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.path = lock_path_for(journal)
        self._fd: int | None = None
        self._made = False  # this lock created the file

    def acquire(self) -> None:
        """Take the lock, or raise `IoError` naming the pid of the engine that has it."""
        with map_errors({OSError: IoError}, f"cannot lock journal {self.journal}"):
            while not self._acquired():
                pass  # the file was removed under us (`release(discard=True)`): lock its successor

    def _acquired(self) -> bool:
        # Truncated and written below: never through a link planted at its name.
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            made = True
        except FileExistsError:
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                return False  # removed between the two opens: make it again
            made = False
        try:
            if made:
                os.fchmod(fd, 0o600)  # a umask of 0277 would leave it 0400: no later engine could open it
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IoError(f"cannot lock journal {self.journal}: {self.path} is not a regular file")
            _lock_or_wait_for_the_dead(fd, self.journal)
            if not _still_named(fd, self.path):
                # Its maker gave up on the journal and removed the file between our open
                # and our lock: a lock on it would be a lock on nothing anyone else sees.
                os.close(fd)
                return False
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise IoError(
                f"journal {self.journal} is in use by another engine (pid {holder}); "
                "one engine at a time may open a journal"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._made = made
        after_fork.track(self)
        return True

    def forked(self) -> None:
        """In a process forked from the holder: close the child's copy; the parent keeps the lock."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def release(self, discard: bool = False) -> None:
        """Let go; with `discard`, also remove the lock file if this lock made it (a journal refused)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            if discard and self._made:
                # Removed while still locked: whoever opened it meanwhile finds it gone once it locks.
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open at `fd`."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _lock_or_wait_for_the_dead(fd: int, journal: Path) -> None:
    """Take the lock; while its holder is a process that is exiting, wait for the kernel to release it.

    A holder killed a moment ago still holds its descriptors until its exit
    has run: a successor started right after the kill must not be refused.
    So is this process while it lets go of the journal (`letting_go`).
    """
    deadline = time.monotonic() + _EXITING_HOLDER_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _read_pid(fd)
            if time.monotonic() > deadline or not holder.isdigit():
                raise
            ours = int(holder) == os.getpid() and journal in _letting_go
            if not ours and not _exiting(int(holder)):
                raise
        time.sleep(0.01)


def _exiting(pid: int) -> bool:
    """Whether `pid` is gone, a zombie, or in its exit (the kernel's PF_EXITING): its locks are going."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    state, flags = fields[0], int(fields[6])
    return state in (b"Z", b"X", b"x") or bool(flags & _PF_EXITING)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"

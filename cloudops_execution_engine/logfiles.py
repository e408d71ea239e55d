"""Where log files live (and on which node), how their directory is made safe, how each log is opened."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO
from uuid import UUID

from .errors import IoError, map_errors

__all__ = [
    "LogDirectories",
    "LogNode",
    "append_to_log",
    "copy_log",
    "log_path_for",
    "make_parents",
    "make_private_dir",
    "open_log",
    "open_to_read",
    "prepare_log_dir",
    "read_log",
    "reopen_log",
    "unlink_unless_in_use",
]

# O_EXCL with O_CREAT fails on any existing entry, a symlink or a FIFO
# included, without following or opening it: only a new inode is ever written.
_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
)
_CREATE_ATTEMPTS = 5
# Retention opens a log only to lock it, and a read only to read it: never following a symlink,
# never waiting on a FIFO.
_PROBE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0)
# A log's end, for `append_to_log`: never a new file, nor one a symlink leads to.
_APPEND_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0)
)
# How much of a log `copy_log` holds at once.
_COPY_PIECE = 1 << 20
_IN_USE = "the log is being written by a running execution of the same id"
# Reopening never follows a symlink, and never waits on a FIFO with no reader
# (O_NONBLOCK makes that ENXIO); what it opens must then prove to be our file.
_REOPEN_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0)
)


def log_path_for(log_dir: Path, execution_id: UUID) -> Path:
    # The name comes from a parsed UUID, never from caller text, so it cannot
    # climb out of the directory.
    return log_dir / f"{execution_id}.log"


@functools.cache
def _umask() -> int:
    """This process's umask: read once, as it is set when a process starts, and Python only sets it."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777  # unknown: assume the worst, a chmod for every log


def open_log(path: str | bytes, dir_fd: int | None = None) -> int:
    """A descriptor on a new, owner-only log file at `path`, open to append, marked in use.

    Whatever already has the name (an older log of the same id, or a hard
    link, symlink, FIFO or device someone placed there) loses its directory
    entry and is otherwise left alone: truncating or chmodding it would reach
    every other name of that inode. Raises the `OSError` when the name cannot
    be freed (a directory, say) or keeps being taken again, and EBUSY when it
    is the log of a run of the same id still being written (in another engine
    on the same directory): that log stays its run's. With `dir_fd`, `path`
    is a name in that directory (`LogDirectories`).
    """
    for attempt in range(1, _CREATE_ATTEMPTS + 1):
        try:
            # The umask can only narrow 0600, so the file is owner-only either way; one that
            # takes the owner's own bits (0277, 0777) is undone, or nobody could read the log.
            fd = os.open(path, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
            if _umask() & 0o600:
                os.fchmod(fd, 0o600)
        except FileExistsError:
            if attempt == _CREATE_ATTEMPTS:
                raise
            # Gone already means someone else removed it first: creating is what is left to try.
            if not unlink_unless_in_use(path, dir_fd):
                # Another engine on this directory runs the same id: its log is not taken from it.
                raise OSError(errno.EBUSY, _IN_USE, os.fsdecode(path)) from None
            continue
        if _mark_in_use(fd) or attempt == _CREATE_ATTEMPTS:
            return fd
        os.close(fd)  # a sweep deleted it between its creation and the mark: make it again
    raise AssertionError("unreachable: the last attempt returns or raises")


def _mark_in_use(fd: int) -> bool:
    """Hold a shared lock on the log at `fd` for as long as it is open; False if the file is being deleted.

    Retention, in this engine or in any other using the same directory,
    deletes a log only under an exclusive lock (`unlink_unless_in_use`), so a
    log being written is never deleted, whichever engine writes it. The lock
    goes with the descriptor: closed, or its process dead, the log is free.
    A log created just as a sweep took its name to delete it is found
    unlinked (or still locked), and made again.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # a filesystem without locks: the log is written unmarked, as before
    return os.fstat(fd).st_nlink > 0


def unlink_unless_in_use(path: str | bytes | Path, dir_fd: int | None = None) -> bool:
    """Delete the log at `path` unless a worker holds it open (`_mark_in_use`); True if it is gone.

    Raises the `OSError` of the deletion, not of a file that is already gone.
    """
    try:
        # Only a regular file can be a log held open: anything else (a planted
        # device, FIFO or symlink) is not opened, only its name deleted.
        regular = stat.S_ISREG(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        fd = os.open(path, _PROBE_FLAGS, dir_fd=dir_fd) if regular else -1
    except FileNotFoundError:
        return True
    except OSError:
        fd = -1  # not openable (no read permission): its lock cannot be asked, as before locks
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:
                pass  # a filesystem without locks
            if _between_attempts(fd):
                return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=dir_fd)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


# Enough of a log's end to hold its last line when that is a retry note.
_LAST_LINE = 512


def _between_attempts(fd: int) -> bool:
    """Whether the log open at `fd` ends in a retry note of an engine that still runs.

    Between attempts no worker holds a log: its engine's note that a next
    attempt is due is what says it is in use (by an engine that may be
    another process's, on the same directory).
    """
    from .actors.output import engine_of_retry_note
    from .actors.process_tree import still_running

    try:
        size = os.fstat(fd).st_size
        end = os.pread(fd, _LAST_LINE, max(0, size - _LAST_LINE))
    except OSError:
        return False
    last = end.rstrip(b"\n").rpartition(b"\n")[2].decode("utf-8", "replace")
    engine = engine_of_retry_note(last)
    return engine is not None and still_running(*engine) is not False


def reopen_log(path: str | bytes, dir_fd: int | None = None) -> int:
    """A descriptor appending to the log an earlier attempt of the same execution wrote at `path`.

    Only a regular file of ours with no other name is written to; anything
    else at the name (nothing at all, on another node; a link or FIFO placed
    there since) is treated as `open_log` treats it: a new file takes its place.
    """
    try:
        fd = os.open(path, _REOPEN_FLAGS, dir_fd=dir_fd)
    except OSError:
        return open_log(path, dir_fd)
    try:
        info = os.fstat(fd)
        ours = not hasattr(os, "getuid") or info.st_uid == os.getuid()
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and ours:
            if _held_by_another(fd):
                # A run of the same id in another engine on this directory: not appended to.
                os.close(fd)
                raise OSError(errno.EBUSY, _IN_USE, os.fsdecode(path))
            if _mark_in_use(fd):
                os.set_blocking(fd, True)
                return fd
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise
    os.close(fd)
    return open_log(path, dir_fd)


def _held_by_another(fd: int) -> bool:
    """Whether a worker holds this log open: an exclusive lock cannot be had while its shared one stands."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # a filesystem without locks
    fcntl.flock(fd, fcntl.LOCK_UN)  # `_mark_in_use` takes the shared one next
    return False


class LogDirectories:
    """Descriptors on the log directories a worker writes into, each found to be ours when opened.

    Logs are made relative to the descriptor (`openat`), not by path: a
    directory checked once cannot be swapped for another under its name
    between the check and the making. Before each log the name is looked up
    again (one `stat`): when it leads elsewhere (a symlinked `log_dir` pointed
    at a new directory), or nowhere (removed by a temp cleaner emptying
    `$TMPDIR`, or a person), the directory it leads to is made if need be
    and checked as at start (`prepare_log_dir`). So logs follow the name as
    they did when made by path, and a directory someone else put at the name
    is refused, never written into.
    """

    def __init__(self) -> None:
        # directory -> (descriptor, st_dev, st_ino) of what it led to when checked
        self._dirs: dict[bytes, tuple[int, int, int]] = {}

    def open(self, path: str | bytes, first_attempt: bool) -> int:
        """`open_log` (a first attempt) or `reopen_log` (a retry's) of the log at `path`."""
        directory, slash, name = os.fsencode(path).rpartition(b"/")
        # "/name" is in the root directory; a bare "name" in the working directory.
        directory = directory or (b"/" if slash else b".")
        dir_fd = self._fd(directory, fresh=False)
        try:
            return open_log(name, dir_fd) if first_attempt else reopen_log(name, dir_fd)
        except FileNotFoundError:  # removed between the look and the making
            dir_fd = self._fd(directory, fresh=True)
            return open_log(name, dir_fd) if first_attempt else reopen_log(name, dir_fd)

    def _fd(self, directory: bytes, fresh: bool) -> int:
        known = self._dirs.get(directory)
        if known is not None:
            if not fresh:
                try:
                    info = os.stat(directory)
                except OSError:
                    pass
                else:
                    if (info.st_dev, info.st_ino) == known[1:]:
                        return known[0]
            del self._dirs[directory]
            os.close(known[0])
        try:
            prepare_log_dir(Path(os.fsdecode(directory)))
        except IoError as exc:
            raise PermissionError(errno.EACCES, exc.reason) from None
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        info = os.fstat(fd)
        if hasattr(os, "getuid") and info.st_uid != os.getuid():  # swapped since the check
            os.close(fd)
            raise PermissionError(
                errno.EACCES, f"log directory {os.fsdecode(directory)} belongs to another user"
            )
        self._dirs[directory] = (fd, info.st_dev, info.st_ino)
        return fd

    def close(self) -> None:
        for fd, _dev, _ino in self._dirs.values():
            os.close(fd)
        self._dirs.clear()


def prepare_log_dir(log_dir: Path) -> None:
    """Create the directory owner-only, and refuse one that someone else controls.

    `log_dir` may be a symlink to a directory. The link itself must then be
    ours or root's, because whoever owns it can point it elsewhere after this
    check; and the directory it leads to must be ours.

    A directory that exists already is used as it is: the host may have named
    one it shares (its project, its home, `/tmp`), whose mode is not ours to
    change; the logs in it are owner-only. Its group is the host's choice (a
    umask of 002 makes directories group-writable), but a directory any user
    may write without the sticky bit is refused: any user could replace a log.
    """
    try:
        str(log_dir).encode("utf-8")
    except UnicodeEncodeError:
        # A name of bytes that are not UTF-8 (a Latin-1 $TMPDIR): every log path would be one, and a
        # result's JSON, its journal row and its events could not hold it.
        shown = os.fsencode(log_dir).decode("utf-8", "backslashreplace")
        raise IoError(
            f"log directory {shown} is not valid UTF-8: its log files' paths could not be written in "
            "results (JSON) or the journal; set log_dir to a path that is"
        ) from None
    with map_errors({OSError: IoError}, "cannot prepare log directory"):
        try:
            make_private_dir(log_dir)
            made = True
        except FileExistsError:
            if not log_dir.is_dir():
                raise
            made = False
        info = os.lstat(log_dir)
        if stat.S_ISLNK(info.st_mode):
            if hasattr(os, "getuid") and info.st_uid not in (os.getuid(), 0):
                raise IoError(f"log directory {log_dir} is a symlink that belongs to another user")
            info = os.stat(log_dir)
        if not stat.S_ISDIR(info.st_mode):
            raise IoError(f"log directory {log_dir} is not a directory")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise IoError(f"log directory {log_dir} belongs to another user")
        mode = stat.S_IMODE(info.st_mode)
        if not made and mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise IoError(
                f"log directory {log_dir} may be written by any user (mode {mode:o}), "
                "who could replace its logs"
            )


def make_parents(directory: Path) -> None:
    """Make `directory` and its missing ancestors (0755 at most), none writable by others whatever the umask.

    `mkdir -p` (and `Path.mkdir(parents=True)`) makes them 0777 less the
    umask: with a umask of 000 any user could move the log directory aside
    and put one of theirs in its place.
    """
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            continue
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o700 != 0o700:  # a umask that takes the owner's bits: nothing could be made inside
            os.chmod(path, mode | 0o700)


def make_private_dir(directory: Path) -> None:
    """Make `directory` 0700 whatever the umask, and its missing parents (`make_parents`).

    `FileExistsError` when something has its name already: what is there is the caller's to judge.
    """
    make_parents(directory.parent)
    os.mkdir(directory, 0o700)
    os.chmod(directory, 0o700)  # the umask may have taken bits away


def open_to_read(path: str | bytes | Path) -> int:
    """A descriptor reading the log at `path`: `IoError` unless a regular file of this user is there.

    A command knows its log's name and may replace the file with anything
    its user can make: a FIFO (an open that never returns), a symlink to
    `/dev/zero` or to a file of secrets, a device. None of those is read.
    """
    return _open_ours(path, _PROBE_FLAGS)


def _open_ours(path: str | bytes | Path, flags: int) -> int:
    """`path` opened with `flags` (which refuse a symlink): `IoError` unless a regular file of this user."""
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            shown = os.fsdecode(path)
            raise IoError(f"log file {shown} was replaced by a symlink, which is not followed") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IoError(f"log file {os.fsdecode(path)} was replaced by something that is not a file")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise IoError(f"log file {os.fsdecode(path)} was replaced by a file of another user")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_log(path: Path, missing_ok: bool = False, limit: int | None = None) -> str:
    """The log's text as it is now; with `missing_ok`, a log that was never written reads as empty.

    A log longer than `limit` bytes is refused (`IoError`) rather than read:
    its text would take some three times its size in memory, and a command
    decides how long its log is.
    """
    with map_errors({OSError: IoError, MemoryError: IoError}, "cannot read log file"):
        try:
            fd = open_to_read(path)
        except FileNotFoundError:
            if missing_ok:
                return ""
            raise
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise IoError(
                    f"log file {path} holds {size} bytes, more than the {limit} that read_logs may "
                    "still read into memory (max_log_read_bytes); read the file itself"
                )
            # As of now: what a running command writes after this is for the next read.
            data = handle.read(size)
        return data.decode("utf-8", "replace")


def append_to_log(path: Path, text: str) -> None:
    """Add `text` at the end of the log at `path`, if a log of ours is there; `OSError` when it cannot be.

    For what the host decides about an execution after its worker wrote the
    log (a cancel between attempts, a worker that died): the log then says how
    it ended, as a worker's footer does. Never a file the command put in its
    log's place (`IoError`), nor a new one.
    """
    fd = _open_ours(path, _APPEND_FLAGS)
    try:
        data = text.encode("utf-8", "surrogateescape")
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def copy_log(path: Path, out: BinaryIO, missing_ok: bool = False) -> None:
    """Write the log at `path`, as it is now, to `out`, a piece at a time; as `read_log` reads it.

    For a reader that only passes it on (`cloudops-exec logs`): a log of any
    length, in a megabyte of memory. Errors reading it are `IoError`; those
    writing `out` are its own.
    """
    with map_errors({OSError: IoError, MemoryError: IoError}, "cannot read log file"):
        try:
            fd = open_to_read(path)
        except FileNotFoundError:
            if missing_ok:
                return
            raise
    with os.fdopen(fd, "rb") as handle:
        with map_errors({OSError: IoError}, "cannot read log file"):
            left = os.fstat(fd).st_size  # as of now, as `read_log`
        while left > 0:
            with map_errors({OSError: IoError}, "cannot read log file"):
                piece = handle.read(min(left, _COPY_PIECE))
            if not piece:
                return  # made shorter meanwhile
            left -= len(piece)
            out.write(piece)


class LogNode(str):
    """The cluster node whose disk holds a log file: its address, carrying the node's id as well.

    It is a `str` equal to the address, so code that prints it or compares it
    with an address reads as before. Several nodes can share an address (more
    than one on a machine), so tell nodes apart by `node_id`, not by equality.
    """

    node_id: str

    def __new__(cls, address: str, node_id: str) -> LogNode:
        node = super().__new__(cls, address)
        node.node_id = node_id
        return node

    @property
    def address(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"LogNode(address={self.address!r}, node_id={self.node_id!r})"

    def __getnewargs__(self) -> tuple[Any, ...]:
        # What `copy` and `pickle` pass back to `__new__`: a plain str's would lack the id.
        return (self.address, self.node_id)

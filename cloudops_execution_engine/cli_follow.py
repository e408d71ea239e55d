"""`cloudops-exec logs --follow`: a log printed as it grows, until its execution has ended.

A log's footer (`# finished: ...`) ends an attempt, not always the execution:
under a `RetryPolicy` the next attempt appends to the same log after its
backoff. And a log whose engine died is never finished. So the end is asked
of whoever knows it:

- the journal the run recorded into: the execution's status there, and whether
  an engine still holds the journal (entries a dead holder left `running`
  stay so until the next engine opens the journal and recovers them);
- otherwise the log itself: a worker holds a shared `flock` on a log for as
  long as it writes it (`logfiles`), and `/proc/locks` lists it. A log with a
  footer that no one holds has ended; one without a footer that no one holds
  never will. Unless a retry is due: the engine that sets one says so in the
  log, naming itself (pid, host, start time), and the next attempt is waited
  for while that engine runs.

Nothing here takes a lock on the log or on the journal's lock file: even a
moment's lock could make the engine refuse a retry's log as another engine's,
or a starting engine refuse the journal.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
import sys
import time
from pathlib import Path
from uuid import UUID

__all__ = ["follow"]

# How often the file is read again while it does not grow, and how often, at most,
# the journal and the lock table are asked whether the execution has ended.
_POLL_S = 0.1
_ASK_EVERY_S = 0.25
# A log no one holds, without a footer, is taken for abandoned only when seen so this many times
# in a row without growing: a worker holds a log from a moment after it creates it.
_UNHELD_LOOKS = 3
_ENDED = frozenset({"completed", "failed", "timeout", "cancelled"})
_FOOTER = "# finished: "
_NEXT_ATTEMPT = "# --- attempt "


class _End(enum.Enum):
    ENDED = "ended"
    ABANDONED = "abandoned"


def follow(log_file: Path, execution_id: UUID, journal: Path | None) -> int | None:
    """Print `log_file` as it grows until its execution ends: 0, or 1 when it will not.

    A command recorded as queued has no log yet: it is waited for. None when
    there is nothing to follow (no log, and nothing recorded that will make one).
    """
    watch = _EndWatch(log_file, execution_id, journal)
    try:
        if not os.path.lexists(log_file):
            waited = _until_it_starts(log_file, execution_id, watch)
            if waited != _STARTED:
                return waited
        return _follow_file(log_file, execution_id, watch)
    finally:
        watch.close()


_STARTED = -1


def _until_it_starts(log_file: Path, execution_id: UUID, watch: _EndWatch) -> int | None:
    """Wait while the journal says the command is queued: `_STARTED` once its log is there."""
    while not os.path.lexists(log_file):
        status = watch.status()
        if status is None:
            return None
        if status in _ENDED:
            if log_file.is_file():
                break
            print(
                f"cloudops-exec: {execution_id} ended {status} before it started: it has no log",
                file=sys.stderr,
            )
            return 1
        if watch.engine_gone(status):
            print(f"cloudops-exec: {execution_id} did not end: {watch.why}", file=sys.stderr)
            return 1
        time.sleep(_ASK_EVERY_S)
    return _STARTED


_READ_CHARS = 1 << 20
# Enough of a line's start to tell a footer or an attempt's header from the command's output.
_LINE_START = 256


def _follow_file(log_file: Path, execution_id: UUID, watch: _EndWatch) -> int:
    from .errors import IoError
    from .logfiles import open_to_read

    out = sys.stdout
    try:
        fd = open_to_read(log_file)
    except (OSError, IoError) as exc:
        print(f"cloudops-exec: cannot follow the log of {execution_id}: {exc}", file=sys.stderr)
        return 1
    # newline="": only "\n" ends a line of the log; a command's lone "\r" is part of its line.
    with open(fd, errors="replace", newline="") as handle:
        pending = ""
        while True:
            # In pieces: a log of gigabytes, or one line of them, is followed in bounded memory.
            chunk = handle.read(_READ_CHARS)
            if chunk:
                out.write(chunk)
                out.flush()
                *lines, pending = (pending + chunk).split("\n")
                pending = pending[:_LINE_START]  # only how a line starts tells anything
                watch.saw(lines, len(chunk))
                continue
            end = watch.end()
            if end is None:
                time.sleep(_POLL_S)
                continue
            while chunk := handle.read(_READ_CHARS):  # what came between the last read and the answer
                out.write(chunk)
            out.flush()
            if end is _End.ABANDONED:
                print(f"cloudops-exec: {execution_id} did not end: {watch.why}", file=sys.stderr)
                return 1
            return 0


class _EndWatch:
    """Whether a followed execution has ended (see the module's docstring)."""

    def __init__(self, log_file: Path, execution_id: UUID, journal: Path | None) -> None:
        self._log = log_file
        self._key = execution_id.bytes
        self._journal = journal
        self._conn: sqlite3.Connection | None = None
        self._footer = False  # the last attempt written so far has its footer
        self._retry_by: tuple[int, str, int] | None = None  # the engine a retry note names
        self._unheld = 0
        self._asked_at = 0.0
        self.why = ""  # why an abandoned execution will not end

    def saw(self, lines: list[str], grown: int) -> None:
        from .actors.output import RETRY_NOTE, engine_of_retry_note

        for line in lines:
            if line.startswith(_FOOTER):
                self._footer = True
                self._retry_by = None
            elif line.startswith(_NEXT_ATTEMPT):
                self._footer = False
                self._retry_by = None
            elif line.startswith(RETRY_NOTE):
                self._retry_by = engine_of_retry_note(line)
        if grown:
            self._unheld = 0

    def end(self) -> _End | None:
        now = time.monotonic()
        if now - self._asked_at < _ASK_EVERY_S:
            return None
        self._asked_at = now
        status = self.status()
        if status in _ENDED:
            return _End.ENDED
        if status is not None:
            # Recorded and not ended: a retry may be due, so only its engine's death ends it.
            return _End.ABANDONED if self.engine_gone(status) else None
        held = _held(self._log)
        if self._retry_by is not None and held is not True:
            # Between attempts: only the death of the engine that set the retry ends it.
            from .actors.process_tree import still_running

            return None if still_running(*self._retry_by) is not False else self._no_next_attempt()
        if held is None:
            # No lock table to read: the footer is all there is to go by.
            return _End.ENDED if self._footer else None
        self.why = "the engine running it stopped writing its log before it ended (the log has no footer)"
        if not self._let_go(held):
            return None
        return _End.ENDED if self._footer else _End.ABANDONED

    def _no_next_attempt(self) -> _End:
        assert self._retry_by is not None
        self.why = (
            f"the engine that was to run its next attempt (pid {self._retry_by[0]}) stopped during the "
            "backoff before it"
        )
        return _End.ABANDONED

    def engine_gone(self, status: str) -> bool:
        """Whether no engine holds the journal that records the execution as `status` (not ended)."""
        holder = _held(_lock_file(self._journal)) if self._journal is not None else None
        self.why = (
            f"the engine running it stopped before it ended; it is recorded as {status} in "
            f"{self._journal} until an engine opens that journal again"
        )
        return self._let_go(holder)

    def _let_go(self, held: bool | None) -> bool:
        """Whether the file was seen held by no one `_UNHELD_LOOKS` times in a row (None: cannot tell)."""
        if held is not False:
            self._unheld = 0
            return False
        self._unheld += 1
        return self._unheld >= _UNHELD_LOOKS

    def status(self) -> str | None:
        """The command's status in the journal; None when it is not recorded there (or unreadable)."""
        if self._journal is None:
            return None
        try:
            if self._conn is None:
                if not self._journal.is_file():
                    return None
                from .actors.journal import open_connection

                self._conn = open_connection(self._journal, readonly=True)
            query = "SELECT status, kind FROM entries WHERE id = ?"
            row = self._conn.execute(query, (self._key,)).fetchone()
        except sqlite3.Error:
            return None
        # A plan has no log of its own to follow: its commands' logs are read, not followed.
        return str(row[0]) if row is not None and row[1] == "command" else None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()


def engine_holds(journal: Path) -> bool | None:
    """Whether an engine holds `journal` (its lock file is `flock`ed); None when that cannot be told."""
    lock = _lock_file(journal)
    if not lock.exists():
        return False
    return _held(lock)


def _lock_file(journal: Path) -> Path:
    from .actors.journal_lock import lock_path_for

    return lock_path_for(journal)


def _held(path: Path) -> bool | None:
    """Whether some process holds an `flock` on `path`; None when the lock table cannot tell.

    `/proc/locks` names a file by device and inode. That the names it gives
    match `stat`'s for this filesystem is checked on the file's directory
    first, with a shared lock of our own that nothing else takes there.
    """
    try:
        info = os.stat(path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        import fcntl

        try:
            fcntl.flock(directory, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return None
        locked = _flocked()
        if locked is None or _file_id(os.fstat(directory)) not in locked:
            return None
        return _file_id(info) in locked
    finally:
        os.close(directory)  # and with it the lock on the directory


def _file_id(info: os.stat_result) -> tuple[int, int, int]:
    return os.major(info.st_dev), os.minor(info.st_dev), info.st_ino


def _flocked() -> set[tuple[int, int, int]] | None:
    """(major, minor, inode) of every file an `flock` is held on, from `/proc/locks`."""
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    held: set[tuple[int, int, int]] = set()
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  READ 17095 fe:00:2809869 0 EOF"; a waiter's line has "->" after the
        # number and holds nothing.
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        with contextlib.suppress(ValueError):
            major, minor, inode = fields[5].split(":")
            held.add((int(major, 16), int(minor, 16), int(inode)))
    return held

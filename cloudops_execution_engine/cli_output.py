"""The command line's stdout: a write that fails is said, and fails the program, as coreutils do.

`cloudops-exec run -- seq 3 > /dev/full` used to exit 0 having written
nothing: the failed writes happened in an event handler, whose errors the
engine logs to a logger nobody configured. And with descriptor 1 closed
(`>&-`) Python sets `sys.stdout` to None, and click writes nowhere, in
silence. Here stdout is a stream whose failures are `CannotWrite`, which the
program turns into `cloudops-exec: cannot write to stdout: <why>` and exit 1.

A closed descriptor 1 is given /dev/null, so that no file the program opens
later (a journal, a log) becomes descriptor 1 and receives the output; writes
to it still fail, as they would have.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from collections.abc import Callable

from .standard_fds import devnull_onto

__all__ = [
    "CannotWrite",
    "closed_at_start",
    "discard_stdout",
    "guard_stdout",
    "reader_left",
    "route_messages",
    "say_cannot_write",
    "say_message",
    "stdout_guarded",
]

# Where the engine's own messages go while a run writes its output through a pump (`cli_pump`):
# written straight to stderr on the loop, a message to a terminal that stopped reading held the
# loop, and with it the signals that end the run.
_route: Callable[[str], None] | None = None


def route_messages(to: Callable[[str], None] | None) -> None:
    """Send what `say_message` is given to `to` (a run's stderr, through its pump); None: to stderr."""
    global _route
    _route = to


def say_message(text: str) -> None:
    """One of the engine's messages (a line, with its newline), from any thread."""
    route = _route
    if route is not None:
        route(text)
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


class CannotWrite(OSError):
    """Our stdout cannot be written: a full disk, a closed descriptor, an I/O error."""


class _Stdout(io.RawIOBase):
    """Descriptor 1, writing as `FileIO` does but for its errors."""

    def __init__(self, closed_at_start: bool) -> None:
        super().__init__()
        self._failing = self.closed_at_start = closed_at_start
        self._discarding = False
        self.reader_left = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return not self._failing and os.isatty(1)

    def write(self, data: object) -> int:
        view = memoryview(data)  # type: ignore[arg-type]
        if self._discarding:
            return len(view)
        if self._failing:
            raise CannotWrite(errno.EBADF, os.strerror(errno.EBADF))
        try:
            return os.write(1, view)
        except BrokenPipeError:
            self.reader_left = True
            raise  # a reader that left: ended as SIGPIPE ends a pipeline, elsewhere
        except OSError as exc:
            raise CannotWrite(exc.errno, exc.strerror) from None

    def discard(self) -> None:
        self._discarding = True


_said = False
_raw: _Stdout | None = None


def stdout_guarded() -> bool:
    """Whether the program's stdout is ours (`guard_stdout`), not a caller's stream (run from Python)."""
    return _raw is not None


def closed_at_start() -> CannotWrite | None:
    """What writing to stdout fails with when descriptor 1 was closed as the program started, else None."""
    if _raw is not None and _raw.closed_at_start:
        return CannotWrite(errno.EBADF, os.strerror(errno.EBADF))
    return None


def reader_left() -> bool:
    """Whether a write to stdout found its reader gone (`cloudops-exec history | head -1`)."""
    return _raw is not None and _raw.reader_left


def guard_stdout() -> None:
    """Make `sys.stdout` a stream whose failed writes raise `CannotWrite` (for the program, not a library)."""
    global _raw
    current = sys.stdout
    closed = current is None
    if closed:
        devnull_onto(1)
    _raw = _Stdout(closed)
    encoding = getattr(current, "encoding", None) or "utf-8"
    # What this program writes as text (reports, tables) in a locale that cannot say a character of
    # it (an ellipsis in ASCII) shows it as "?" rather than end in a traceback; a command's output
    # goes as UTF-8 bytes, past the encoding (`cli_commands._Output`).
    errors = getattr(current, "errors", None) or "strict"
    if errors == "strict":
        errors = "replace"
    line_buffering = bool(getattr(current, "line_buffering", False))
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_raw), encoding=encoding, errors=errors, line_buffering=line_buffering
    )


def discard_stdout() -> None:
    """From now on what is written to stdout is dropped: its failure has been said."""
    if _raw is not None:
        _raw.discard()


def say_cannot_write(exc: OSError) -> None:
    """Say once, on stderr, that stdout cannot be written."""
    global _said
    discard_stdout()
    if _said:
        return
    _said = True
    why = exc.strerror or str(exc)
    try:
        sys.stderr.write(f"cloudops-exec: cannot write to stdout: {why}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no stderr either: the exit status says it

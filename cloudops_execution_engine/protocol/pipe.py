"""Writing frames to a non-blocking pipe from an event loop.

Both ends of the protocol use it. Frames queue in one buffer and are written
once per loop turn, so a burst of messages costs one system call rather than
one each; what the pipe does not take now is written when it becomes writable.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["READ_SIZE", "PipeWriter", "read_available", "write_unsignalled"]

READ_SIZE = 64 * 1024  # a pipe's default capacity: larger reads measured no faster
_SIGPIPE = getattr(signal, "SIGPIPE", None)


def write_unsignalled(fd: int, data: bytes | bytearray) -> int:
    """`os.write`, which fails with `BrokenPipeError` when the reader is gone, whatever SIGPIPE's action is.

    Python ignores SIGPIPE, so such a write fails with EPIPE. A host that
    restored the default action (command-line tools do, and programs that
    embed Python may never have ignored it) would instead be killed by the
    write to a worker that had just died: there the signal is blocked on this
    thread for the write, and taken if the write raised it.
    """
    if _SIGPIPE is None or signal.getsignal(_SIGPIPE) not in (signal.SIG_DFL, None):
        return os.write(fd, data)
    was = signal.pthread_sigmask(signal.SIG_BLOCK, {_SIGPIPE})
    try:
        return os.write(fd, data)
    except BrokenPipeError:
        signal.sigtimedwait({_SIGPIPE}, 0)
        raise
    finally:
        if _SIGPIPE not in was:
            signal.pthread_sigmask(signal.SIG_SETMASK, was)


def read_available(fd: int) -> bytes | None:
    """One read of a non-blocking fd the loop said is readable.

    None when there was nothing after all; empty bytes at end of file, or when
    the fd failed, which means the same to every reader here: the writer is gone.
    """
    try:
        return os.read(fd, READ_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Loop(Protocol):
    """What the writer needs of a loop: asyncio's, or the worker's own."""

    def call_soon(self, callback: Callable[..., object], *args: Any) -> object: ...

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> object: ...

    def remove_writer(self, fd: int) -> bool: ...


class PipeWriter:
    __slots__ = (
        "_broken",
        "_buffer",
        "_closed",
        "_fd",
        "_loop",
        "_on_broken",
        "_on_flushed",
        "_scheduled",
        "_watching",
    )

    def __init__(
        self,
        loop: Loop,
        fd: int,
        on_broken: Callable[[OSError], None],
        on_flushed: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._on_broken = on_broken
        self._on_flushed = on_flushed
        self._buffer = bytearray()
        self._scheduled = False
        self._watching = False
        self._closed = False
        self._broken = False

    @property
    def backlog(self) -> int:
        return len(self._buffer)

    def write(self, frame: bytes) -> None:
        if self._closed:
            return
        self._buffer += frame
        if not self._scheduled and not self._watching:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._closed or not self._buffer:
            return
        try:
            written = write_unsignalled(self._fd, self._buffer)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self.close()
            self._on_broken(exc)
            return
        del self._buffer[:written]
        if self._buffer and not self._watching:
            self._loop.add_writer(self._fd, self.flush)
            self._watching = True
        elif not self._buffer and self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False
        if self._on_flushed is not None:
            self._on_flushed()

    def forget(self) -> None:
        """Stop writing, without asking the loop (in a forked child: its epoll instance is the parent's)."""
        self._closed = True
        self._watching = False
        self._buffer.clear()

    def close(self) -> None:
        """Stop writing, and let go of what was never written; the caller owns and closes the fd."""
        self._closed = True
        self._buffer = bytearray()  # a dead worker's backlog (commands' stdin) may be large
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False

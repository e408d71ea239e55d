"""Feeding a command its stdin from the worker's loop, without ever blocking it.

The worker gives the command the read end of a pipe and keeps the write end,
non-blocking. It writes whenever the loop says the pipe has room, as much as
the pipe takes, and closes its end once everything is written, so the command
reads end of input. A command that never reads only fills the pipe: the loop
stops hearing of it, and every other execution goes on. When the command
closes its stdin or exits, the next write fails with EPIPE (the worker ignores
SIGPIPE, as Python does) and the feed closes; the end of the execution closes
it in any case.
"""

from __future__ import annotations

import os

from .reactor import Reactor

__all__ = ["StdinFeed"]

# One write at most: the pipe takes 64 KiB at a time on Linux; a larger slice
# costs nothing (a memoryview) and lets a pipe made larger take more.
_CHUNK = 1024 * 1024


class StdinFeed:
    """The worker's end of one command's stdin pipe, and what is left to write into it."""

    __slots__ = ("_data", "_fd", "_loop", "_pos")

    def __init__(self, loop: Reactor, fd: int, data: bytes) -> None:
        os.set_blocking(fd, False)
        self._loop = loop
        self._fd = fd
        self._data = memoryview(data)
        self._pos = 0
        loop.add_writer(fd, self._write)

    @property
    def done(self) -> bool:
        return self._fd < 0

    def _write(self) -> None:
        try:
            self._pos += os.write(self._fd, self._data[self._pos : self._pos + _CHUNK])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # EPIPE: the command closed its stdin or has gone; the rest is not wanted.
            self.close()
            return
        if self._pos >= len(self._data):
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_writer(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._data = memoryview(b"")

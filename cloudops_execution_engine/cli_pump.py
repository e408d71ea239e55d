"""What a run's handlers write to our stdout and stderr, written by a thread of its own.

A reader that stops reading (`cloudops-exec run -- yes | less`, less at its
prompt) fills the pipe, and the next write to it waits until the reader reads
again, perhaps never. Made on the event loop, that write held the loop too,
and with it the signals that end a run: Ctrl-C, SIGTERM and a hangup did
nothing. Here handlers queue what they write and one thread writes it, in
order, to descriptors 1 and 2. While more than `BUDGET` bytes wait, a handler
waits too (`room`), without holding the loop: a slow reader then holds the
commands' output back through the engine's flow control, and loses none of it.

A run that ends waits until everything queued is written (`drained`), however
slow the reader, unless a signal ended it: then the reader, which may never
read again, has `AFTER_SIGNAL_S` to take what waits (and, each time, what is
written later, the run's report among it), none after a second signal; what
it has not taken then is not written (`abandoned`), nor anything after it.

The thread writes bytes to the descriptors, past `sys.stdout`'s buffer: a
daemon thread left waiting in a write must hold no lock the interpreter takes
as it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable

from .standard_fds import devnull_onto

__all__ = ["AFTER_SIGNAL_S", "BUDGET", "Pump", "Sink"]

# Bytes queued before a handler waits: some hundred lines of a busy command,
# about what a pipe holds, kept in memory at most.
BUDGET = 256 * 1024
# How long a run that a signal ended waits for its reader to take what is queued.
AFTER_SIGNAL_S = 2.0


class Sink:
    """One descriptor the pump writes: `closed` when its reader left, `failed` when it cannot be written.

    Both are called on the loop, once; what is queued for the descriptor after
    that is dropped.
    """

    def __init__(self, fd: int, closed: Callable[[], None], failed: Callable[[OSError], None]) -> None:
        self.fd = fd
        self.closed = closed
        self.failed = failed
        self.open = True


class Pump:
    """Queues writes on the loop's thread; its own thread makes them, in order."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._items: deque[tuple[Sink, bytes]] = deque()
        self._queued = 0  # bytes queued and not yet written, or being written
        self._wake = threading.Condition(self._lock)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (queued at most, who waits for it)
        self._thread: threading.Thread | None = None
        self._writing: Sink | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._patience: float | None = None  # set by a signal: how long a write may wait
        self._closing = False
        self.abandoned = False

    def write(self, sink: Sink, data: bytes) -> None:
        """Queue `data` for `sink` (from the loop's thread)."""
        if not data or self.abandoned:
            return
        with self._lock:
            self._items.append((sink, data))
            self._queued += len(data)
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="cloudops-exec-output", daemon=True)
            self._thread.start()
        self._arm()  # after a signal: this too waits `_patience` at most

    def backlog(self) -> int:
        """Bytes queued and not yet written (read without the lock: an estimate, for pacing)."""
        return self._queued

    async def room(self) -> None:
        """Return once no more than `BUDGET` bytes wait to be written."""
        await self._until(BUDGET)

    async def drained(self) -> None:
        """Return once everything queued is written, or given up (`give_up_after`)."""
        await self._until(0)

    def give_up_after(self, seconds: float) -> None:
        """From now on no write waits more than `seconds` for the reader (a signal is ending the run).

        Asked again (a second signal), nothing more is written at all.
        """
        if self._patience is not None:
            self.abandon()
            return
        self._patience = seconds
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None and self._patience is not None:
            self._deadline = self._loop.call_later(self._patience, self._give_up)

    def _give_up(self) -> None:
        self._deadline = None
        with self._lock:
            stalled = self._queued > 0 or self._writing is not None
        if stalled:
            self.abandon()

    def close(self) -> None:
        """Let the thread end once what is queued is written (it stays if that write never ends)."""
        with self._lock:
            self._closing = True
            self._wake.notify()

    def abandon(self) -> None:
        """Write nothing more: what is queued is dropped, a descriptor it waited for is /dev/null now.

        So that nothing the program writes to it later (a report, a logged
        warning, the flush at exit) waits for that reader either; the write
        the thread may be waiting in keeps the pipe it began on.
        """
        self.abandoned = True
        with self._lock:
            stalled = {sink for sink, _data in self._items}
            if self._writing is not None:
                stalled.add(self._writing)
            self._items.clear()
            self._queued = 0
            waiters, self._waiters = self._waiters, []
        for sink in stalled:
            sink.open = False
            _devnull_onto(sink.fd)
        for _most, waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _until(self, most: int) -> None:
        with self._lock:
            if self._queued <= most or self.abandoned:
                return
            waiter = self._loop.create_future()
            self._waiters.append((most, waiter))
        await waiter

    def _main(self) -> None:
        while True:
            with self._lock:
                while not self._items:
                    if self._closing:
                        return
                    self._wake.wait()
                sink, data = self._items.popleft()
                # What follows for the same descriptor goes in the same write.
                if self._items and self._items[0][0] is sink:
                    parts = [data]
                    while self._items and self._items[0][0] is sink:
                        parts.append(self._items.popleft()[1])
                    data = b"".join(parts)
                self._writing = sink
            if sink.open:
                self._write(sink, data)
            with self._lock:
                self._writing = None
                if self.abandoned:
                    continue
                self._queued -= len(data)
                ready = [waiter for most, waiter in self._waiters if self._queued <= most]
                if ready:
                    self._waiters = [(most, w) for most, w in self._waiters if self._queued > most]
            for waiter in ready:
                self._call(_settle, waiter)

    def _write(self, sink: Sink, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(sink.fd, view) :]
        except BrokenPipeError:
            sink.open = False
            _devnull_onto(sink.fd)  # nothing written to it later fails again
            self._call(sink.closed)
        except OSError as exc:  # a full disk, an I/O error
            sink.open = False
            self._call(sink.failed, exc)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        # RuntimeError: the loop has closed, the run is over and nobody waits.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)


def _devnull_onto(fd: int) -> None:
    with contextlib.suppress(OSError):
        devnull_onto(fd)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

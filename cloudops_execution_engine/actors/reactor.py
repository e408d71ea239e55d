"""The worker's event loop: readiness of fds, timers, signals and deferred calls.

A worker needs a small part of asyncio: callbacks on readable and writable
fds, timers, two signals, calls deferred to the end of the current turn, and
low-priority calls (the start of a command) that wait for everything else.
Every command costs two pipe registrations, a timeout timer and a few deferred
calls, and asyncio wraps each in handles, selector keys and context copies
made for coroutines the worker never runs. This loop keeps a callback per fd
and a heap of timers, so a command costs a few dict operations besides its
system calls.

Each turn waits once, then runs the fd callbacks, the signal callbacks, the
timers that are due, the low-priority calls, and last the deferred calls
(which is where the frame writer sends everything the turn produced, in one
write). A command's start blocks for a millisecond or more, so a low-priority
call waits while a timer falls due sooner than such a call takes (their
running average), and while `hold_low_priority()` says so (the worker: a tree
it just signalled is dying), each for at most `LOW_HOLD_MAX`, so that none
waits for long. While `one_low_a_turn()` says so (the worker: a tree is being
killed), they go one a turn, and between two starts the loop looks again, so
that a command that died is dealt with first rather than after a whole burst
of starts; otherwise a turn runs all that may run, and their messages share
one write, as a burst of starts is common (a host filling freed slots) and a
write per start would wake the host for each.

Timers wake on time to within the kernel's timer slack on a short wait: epoll
counts whole milliseconds and rounds up, and the kernel lets a long wait end
later in proportion (60 ms on a 60 s wait), so a wait for a timer ends well
before it, and the last stretch is waited out with `select`, which counts
microseconds.

A callback that raises ends the loop, and with it the worker. Where asyncio
would log the error and go on, leaving that execution never to finish, the
supervisor sees the worker die, fails what it held, kills what it left and
starts another.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import select
import selectors
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["LOW_HOLD_MAX", "Reactor", "Timer"]

# poll(2)'s bits, which epoll shares and the selector fallback translates.
_READ, _WRITE = select.POLLIN, select.POLLOUT
# Errors and hang-ups count as readable and writable: the callback's own read
# or write then finds out what happened, as with asyncio.
_READ_LIKE = _READ | select.POLLERR | select.POLLHUP
_WRITE_LIKE = _WRITE | select.POLLERR | select.POLLHUP
# Past this many cancelled timers, and once they are half the heap, the heap is rebuilt:
# every command's timeout timer is cancelled when it ends, usually long before it is due.
_CANCELLED_SWEEP = 256
# epoll waits whole milliseconds, rounded up, and a long wait ends later still:
# the kernel's "slack" lets it end a thousandth of the wait late (a 200th for a
# niced process, at most 0.1 s), and a virtual machine's host adds its own (a
# 5 s wait ended 10 ms late on one). A wait that ends with a timer is cut short
# by two milliseconds and a hundredth, so that it ends before the timer; the rest is
# waited the same way, a few turns from far off, and under _FINE_WAIT with
# select, which counts microseconds.
_EARLY = 0.002
_FINE_WAIT = 0.01
_SLACK = 0.01
# select's fd sets hold fds below this; the epoll fd, made first, always is.
_FD_SETSIZE = 1024
# The longest a low-priority call is held back for timers and `hold_low_priority`;
# what it is expected to take at first, and at most.
LOW_HOLD_MAX = 0.005
_LOW_COST_FIRST = 0.001
_LOW_COST_MAX = 0.005


class Timer:
    __slots__ = ("args", "callback", "cancelled", "reactor", "when")

    def __init__(self, reactor: Reactor, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.reactor = reactor
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            # The heap keeps a cancelled timer until its next sweep; what the
            # callback would have used (for a timeout, a whole execution) is let
            # go now, so it is freed at once rather than aged through the GC.
            self.callback = _nothing
            self.args = ()
            self.reactor._timer_cancelled()


_MAX_WAIT = 3600.0


def _nothing() -> None:
    pass


def _never() -> bool:
    return False


class _Poller(Protocol):
    """What the loop needs of a poller; `select.epoll` has it as it is."""

    def register(self, fd: int, mask: int, /) -> None: ...

    def modify(self, fd: int, mask: int, /) -> None: ...

    def unregister(self, fd: int, /) -> None: ...

    def poll(self, timeout: float | None, /) -> list[tuple[int, int]]: ...

    def close(self) -> None: ...


class _SelectorPoller:
    """Where there is no epoll (macOS): the platform's default selector, shaped as epoll."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()

    @staticmethod
    def _events(mask: int) -> int:
        return (selectors.EVENT_READ if mask & _READ else 0) | (selectors.EVENT_WRITE if mask & _WRITE else 0)

    def register(self, fd: int, mask: int, /) -> None:
        self._selector.register(fd, self._events(mask))

    def modify(self, fd: int, mask: int, /) -> None:
        self._selector.modify(fd, self._events(mask))

    def unregister(self, fd: int, /) -> None:
        self._selector.unregister(fd)

    def poll(self, timeout: float | None, /) -> list[tuple[int, int]]:
        ready = []
        for key, events in self._selector.select(timeout):
            read = _READ if events & selectors.EVENT_READ else 0
            ready.append((key.fd, read | (_WRITE if events & selectors.EVENT_WRITE else 0)))
        return ready

    def close(self) -> None:
        self._selector.close()


_HAVE_EPOLL = hasattr(select, "epoll")


class Reactor:
    def __init__(self, epoll: bool = _HAVE_EPOLL) -> None:
        self._poller: _Poller
        # The fd whose readiness the fine wait watches; -1 for the selector, which
        # is for where there is no epoll (kqueue counts nanoseconds).
        self._fine_fd = -1
        if epoll:
            self._poller = poller = select.epoll()
            if poller.fileno() < _FD_SETSIZE:
                self._fine_fd = poller.fileno()
        else:
            self._poller = _SelectorPoller()
        self._readers: dict[int, tuple[Callable[..., object], tuple[Any, ...]]] = {}
        self._writers: dict[int, tuple[Callable[..., object], tuple[Any, ...]]] = {}
        self._masks: dict[int, int] = {}
        # (when, sequence, timer): ordered by C-level tuple comparison, ties in call order.
        self._timers: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._cancelled = 0
        self._soon: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._low: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = collections.deque()
        self._low_cost = _LOW_COST_FIRST
        self._low_held_since = 0.0  # when the next low-priority call was first held back; 0: it was not
        # While this answers True, low-priority calls wait (at most LOW_HOLD_MAX each).
        self.hold_low_priority: Callable[[], bool] = _never
        # While this answers True, one low-priority call runs a turn; otherwise all that
        # may run do, and what they produce goes out in the turn's one write.
        self.one_low_a_turn: Callable[[], bool] = _never
        self._signals: dict[int, Callable[[], None]] = {}
        self._previous_handlers: dict[int, Any] = {}
        self._previous_wakeup: int | None = None
        self._pending_signals: set[int] = set()
        self._running = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._watch(self._wake_read, _READ)

    # -- fds -----------------------------------------------------------------

    def _watch(self, fd: int, mask: int) -> None:
        old = self._masks.get(fd, 0)
        new = old | mask
        if old == 0:
            self._poller.register(fd, new)
        elif new != old:
            self._poller.modify(fd, new)
        self._masks[fd] = new

    def _unwatch(self, fd: int, mask: int) -> None:
        old = self._masks.get(fd, 0)
        new = old & ~mask
        if new == old:
            return
        if new:
            self._poller.modify(fd, new)
            self._masks[fd] = new
        else:
            # try rather than contextlib.suppress: this runs twice per command.
            try:  # noqa: SIM105
                self._poller.unregister(fd)
            except (OSError, KeyError, ValueError):
                pass
            del self._masks[fd]

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._readers[fd] = (callback, args)
        self._watch(fd, _READ)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        self._unwatch(fd, _READ)
        return True

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._writers[fd] = (callback, args)
        self._watch(fd, _WRITE)

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        self._unwatch(fd, _WRITE)
        return True

    # -- calls -----------------------------------------------------------------

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        self._soon.append((callback, args))

    def call_low_priority(self, callback: Callable[..., object], *args: Any) -> None:
        """Run `callback` in a later turn, once that turn's ready fds, signals and due timers have run.

        In the order they were asked for; not while a timer is about to fall
        due or `hold_low_priority()` holds, and one a turn while
        `one_low_a_turn()` does (see the module's docstring).
        """
        self._low.append((callback, args))

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        when = time.monotonic() + delay
        timer = Timer(self, when, callback, args)
        heapq.heappush(self._timers, (when, next(self._sequence), timer))
        return timer

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled > _CANCELLED_SWEEP and self._cancelled * 2 > len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    # -- signals -----------------------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Callable[[], None]) -> None:
        """Run `callback` in the loop, never inside the interrupted code, when `sig` arrives."""
        if self._previous_wakeup is None:
            # A burst of signals can fill the pipe; nothing is lost, since the
            # handler below records each signal, so the warning would be noise.
            self._previous_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        self._signals[sig] = callback
        self._previous_handlers.setdefault(sig, signal.signal(sig, self._note_signal))
        # Restart interrupted system calls rather than fail them, as asyncio does.
        signal.siginterrupt(sig, False)

    def _note_signal(self, sig: int, _frame: object) -> None:
        self._pending_signals.add(sig)

    # -- running -----------------------------------------------------------------

    def run(self) -> None:
        """Turn until `stop()`."""
        self._running = True
        readers, writers, timers, soon = self._readers, self._writers, self._timers, self._soon
        low = self._low
        while self._running:
            if soon or self._pending_signals:
                timeout: float | None = 0.0
            else:
                now = time.monotonic()
                timeout = None
                if self._timers:
                    # epoll takes at most INT_MAX milliseconds (about 24.8 days); a
                    # longer timer (a 30-day timeout) is reached in several waits.
                    timeout = min(max(0.0, self._timers[0][0] - now), _MAX_WAIT)
                if low:
                    held = self._low_wait(now)
                    held = 0.0 if held is None else held
                    timeout = held if timeout is None else min(timeout, held)
                if timeout and self._fine_fd >= 0:
                    timeout = self._fine_wait(timeout)
            events = self._poller.poll(timeout)
            for fd, mask in events:
                if fd == self._wake_read:
                    self._drain_wakeups()
                    continue
                if mask & _READ_LIKE:
                    entry = readers.get(fd)
                    if entry is not None:
                        entry[0](*entry[1])
                if mask & _WRITE_LIKE:
                    entry = writers.get(fd)
                    if entry is not None:
                        entry[0](*entry[1])
            # Signals after the fds: a command's end of output and its exit
            # arrive together, and reading the output first lets the exit
            # finish the execution at once.
            if self._pending_signals:
                self._run_signals()
            timers = self._timers
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if timer.cancelled:
                        self._cancelled -= 1
                        continue
                    timer.cancelled = True  # spent: a late cancel() must not count it again
                    timer.callback(*timer.args)
                    timers = self._timers
            if low and soon:
                # What the turn produced (an end) goes out first, not after its starts.
                self._run_soon()
            ran = False
            while low:
                if ran and self.one_low_a_turn():
                    break
                start = time.monotonic()
                if self._low_wait(start) is not None:
                    break
                self._low_held_since = 0.0
                callback, args = low.popleft()
                callback(*args)
                self._low_cost += (time.monotonic() - start - self._low_cost) / 4
                ran = True
            if soon:
                self._run_soon()

    def _run_soon(self) -> None:
        soon = self._soon
        while soon:
            batch = soon[:]
            soon.clear()
            for callback, args in batch:
                callback(*args)

    def _low_wait(self, now: float) -> float | None:
        """How long the next low-priority call is held back from `now`; None: it runs this turn."""
        if self._low_held_since:
            left = self._low_held_since + LOW_HOLD_MAX - now
            if left <= 0:
                return None
        else:
            left = LOW_HOLD_MAX
        if self.hold_low_priority():
            # Until what holds it changes, which happens in some turn, or the limit.
            self._low_held_since = self._low_held_since or now
            return left
        timers = self._timers
        while timers and timers[0][2].cancelled:
            # A cancelled timer (a timeout of a command that ended) holds nothing back.
            heapq.heappop(timers)
            self._cancelled -= 1
        if timers:
            due_in = timers[0][0] - now
            if due_in < min(self._low_cost, _LOW_COST_MAX):
                self._low_held_since = self._low_held_since or now
                return min(max(due_in, 0.0), left)
        return None

    def _fine_wait(self, timeout: float) -> float:
        """What is left to wait with epoll: a long wait ends early, a short one here."""
        if timeout > _FINE_WAIT:
            # Rounded up and slackened, this ends before the timer; the next
            # turn waits out the rest, below or, from far off, with epoll again.
            return timeout - _EARLY - timeout * _SLACK
        # The epoll fd reads as ready when one of its fds is: this returns as
        # epoll would have, but at the timer to the microsecond.
        select.select((self._fine_fd,), (), (), timeout)
        return 0.0

    def _drain_wakeups(self) -> None:
        # A short read emptied the pipe: one call, where reading on to EAGAIN
        # would cost a second one and an exception every time.
        try:
            while len(os.read(self._wake_read, 4096)) == 4096:
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _run_signals(self) -> None:
        while self._pending_signals:
            sig = self._pending_signals.pop()
            callback = self._signals.get(sig)
            if callback is not None:
                callback()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        """Release the fds and give the signals back to whoever had them before."""
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        if self._previous_wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
        self._signals.clear()
        self._previous_handlers.clear()
        self._poller.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

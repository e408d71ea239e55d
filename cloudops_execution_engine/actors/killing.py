"""How a process tree is stopped: one escalation, used by every path that stops one.

    begin:  look, then SIGTERM and SIGCONT to the command's process group
            while its leader is unreaped (one call that reaches most of a tree
            at once), and to every process found outside it (those that left
            the group), so that each gets one of each; with no grace, SIGSTOP
            and SIGKILL at once instead
    look:   reap, find what is left; before the deadline, SIGTERM and SIGCONT
            what is new since the last look; past it, SIGSTOP then SIGKILL what is left
            (and SIGKILL the group), so that none can fork while its
            siblings die
    until:  a look finds nothing left, or nothing but processes not yet known
            to be the tree's (in the middle of an `exec`) and the deadline passed:
            what never showed the marker by then is not the tree's

The looks come after 2 ms, then at twice the previous pause, at most every
50 ms: most trees are gone at the first look, and a stubborn one is not polled
hard for the whole grace period. Between them, the worker hurries a look
whenever it reaps an orphan (`hurry`), so that the end of a tree that takes a
while to die is seen when it happens rather than at the next look. `watch`
runs the looks on the worker's reactor; `run_blocking` runs them in a plain
loop, for a worker about to exit.

The caller supplies what differs between its uses, as trio's `deliver_cancel`
is supplied to `open_process`: how to find the tree (`look`), how to reap, the
grace period, the process group while there is one, and what to do once the
tree is gone. Cancel, timeout, a lingering descendant, the sweep after a
command's end, and the host's death (no grace) all go through `Escalation`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from time import monotonic, sleep

from . import process_tree
from .process_tree import Signallable
from .reactor import Reactor, Timer

__all__ = ["POLL_FIRST", "POLL_MAX", "Escalation", "Look"]

POLL_FIRST = 0.002
POLL_MAX = 0.05
# The polite stop, as systemd sends it: a stopped process keeps SIGTERM pending
# until it runs again, so without SIGCONT its handler never runs and it dies
# only of SIGKILL, a whole grace period later.
_TERM = (signal.SIGTERM, signal.SIGCONT)

# The live processes of the tree, deepest first, and whether some process might
# yet turn out to be the tree's (its environment reads as empty: it is in an `exec`).
Look = Callable[[], tuple[Sequence[Signallable], bool]]


def _no_group() -> int:
    return 0


def _nothing() -> None:
    pass


def _always() -> bool:
    return True


class Escalation:
    """Stops one process tree: SIGTERM, a bounded wait, then SIGSTOP and SIGKILL until it is gone."""

    __slots__ = (
        "_cancelled",
        "_deadline",
        "_delay",
        "_group",
        "_look",
        "_on_gone",
        "_reap",
        "_termed",
        "_timer",
        "grace",
    )

    def __init__(
        self,
        look: Look,
        reap: Callable[[], None],
        grace: float,
        group: Callable[[], int] = _no_group,
    ) -> None:
        """`group` gives the process group to signal as a whole, or 0 once its leader was reaped."""
        self._look = look
        self._reap = reap
        self.grace = grace
        self._group = group
        self._deadline = 0.0
        self._delay = POLL_FIRST
        # Who has had its SIGTERM: processes compare by pid and start time.
        self._termed: set[Signallable] = set()
        self._timer: Timer | None = None
        self._cancelled = False
        self._on_gone: Callable[[], None] = _nothing

    def begin(self, found: Sequence[Signallable] | None = None) -> None:
        """The first blow, to `found` if the caller has just looked; starts the grace period."""
        procs = found if found is not None else self._look()[0]
        if self.grace > 0:
            # Each process gets one SIGTERM: a second is how many programs are
            # told to stop at once, without cleaning up. The look comes first,
            # so that what it found in the group gets the group's, and what the
            # group's missed (forked since) is new to the next look.
            pgid = self._group()
            outside = [proc for proc in procs if getattr(proc, "group", 0) != pgid] if pgid else procs
            for sig in _TERM:
                if pgid:
                    process_tree.signal_group(pgid, sig)
                process_tree.signal_processes(outside, sig)
            self._termed.update(procs)
        else:
            self._kill(procs)
        self._deadline = monotonic() + self.grace

    def look(self) -> bool:
        """Reap, look at the tree and escalate as the deadline says; True once nothing is left."""
        self._reap()
        procs, unsure = self._look()
        past = monotonic() >= self._deadline
        if not procs and (not unsure or past):
            return True
        if past:
            self._kill(procs)
        else:
            # Started since the last look: they have had no SIGTERM yet.
            new = [proc for proc in procs if proc not in self._termed]
            if new:
                for sig in _TERM:
                    process_tree.signal_processes(new, sig)
                self._termed.update(new)
        return False

    def _kill(self, procs: Sequence[Signallable]) -> None:
        process_tree.stop_and_kill(procs)
        pgid = self._group()
        if pgid:
            process_tree.signal_group(pgid, signal.SIGKILL)

    # -- drivers ---------------------------------------------------------------

    def watch(
        self, loop: Reactor, on_gone: Callable[[], None], found: Sequence[Signallable] | None = None
    ) -> None:
        """Begin, then look on `loop`'s timers until the tree is gone; then call `on_gone`."""
        self._on_gone = on_gone
        self.begin(found)
        self._delay = POLL_FIRST
        self._timer = loop.call_later(POLL_FIRST, self._step, loop)

    def _step(self, loop: Reactor) -> None:
        self._timer = None
        gone = self.look()
        if self._cancelled:
            # The reap at the start of the look ended the execution.
            return
        if gone:
            on_gone, self._on_gone = self._on_gone, _nothing
            on_gone()
            return
        self._delay = min(self._delay * 2, POLL_MAX)
        self._timer = loop.call_later(self._delay, self._step, loop)

    def hurry(self) -> None:
        """Look now, between the scheduled looks: part of the tree was just reaped, perhaps the last of it.

        The schedule stays as it was; only a `watch` still looking is hurried.
        """
        if self._timer is None:
            return
        gone = self.look()
        if self._cancelled or not gone:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        on_gone, self._on_gone = self._on_gone, _nothing
        on_gone()

    def cancel(self) -> None:
        """Stop looking (the execution ended some other way); what was signalled stays signalled."""
        self._cancelled = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_gone = _nothing

    def run_blocking(self, timeout: float, pause: float, settled: Callable[[], bool] = _always) -> bool:
        """Begin, then look every `pause` seconds until the tree is gone and `settled()`, or `timeout` passed.

        For a worker that is about to exit and has no loop left to wait on. Once
        the tree is gone, only `reap` and `settled` are called. Returns whether
        it ended before the timeout.
        """
        end = monotonic() + timeout
        self.begin()
        gone = False
        while True:
            if gone:
                self._reap()
            else:
                gone = self.look()
            if gone and settled():
                return True
            if monotonic() >= end:
                return False
            sleep(pause)

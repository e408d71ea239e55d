"""The kill escalation, with stand-in processes and a stand-in clock: no process is harmed."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, cast

import psutil
import pytest
from conftest import run_loop

from cloudops_execution_engine.actors import killing, process_tree
from cloudops_execution_engine.actors.killing import POLL_FIRST, POLL_MAX, Escalation
from cloudops_execution_engine.actors.reactor import Reactor

pytestmark = pytest.mark.timeout(10)

TERM, CONT, STOP, KILL = signal.SIGTERM, signal.SIGCONT, signal.SIGSTOP, signal.SIGKILL


class Proc:
    """Stands in for a `psutil.Process`: records the signals it gets, dies of those it does not ignore."""

    def __init__(
        self, name: str, log: list[tuple[str, int]], ignores: tuple[int, ...] = (), group: int = 0
    ) -> None:
        self.name = name
        self.log = log
        self.ignores = ignores
        self.group = group
        self.alive = True

    def send_signal(self, sig: int) -> None:
        self.log.append((self.name, sig))
        if sig in (TERM, KILL) and sig not in self.ignores:
            self.alive = False


class Tree:
    """What a look finds: the live stand-ins, and whether one is still unsure."""

    def __init__(self, *procs: Proc) -> None:
        self.procs = list(procs)
        self.unsure = False
        self.looks = 0
        self.reaps = 0

    def look(self) -> tuple[list[psutil.Process], bool]:
        self.looks += 1
        return cast(list[psutil.Process], [p for p in self.procs if p.alive]), self.unsure

    def reap(self) -> None:
        self.reaps += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(killing, "monotonic", fake)
    return fake


def test_sigterm_first_then_nothing_more_while_the_tree_dies(clock: Clock) -> None:
    """A tree that honours SIGTERM gets nothing else; the look after it reaps and finds it gone.

    SIGCONT follows SIGTERM, so that a stopped process runs to hear it.
    """
    log: list[tuple[str, int]] = []
    tree = Tree(Proc("child", log), Proc("main", log))
    kill = Escalation(tree.look, tree.reap, grace=2.0)
    kill.begin()
    told = [("child", TERM), ("main", TERM), ("child", CONT), ("main", CONT)]
    assert log == told
    assert kill.look() is True
    assert tree.reaps == 1
    assert log == told


def test_stubborn_processes_are_stopped_then_killed_past_the_grace_period(clock: Clock) -> None:
    """SIGTERM ignored: nothing more until the deadline, then SIGSTOP to all before SIGKILL to all."""
    log: list[tuple[str, int]] = []
    tree = Tree(Proc("child", log, ignores=(TERM,)), Proc("main", log, ignores=(TERM,)))
    kill = Escalation(tree.look, tree.reap, grace=2.0)
    kill.begin()
    clock.now += 1.9
    assert kill.look() is False
    told = [("child", TERM), ("main", TERM), ("child", CONT), ("main", CONT)]
    assert log == told, "a process is told once, not at every look"
    clock.now += 0.1
    assert kill.look() is False
    assert log[len(told) :] == [("child", STOP), ("main", STOP), ("child", KILL), ("main", KILL)]
    assert kill.look() is True


def test_a_process_found_during_the_grace_period_gets_its_own_sigterm(clock: Clock) -> None:
    """One forked after the first blow is told too, rather than left for the SIGKILL."""
    log: list[tuple[str, int]] = []
    tree = Tree(Proc("main", log, ignores=(TERM,)))
    kill = Escalation(tree.look, tree.reap, grace=2.0)
    kill.begin()
    tree.procs.append(Proc("late", log, ignores=(TERM,)))
    assert kill.look() is False
    assert log == [("main", TERM), ("main", CONT), ("late", TERM), ("late", CONT)]


def test_no_grace_kills_at_once(clock: Clock) -> None:
    """The host's death: no SIGTERM, SIGSTOP and SIGKILL straight away."""
    log: list[tuple[str, int]] = []
    tree = Tree(Proc("a", log), Proc("b", log))
    Escalation(tree.look, tree.reap, grace=0.0).begin()
    assert log == [("a", STOP), ("b", STOP), ("a", KILL), ("b", KILL)]


def test_an_unsure_process_is_waited_for_until_the_deadline_only(clock: Clock) -> None:
    """One in the middle of an `exec` is looked at again; unsure still at the deadline, it is not ours."""
    tree = Tree()
    tree.unsure = True
    kill = Escalation(tree.look, tree.reap, grace=1.0)
    kill.begin()
    assert kill.look() is False
    clock.now += 1.0
    assert kill.look() is True


def test_the_process_group_is_signalled_while_it_has_a_leader(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM and, past the deadline, SIGKILL go to the group too, for children forked since the look."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(process_tree, "signal_group", lambda pgid, sig: sent.append((pgid, sig)))
    log: list[tuple[str, int]] = []
    tree = Tree(Proc("main", log, ignores=(TERM,)))
    leader = [4242]
    kill = Escalation(tree.look, tree.reap, grace=1.0, group=lambda: leader[0])
    kill.begin()
    clock.now += 1.0
    kill.look()
    assert sent == [(4242, TERM), (4242, CONT), (4242, KILL)]
    leader[0] = 0  # reaped: its pid may be someone else's now
    kill.look()
    assert sent == [(4242, TERM), (4242, CONT), (4242, KILL)]


def test_a_process_in_the_signalled_group_gets_no_second_sigterm(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's SIGTERM reaches its members; only those found outside it get one of their own."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(process_tree, "signal_group", lambda pgid, sig: sent.append((pgid, sig)))
    log: list[tuple[str, int]] = []
    tree = Tree(
        Proc("member", log, ignores=(TERM,), group=4242), Proc("escaped", log, ignores=(TERM,), group=777)
    )
    kill = Escalation(tree.look, tree.reap, grace=1.0, group=lambda: 4242)
    kill.begin()
    assert sent == [(4242, TERM), (4242, CONT)]
    assert log == [("escaped", TERM), ("escaped", CONT)]
    tree.procs.append(Proc("forked since", log, ignores=(TERM,), group=4242))
    kill.look()
    assert log[2:] == [("forked since", TERM), ("forked since", CONT)], "the group's came before it existed"


def test_watch_looks_with_a_growing_pause_and_reports_the_end_once() -> None:
    """On the reactor: looks after 2 ms, doubling to 50 ms; `on_gone` once, then no more looks."""
    loop = Reactor()
    delays: list[float] = []
    real_call_later = loop.call_later

    def call_later(delay: float, callback: Callable[..., object], *args: Any) -> Any:
        if callback.__name__ == "_step":
            delays.append(delay)
        return real_call_later(delay, callback, *args)

    loop.call_later = call_later  # type: ignore[method-assign]
    log: list[tuple[str, int]] = []
    stubborn = Proc("main", log, ignores=(TERM,))
    tree = Tree(stubborn)
    gone: list[bool] = []
    try:
        Escalation(tree.look, tree.reap, grace=10.0).watch(loop, lambda: gone.append(True))
        run_loop(loop, lambda: len(delays) >= 8)
        stubborn.alive = False
        run_loop(loop, lambda: bool(gone))
        looks = tree.looks
        run_loop(loop, lambda: True)
    finally:
        loop.close()
    assert delays[:8] == [POLL_FIRST, 0.004, 0.008, 0.016, 0.032, POLL_MAX, POLL_MAX, POLL_MAX]
    assert gone == [True]
    assert tree.looks == looks


def test_a_cancelled_watch_stops_even_when_its_own_reap_ended_the_execution() -> None:
    """The reap at the start of a look can finish the execution, which cancels the watch mid-look."""
    loop = Reactor()
    log: list[tuple[str, int]] = []
    tree = Tree(Proc("main", log, ignores=(TERM,)))
    gone: list[bool] = []
    kill = Escalation(tree.look, lambda: kill.cancel(), grace=10.0)
    try:
        kill.watch(loop, lambda: gone.append(True))
        run_loop(loop, lambda: tree.looks >= 2)  # the first blow's look, then one watch step
        looks = tree.looks
        turns = iter(range(100))  # about 100 ms: twice the longest pause between looks
        run_loop(loop, lambda: next(turns, None) is None)
    finally:
        loop.close()
    assert tree.looks == looks == 2
    assert gone == []


def test_run_blocking_kills_and_waits_until_settled(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """For a worker about to exit: kill at once, then reap until `settled`, within the timeout."""
    monkeypatch.setattr(killing, "sleep", lambda pause: setattr(clock, "now", clock.now + pause))
    log: list[tuple[str, int]] = []
    tree = Tree(Proc("a", log))
    zombies = [3]

    def settled() -> bool:
        zombies[0] -= 1
        return zombies[0] <= 0

    kill = Escalation(tree.look, tree.reap, grace=0.0)
    assert kill.run_blocking(2.0, 0.005, settled) is True
    assert log == [("a", STOP), ("a", KILL)]
    assert tree.looks == 2, "once gone, only reaping goes on"
    assert tree.reaps == 3

    stuck = Tree(Proc("b", log, ignores=(KILL,)))
    assert Escalation(stuck.look, stuck.reap, grace=0.0).run_blocking(0.02, 0.005) is False

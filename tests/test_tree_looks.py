"""A look at a process tree: one /proc read per process, the same tree psutil finds, and a kill
that sees the tree's end when the worker reaps it rather than at the next scheduled look."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import cast

import psutil
import pytest
from conftest import gone, run_loop, wait_until

from cloudops_execution_engine.actors import process_tree
from cloudops_execution_engine.actors.killing import POLL_MAX, Escalation
from cloudops_execution_engine.actors.process_tree import Proc
from cloudops_execution_engine.actors.reactor import Reactor

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leaks")]


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"])


def test_a_proc_reads_as_psutil_sees_the_process() -> None:
    """Parent, session, start time and identity agree with psutil's view of the same process."""
    child = _sleeper()
    try:
        wait_until(lambda: psutil.Process(child.pid).name() == "sleep", 10, "sleep to exec")
        proc = Proc.read(child.pid)
        assert proc is not None
        theirs = psutil.Process(child.pid)
        assert proc.ppid() == theirs.ppid() == os.getpid()
        assert proc.session == os.getsid(child.pid)
        assert abs(proc.create_time() - theirs.create_time()) < 0.05
        assert proc == Proc.read(child.pid)
        assert hash(proc) == hash(Proc.read(child.pid))
        assert not proc.zombie
    finally:
        child.kill()
        child.wait(10)
    assert Proc.read(child.pid) is None, "a reaped process reads as gone"


def test_a_recycled_pid_is_never_signalled() -> None:
    """A Proc whose start time is not the live process's holds a pid that is someone else's now."""
    child = _sleeper()
    try:
        proc = Proc.read(child.pid)
        assert proc is not None
        stale = Proc(proc.pid, proc.ppid(), proc.session, proc.start - 1, proc.threads, False)
        assert stale != proc
        process_tree.signal_processes([stale], signal.SIGKILL)
        process_tree.signal_processes([proc], signal.SIGTERM)
        # Signals arrive in order: had the stale one hit, the SIGKILL would have ended it.
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    process_tree.signal_processes([proc], signal.SIGTERM)  # gone now: passed over without an error


def test_a_zombie_is_found_but_not_live() -> None:
    """An exited, unreaped process is part of the tree but needs no signal: `live` leaves it out."""
    child = subprocess.Popen(["true"])
    wait_until(lambda: (p := Proc.read(child.pid)) is not None and p.zombie, 10, "true to exit")
    found = process_tree.tree_of(child.pid, child.pid, "no-such-marker", os.getpid(), [])
    assert [p.pid for p in found] == [child.pid]
    assert process_tree.live(found) == []
    child.wait(10)


def test_tree_of_finds_what_psutil_finds_deepest_first() -> None:
    """Nested shells, a pipeline and a setsid child: the same processes, children before parents."""
    script = "sh -c 'sleep 30 | cat & setsid sleep 30 & wait' & sleep 30 & wait"
    top = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:

        def expected() -> set[int]:
            return {top.pid} | {p.pid for p in psutil.Process(top.pid).children(recursive=True)}

        def settled() -> bool:
            names = [p.name() for p in psutil.Process(top.pid).children(recursive=True)]
            return len(names) == 5 and names.count("sleep") == 3

        wait_until(settled, 10, "the tree to be started")
        found = process_tree.tree_of(top.pid, top.pid, "no-such-marker", os.getpid(), [])
        assert {p.pid for p in found} == expected()
        position = {p.pid: i for i, p in enumerate(found)}
        for proc in found:
            if proc.ppid() in position:
                assert position[proc.pid] < position[proc.ppid()], "a child comes before its parent"
        process_tree.stop_and_kill(process_tree.live(found))
        wait_until(lambda: all(gone(p.pid) or p.pid == top.pid for p in found), 10, "the tree to die")
    finally:
        if top.poll() is None:
            top.kill()
        top.wait(10)


class _Stubborn:
    """Stands in for a process: ignores SIGTERM, dies when `alive` is cleared."""

    def __init__(self) -> None:
        self.alive = True

    def send_signal(self, sig: int) -> None:
        pass


def test_hurry_sees_the_end_at_once_and_then_stops_looking() -> None:
    """A reap between looks ends the watch there and then, not at the next look up to 50 ms later."""
    loop = Reactor()
    proc = _Stubborn()
    looks: list[bool] = []

    def look() -> tuple[list[psutil.Process], bool]:
        looks.append(proc.alive)
        return cast(list[psutil.Process], [proc] if proc.alive else []), False

    gone_calls: list[bool] = []
    kill = Escalation(look, lambda: None, grace=10.0)
    try:
        idle = Escalation(look, lambda: None, grace=10.0)
        idle.hurry()
        assert looks == [], "an escalation that is not watching is not hurried"
        kill.watch(loop, lambda: gone_calls.append(True))
        run_loop(loop, lambda: len(looks) >= 6)  # the pause between looks is long by now
        proc.alive = False
        before = len(looks)
        kill.hurry()
        assert gone_calls == [True]
        assert len(looks) == before + 1
        turns = iter(range(int(POLL_MAX * 2 / 0.001)))
        run_loop(loop, lambda: next(turns, None) is None)
        kill.hurry()
    finally:
        loop.close()
    assert gone_calls == [True], "the end is reported once"
    assert len(looks) == before + 1, "no look after the end"


def test_hurry_cancelled_by_its_own_reap_reports_nothing() -> None:
    """The reap at the start of a hurried look can end the execution: then nothing more happens."""
    loop = Reactor()
    proc = _Stubborn()
    looks: list[bool] = []
    ending = [False]

    def look() -> tuple[list[psutil.Process], bool]:
        looks.append(proc.alive)
        return cast(list[psutil.Process], [proc] if proc.alive else []), False

    def reap() -> None:
        if ending[0]:
            proc.alive = False
            kill.cancel()

    gone_calls: list[bool] = []
    kill = Escalation(look, reap, grace=10.0)
    try:
        kill.watch(loop, lambda: gone_calls.append(True))
        run_loop(loop, lambda: len(looks) >= 3)
        ending[0] = True
        kill.hurry()
        after = len(looks)
        turns = iter(range(int(POLL_MAX * 2 / 0.001)))
        run_loop(loop, lambda: next(turns, None) is None)
    finally:
        loop.close()
    assert gone_calls == []
    assert len(looks) == after, "no look once cancelled"

"""The worker's event loop on its own: fds, timers, deferred calls and signals."""

from __future__ import annotations

import os
import signal
import tracemalloc
import weakref
from collections.abc import Iterator

import pytest

from cloudops_execution_engine.actors.reactor import Reactor

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=[True, False], ids=["epoll", "selector"])
def reactor(request: pytest.FixtureRequest) -> Iterator[Reactor]:
    """Both pollers: epoll, and the selector used where there is none (macOS)."""
    loop = Reactor(epoll=request.param)
    yield loop
    loop.close()


def test_readers_writers_timers_and_deferred_calls_run_in_turn_order(reactor: Reactor) -> None:
    seen: list[str] = []
    read_end, write_end = os.pipe()
    try:

        def readable() -> None:
            seen.append(f"read {os.read(read_end, 100).decode()}")
            reactor.remove_reader(read_end)
            reactor.call_soon(seen.append, "soon")

        def writable() -> None:
            seen.append("writable")
            reactor.remove_writer(write_end)
            os.write(write_end, b"x")

        reactor.add_reader(read_end, readable)
        reactor.add_writer(write_end, writable)
        late = reactor.call_later(0.05, seen.append, "cancelled timer")
        reactor.call_later(0.02, seen.append, "second timer")
        reactor.call_later(0.01, seen.append, "first timer")
        reactor.call_later(0.03, reactor.stop)
        late.cancel()
        reactor.run()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert seen == ["writable", "read x", "soon", "first timer", "second timer"]


def test_a_signal_runs_its_callback_in_the_loop_and_the_old_handler_comes_back() -> None:
    reactor = Reactor()
    got: list[int] = []

    def on_usr1() -> None:
        got.append(signal.SIGUSR1)
        reactor.stop()

    before = signal.getsignal(signal.SIGUSR1)
    reactor.add_signal_handler(signal.SIGUSR1, on_usr1)
    reactor.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    reactor.run()
    reactor.close()
    assert got == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) == before


def test_cancelled_timers_do_not_pile_up(reactor: Reactor) -> None:
    """Every command's timeout timer is cancelled when it ends, long before it is due."""
    for _ in range(1000):  # warm-up: the first allocations are not growth
        reactor.call_later(300, print).cancel()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(50_000):
            reactor.call_later(300, print).cancel()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, f"{grown} bytes kept for 50,000 cancelled timers"


def test_a_cancelled_timer_lets_go_of_what_its_callback_would_have_used(reactor: Reactor) -> None:
    """A command's timeout timer holds its execution; cancelled, it must not keep it alive."""

    class Execution:
        pass

    execution = Execution()
    gone = weakref.ref(execution)
    reactor.call_later(300, print, execution).cancel()
    del execution
    assert gone() is None

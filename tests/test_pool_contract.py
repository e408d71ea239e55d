"""The worker-pool contract (`actors/pool.py`) on an in-memory backend, and the pieces pools share.

`EchoHandle` and `EchoPool` keep the promises the contract lists and nothing
more, with no process behind them, so these tests check what the shared
machinery does with a backend that follows it: a worker counts once it said
hello, a death is reported once and only after `die` has returned, and one
that dies before its hello is never reported nor replaced.
"""

from __future__ import annotations

import asyncio
import copy
import pickle
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from cloudops_execution_engine.actors.local_pool import ProcessWorkerHandle
from cloudops_execution_engine.actors.pool import (
    OnDeath,
    OnMessage,
    WorkerHandle,
    WorkerPool,
    WorkerStartError,
    resolve_if_pending,
)
from cloudops_execution_engine.engine import LogNode
from cloudops_execution_engine.protocol import Hello, encode_frame

pytestmark = pytest.mark.timeout(30)


class EchoHandle(WorkerHandle):
    def __init__(
        self, index: int, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_death: OnDeath
    ) -> None:
        super().__init__(index, loop, on_message)
        self._on_death = on_death
        self._reported: asyncio.Future[None] = loop.create_future()
        self.sent: list[list[Any]] = []
        self.alive = True

    def say_hello(self) -> None:
        self._feed(encode_frame(Hello(1000 + self.index, 2).to_wire()))

    def send(self, wire: list[Any]) -> None:
        if not self._dead:
            self.sent.append(wire)

    def die(self, how: str) -> None:
        if not self._mark_dead(how):
            return
        # Callbacks run in the order they were scheduled: `stop` returns after the report.
        self._loop.call_soon(self._on_death, self, f"Echo worker {self.index} died ({how})")
        self._loop.call_soon(self._reported.set_result, None)

    async def stop(self) -> None:
        self.die("was shut down")
        await self._reported


class EchoPool(WorkerPool[EchoHandle]):
    async def start(self) -> None:
        handles = [self._adopt(self._new()) for _ in range(self.size)]
        for handle in handles:
            handle.say_hello()
        await self._start_all(handles)

    def _new(self) -> EchoHandle:
        return EchoHandle(
            self._next_index(), asyncio.get_running_loop(), self._on_message, self._handle_death
        )

    async def _successor(self, dead: EchoHandle) -> EchoHandle:
        handle = self._new()
        handle.say_hello()
        return handle

    def clean_up_after(self, dead: WorkerHandle, markers: set[str], sessions: set[int]) -> Awaitable[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class Calls:
    def __init__(self) -> None:
        self.deaths: list[tuple[WorkerHandle, str]] = []
        self.ready: list[WorkerHandle] = []
        self.ready_event = asyncio.Event()

    def on_message(self, handle: WorkerHandle, message: Any) -> None:
        raise AssertionError(f"unexpected message {message!r}")

    def on_death(self, handle: WorkerHandle, why: str) -> None:
        self.deaths.append((handle, why))

    def on_ready(self, handle: WorkerHandle) -> None:
        self.ready.append(handle)
        self.ready_event.set()

    def pool(self, size: int) -> EchoPool:
        return EchoPool(size, self.on_message, self.on_death, self.on_ready, hello_timeout=5)


async def test_a_worker_that_said_hello_is_reported_once_after_die_returns_and_replaced() -> None:
    """Two paths noticing one death make one report, which comes after `die`, and a successor starts."""
    calls = Calls()
    pool = calls.pool(2)
    await pool.start()
    first, second = pool.workers
    assert first.said_hello
    assert first.ready
    assert first.pid == 1000 + first.index
    first.die("closed its pipe")
    first.die("exited")
    assert calls.deaths == [], "a death was reported from within die()"
    await asyncio.wait_for(calls.ready_event.wait(), 5)
    assert calls.deaths == [(first, f"Echo worker {first.index} died (closed its pipe)")]
    assert first not in pool.workers
    assert second in pool.workers
    assert calls.ready[0] in pool.workers
    assert calls.ready[0].said_hello
    await pool.stop()
    assert pool.workers == []


async def test_a_worker_that_dies_before_its_hello_is_neither_reported_nor_replaced() -> None:
    """Having held no work, it is the starter's failure to handle (`wait_ready`), not a death to report."""
    calls = Calls()
    pool = calls.pool(1)
    handle = pool._adopt(pool._new())
    waiting = asyncio.ensure_future(handle.wait_ready(5))
    await asyncio.sleep(0)
    handle.die("exited")
    with pytest.raises(WorkerStartError, match=f"worker {handle.index} exited while starting"):
        await waiting
    await handle.stop()
    assert not handle.said_hello
    assert calls.deaths == []
    assert pool.workers == []
    assert not pool._replacing


def test_the_default_pool_names_no_node_for_a_log() -> None:
    """A pool whose workers write to this machine's disk says so with None."""
    pool = Calls().pool(1)
    assert pool.log_location(None) is None


def test_a_log_node_is_its_address_and_carries_the_node_id() -> None:
    """Code that printed or compared the address reads the same; the id tells nodes on one address apart."""
    node = LogNode("10.0.0.5", "a1b2c3d4e5f6")
    assert node == "10.0.0.5"
    assert str(node) == f"{node}" == "10.0.0.5"
    assert type(str(node)) is str
    assert (node.address, node.node_id) == ("10.0.0.5", "a1b2c3d4e5f6")
    assert repr(node) == "LogNode(address='10.0.0.5', node_id='a1b2c3d4e5f6')"
    assert hash(node) == hash("10.0.0.5")
    for twin in (copy.copy(node), copy.deepcopy(node), pickle.loads(pickle.dumps(node))):
        assert isinstance(twin, LogNode)
        assert (twin.address, twin.node_id) == (node.address, node.node_id)


async def test_resolve_if_pending_leaves_a_settled_future_alone() -> None:
    """Callbacks that race to end a wait (a sentinel, a cancellation) may both call it."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[None] = loop.create_future()
    resolve_if_pending(pending)
    resolve_if_pending(pending)
    assert pending.done()
    assert pending.result() is None
    cancelled: asyncio.Future[None] = loop.create_future()
    cancelled.cancel()
    resolve_if_pending(cancelled)
    assert cancelled.cancelled()


async def test_waiting_for_an_exit_status_that_trails_the_exit_fd_keeps_the_loop_turning() -> None:
    """The gap between a worker's exit fd and its exit status is polled for, never slept through."""
    loop = asyncio.get_running_loop()
    polls = 0
    turns = 0
    stop = False

    class TrailingProcess:
        @property
        def exitcode(self) -> int | None:
            nonlocal polls
            polls += 1
            return 0 if polls > 5 else None

    async def count_turns() -> None:
        nonlocal turns
        while not stop:
            turns += 1
            await asyncio.sleep(0)

    # The polling alone, on a handle with no process behind it.
    handle = object.__new__(ProcessWorkerHandle)
    handle._loop = loop
    handle._released_code = None
    handle.process = cast(Any, TrailingProcess())
    counter = asyncio.ensure_future(count_turns())
    try:
        assert await handle._reaped(5)
    finally:
        stop = True
        await counter
    assert polls == 6
    assert turns >= 5, "the loop did not run while the exit status was awaited"

    handle.process = cast(Any, SimpleNamespace(exitcode=None))
    started = loop.time()
    assert not await handle._reaped(0.05)
    assert loop.time() - started < 2

"""The event bus measures what its listeners have not yet taken, for flow control.

Events are published straight onto a real engine's bus, with made-up frame
weights, so that each test controls exactly what is undelivered.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

import pytest
from conftest import config, result_of, shell

from cloudops_execution_engine import ExecutionEngine, StdoutEvent
from cloudops_execution_engine.actors.handlers import STOP, EventBus

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

MIB = 1024 * 1024


def lines(key: UUID, *texts: str) -> list[Any]:
    return [StdoutEvent(execution_id=key, line=text) for text in texts]


def line_of(event: Any) -> str:
    assert isinstance(event, StdoutEvent), event
    return event.line


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll a real condition, giving the loop turns, until it holds; fail naming it if it never does."""
    try:
        async with asyncio.timeout(timeout):
            # The bus has no notice for "weight given back"; its own tasks and
            # threads need loop turns to get there, so the test polls.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Gate:
    """A handler that holds each event until the test lets it through, one permit per event."""

    def __init__(self) -> None:
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.waiting = asyncio.Event()
        self.seen: list[Any] = []

    async def on_event(self, event: Any) -> None:
        self.waiting.set()
        await self.permits.get()
        self.waiting.clear()
        self.seen.append(event)

    async def let_through(self, count: int) -> None:
        for _ in range(count):
            await asyncio.wait_for(self.waiting.wait(), 10)
            self.waiting.clear()
            self.permits.put_nowait(None)


class Relief:
    """Counts the bus's relief calls, passing each on to whoever listened before."""

    def __init__(self, bus: EventBus) -> None:
        self.calls = 0
        self._before = bus.on_relief
        bus.on_relief = self

    def __call__(self) -> None:
        self.calls += 1
        if self._before is not None:
            self._before()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[ExecutionEngine]:
    async with ExecutionEngine(config(tmp_path)) as eng:
        yield eng


async def test_a_handler_counts_each_batch_until_it_has_returned_from_its_last_event(
    engine: ExecutionEngine,
) -> None:
    gate = Gate()
    engine.with_event_handler(gate)
    bus, key = engine._bus, uuid4()
    assert bus.backlog == 0
    bus.publish_batch(lines(key, "a", "b"), key, weight=1000)
    bus.publish_batch(lines(key, "c"), key, weight=500)
    assert bus.backlog == 1500
    await gate.let_through(1)  # "a": the first batch is not yet handed over in full
    await eventually(lambda: len(gate.seen) == 1, "the handler to take a")
    assert bus.backlog == 1500
    await gate.let_through(1)  # "b"
    await eventually(lambda: bus.backlog == 500, "the first batch's weight to be given back")
    await gate.let_through(1)  # "c"
    await eventually(lambda: bus.backlog == 0, "the second batch's weight to be given back")
    assert [e.line for e in gate.seen] == ["a", "b", "c"]


async def test_single_events_weigh_nothing(engine: ExecutionEngine) -> None:
    gate = Gate()
    engine.with_event_handler(gate)
    key = uuid4()
    engine._bus.publish(lines(key, "alone")[0], key)
    engine._bus.publish_batch(lines(key, "unweighed"), key)
    await asyncio.wait_for(gate.waiting.wait(), 10)
    assert engine._bus.backlog == 0
    await gate.let_through(2)
    await eventually(lambda: len(gate.seen) == 2, "both events to be handled")


async def test_backlog_is_the_largest_listener_total_not_the_sum(engine: ExecutionEngine) -> None:
    slow = Gate()
    fast_seen: list[Any] = []
    engine.with_event_handler(slow)
    bus, key = engine._bus, uuid4()
    bus.add_handler(fast_seen.append)  # a plain function, on the loop
    for weight in (300, 400):
        bus.publish_batch(lines(key, "x"), key, weight=weight)
    await eventually(lambda: len(fast_seen) == 2, "the fast handler to take both batches")
    assert bus.backlog == 700  # all of it held by the slow handler
    await slow.let_through(2)
    await eventually(lambda: bus.backlog == 0, "the slow handler to catch up")


async def test_congestion_rises_above_high_water_and_ends_only_below_low_water(
    engine: ExecutionEngine,
) -> None:
    gate = Gate()
    engine.with_event_handler(gate)
    bus, key = engine._bus, uuid4()
    relief = Relief(bus)
    assert (EventBus.HIGH_WATER, EventBus.LOW_WATER) == (8 * MIB, 2 * MIB)
    bus.publish_batch(lines(key, "1"), key, weight=4 * MIB)
    bus.publish_batch(lines(key, "2"), key, weight=4 * MIB)
    assert bus.backlog == EventBus.HIGH_WATER
    assert not bus.congested  # at the mark is not above it
    bus.publish_batch(lines(key, "3"), key, weight=1 * MIB)
    bus.publish_batch(lines(key, "4"), key, weight=1 * MIB)
    assert bus.congested
    await gate.let_through(1)
    await eventually(lambda: bus.backlog == 6 * MIB, "the first batch to be handed over")
    await gate.let_through(1)
    await eventually(lambda: bus.backlog == 2 * MIB, "the second batch to be handed over")
    assert bus.congested  # below the high mark, not yet below the low one
    assert relief.calls == 0
    await gate.let_through(1)
    await eventually(lambda: bus.backlog == 1 * MIB, "the third batch to be handed over")
    assert not bus.congested
    assert relief.calls == 1
    await gate.let_through(1)
    await eventually(lambda: bus.backlog == 0, "the last batch to be handed over")
    assert relief.calls == 1  # once per end of congestion


async def test_a_subscriber_counts_a_batch_until_its_reader_takes_the_last_event(
    engine: ExecutionEngine,
) -> None:
    bus, key = engine._bus, uuid4()
    relief = Relief(bus)
    subscription = bus.subscribe(key)
    bus.publish_batch(lines(key, "a", "b"), key, weight=9 * MIB)
    bus.publish_batch(lines(key, "c"), uuid4(), weight=5 * MIB)  # another execution's: not ours
    assert (bus.backlog, bus.congested) == (9 * MIB, True)
    assert (await subscription.get()).line == "a"
    assert (bus.backlog, bus.congested) == (9 * MIB, True)
    assert (await subscription.get()).line == "b"
    assert (bus.backlog, bus.congested, relief.calls) == (0, False, 1)
    bus.end_stream(key)
    assert await subscription.get() is STOP
    bus.unsubscribe(subscription)


async def test_an_events_reader_holds_back_the_bus_until_it_reads_or_goes_away(
    engine: ExecutionEngine,
) -> None:
    bus = engine._bus
    relief = Relief(bus)
    eid = await engine.execute(shell("exec sleep 30"))
    reader = cast(AsyncGenerator[Any, None], engine.events(eid))
    assert (await asyncio.wait_for(anext(reader), 20)).event_type == "started"
    bus.publish_batch(lines(eid, "a", "b"), eid, weight=9 * MIB)
    assert bus.congested
    assert line_of(await anext(reader)) == "a"
    assert line_of(await anext(reader)) == "b"
    assert (bus.backlog, bus.congested, relief.calls) == (0, False, 1)
    bus.publish_batch(lines(eid, "c"), eid, weight=9 * MIB)
    assert bus.congested
    await reader.aclose()  # the reader leaves with the batch unread
    assert (bus.backlog, bus.congested, relief.calls) == (0, False, 2)
    await engine.cancel(eid)
    await engine.wait(eid, timeout=20)


async def test_an_uncounted_subscriber_counts_only_once_adopted(engine: ExecutionEngine) -> None:
    bus, key = engine._bus, uuid4()
    relief = Relief(bus)
    subscription = bus.subscribe(key, counted=False)
    bus.publish_batch(lines(key, "a"), key, weight=9 * MIB)
    assert (bus.backlog, bus.congested) == (0, False)
    bus.adopt(subscription)
    assert (bus.backlog, bus.congested) == (9 * MIB, True)
    assert subscription.take_ready(10)[0].line == "a"
    assert (bus.backlog, bus.congested, relief.calls) == (0, False, 1)
    bus.unsubscribe(subscription)


async def test_removing_a_congested_handler_relieves_the_bus(engine: ExecutionEngine) -> None:
    gate = Gate()
    engine.with_event_handler(gate)
    bus, key = engine._bus, uuid4()
    relief = Relief(bus)
    bus.publish_batch(lines(key, "a"), key, weight=9 * MIB)
    await asyncio.wait_for(gate.waiting.wait(), 10)
    assert bus.congested
    engine.remove_event_handler(gate)
    assert (bus.backlog, bus.congested, relief.calls) == (0, False, 1)


async def test_the_drain_at_shutdown_relieves_the_bus(engine: ExecutionEngine) -> None:
    gate = Gate()
    engine.with_event_handler(gate)
    bus, key = engine._bus, uuid4()
    relief = Relief(bus)
    bus.publish_batch(lines(key, "a"), key, weight=9 * MIB)
    await asyncio.wait_for(gate.waiting.wait(), 10)
    await bus.drain(0.05)  # the gate never opens: the drain gives up on it
    assert (bus.backlog, bus.congested, relief.calls) == (0, False, 1)


async def test_a_handler_on_its_own_thread_counts_until_it_returns_and_ends_at_drain(
    engine: ExecutionEngine,
) -> None:
    entered, release = threading.Event(), threading.Event()
    threads: list[str] = []

    def handler(event: Any) -> None:
        threads.append(threading.current_thread().name)
        entered.set()
        assert release.wait(10)

    bus, key = engine._bus, uuid4()
    bus.add_handler(handler, on_thread=True)
    bus.publish_batch(lines(key, "a", "b"), key, weight=9 * MIB)
    relief = Relief(bus)
    await eventually(entered.is_set, "the handler thread to take the first event")
    assert (bus.backlog, bus.congested) == (9 * MIB, True)
    release.set()
    await eventually(lambda: bus.backlog == 0, "the handler thread to give the weight back")
    assert (bus.congested, relief.calls, len(threads)) == (False, 1, 2)
    assert threads[0].startswith("cloudops-event-handler-")
    await bus.drain(10)
    assert not any(t.name.startswith("cloudops-event-handler-") for t in threading.enumerate())


async def test_a_handler_whose_own_await_is_cancelled_keeps_receiving(engine: ExecutionEngine) -> None:
    seen: list[str] = []

    async def handler(event: Any) -> None:
        seen.append(event.line)
        if event.line == "a":
            raise asyncio.CancelledError  # as if something it awaited had been cancelled

    engine._bus.add_handler(handler)
    key = uuid4()
    engine._bus.publish_batch(lines(key, "a", "b"), key, weight=100)
    await eventually(lambda: engine._bus.backlog == 0, "the handler to take both events")
    assert seen == ["a", "b"]


class WaitsOnTheEngine:
    """On its first event, waits as a handler awaiting `engine.wait()` does, until released."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.inside = asyncio.Event()
        self.release = asyncio.Event()
        self.back = asyncio.Event()  # out of its wait, however it ended
        self.seen: list[Any] = []

    async def on_event(self, event: Any) -> None:
        if not self.seen:
            try:
                with self.bus.handler_waiting():
                    self.inside.set()
                    await self.release.wait()
            finally:
                self.back.set()
        self.seen.append(event)


@pytest.mark.parametrize("then", ["returns", "is removed"])
async def test_a_handler_waiting_on_the_engine_holds_nothing_back_until_it_is_back(
    engine: ExecutionEngine, then: str
) -> None:
    bus, key = engine._bus, uuid4()
    handler = WaitsOnTheEngine(bus)
    engine.with_event_handler(handler)
    bus.publish_batch(lines(key, "first"), key, weight=1)
    await asyncio.wait_for(handler.inside.wait(), 10)
    bus.publish_batch(lines(key, "big"), key, weight=9 * MIB)
    assert not bus.congested, "the output it waits for would wait for it"
    if then == "returns":
        handler.release.set()
        await eventually(lambda: bus.congested or len(handler.seen) == 2, "the handler to be back")
        await eventually(lambda: len(handler.seen) == 2, "the handler to take what waited for it")
        await eventually(lambda: bus.backlog == 0, "the weight to be given back")
    else:
        engine.remove_event_handler(handler)
        await asyncio.wait_for(handler.back.wait(), 10)
    assert (bus.backlog, bus.congested) == (0, False)


class Abort(BaseException):
    """A host's own way to give up, not an `Exception`."""


class Lines:
    """Keeps every stdout line; raises `raised` on the line "boom"."""

    def __init__(self, raised: type[BaseException] | None = None) -> None:
        self.seen: list[str] = []
        self.raised = raised

    async def on_event(self, event: Any) -> None:
        if isinstance(event, StdoutEvent):
            self.seen.append(event.line)
            if event.line == "boom" and self.raised is not None:
                raise self.raised("the handler gives up on this one event")


@pytest.mark.parametrize("raised", [Abort, GeneratorExit])
async def test_a_handler_raising_a_base_exception_keeps_receiving_and_holds_no_output_back(
    engine: ExecutionEngine, raised: type[BaseException]
) -> None:
    """Raised once: later events still come to it, and 30 MB of another command's output flows."""
    handler = Lines(raised)
    engine.with_event_handler(handler)
    await engine.wait(await engine.execute(shell("echo boom")), timeout=20)
    big = await engine.execute(shell("yes 0123456789012345678901234567890123456789 | head -c 30000000"))
    result = await result_of(engine, big, timeout=60)
    assert result.status == "completed", result.error
    await engine.wait(await engine.execute(shell("echo after")), timeout=20)
    await eventually(lambda: "after" in handler.seen, "the handler to get the last command's line")
    assert handler.seen.count("0123456789012345678901234567890123456789") == 30_000_000 // 41


async def test_a_handler_added_from_another_thread_receives_later_events(engine: ExecutionEngine) -> None:
    """`with_event_handler` called off the engine's loop (a host's worker thread) is not lost."""
    handler = Lines()
    await engine.wait(await engine.execute(shell("echo before")), timeout=20)  # the bus is running
    await asyncio.to_thread(engine.with_event_handler, handler)
    await engine.wait(await engine.execute(shell("echo one; echo two")), timeout=20)
    await eventually(lambda: handler.seen == ["one", "two"], "the handler to get both lines")

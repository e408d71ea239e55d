"""Handlers that fail in the ways that used to end their delivery, or the engine's loop.

Each ends in a clear outcome for that handler alone: it is told of (logged),
other handlers and executions go on, and no blocking call waits for ever.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import PYTHON, config, result_of, shell

from cloudops_execution_engine import (
    CompletedEvent,
    ExecutionEngine,
    ExecutionStatus,
    StartedEvent,
    StdoutEvent,
    SyncExecutionEngine,
)
from cloudops_execution_engine.actors import handlers
from cloudops_execution_engine.actors.handlers import EventBus

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

# More output than the bus lets one listener hold back (HIGH_WATER, 8 MiB): it flows only if
# every listener takes what it is given.
FLOOD = "yes 0123456789012345678901234567890123456789 | head -c 12000000"


class ExitsOnce:
    """Raises `exit` on the first line it is given, as `sys.exit()` in a handler would."""

    def __init__(self, exit: type[BaseException]) -> None:
        self.exit = exit
        self.lines: list[str] = []

    async def on_event(self, event: Any) -> None:
        if isinstance(event, StdoutEvent):
            self.lines.append(event.line)
            if len(self.lines) == 1:
                raise self.exit(3)


class ReturnsACoroutine(ExitsOnce):
    """A plain `on_event` that hands back a coroutine: run on the loop, awaited by its thread."""

    def on_event(self, event: Any) -> Any:
        return super().on_event(event)


@pytest.mark.parametrize("exit", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("handler_type", [ExitsOnce, ReturnsACoroutine])
def test_a_sync_engines_handler_that_exits_is_a_raise_and_the_engine_serves_on(
    tmp_path: Path, exit: type[BaseException], handler_type: type[ExitsOnce], caplog: pytest.LogCaptureFixture
) -> None:
    """On the engine's own loop thread it would end that thread: every blocking call then hung."""
    handler = handler_type(exit)
    engine = SyncExecutionEngine(config(tmp_path, workers=1)).with_event_handler(handler)
    try:
        first = engine.execute(shell("echo one; echo two"))
        assert engine.wait(first, timeout=20).status is ExecutionStatus.COMPLETED
        second = engine.execute(shell("echo three"))
        assert engine.wait(second, timeout=20).status is ExecutionStatus.COMPLETED
    finally:
        engine.shutdown()
    assert handler.lines == ["one", "two", "three"]
    assert any("raised on StdoutEvent" in r.getMessage() for r in caplog.records), caplog.text


class UnsayableError(Exception):
    def __str__(self) -> str:
        raise ValueError("no text for this one")


@dataclass
class Counter:
    """Counts its events; raises `raising` on each, if set."""

    raising: type[BaseException] | None = None
    events: list[str] = field(default_factory=list)

    async def on_event(self, event: Any) -> None:
        self.events.append(event.event_type)
        if self.raising is not None:
            raise self.raising()


async def test_a_handler_whose_raise_cannot_be_said_keeps_receiving(tmp_path: Path) -> None:
    """Saying its raise raised in turn: that ended its delivery, and held every command's output back."""
    handler = Counter(UnsayableError)
    async with ExecutionEngine(config(tmp_path)).with_event_handler(handler) as engine:
        for _ in range(3):
            await engine.wait(await engine.execute(shell("echo a; echo b")), timeout=20)
        flood = await engine.execute(shell(FLOOD))
        assert (await result_of(engine, flood, 60)).status is ExecutionStatus.COMPLETED
    assert handler.events.count("completed") == 4


async def test_a_host_log_handler_that_raises_does_not_end_a_raising_handlers_delivery(
    tmp_path: Path,
) -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("the host's log is down")

    broken = Broken()
    events_logger = logging.getLogger("cloudops_execution_engine.events")
    events_logger.addHandler(broken)
    handler = Counter(ValueError)
    try:
        async with ExecutionEngine(config(tmp_path)).with_event_handler(handler) as engine:
            for _ in range(3):
                await engine.wait(await engine.execute(shell("echo a")), timeout=20)
            flood = await engine.execute(shell(FLOOD))
            assert (await result_of(engine, flood, 60)).status is ExecutionStatus.COMPLETED
    finally:
        events_logger.removeHandler(broken)
    assert handler.events.count("completed") == 4


class CancelsItsOwnTask:
    def __init__(self) -> None:
        self.calls = 0

    async def on_event(self, event: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            current = asyncio.current_task()
            assert current is not None
            current.cancel()


async def test_a_handler_that_ended_its_own_delivery_is_let_go_of_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Still registered and never served, its queue held back every command's output."""
    handler = CancelsItsOwnTask()
    others = Counter()
    async with (
        ExecutionEngine(config(tmp_path)).with_event_handler(handler).with_event_handler(others) as engine
    ):
        await engine.wait(await engine.execute(shell("echo first")), timeout=20)
        flood = await engine.execute(shell(FLOOD))
        assert (await result_of(engine, flood, 60)).status is ExecutionStatus.COMPLETED
    assert handler.calls == 1
    assert others.events.count("completed") == 2
    said = [r for r in caplog.records if "receives no more events" in r.getMessage()]
    assert len(said) == 1
    assert "CancelsItsOwnTask" in said[0].getMessage()
    assert "cancelled" in said[0].getMessage()


_ENDS_WITHOUT_SHUTDOWN = """
import asyncio, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from cloudops_execution_engine import ExecCommand, ExecutionConfig, ExecutionEngine, ExecutionRequest

class Quiet:
    async def on_event(self, event):
        pass

async def main():
    engine = ExecutionEngine(ExecutionConfig(log_dir=sys.argv[1])).with_event_handler(Quiet())
    done = await engine.wait(await engine.execute(ExecutionRequest(command=ExecCommand(program="true"))))
    print(done.status.value)

asyncio.run(main())
"""


def test_a_loop_that_ends_without_shutdown_says_nothing_about_the_handlers(tmp_path: Path) -> None:
    """`asyncio.run(main())` cancels every task left as it ends, the handlers' deliveries among them.

    Each was said as an error ("receives no more events"), as if a handler had
    failed, in every host that lets its loop end without `shutdown()`.
    """
    done = subprocess.run(
        [PYTHON, "-c", _ENDS_WITHOUT_SHUTDOWN, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "completed\n"
    assert "receives no more events" not in done.stderr


async def test_tasks_a_slow_handler_starts_do_not_lift_the_bound_on_its_queue(tmp_path: Path) -> None:
    """A watcher task per execution that awaits `wait()` took the handler's exemption along with it.

    The exemption (a handler waiting on the engine holds nothing back) is for
    the handler's own wait, while it is being delivered to; a task it started
    and left waits as anyone does. Its queue then grew as fast as the output.
    """
    engine = ExecutionEngine(config(tmp_path, workers=1))
    watchers: set[asyncio.Task[Any]] = set()
    largest = 0
    seen = 0
    enough = asyncio.Event()  # a good stretch of the flood taken, or far too much held

    async def watch(execution_id: Any) -> None:
        await engine.wait(execution_id)

    async def on_event(event: Any) -> None:
        nonlocal largest, seen
        largest = max(largest, engine._bus.backlog)
        seen += 1
        if seen >= 3000 or largest > 4 * EventBus.HIGH_WATER:
            enough.set()
        if isinstance(event, StartedEvent):
            task = asyncio.create_task(watch(event.execution_id))
            watchers.add(task)
        else:
            await asyncio.sleep(0.0005)

    slow = SimpleNamespace(on_event=on_event)
    async with engine.with_event_handler(slow):
        flood = await engine.execute(shell("yes 0123456789 | head -c 100000000", timeout_ms=60_000))
        await asyncio.wait_for(enough.wait(), 40)
        await engine.cancel(flood)
    # What the bus holds back at (HIGH_WATER), plus the output a worker may send ahead of credit.
    assert largest <= 2 * EventBus.HIGH_WATER, f"{largest / 2**20:.0f} MiB held for it"


async def test_removing_a_handler_removes_that_one_even_if_another_equals_it(tmp_path: Path) -> None:
    first, second = Counter(), Counter()
    assert first == second
    async with (
        ExecutionEngine(config(tmp_path)).with_event_handler(first).with_event_handler(second) as engine
    ):
        await engine.wait(await engine.execute(shell("echo a")), timeout=20)
        engine.remove_event_handler(second)
        await engine.wait(await engine.execute(shell("echo b")), timeout=20)
        await engine.wait(await engine.execute(shell("echo c")), timeout=20)
    assert first.events.count("completed") == 3
    assert second.events.count("completed") == 1


def test_a_sync_call_on_an_engine_whose_loop_thread_died_is_engine_closed(tmp_path: Path) -> None:
    """Nothing of the engine's ends its loop now; should anything, callers hear it rather than wait."""
    from cloudops_execution_engine import EngineClosed

    engine = SyncExecutionEngine(config(tmp_path, workers=1))
    try:
        engine.wait(engine.execute(shell("true")), timeout=20)
        entered = threading.Event()

        def ends_the_loop() -> None:
            entered.set()
            raise KeyboardInterrupt  # asyncio lets it out of the loop, as it would SystemExit

        engine._loop.call_soon_threadsafe(ends_the_loop)
        assert entered.wait(10)
        engine._thread.join(30)
        assert not engine._thread.is_alive()
        with pytest.raises(EngineClosed):
            engine.execute(shell("true"))
    finally:
        engine.shutdown()


class Redacts:
    """Edits what it is given, as if it were its own copy."""

    def __init__(self) -> None:
        self.refused = 0

    def _try(self, target: Any, name: str, value: Any) -> None:
        try:
            setattr(target, name, value)
        except ValueError:
            self.refused += 1

    async def on_event(self, event: Any) -> None:
        if isinstance(event, StdoutEvent):
            self._try(event, "line", "REDACTED")
        elif isinstance(event, CompletedEvent):
            self._try(event.result, "stdout", "")
            self._try(event.result, "exit_code", 42)


async def test_events_and_results_are_the_same_for_everyone_whatever_a_handler_does(tmp_path: Path) -> None:
    """One event object goes to every handler; one result to every waiter, and to its terminal event."""
    redacts, after = Redacts(), Counter()
    lines: list[str] = []

    async def keep(event: Any) -> None:
        if isinstance(event, StdoutEvent):
            lines.append(event.line)

    keeper = SimpleNamespace(on_event=keep)
    async with (
        ExecutionEngine(config(tmp_path))
        .with_event_handler(redacts)
        .with_event_handler(keeper)
        .with_event_handler(after) as engine
    ):
        execution_id = await engine.execute(shell("echo secret-ish"))
        await engine.wait(execution_id, timeout=20)
        result = await engine.get_result(execution_id)
        assert (result.stdout, result.exit_code) == ("secret-ish\n", 0)
        edited = result.model_copy(update={"stdout": ""})  # an edited copy is the host's to make
        assert (edited.stdout, (await engine.get_result(execution_id)).stdout) == ("", "secret-ish\n")
    assert lines == ["secret-ish"]
    assert redacts.refused == 3  # the line, and the result's two fields


class Stuck:
    """Never returns from its first line until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def on_event(self, event: Any) -> None:
        if isinstance(event, StdoutEvent):
            await self.release.wait()


async def test_a_handler_holding_every_commands_output_back_is_named_in_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Flow control waits for it (nothing is dropped), so other commands stall: the host must hear why."""
    monkeypatch.setattr(handlers, "CONGESTED_SAID_AFTER_S", 0.2)
    stuck = Stuck()
    said = asyncio.Event()

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "held back" in record.getMessage():
                said.set()

    watcher = Said()
    logging.getLogger("cloudops_execution_engine.events").addHandler(watcher)
    try:
        async with ExecutionEngine(config(tmp_path)).with_event_handler(stuck) as engine:
            flood = await engine.execute(shell(FLOOD))
            await asyncio.wait_for(said.wait(), 30)
            stuck.release.set()
            assert (await result_of(engine, flood, 60)).status is ExecutionStatus.COMPLETED
    finally:
        logging.getLogger("cloudops_execution_engine.events").removeHandler(watcher)
    (warning,) = [r for r in caplog.records if "held back" in r.getMessage()]
    assert "Stuck" in warning.getMessage()
    assert warning.levelno == logging.WARNING

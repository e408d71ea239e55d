"""`execute()` queues at once and sends on the loop's next turn: what it refuses, it still refuses itself,
and nothing it accepted is lost, whatever happens before the turn ends."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast
from uuid import UUID, uuid4

import pytest
from conftest import Recorder, config, result_of, run, shell

from cloudops_execution_engine import (
    EngineClosed,
    ExecCommand,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionStatus,
    InvalidCommand,
    NotFound,
)
from cloudops_execution_engine.actors.pool import WorkerHandle
from cloudops_execution_engine.actors.records import Record
from cloudops_execution_engine.actors.scheduler import Scheduler

pytestmark = pytest.mark.timeout(60)

# Over Linux's limit for one argument or variable (32 pages) in UTF-8 bytes, under it in characters.
WIDE = "é" * 70_000


async def test_a_command_cancelled_in_the_turn_of_its_execute_never_starts(
    tmp_path: Path, engine: ExecutionEngine, recorder: Recorder
) -> None:
    """A cancel right after `execute()` finds the command pending: it ends cancelled and never runs."""
    marker = tmp_path / "ran"
    eid = await engine.execute(shell(f"touch {marker}"))
    await engine.cancel(eid)
    result = await result_of(engine, eid, timeout=20)
    assert result.status is ExecutionStatus.CANCELLED
    await recorder.until_final(eid)
    assert recorder.types_of(eid) == ["cancelled"]
    # A worker takes its frames in order: had the command been sent, it would
    # have started (and made its file) before a command sent after it ended.
    again = await result_of(engine, await engine.execute(run("true")), timeout=20)
    assert again.status is ExecutionStatus.COMPLETED
    assert not marker.exists()


async def test_every_command_queued_in_one_turn_runs_once(tmp_path: Path, recorder: Recorder) -> None:
    """Sixty commands queued in one burst, far more than may run at once, all run, each once."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=4)).with_event_handler(
        recorder
    ) as engine:
        ids = [await engine.execute(run("echo", str(index))) for index in range(60)]
        results = [await result_of(engine, eid, timeout=30) for eid in ids]
    assert [r.stdout for r in results] == [f"{index}\n" for index in range(60)]
    assert all(r.status is ExecutionStatus.COMPLETED for r in results)
    for eid in ids:
        assert recorder.types_of(eid).count("started") == 1


async def test_a_shutdown_in_the_turn_of_execute_loses_nothing(tmp_path: Path, recorder: Recorder) -> None:
    """`shutdown(cancel=False)` right after `execute()` lets the command run; `shutdown()` cancels it."""
    engine = ExecutionEngine(config(tmp_path)).with_event_handler(recorder)
    kept = await engine.execute(run("echo", "kept"))
    await engine.shutdown(cancel=False)
    assert recorder.types_of(kept) == ["started", "stdout", "completed"]
    assert [e.line for e in recorder.of(kept) if e.event_type == "stdout"] == ["kept"]

    engine = ExecutionEngine(config(tmp_path)).with_event_handler(recorder)
    dropped = await engine.execute(run("sleep", "30"))
    await engine.shutdown()
    assert recorder.types_of(dropped)[-1:] == ["cancelled"]
    assert [t for t in recorder.types_of(dropped) if t != "started"] == ["cancelled"]


async def test_execute_still_refuses_by_itself_and_registers_nothing(
    engine: ExecutionEngine, recorder: Recorder
) -> None:
    """What no exec could take (counted in UTF-8 bytes) is refused by `execute()`; so is an id used twice."""
    for request in (
        run("printf", "%s", WIDE),
        run("env", env={"WIDE": WIDE}),
        run("echo", "bad \udcff"),
    ):
        with pytest.raises(InvalidCommand):
            await engine.execute(request)
        with pytest.raises(NotFound):
            await engine.get_status(request.id)

    first = run("echo", "first")
    twin = ExecutionRequest(id=first.id, command=ExecCommand(program="echo", args=["twin"]))
    await engine.execute(first)
    with pytest.raises(InvalidCommand, match="already exists"):
        await engine.execute(twin)
    assert (await result_of(engine, first.id, timeout=20)).stdout == "first\n"

    # Just under the limit in bytes: accepted, and the command gets it whole.
    fits = "é" * 60_000
    eid = await engine.execute(run("printf", "%s", fits))
    assert (await result_of(engine, eid, timeout=20)).stdout == fits

    await engine.shutdown()
    with pytest.raises(EngineClosed):
        await engine.execute(run("true"))


class _Starts:
    def __init__(self) -> None:
        self.started: list[Record] = []

    def __call__(self, worker: WorkerHandle, item: Record) -> bool:
        item.status = ExecutionStatus.RUNNING
        self.started.append(item)
        return True


async def test_submissions_of_one_turn_are_sent_together_on_the_next() -> None:
    """Records queued with `add_soon` wait for the loop to turn; then one dispatch sends all, and flushes."""
    starts = _Starts()
    flushes: list[int] = []
    scheduler = Scheduler(
        10, lambda: cast(WorkerHandle, object()), starts, sent=lambda: flushes.append(len(starts.started))
    )
    records = []
    for _ in range(3):
        request = ExecutionRequest(command=ExecCommand(program="true"))
        records.append(Record(request, ["true"], Path(f"/logs/{uuid4()}.log"), 1000))
        scheduler.add_soon(records[-1])
    assert starts.started == []
    await asyncio.sleep(0)
    assert starts.started == records
    assert flushes == [3]
    assert scheduler.running == 3


async def test_a_queued_command_has_its_log_path_before_it_is_sent(tmp_path: Path) -> None:
    """The log path, made when first asked for, is `<log_dir>/<id>.log` before and after the command runs."""
    async with ExecutionEngine(config(tmp_path)) as engine:
        request = run("echo", "logged")
        eid = await engine.execute(request)
        before = engine.get_log_path(eid)  # the same turn: nothing has been sent yet
        result = await result_of(engine, eid, timeout=20)
    assert before == tmp_path / "logs" / f"{eid}.log"
    assert result.log_path == before
    assert "logged" in before.read_text()


async def test_the_command_shown_in_events_and_log_is_made_from_the_request(
    tmp_path: Path, recorder: Recorder
) -> None:
    """The display, made when first asked for, is its shell quoting, in its started event and its log."""
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(run("echo", "two words", "it's"))
        result = await result_of(engine, eid, timeout=20)
        await recorder.until_final(eid)
    shown = "echo 'two words' 'it'\"'\"'s'"
    started = [e for e in recorder.of(eid) if e.event_type == "started"]
    assert [e.command for e in started] == [shown]
    assert f"# command: {shown}\n" in result.log_path.read_text()


async def test_an_execute_cancelled_while_it_yields_leaves_no_command_running_unknown(
    tmp_path: Path, recorder: Recorder
) -> None:
    """A caller whose `execute()` is cancelled never got the id: that command must not run behind its back.

    `execute()` lets the loop turn every few submissions while the queue is
    deep; a cancel of the calling task lands there, after the command was queued.
    """
    marks = tmp_path / "marks"
    marks.mkdir()
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(
        recorder
    ) as engine:
        returned: list[object] = []
        queued = asyncio.Event()

        async def submit_many() -> None:
            for index in range(500):
                returned.append(await engine.execute(shell(f"touch {marks}/{index}")))
                if len(returned) == 20:
                    queued.set()

        task = asyncio.create_task(submit_many())
        await queued.wait()
        # This task runs only while the other one is suspended: inside an execute().
        assert not task.done(), "execute() never let the loop turn"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        listed = await engine.list_executions()
        unknown = [s.id for s in listed if s.id not in returned]
        assert len(unknown) <= 1
        for eid in returned:
            await result_of(engine, cast("UUID", eid), timeout=30)
        for eid in unknown:
            result = await result_of(engine, eid, timeout=30)
            assert result.status is ExecutionStatus.CANCELLED
            await recorder.until_final(eid)
            assert recorder.types_of(eid) == ["cancelled"]
    assert len(list(marks.iterdir())) == len(returned)

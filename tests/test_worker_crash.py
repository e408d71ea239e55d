"""A worker killed with SIGKILL costs only the executions it held."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from uuid import uuid4

import psutil
import pytest
from conftest import HELPERS, PYTHON, Recorder, config, gone, result_of, run, shell

from cloudops_execution_engine import (
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ShellCommand,
)
from cloudops_execution_engine.protocol import messages

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]


async def test_sigkilled_worker_fails_its_executions_and_the_engine_keeps_serving(
    tmp_path: Path, recorder: Recorder
) -> None:
    async with ExecutionEngine(config(tmp_path, workers=1)).with_event_handler(recorder) as engine:
        eid = await engine.execute(run(PYTHON, str(HELPERS / "tree.py")))
        await recorder.until(lambda _: sum(e.event_type == "stdout" for e in recorder.of(eid)) == 3)
        pids = [int(e.line.split()[1]) for e in recorder.of(eid) if e.event_type == "stdout"]
        worker = psutil.Process(pids[0]).ppid()
        os.kill(worker, signal.SIGKILL)
        result = await engine.wait(eid, timeout=30)
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.FAILED
        assert result.error == (
            f"Worker process {worker} died (killed by signal SIGKILL(-9)) while running this execution"
        )
        await recorder.until_final(eid)
        assert recorder.types_of(eid)[-1] == "failed"
        assert [pid for pid in pids if not gone(pid)] == [], "the dead worker's command tree survived"
        after = await engine.execute(run("echo", "still serving"))
        assert (await engine.wait(after, timeout=30)).stdout == "still serving\n"  # type: ignore[union-attr]


async def test_repeated_worker_kills_never_break_the_engine(tmp_path: Path, recorder: Recorder) -> None:
    """Unlike a broken process pool, the engine recovers every time."""
    async with ExecutionEngine(config(tmp_path, workers=2)).with_event_handler(recorder) as engine:
        for _ in range(5):
            held = [await engine.execute(shell("echo up; exec sleep 30")) for _ in range(4)]
            await recorder.until(
                lambda _: all("stdout" in recorder.types_of(eid) for eid in held)  # noqa: B023
            )
            # The worker of one of them: a new worker may still be starting, and hold none.
            command = engine._supervisor.entry(held[0]).pid  # type: ignore[union-attr]
            victim = psutil.Process(command).ppid()
            os.kill(victim, signal.SIGKILL)
            # Those on the surviving worker are still running: cancel them.
            for eid in held:
                if await engine.get_status(eid) is ExecutionStatus.RUNNING:
                    await engine.cancel(eid)
            results = [await result_of(engine, eid, timeout=30) for eid in held]
            statuses = {r.status for r in results}
            assert statuses <= {ExecutionStatus.FAILED, ExecutionStatus.CANCELLED}
            failed = [r for r in results if r.status is ExecutionStatus.FAILED]
            assert failed, "none of the killed worker's executions failed"
            assert all(r.error is not None and f"Worker process {victim} died" in r.error for r in failed)
            ok = await engine.execute(run("true"))
            assert (await engine.wait(ok, timeout=30)).status is ExecutionStatus.COMPLETED
        summaries = await engine.list_executions()
        assert all(s.status.is_final for s in summaries)


def _reap_every_child(_signum: int, _frame: FrameType | None) -> None:
    # As pre-forking servers' arbiters do: whatever child ended, collect it.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


@pytest.fixture(params=["default", "ignored", "reaped by the host"])
def host_sigchld(request: pytest.FixtureRequest) -> Iterator[str]:
    """The host's SIGCHLD: as Python leaves it, ignored (the kernel then reaps), or its own reaper."""
    chosen: dict[str, Callable[[int, FrameType | None], None] | signal.Handlers] = {
        "default": signal.SIG_DFL,
        "ignored": signal.SIG_IGN,
        "reaped by the host": _reap_every_child,
    }
    previous = signal.signal(signal.SIGCHLD, chosen[request.param])
    try:
        yield request.param
    finally:
        signal.signal(signal.SIGCHLD, previous)


async def test_a_dead_worker_is_noticed_at_once_whoever_reaps_the_hosts_children(
    tmp_path: Path, recorder: Recorder, host_sigchld: str
) -> None:
    """A host that ignores SIGCHLD, or reaps every child itself, never gets a worker's exit status.

    The worker's death, its executions' failure and the engine's shutdown must
    not wait for a status that will never come.
    """
    engine = ExecutionEngine(config(tmp_path, workers=1)).with_event_handler(recorder)
    async with engine:
        eid = await engine.execute(shell("echo $PPID; exec sleep 30"))
        await recorder.until(lambda _: "stdout" in recorder.types_of(eid))
        worker = int(recorder.of(eid)[-1].line)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        result = await engine.wait(eid, timeout=30)
        noticed = time.monotonic() - killed
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.FAILED
        assert result.error is not None
        assert result.error.startswith(f"Worker process {worker} died (")
        if host_sigchld != "default":
            assert "its exit status unknown, the host's SIGCHLD handling reaped it" in result.error
        assert noticed < 2.0, f"the death of worker {worker} was noticed after {noticed:.2f} s"
        after = await engine.wait(await engine.execute(run("echo", "still serving")), timeout=30)
        assert after.stdout == "still serving\n"  # type: ignore[union-attr]
        stopping = time.monotonic()
    stopped = time.monotonic() - stopping
    assert stopped < 1.5, f"shutdown took {stopped:.2f} s"


async def test_a_dead_workers_clean_up_spares_another_engines_command_of_the_same_id(
    tmp_path: Path, recorder: Recorder
) -> None:
    """Ids are the host's to choose (a job's name made a UUID, say): another engine may run the same one.

    The processes a dead worker left are found across the machine by their
    execution's marker; those of another engine's execution are not theirs.
    """
    shared = uuid4()
    first = ExecutionEngine(config(tmp_path / "first", workers=1)).with_event_handler(recorder)
    watcher = Recorder()
    second = ExecutionEngine(config(tmp_path / "second", workers=1)).with_event_handler(watcher)
    async with first, second:
        await first.execute(
            ExecutionRequest(id=shared, command=ShellCommand(command="echo $PPID; exec sleep 30"))
        )
        await second.execute(ExecutionRequest(id=shared, command=ShellCommand(command="exec sleep 30")))
        await recorder.until(lambda _: "stdout" in recorder.types_of(shared))
        worker = int(recorder.of(shared)[-1].line)
        await watcher.until(lambda _: "started" in watcher.types_of(shared))
        bystander = second._supervisor.entry(shared).pid  # type: ignore[union-attr]
        os.kill(worker, signal.SIGKILL)
        result = await first.wait(shared, timeout=30)
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.FAILED
        assert not gone(bystander), "the first engine's clean-up killed the second engine's command"
        assert await second.get_status(shared) is ExecutionStatus.RUNNING
        await second.cancel(shared)
        assert (await second.wait(shared, timeout=30)).status is ExecutionStatus.CANCELLED


async def test_a_worker_a_command_terminates_is_said_to_be_killed_by_sigterm(tmp_path: Path) -> None:
    """`kill -TERM $PPID`: the worker kills its trees and ends by that signal, which the failure names."""
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        result = await result_of(engine, await engine.execute(shell("kill -TERM $PPID; sleep 5")), timeout=30)
        assert result.status == "failed"
        assert result.error is not None
        said = "died (killed by signal SIGTERM(-15)) while running this execution"
        assert said in result.error, result.error
        again = await result_of(engine, await engine.execute(run("echo", "served")), timeout=30)
        assert again.stdout == "served\n"


async def test_a_command_the_worker_cannot_read_fails_alone_and_the_worker_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Run whose fields do not decode (a value of the wrong type slipped past the host) is that
    execution's failure, said as such; the worker, and the command it runs beside it, go on."""
    unreadable = shell("echo never")
    to_wire = messages.Run.to_wire

    def garbled(run: messages.Run) -> list[Any]:
        wire = to_wire(run)
        if run.execution_id == unreadable.id.bytes:
            wire[5] = 1500.5  # timeout_ms: no worker takes a float there
        return wire

    monkeypatch.setattr(messages.Run, "to_wire", garbled)
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        beside = await engine.execute(shell("read line; echo $line", stdin="beside\n"))
        failed = await result_of(engine, await engine.execute(unreadable), 20)
        assert failed.status is ExecutionStatus.FAILED
        assert failed.error is not None
        assert "could not read" in failed.error
        assert "timeout_ms" in failed.error
        assert (await result_of(engine, beside, 20)).stdout == "beside\n"
        after = await result_of(engine, await engine.execute(shell("echo after")), 20)
        assert after.stdout == "after\n"
        assert len({engine._supervisor.entry(eid).worker for eid in (beside, after.id)}) == 1  # type: ignore[union-attr]


@pytest.mark.timeout(120)
def test_a_host_that_adopts_orphans_is_left_no_zombie_by_shutdowns_or_dead_workers(tmp_path: Path) -> None:
    """PID 1 in a container, or any command another engine runs, adopts its descendants' orphans.

    Each worker that exited, shut down or killed, left its spawner to such a
    host, which never reaped it: a zombie per shutdown and per dead worker.
    """
    import json
    import subprocess

    done = subprocess.run(
        [PYTHON, str(HELPERS / "subreaper_host.py"), str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"after_cycles": [], "after_kills": []}

"""The worker pool under faults of its own: workers that misbehave, a host out of fds, a cancelled shutdown.

Worker-side faults are named injectors (`helpers/faulty_workers.py`): entry
points a real pool starts in real worker processes in place of `worker_main`.
Each ends in a bounded outcome a user can see: the engine's start fails with
`SpawnFailed` naming the cause, or the execution the fault struck fails naming
the worker's death while one on another worker completes; and the engine
serves afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest
from conftest import (
    HELPERS,
    PYTHON,
    Recorder,
    config,
    gone,
    host_children,
    open_fds,
    result_of,
    run,
    shell,
    wait_until,
)
from helpers import faulty_workers

from cloudops_execution_engine import EngineClosed, ExecutionEngine, ExecutionStatus, SpawnFailed
from cloudops_execution_engine.actors import supervisor
from cloudops_execution_engine.actors.local_pool import LocalWorkerPool, WorkerTarget
from cloudops_execution_engine.actors.worker import worker_main

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
UsePool = Callable[..., None]


@pytest.fixture
def use_pool(monkeypatch: pytest.MonkeyPatch) -> UsePool:
    """Make the engines of this test build their local pool with these keyword arguments."""

    def use(**options: Any) -> None:
        monkeypatch.setattr(supervisor, "LocalWorkerPool", functools.partial(LocalWorkerPool, **options))

    return use


async def until_gone(pids: Iterable[int], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} to end")
        await asyncio.sleep(0.02)


async def serves(engine: ExecutionEngine, times: int = 1) -> None:
    for _ in range(times):
        result = await result_of(engine, await engine.execute(run("echo", "served")), timeout=30)
        assert result.stdout == "served\n", result.error


# -- faults at start-up ------------------------------------------------------------

START_FAULTS: dict[str, tuple[WorkerTarget, str]] = {
    "exit before hello": (
        faulty_workers.exit_before_hello,
        rf"worker process \d+ died before it was ready \(exited with exit code {faulty_workers.EXIT_CODE}\)",
    ),
    "hang before hello": (faulty_workers.hang_before_hello, r"worker \d+ did not start within 3s"),
}


@pytest.mark.parametrize("fault", list(START_FAULTS))
async def test_a_worker_that_never_says_hello_fails_the_start_naming_the_cause(
    tmp_path: Path, use_pool: UsePool, fault: str
) -> None:
    """The start fails in bounded time with SpawnFailed naming the cause; with sound workers it serves."""
    target, cause = START_FAULTS[fault]
    # Long enough for a worker to start and fail by itself on a loaded machine.
    use_pool(worker_target=target, hello_timeout=3.0)
    engine = ExecutionEngine(config(tmp_path, workers=2))
    with pytest.raises(SpawnFailed) as caught:
        await asyncio.wait_for(engine.start(), 30)
    assert re.fullmatch(f"Process spawn failed: {cause}", str(caught.value)), str(caught.value)
    use_pool(worker_target=worker_main)
    try:
        await serves(engine)
    finally:
        await engine.shutdown()


# -- faults while running ----------------------------------------------------------

RUN_FAULTS: dict[str, tuple[WorkerTarget, str]] = {
    "exit on run": (
        faulty_workers.exit_on_run,
        rf"exited with exit code {faulty_workers.EXIT_CODE}",
    ),
    "SIGKILL itself on run": (faulty_workers.kill_self_on_run, r"killed by signal SIGKILL\(-9\)"),
    "oversized finished frame": (
        faulty_workers.oversized_finished,
        r"sent a malformed message \(frame of \d+ bytes exceeds the \d+-byte limit\)[^)]*",
    ),
}


@pytest.mark.parametrize("fault", list(RUN_FAULTS))
async def test_a_worker_fault_while_running_costs_only_the_execution_it_struck(
    tmp_path: Path, use_pool: UsePool, recorder: Recorder, fault: str
) -> None:
    """The struck execution fails naming the worker's death; one on the other worker completes."""
    target, death = RUN_FAULTS[fault]
    use_pool(worker_target=target)
    go = tmp_path / "go"
    cfg = config(tmp_path, workers=2, max_output_bytes=MIB)
    async with ExecutionEngine(cfg).with_event_handler(recorder) as engine:
        workers = {child.pid for child in psutil.Process().children()}
        bystander = await engine.execute(shell(f"echo up; until [ -e {go} ]; do sleep 0.01; done; echo done"))
        await recorder.until(lambda _: "stdout" in recorder.types_of(bystander))
        struck = await engine.execute(shell(f"echo {faulty_workers.TRIGGER}"))
        result = await result_of(engine, struck, timeout=30)
        assert result.status is ExecutionStatus.FAILED
        assert result.error is not None
        died = re.fullmatch(
            rf"Worker process (\d+) died \({death}\) while running this execution", result.error
        )
        assert died, result.error
        assert int(died[1]) in workers
        go.touch()
        survivor = await result_of(engine, bystander, timeout=30)
        assert survivor.status is ExecutionStatus.COMPLETED
        assert survivor.stdout == "up\ndone\n"
        await serves(engine, times=4)


# -- a host out of file descriptors -------------------------------------------------


@pytest.fixture(scope="module")
def starved_host(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What helpers/starved_host.py reported, run once for the tests below."""
    logs = tmp_path_factory.mktemp("starved") / "logs"
    done = subprocess.run(
        [PYTHON, str(HELPERS / "starved_host.py"), str(logs)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def events_of(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == kind]


def result_named(lines: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [line for line in events_of(lines, "result") if line["name"] == name]
    return found


EMFILE = "cannot start a worker process: [Errno 24] Too many open files"


def test_a_start_without_file_descriptors_is_spawn_failed_and_leaves_nothing_open(
    starved_host: list[dict[str, Any]],
) -> None:
    """EMFILE while starting the pool is SpawnFailed naming it, never a raw OSError, and no fd stays open."""
    assert events_of(starved_host, "start") == [
        {"event": "start", "error": f"Process spawn failed: {EMFILE}"}
    ]
    assert events_of(starved_host, "start fds") == [{"event": "start fds", "leaked": []}]


def test_a_pool_that_cannot_replace_its_worker_reports_itself_broken_then_recovers(
    starved_host: list[dict[str, Any]],
) -> None:
    """Retries with backoff, warns once, reports broken naming EMFILE, and recovers once fds are back."""
    kinds = [line["event"] for line in starved_host]
    assert events_of(starved_host, "broken") == [{"event": "broken", "cause": EMFILE}]
    assert kinds.index("broken") < kinds.index("recovered") < kinds.index("closed")
    pool_logs = [line for line in events_of(starved_host, "log") if line["logger"].endswith(".pool")]
    warnings = [line for line in pool_logs if line["message"].startswith("cannot start a replacement worker")]
    assert len(warnings) == 1, "one warning per streak of failed starts, not one per attempt"
    assert EMFILE in warnings[0]["message"]
    (worker,) = events_of(starved_host, "worker")
    long = result_named(starved_host, "long")
    assert long["status"] == "failed"
    assert long["error"] == (
        f"Worker process {worker['pid']} died (killed by signal SIGKILL(-9)) while running this execution"
    )
    assert gone(worker["command"]), "the dead worker's command outlived it"
    after = result_named(starved_host, "after")
    assert (after["status"], after["stdout"]) == ("completed", "after\n")


def test_work_queued_while_no_worker_can_start_fails_with_spawn_failed(
    starved_host: list[dict[str, Any]],
) -> None:
    """Queued work does not wait for ever for a worker that cannot be started: it fails naming the cause."""
    queued = result_named(starved_host, "queued")
    assert queued["status"] == "failed"
    assert queued["error"] == f"Process spawn failed: {EMFILE}"


# -- cancelling the engine's own calls ----------------------------------------------


async def test_a_worker_whose_pipe_closes_before_it_exits_does_not_hold_up_shutdown(
    tmp_path: Path, use_pool: UsePool
) -> None:
    """A worker's pipe may close before its exit is seen; shutdown waits for the exit, not its timeout."""
    use_pool(worker_target=faulty_workers.pipe_closed_before_exit)
    engine = ExecutionEngine(config(tmp_path, workers=2))
    await engine.start()
    await serves(engine)
    workers = [w.pid for w in engine._supervisor._pool.workers]  # type: ignore[union-attr]
    started = time.monotonic()
    await asyncio.wait_for(engine.shutdown(), 30)
    took = time.monotonic() - started
    # Each worker lingers LINGER seconds after closing its pipe; the host's exit timeout is 5 s.
    assert took < faulty_workers.LINGER + 2.0, f"shutdown took {took:.2f}s"
    assert all(gone(pid) for pid in workers)


async def test_a_worker_whose_exit_is_learnt_by_asking_does_not_hold_up_shutdown(
    tmp_path: Path, use_pool: UsePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its sentinel never fires (a process of its own holds it): the exit status alone ends the wait."""
    pidfile = tmp_path / "holder.pid"
    monkeypatch.setenv(faulty_workers.HOLDER_PIDFILE, str(pidfile))
    use_pool(worker_target=faulty_workers.exit_seen_only_by_asking)
    engine = ExecutionEngine(config(tmp_path, workers=1))
    await engine.start()
    await serves(engine)
    started = time.monotonic()
    await asyncio.wait_for(engine.shutdown(), 30)
    took = time.monotonic() - started
    holder = int(pidfile.read_text())
    # The holder keeps the sentinel open for 4 * LINGER seconds; the exit timeout is 5 s.
    assert took < faulty_workers.LINGER * 3, f"shutdown took {took:.2f}s"
    await until_gone([holder], 10, "the process holding the sentinel")


async def running_sleepers(engine: ExecutionEngine, recorder: Recorder, count: int) -> list[UUID]:
    """`count` commands that ignore SIGTERM, so that ending them takes the whole kill grace."""
    ids = [await engine.execute(shell("trap '' TERM; exec sleep 30")) for _ in range(count)]
    await recorder.until(lambda _: all("started" in recorder.types_of(eid) for eid in ids))
    return ids


async def test_a_shutdown_cut_short_by_its_caller_still_stops_every_worker_and_command(
    tmp_path: Path, recorder: Recorder
) -> None:
    """wait_for(shutdown(), 0.01) times out; yet no worker or command survives, and the engine is closed."""
    before = host_children()
    engine = ExecutionEngine(config(tmp_path, workers=2, kill_grace_ms=500)).with_event_handler(recorder)
    await engine.start()
    ids = await running_sleepers(engine, recorder, 4)
    ours = host_children() - before
    assert len(ours) >= 2 + 4, "expected both workers and four commands"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.shutdown(), 0.01)
    await until_gone(ours, 20, "every worker and command")
    with pytest.raises(EngineClosed):
        await engine.execute(run("true"))
    await asyncio.wait_for(engine.shutdown(), 30)
    with pytest.raises(EngineClosed):
        await engine.get_status(ids[0])
    assert all(recorder.types_of(eid)[-1] == "cancelled" for eid in ids)


async def test_a_cancelled_shutdown_raises_in_its_caller_and_a_second_call_awaits_the_same_end(
    tmp_path: Path, recorder: Recorder
) -> None:
    """The caller's CancelledError propagates; shutdown() again returns once everything has stopped."""
    before = host_children()
    engine = ExecutionEngine(config(tmp_path, workers=2, kill_grace_ms=500)).with_event_handler(recorder)
    await engine.start()
    ids = await running_sleepers(engine, recorder, 2)
    ours = host_children() - before
    first = asyncio.create_task(engine.shutdown())
    await recorder.until(lambda _: any("cancelled" in recorder.types_of(eid) for eid in ids))
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(engine.shutdown(), 30)
    assert [pid for pid in ours if not gone(pid)] == []
    assert all(recorder.types_of(eid)[-1] == "cancelled" for eid in ids)
    with pytest.raises(EngineClosed):
        await engine.list_executions()


async def test_a_start_cancelled_as_its_workers_say_hello_is_quiet_and_leaves_nothing(tmp_path: Path) -> None:
    """`wait_for(start(), t)` times out at every point of a four-worker start: no error, nothing left.

    A worker that said hello before the start was given up held no work: its
    stop is not a death to report (the report found no pool, and an assertion
    failed in a task nobody awaited).
    """
    before = host_children()
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(repr(context)))
    try:
        for step in range(20):
            engine = ExecutionEngine(config(tmp_path, workers=4))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.start(), 0.02 + step * 0.02)
            await asyncio.wait_for(engine.shutdown(), 30)
            del engine
            gc.collect()
        await until_gone(host_children() - before, 10, "the workers of the cancelled starts")
        async with ExecutionEngine(config(tmp_path, workers=1)) as served:
            await serves(served)
    finally:
        loop.set_exception_handler(None)
    assert errors == []


# -- the loop closing as a worker dies ------------------------------------------------


def run_in_thread(main: Callable[[], Any], timeout: float) -> None:
    """`asyncio.run(main())` on a thread of its own; fail if it has not returned within `timeout`."""
    failed: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"asyncio.run did not return within {timeout}s"
    assert not failed, failed


def let_go(held: list[Any]) -> None:
    """Drop the only reference to what `held` holds, and collect it."""
    held.clear()
    gc.collect()


def wait_for_exit_in_place(pid: int) -> None:
    """Block the loop until `pid` has ended, not reaping it: the loop learns of it on its next turn."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_a_worker_death_the_loop_closes_on_is_still_cleaned_up(tmp_path: Path) -> None:
    """A worker dies as `asyncio.run` ends: its command's tree is killed and nothing of it stays open.

    The loop's last turn reads the worker's exit, so its death report is due on
    a turn that never comes; `asyncio.run` cancels it before it begins.
    """
    before, fds_before = host_children(), open_fds()
    kept: list[ExecutionEngine] = []
    sleeper: list[int] = []

    async def main() -> None:
        engine = ExecutionEngine(config(tmp_path, workers=1))
        kept.append(engine)
        recorder = Recorder()
        engine.with_event_handler(recorder)
        await engine.start()
        eid = await engine.execute(shell("echo $$; exec sleep 30"))
        await recorder.until(lambda _: "stdout" in recorder.types_of(eid))
        sleeper.append(int(next(e.line for e in recorder.of(eid) if e.event_type == "stdout")))
        worker = engine._supervisor._pool.workers[0]  # type: ignore[union-attr]
        os.kill(worker.pid, signal.SIGKILL)
        wait_for_exit_in_place(worker.pid)

    run_in_thread(main, 30)
    wait_until(lambda: gone(sleeper[0]), 10, "the dead worker's command to be killed")
    wait_until(lambda: "cloudops-clean-up" not in {t.name for t in threading.enumerate()}, 10, "the clean-up")
    wait_until(lambda: host_children() <= before, 10, "the dead worker to be reaped")
    left = {fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target}
    assert not left, f"the dead worker's descriptors were left open: {left}"
    with pytest.warns(ResourceWarning, match="without shutdown"):
        let_go(kept)


def test_a_shutdown_under_way_as_the_loop_closes_on_a_worker_death_ends(tmp_path: Path) -> None:
    """The shutdown waits for a worker's exit, which comes on the loop's last turn: `asyncio.run` returns."""
    before, fds_before = host_children(), open_fds()
    kept: list[Any] = []

    async def main() -> None:
        engine = ExecutionEngine(config(tmp_path, workers=1))
        await engine.start()
        worker = engine._supervisor._pool.workers[0]  # type: ignore[union-attr]
        os.kill(worker.pid, signal.SIGSTOP)  # its Shutdown goes unanswered: the stop waits for the exit
        kept.append(asyncio.ensure_future(engine.shutdown()))
        for _ in range(10_000):  # turns of the loop until the stop waits for the exit
            if worker._exit_waiters:
                break
            await asyncio.sleep(0)
        assert worker._exit_waiters, "the shutdown never came to wait for the worker's exit"
        os.kill(worker.pid, signal.SIGKILL)
        wait_for_exit_in_place(worker.pid)

    run_in_thread(main, 30)
    wait_until(lambda: host_children() <= before, 10, "the worker to be reaped")
    left = {fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target}
    assert not left, f"the worker's descriptors were left open: {left}"

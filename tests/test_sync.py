"""SyncExecutionEngine: the same engine for code without an event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    PYTHON,
    assert_raises_logged_sparingly,
    config,
    gone,
    host_children,
    run,
    shell,
    wait_until,
)

from cloudops_execution_engine import (
    EngineClosed,
    ExecutionPlan,
    ExecutionStatus,
    IoError,
    NotFound,
    ParallelStrategy,
    PlanExecutionResult,
    SerialStrategy,
    SyncExecutionEngine,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def test_blocking_calls_mirror_the_async_api(tmp_path: Path) -> None:
    threads_before = set(threading.enumerate())
    seen: list[Any] = []
    with SyncExecutionEngine(config(tmp_path)).with_event_handler(seen.append) as engine:
        eid = engine.execute(shell("echo sync"))
        result = engine.wait(eid, timeout=20)
        assert result.status is ExecutionStatus.COMPLETED
        assert engine.get_result(eid).stdout == "sync\n"
        assert engine.get_status(eid) is ExecutionStatus.COMPLETED
        assert "stdout sync" in engine.read_logs(eid)
        assert engine.get_log_path(eid).exists()
        plan = ExecutionPlan(commands=[run("true"), run("true")], strategy=ParallelStrategy())
        plan_result = engine.wait(engine.execute_plan(plan), timeout=20)
        assert isinstance(plan_result, PlanExecutionResult)
        assert engine.get_plan_result(plan.id).stats.completed == 2
        assert len(engine.list_executions()) == 4
        with pytest.raises(NotFound):
            engine.get_status("00000000-0000-0000-0000-000000000000")
        with pytest.raises(TimeoutError):
            engine.wait(engine.execute(run("sleep", "30")), timeout=0.05)
    assert [e.event_type for e in seen if getattr(e, "execution_id", None) == eid] == [
        "started",
        "stdout",
        "completed",
    ]
    with pytest.raises(EngineClosed):
        engine.execute(run("true"))
    engine.shutdown()
    assert not any(t.name == "cloudops-execution-engine" for t in threading.enumerate())
    assert set(threading.enumerate()) <= threads_before  # log reads' threads too


def test_events_iterator_and_cancel_from_another_thread(tmp_path: Path) -> None:
    with SyncExecutionEngine(config(tmp_path)) as engine:
        eid = engine.execute(shell("echo first; exec sleep 30"))
        kinds = []
        for event in engine.events(eid):
            kinds.append(event.event_type)
            if event.event_type == "stdout":
                threading.Thread(target=engine.cancel, args=(eid,)).start()
        assert kinds == ["started", "stdout", "cancelled"]
        assert engine.get_status(eid) is ExecutionStatus.CANCELLED


# -- handlers off the loop ----------------------------------------------------------


def engine_threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_a_slow_plain_handler_runs_on_its_own_thread_and_delays_only_itself(tmp_path: Path) -> None:
    """A plain handler sleeping per event neither blocks the loop nor holds back another handler."""
    threads_before = engine_threads()
    slow_seen: list[str] = []
    slow_threads: set[str] = set()
    fast_seen: list[Any] = []

    def slow(event: Any) -> None:
        slow_threads.add(threading.current_thread().name)
        time.sleep(0.2)
        slow_seen.append(event.event_type)

    engine = SyncExecutionEngine(config(tmp_path)).with_event_handler(slow)
    with engine.with_event_handler(fast_seen.append):
        noisy = engine.execute(shell("for i in $(seq 10); do echo $i; done"))
        assert engine.wait(noisy, timeout=20).status is ExecutionStatus.COMPLETED
        begun = time.monotonic()
        quick = engine.execute(run("true"))
        assert engine.wait(quick, timeout=20).status is ExecutionStatus.COMPLETED
        assert time.monotonic() - begun < 1.0, "the slow handler delayed an unrelated execution"
        wait_until(
            lambda: any(getattr(e, "execution_id", None) == quick for e in fast_seen[-1:]),
            5,
            "the fast handler to see the quick execution end",
        )
        assert len(slow_seen) < 14, "the slow handler should still be behind"
    # Shutdown waited for what was queued, then ended the handlers' threads.
    assert slow_seen == ["started", *["stdout"] * 10, "completed", "started", "completed"]
    assert len(slow_threads) == 1
    assert next(iter(slow_threads)).startswith("cloudops-event-handler-")
    assert engine_threads() <= threads_before


def test_a_coroutine_handler_that_calls_the_engine_gets_an_error_not_a_deadlock(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    engine = SyncExecutionEngine(config(tmp_path))

    async def on_loop(event: Any) -> None:
        try:
            engine.get_status(event.execution_id)
        except RuntimeError as exc:
            errors.append(exc)

    with engine.with_event_handler(on_loop):
        engine.wait(engine.execute(run("true")), timeout=20)
        wait_until(lambda: len(errors) == 2, 10, "the handler's two calls to fail")
    assert "own loop thread" in str(errors[0])


# -- events() after execute() ---------------------------------------------------------


def test_events_right_after_execute_yield_everything_from_started(tmp_path: Path) -> None:
    """The README's pattern: nothing is lost between `execute()` and `events()`."""
    with SyncExecutionEngine(config(tmp_path)) as engine:
        for _ in range(100):
            eid = engine.execute(shell("echo a; echo b"))
            seen = list(engine.events(eid))
            assert [e.event_type for e in seen] == ["started", "stdout", "stdout", "completed"]
            assert [getattr(e, "line", None) for e in seen[1:3]] == ["a", "b"]


def test_events_of_a_command_that_has_already_ended_are_all_there(tmp_path: Path) -> None:
    with SyncExecutionEngine(config(tmp_path)) as engine:
        eid = engine.execute(shell("echo done"))
        engine.wait(eid, timeout=20)
        assert [e.event_type for e in engine.events(eid)] == ["started", "stdout", "completed"]
        # The first call took the kept events; an ended execution has none from now on.
        assert list(engine.events(eid)) == []


def test_events_of_a_plan_right_after_execute_plan(tmp_path: Path) -> None:
    with SyncExecutionEngine(config(tmp_path)) as engine:
        plan = ExecutionPlan(commands=[run("true"), run("true")], strategy=ParallelStrategy())
        pid = engine.execute_plan(plan)
        engine.wait(pid, timeout=20)
        kinds = [e.event_type for e in engine.events(pid)]
        assert sorted(kinds) == sorted(["started", "completed", "progress"] * 2)


def test_early_buffers_are_kept_for_the_most_recent_ended_ids(tmp_path: Path) -> None:
    """Buffers nobody reads do not pile up: the oldest ended ones go."""
    with SyncExecutionEngine(config(tmp_path)) as engine:
        ids = [engine.execute(run("true")) for _ in range(300)]
        for eid in ids:
            engine.wait(eid, timeout=20)
        assert list(engine.events(ids[0])) == []
        assert [e.event_type for e in engine.events(ids[-1])] == ["started", "completed"]


def test_an_unread_early_buffer_of_a_flood_neither_stalls_the_engine_nor_keeps_growing(
    tmp_path: Path,
) -> None:
    with SyncExecutionEngine(config(tmp_path)) as engine:
        flood = engine.execute(shell("seq 200000"))
        other = engine.execute(shell("echo other"))
        assert engine.wait(other, timeout=20).status is ExecutionStatus.COMPLETED
        assert engine.wait(flood, timeout=50).status is ExecutionStatus.COMPLETED
        assert not engine._bus.congested
        with pytest.raises(IoError, match="no longer buffered"):
            engine.events(flood).__next__()
        assert [e.event_type for e in engine.events(other)] == ["started", "stdout", "completed"]


# -- interrupts and cancellation -------------------------------------------------------


def blocked_in_a_call() -> bool:
    """Whether the main thread is waiting inside `SyncExecutionEngine._call`."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    innermost = frame
    while frame is not None:
        if frame.f_code.co_name == "_call" and frame.f_code.co_filename.endswith("sync.py"):
            return innermost is not None and innermost.f_code.co_filename == threading.__file__
        frame = frame.f_back
    return False


def interrupt_main_thread(when: Callable[[], bool] = lambda: True) -> threading.Thread:
    """SIGINT to the main thread (a KeyboardInterrupt there) once it is blocked in a call and `when` holds."""

    def interrupt() -> None:
        deadline = time.monotonic() + 10
        while not (blocked_in_a_call() and when()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    thread = threading.Thread(target=interrupt)
    thread.start()
    return thread


@pytest.fixture
def on_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("KeyboardInterrupt is delivered to the main thread only")


@pytest.mark.usefixtures("on_main_thread")
def test_a_keyboard_interrupt_while_blocked_cancels_the_call_on_the_loop(tmp_path: Path) -> None:
    with SyncExecutionEngine(config(tmp_path)) as engine:
        running, cancelled = threading.Event(), threading.Event()

        async def blocked() -> None:
            running.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        interrupter = interrupt_main_thread(running.is_set)
        with pytest.raises(KeyboardInterrupt):
            engine._call(blocked())
        interrupter.join(10)
        assert cancelled.wait(10), "the coroutine on the loop was not cancelled"

        # Through the public API: an interrupted wait leaves the execution and the engine as they were.
        eid = engine.execute(shell("echo up; exec sleep 30"))
        events = engine.events(eid)
        assert [next(events).event_type, next(events).event_type] == ["started", "stdout"]
        interrupter = interrupt_main_thread()
        with pytest.raises(KeyboardInterrupt):
            engine.wait(eid)
        interrupter.join(10)
        assert engine.get_status(eid) is ExecutionStatus.RUNNING
        engine.cancel(eid)
        assert [e.event_type for e in events] == ["cancelled"]


def interrupt_once_the_call_returns(engine: SyncExecutionEngine) -> threading.Thread:
    """A KeyboardInterrupt in the main thread after its next call has done its work, before it returns.

    The loop is held until the main thread waits in the call; then SIGINT goes
    to the loop's thread. Python runs the handler on the main thread, which
    only the call's answer wakes: the interrupt comes with the answer.
    """
    held = threading.Event()
    engine._loop.call_soon_threadsafe(held.wait, 10)

    def interrupt() -> None:
        deadline = time.monotonic() + 10
        while not blocked_in_a_call() and time.monotonic() < deadline:
            time.sleep(0.001)
        signal.pthread_kill(engine._thread.ident or 0, signal.SIGINT)
        held.set()

    thread = threading.Thread(target=interrupt)
    thread.start()
    return thread


@pytest.mark.usefixtures("on_main_thread")
@pytest.mark.parametrize("call", ["execute", "execute_plan", "resume_plan"])
def test_a_submission_interrupted_after_the_engine_took_it_leaves_nothing_running(
    tmp_path: Path, call: str
) -> None:
    """A caller whose execute() raised never learnt an id: nothing may run that it cannot cancel."""
    with SyncExecutionEngine(config(tmp_path)) as engine:
        slow = shell("echo started; exec sleep 30")
        # Fails at its first run, and runs long at the next (its resumed plan's).
        again = shell(f"test -e {tmp_path}/ran && exec sleep 30; touch {tmp_path}/ran; exit 1")
        old_plan = engine.execute_plan(ExecutionPlan(commands=[again], strategy=SerialStrategy()))
        assert engine.wait(old_plan, timeout=10).status is ExecutionStatus.FAILED
        submissions: dict[str, Callable[[], object]] = {
            "execute": lambda: engine.execute(slow),
            "execute_plan": lambda: engine.execute_plan(
                ExecutionPlan(
                    commands=[slow, shell("exec sleep 30")], strategy=ParallelStrategy(max_concurrency=2)
                )
            ),
            "resume_plan": lambda: engine.resume_plan(old_plan),
        }
        before = {summary.id for summary in engine.list_executions()}
        interrupter = interrupt_once_the_call_returns(engine)
        with pytest.raises(KeyboardInterrupt):
            submissions[call]()
        interrupter.join(10)

        def unknown_ones_ended() -> bool:
            new = [s for s in engine.list_executions() if s.id not in before]
            return bool(new) and all(s.status is ExecutionStatus.CANCELLED for s in new)

        wait_until(unknown_ones_ended, 10, "what the interrupted call submitted to be cancelled")
        wait_until(lambda: not [p for p in host_children() if "sleep" in _cmdline(p)], 10, "no sleep left")
        # The engine serves on.
        assert engine.wait(engine.execute(run("true")), timeout=10).status is ExecutionStatus.COMPLETED


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


@pytest.mark.usefixtures("on_main_thread")
def test_an_interrupted_events_iterator_lets_go_of_its_queue(tmp_path: Path) -> None:
    with SyncExecutionEngine(config(tmp_path)) as engine:
        eid = engine.execute(shell("echo up; exec sleep 30"))
        events = engine.events(eid)
        assert [next(events).event_type, next(events).event_type] == ["started", "stdout"]
        assert engine._bus.active  # the iterator's queue
        interrupter = interrupt_main_thread()
        with pytest.raises(KeyboardInterrupt):
            next(events)
        interrupter.join(10)
        wait_until(lambda: not engine._bus.active, 10, "the iterator's queue to be let go")
        assert engine._bus.backlog == 0
        engine.cancel(eid)


def test_a_call_cancelled_on_the_loop_raises_in_the_caller(tmp_path: Path) -> None:
    """A cancel is never turned into a value."""
    with SyncExecutionEngine(config(tmp_path)) as engine:

        async def cancelled_on_the_loop() -> str:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
            return "a value"

        with pytest.raises(concurrent.futures.CancelledError):
            engine._call(cancelled_on_the_loop())


def test_a_call_still_waiting_at_shutdown_gets_engine_closed(tmp_path: Path) -> None:
    engine = SyncExecutionEngine(config(tmp_path))
    running = threading.Event()
    outcome: list[BaseException] = []

    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    def caller() -> None:
        try:
            engine._call(forever())
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=caller)
    waiter.start()
    assert running.wait(10)
    engine.shutdown()
    waiter.join(10)
    assert not waiter.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], EngineClosed)


def test_a_reader_still_iterating_at_shutdown_reads_to_the_end(tmp_path: Path) -> None:
    engine = SyncExecutionEngine(config(tmp_path))
    eid = engine.execute(shell("echo a; echo b; exec sleep 30"))
    events = engine.events(eid)
    assert [next(events).event_type for _ in range(3)] == ["started", "stdout", "stdout"]
    engine.shutdown()
    assert [e.event_type for e in events] == ["cancelled"]


def test_a_handler_that_shuts_the_engine_down_is_not_waited_for_by_that_shutdown(tmp_path: Path) -> None:
    """A handler on its own thread calls `shutdown()`: it returns soon, and so does a second call."""
    engine = SyncExecutionEngine(config(tmp_path))
    inner: list[float] = []
    asked = threading.Event()

    def stop_on_first_end(event: Any) -> None:
        if event.event_type == "completed" and not asked.is_set():
            asked.set()
            began = time.monotonic()
            engine.shutdown()
            inner.append(time.monotonic() - began)

    engine.with_event_handler(stop_on_first_end)
    engine.start()
    first = engine.execute(shell("echo one"))
    other = engine.execute(run("sleep", "30"))
    engine.wait(first, timeout=20)
    assert engine.wait(other, timeout=20).status is ExecutionStatus.CANCELLED
    began = time.monotonic()
    engine.shutdown()  # while the handler's own call winds the engine down, or after it did
    outer = time.monotonic() - began
    assert asked.is_set()
    wait_until(lambda: bool(inner), 20, "the handler's shutdown() to return")
    assert inner[0] < 5, f"the handler's shutdown() took {inner[0]:.1f} s"
    assert outer < 5, f"the second shutdown() took {outer:.1f} s"
    assert not any(t.name == "cloudops-execution-engine" for t in threading.enumerate()), (
        "a second shutdown() returned before the loop thread had stopped"
    )
    wait_until(
        lambda: not any(t.name.startswith("cloudops-event-handler") for t in threading.enumerate()),
        5,
        "the handler's thread to end",
    )


def test_a_handler_waiting_for_a_wordy_execution_does_not_hold_its_output_back(tmp_path: Path) -> None:
    """A handler on its own thread waits for an execution whose output fills its queue: it still ends."""
    engine = SyncExecutionEngine(config(tmp_path))
    outcome: list[object] = []

    def run_another_and_wait(event: Any) -> None:
        if event.event_type != "completed" or outcome:
            return
        outcome.append("started")
        other = engine.execute(shell("yes 0123456789012345678901234567890123456789 | head -c 40000000"))
        try:
            outcome.append(engine.wait(other, timeout=20).status)
        except TimeoutError:
            outcome.append("stuck")

    with engine.with_event_handler(run_another_and_wait):
        engine.wait(engine.execute(shell("echo one")), timeout=20)
        wait_until(lambda: len(outcome) > 1, 30, "the handler's wait to end")
    assert outcome == ["started", ExecutionStatus.COMPLETED]


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
def test_a_handler_raising_a_base_exception_on_its_thread_keeps_receiving(
    tmp_path: Path, raised: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """`sys.exit()` in a handler ends only its thread, in Python: its queue would then never drain,
    and a command with more output than the queue holds would wait on it for ever."""
    lines: list[str] = []

    def exits_once(event: Any) -> None:
        if event.event_type == "stdout":
            lines.append(event.line)
            if len(lines) == 1:
                raise raised("from a handler")

    engine = SyncExecutionEngine(config(tmp_path)).with_event_handler(exits_once)
    with engine:
        eid = engine.execute(shell("yes 0123456789012345678901234567890123456789 | head -n 300000"))
        assert engine.wait(eid, timeout=30).status is ExecutionStatus.COMPLETED
    assert len(lines) == 300_000
    logged = [r for r in caplog.records if "raised on" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[0] is raised


def test_a_handler_on_its_thread_raising_on_every_line_is_not_logged_for_every_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def broken(event: Any) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("handler bug")

    began = time.monotonic()
    with SyncExecutionEngine(config(tmp_path)).with_event_handler(broken) as engine:
        eid = engine.execute(shell("seq 200000"))
        assert engine.wait(eid, timeout=60).status is ExecutionStatus.COMPLETED
    assert calls == 200_002  # started, every line, completed
    assert_raises_logged_sparingly(caplog, calls, time.monotonic() - began, eid)


def let_go(held: list[Any]) -> None:
    """Drop the only reference to what `held` holds, and collect it."""
    held.clear()
    gc.collect()


def test_a_sync_engine_let_go_without_shutdown_stops_its_workers_and_its_thread(tmp_path: Path) -> None:
    """Dropped without `shutdown()`: a ResourceWarning, and no worker, command or loop thread left."""
    before = host_children()
    held = [SyncExecutionEngine(config(tmp_path))]
    eid = held[0].execute(run("sleep", "30"))
    wait_until(lambda: held[0].get_status(eid) is ExecutionStatus.RUNNING, 20, "the command to start")
    assert host_children() > before
    with pytest.warns(ResourceWarning, match="without shutdown"):
        let_go(held)
    wait_until(lambda: host_children() <= before, 10, "the engine's workers and command to end")
    wait_until(
        lambda: not any(t.name == "cloudops-execution-engine" for t in threading.enumerate()),
        10,
        "the engine's loop thread to end",
    )


def test_a_sync_engine_never_started_and_let_go_leaves_no_thread(tmp_path: Path) -> None:
    held = [SyncExecutionEngine(config(tmp_path))]
    with pytest.warns(ResourceWarning, match="without shutdown"):
        let_go(held)
    wait_until(
        lambda: not any(t.name == "cloudops-execution-engine" for t in threading.enumerate()),
        10,
        "the engine's loop thread to end",
    )


def test_a_script_that_never_shuts_its_engine_down_exits_quietly_and_leaves_nothing(tmp_path: Path) -> None:
    """No `shutdown()`, a command still running at exit: the engine is shut down before the interpreter ends.

    multiprocessing's exit handler terminated the workers under the engine's running loop thread,
    which started replacements the exit cut off mid-spawn: an `EOFError` traceback, every time.
    """
    script = (
        "from cloudops_execution_engine import ExecutionConfig, ExecutionRequest, ShellCommand, "
        "SyncExecutionEngine\n"
        f"engine = SyncExecutionEngine(ExecutionConfig(log_dir={str(tmp_path / 'logs')!r}))\n"
        "print(engine.wait(engine.execute(ExecutionRequest(command=ShellCommand(command='echo hi'))), "
        "timeout=20).status.value)\n"
        "request = ExecutionRequest(command=ShellCommand(command='echo $$; exec sleep 30'))\n"
        "engine.execute(request)\n"
        "for event in engine.events(request.id):\n"
        "    if event.event_type == 'stdout':\n"
        "        print(event.line, flush=True)\n"
        "        break\n"
    )
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    status, pid = done.stdout.split()
    assert status == "completed"
    wait_until(lambda: gone(int(pid)), 10, "the running command to be gone")


def test_a_with_block_whose_start_fails_leaves_no_thread_and_no_warning(tmp_path: Path) -> None:
    """`__exit__` never runs when `__enter__` raised: the engine's loop thread ends all the same."""
    (tmp_path / "a-file").touch()
    threads_before = set(threading.enumerate())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with pytest.raises(IoError), SyncExecutionEngine(config(tmp_path, log_dir=tmp_path / "a-file")):
            pytest.fail("the block ran")
        gc.collect()
    assert set(threading.enumerate()) <= threads_before


@pytest.mark.parametrize("timeout", [10**400, -(10**400)], ids=["huge", "hugely-negative"])
def test_wait_takes_any_integer_timeout(tmp_path: Path, timeout: int) -> None:
    """An int past what a float holds waits for ever (or not at all), as 1e300 and -1e300 do."""
    with SyncExecutionEngine(config(tmp_path)) as engine:
        eid = engine.execute(shell("true"))
        if timeout > 0:
            assert engine.wait(eid, timeout=timeout).status is ExecutionStatus.COMPLETED
        else:
            engine.wait(eid, timeout=60)
            assert engine.wait(eid, timeout=timeout).status is ExecutionStatus.COMPLETED


def test_events_of_a_resumed_plan_are_kept_from_its_start_as_an_executed_plans_are(tmp_path: Path) -> None:
    """`events(resume_plan(old))` after the new plan has ended yields all of it, as after `execute_plan()`."""
    with SyncExecutionEngine(config(tmp_path)) as engine:
        plan = ExecutionPlan(commands=[run("true"), run("false")], strategy=SerialStrategy())
        engine.wait(engine.execute_plan(plan), timeout=20)
        resumed = engine.resume_plan(plan.id)
        engine.wait(resumed, timeout=20)
        progress = [e for e in engine.events(resumed) if e.event_type == "progress"]
    assert [(getattr(e, "completed", None), getattr(e, "total", None)) for e in progress][-1] == (2, 2)

"""ExecutionEngine: every public method, status and error, against real processes."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import psutil
import pytest
from conftest import (
    Recorder,
    assert_raises_logged_sparingly,
    config,
    gone,
    handler_raises_said,
    host_children,
    result_of,
    run,
    shell,
    wait_until,
)

from cloudops_execution_engine import (
    EngineClosed,
    ExecCommand,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    InvalidCommand,
    InvalidWorkingDir,
    IoError,
    MissingField,
    NotCompleted,
    NotFound,
    NotRunning,
    ScriptCommand,
    ScriptNotFound,
    SerializationError,
    SyncExecutionEngine,
    TimeoutTooLarge,
    ValidationError,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


async def test_completed_command_result(engine: ExecutionEngine) -> None:
    """A command that exits 0 ends completed with its output, timings and resource usage."""
    eid = await engine.execute(shell("echo out; echo err >&2"))
    result = await engine.wait(eid, timeout=20)
    assert isinstance(result, ExecutionResult)
    assert result.id == eid
    assert result.status is ExecutionStatus.COMPLETED
    assert (result.exit_code, result.stdout, result.stderr, result.error) == (0, "out\n", "err\n", None)
    assert result.completed_at is not None
    assert result.completed_at >= result.started_at
    assert result.duration.total_seconds() >= 0
    assert result.resource_usage is not None
    assert result.resource_usage.max_rss_bytes > 0
    assert await engine.get_status(eid) is ExecutionStatus.COMPLETED
    assert await engine.get_result(eid) == result


async def test_standard_input_is_empty(engine: ExecutionEngine) -> None:
    """A command that reads its input gets end of file at once, never the host's terminal or pipes."""
    eid = await engine.execute(shell("readlink /proc/self/fd/0; cat; echo done"))
    result = await engine.wait(eid, timeout=20)
    assert isinstance(result, ExecutionResult)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "/dev/null\ndone\n")


async def test_failed_command_reports_exit_code(engine: ExecutionEngine) -> None:
    result = await result_of(engine, await engine.execute(shell("exit 7")), timeout=20)
    assert result.status is ExecutionStatus.FAILED
    assert result.exit_code == 7
    assert result.error == "Command failed with exit code 7"


async def test_command_killed_by_signal_has_negative_exit_code(engine: ExecutionEngine) -> None:
    """A command that dies of signal N has exit_code -N."""
    result = await result_of(engine, await engine.execute(shell("kill -SEGV $$")), timeout=20)
    assert result.status is ExecutionStatus.FAILED
    assert result.exit_code == -11


async def test_missing_program_fails_with_spawn_message(engine: ExecutionEngine) -> None:
    result = await result_of(engine, await engine.execute(run("no-such-program-here")), timeout=20)
    assert result.status is ExecutionStatus.FAILED
    assert result.exit_code == -1
    assert result.error == "Process spawn failed: No such file or directory: no-such-program-here"


async def test_timeout_status_and_message(engine: ExecutionEngine, recorder: Recorder) -> None:
    eid = await engine.execute(run("sleep", "30", timeout_ms=300))
    result = await result_of(engine, eid, timeout=20)
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error == "Execution timeout after 300ms"
    assert result.exit_code == -15
    assert 0.25 < result.duration.total_seconds() < 5
    await recorder.until_final(eid)
    assert recorder.types_of(eid) == ["started", "failed"]
    assert recorder.of(eid)[-1].error == "Execution timeout after 300ms"


async def test_cancel_running(engine: ExecutionEngine, recorder: Recorder) -> None:
    eid = await engine.execute(shell("echo up; exec sleep 30"))
    await recorder.until(lambda _: "stdout" in recorder.types_of(eid))
    assert await engine.get_status(eid) is ExecutionStatus.RUNNING
    await engine.cancel(eid)
    result = await result_of(engine, eid, timeout=20)
    assert result.status is ExecutionStatus.CANCELLED
    assert result.error == "Execution cancelled"
    await recorder.until_final(eid)
    assert recorder.types_of(eid) == ["started", "stdout", "cancelled"]
    with pytest.raises(NotRunning, match=str(eid)):
        await engine.cancel(eid)


async def test_queue_holds_excess_work_pending_in_arrival_order(tmp_path: Path, recorder: Recorder) -> None:
    """With one slot, later requests wait as pending and start in the order they came."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(
        recorder
    ) as engine:
        blocker = await engine.execute(shell("echo go; exec sleep 30"))
        await recorder.until(lambda _: "stdout" in recorder.types_of(blocker))
        queued = [await engine.execute(run("true")) for _ in range(3)]
        for eid in queued:
            assert await engine.get_status(eid) is ExecutionStatus.PENDING
        with pytest.raises(NotCompleted):
            await engine.get_result(queued[0])
        await engine.cancel(queued[1])
        assert await engine.get_status(queued[1]) is ExecutionStatus.CANCELLED
        await recorder.until_final(queued[1])
        assert recorder.types_of(queued[1]) == ["cancelled"], "a command cancelled while pending never starts"
        await engine.cancel(blocker)
        for eid in (queued[0], queued[2]):
            assert (await engine.wait(eid, timeout=20)).status is ExecutionStatus.COMPLETED
        starts = [e.execution_id for e in recorder.events if e.event_type == "started"]
        assert starts == [blocker, queued[0], queued[2]]
        result = await engine.get_result(queued[1])
        assert result.status is ExecutionStatus.CANCELLED
        assert not result.log_path.exists(), "a command cancelled before starting never ran"


async def test_concurrency_limit_is_never_exceeded(tmp_path: Path, recorder: Recorder) -> None:
    """At most max_concurrent_executions commands run at once across the engine."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=3)).with_event_handler(
        recorder
    ) as engine:
        ids = [await engine.execute(run("sleep", "0.2")) for _ in range(9)]
        for eid in ids:
            await engine.wait(eid, timeout=30)
        await asyncio.gather(*(recorder.until_final(eid) for eid in ids))
        running = peak = 0
        for event in recorder.events:
            if event.event_type == "started":
                running += 1
                peak = max(peak, running)
            elif event.event_type in ("completed", "failed", "cancelled"):
                running -= 1
        assert peak == 3


async def test_commands_end_and_are_replaced_while_a_caller_is_still_queueing(
    tmp_path: Path, recorder: Recorder
) -> None:
    """A caller that queues a large batch in one loop does not hold up the commands already running."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=2)).with_event_handler(
        recorder
    ) as engine:
        submitted = 0
        # Never awaiting anything else, this loop lets events through only if execute() does.
        while not any(e.event_type == "completed" for e in recorder.events) and submitted < 3000:
            await engine.execute(run("true"))
            submitted += 1
        assert submitted < 3000, "no command ended while the batch was being queued"


async def test_events_in_order_for_each_of_several_handlers(tmp_path: Path) -> None:
    """Every handler sees started, each line in order, then exactly one final event."""
    first, second = Recorder(), Recorder()
    async with (
        ExecutionEngine(config(tmp_path)).with_event_handler(first).with_event_handler(second) as engine
    ):
        eid = await engine.execute(shell("for i in $(seq 1 200); do echo line$i; done; echo bad >&2"))
        await engine.wait(eid, timeout=20)
        for recorder in (first, second):
            await recorder.until_final(eid)
            events = recorder.of(eid)
            assert events[0].event_type == "started"
            assert events[0].command == "for i in $(seq 1 200); do echo line$i; done; echo bad >&2"
            assert events[-1].event_type == "completed"
            assert events[-1].result.exit_code == 0
            lines = [e.line for e in events if e.event_type == "stdout"]
            assert lines == [f"line{i}" for i in range(1, 201)]
            assert [e.line for e in events if e.event_type == "stderr"] == ["bad"]
            assert sum(e.event_type in ("completed", "failed", "cancelled") for e in events) == 1


class RaisingHandler:
    """A handler with a bug: it raises on every event it is given, and counts them."""

    def __init__(self) -> None:
        self.calls = 0

    async def on_event(self, event: object) -> None:
        self.calls += 1
        raise RuntimeError("handler bug")


async def test_a_raising_handler_does_not_stop_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that raises is logged and ignored; the engine and other handlers go on."""
    broken = RaisingHandler()
    good = Recorder()
    async with (
        ExecutionEngine(config(tmp_path)).with_event_handler(broken).with_event_handler(good) as engine
    ):
        eid = await engine.execute(shell("echo a; echo b"))
        await engine.wait(eid, timeout=20)
        await good.until_final(eid)
        assert good.types_of(eid) == ["started", "stdout", "stdout", "completed"]
        second = await engine.execute(run("true"))
        assert (await engine.wait(second, timeout=20)).status is ExecutionStatus.COMPLETED
    assert broken.calls >= 4
    assert "handler bug" in caplog.text


async def test_a_handler_raising_on_every_line_is_not_logged_for_every_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A traceback per output line would cost the engine's loop 100 µs a line and flood the host's log."""
    broken = RaisingHandler()
    began = time.monotonic()
    async with ExecutionEngine(config(tmp_path)).with_event_handler(broken) as engine:
        eid = await engine.execute(shell("seq 200000"))
        result = await engine.wait(eid, timeout=60)
    assert result.status is ExecutionStatus.COMPLETED
    assert broken.calls == 200_002  # started, every line, completed
    assert_raises_logged_sparingly(caplog, broken.calls, time.monotonic() - began, eid)


async def test_raises_only_counted_are_said_once_the_handler_goes_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst of raises is accounted for while the engine runs on, not only at its shutdown."""

    class RaisesOnOutput:
        async def on_event(self, event: Any) -> None:
            if event.event_type == "stdout":
                raise ValueError("handler bug")

    counted = threading.Event()

    class Counted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "more times after the last one logged" in record.getMessage():
                counted.set()

    watcher = Counted()
    logging.getLogger("cloudops_execution_engine.events").addHandler(watcher)
    try:
        async with ExecutionEngine(config(tmp_path)).with_event_handler(RaisesOnOutput()) as engine:
            await engine.wait(await engine.execute(shell("seq 1000")), timeout=20)
            assert await asyncio.to_thread(counted.wait, 10), "the count was not said while the engine ran"
            assert handler_raises_said(caplog) == (2, 1000)
    finally:
        logging.getLogger("cloudops_execution_engine.events").removeHandler(watcher)


async def test_a_slow_handler_delays_only_itself(tmp_path: Path) -> None:
    """A handler blocked on an event does not hold back another handler."""
    release = asyncio.Event()

    class Stuck:
        async def on_event(self, event: object) -> None:
            await release.wait()

    fast = Recorder()
    async with (
        ExecutionEngine(config(tmp_path)).with_event_handler(Stuck()).with_event_handler(fast) as engine
    ):
        eid = await engine.execute(shell("echo x"))
        await fast.until_final(eid)
        assert fast.types_of(eid) == ["started", "stdout", "completed"]
        release.set()


async def test_stream_output_off_sends_no_line_events(tmp_path: Path, recorder: Recorder) -> None:
    async with ExecutionEngine(config(tmp_path, stream_output=False)).with_event_handler(recorder) as engine:
        eid = await engine.execute(shell("echo hidden"))
        result = await result_of(engine, eid, timeout=20)
        await recorder.until_final(eid)
        assert recorder.types_of(eid) == ["started", "completed"]
        assert result.stdout == "hidden\n"
        assert "stdout hidden" in await engine.read_logs(eid)


async def test_log_file_content_permissions_and_path(engine: ExecutionEngine) -> None:
    """The log holds the command, tagged lines and the outcome; it is 0600 in a 0700 directory."""
    secret = "s3cr3t-value-" + uuid4().hex
    eid = await engine.execute(shell("echo to-out; echo to-err >&2; exit 4", env={"TOKEN": secret}))
    result = await result_of(engine, eid, timeout=20)
    path = engine.get_log_path(eid)
    assert path == result.log_path == engine.config.log_dir / f"{eid}.log"  # type: ignore[operator]
    text = await engine.read_logs(eid)
    assert "# command: echo to-out; echo to-err >&2; exit 4" in text
    assert " stdout to-out\n" in text
    assert " stderr to-err\n" in text
    assert "status=failed exit_code=4" in text
    assert secret not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


async def test_log_is_written_while_the_command_runs(engine: ExecutionEngine, recorder: Recorder) -> None:
    """The log file exists from the start and receives lines as they are produced."""
    eid = await engine.execute(shell("echo early; exec sleep 30"))
    await recorder.until(lambda _: "stdout" in recorder.types_of(eid))
    assert " stdout early\n" in engine.get_log_path(eid).read_text()
    await engine.cancel(eid)
    await engine.wait(eid, timeout=20)


async def test_log_stays_after_shutdown(tmp_path: Path) -> None:
    engine = ExecutionEngine(config(tmp_path))
    async with engine:
        eid = await engine.execute(run("echo", "kept"))
        await engine.wait(eid, timeout=20)
    assert " stdout kept\n" in engine.get_log_path(eid).read_text()


async def test_output_beyond_the_limit_is_truncated_in_the_result_only(tmp_path: Path) -> None:
    async with ExecutionEngine(config(tmp_path, max_output_bytes=1000)) as engine:
        eid = await engine.execute(shell("head -c 5000 /dev/zero | tr '\\0' 'a'; echo; echo e >&2"))
        result = await engine.wait(eid, timeout=20)
        assert isinstance(result, ExecutionResult)
        assert result.stdout == "a" * 1000
        assert result.stdout_truncated is True
        assert (result.stderr, result.stderr_truncated) == ("e\n", False)
        assert "a" * 5000 in await engine.read_logs(eid)


async def test_validation_errors_register_nothing(engine: ExecutionEngine, tmp_path: Path) -> None:
    """Each validation failure raises its contract error and leaves the registry untouched."""
    bad = [
        (run("x", timeout_ms=700_000), TimeoutTooLarge, "700000ms > 600000ms"),
        (run("x", timeout_ms=0), InvalidCommand, "timeout_ms must be positive"),
        (run("x", working_dir=tmp_path / "missing"), InvalidWorkingDir, "missing"),
        (ExecutionRequest(command=ScriptCommand(path=tmp_path / "none.sh")), ScriptNotFound, "none.sh"),
        (run(""), InvalidCommand, "program must not be empty"),
        (shell("   "), InvalidCommand, "shell command must not be empty"),
        (run("echo", "a\x00b"), InvalidCommand, "NUL"),
        (run("true", env={"A=B": "1"}), InvalidCommand, "not valid"),
    ]
    for request, error, text in bad:
        with pytest.raises(error, match=text):
            await engine.execute(request)
        with pytest.raises(NotFound):
            await engine.get_status(request.id)
    # A negative timeout cannot be a u64: refused as the request is built, or as a document is read.
    with pytest.raises(ValidationError, match="timeout_ms"):
        run("x", timeout_ms=-5)
    with pytest.raises(InvalidCommand, match="timeout_ms"):
        await engine.execute({"command": {"type": "exec", "program": "x"}, "timeout_ms": -5})  # type: ignore[arg-type]
    assert await engine.list_executions() == []


async def test_request_as_dict_or_json_is_accepted_and_bad_shapes_are_contract_errors(
    engine: ExecutionEngine,
) -> None:
    eid = await engine.execute({"command": {"type": "exec", "program": "true", "args": []}})  # type: ignore[arg-type]
    assert (await engine.wait(eid, timeout=20)).status is ExecutionStatus.COMPLETED
    with pytest.raises(MissingField, match="command"):
        await engine.execute({"env": {}})  # type: ignore[arg-type]
    with pytest.raises(InvalidCommand):
        await engine.execute({"command": {"type": "exec", "program": "x", "args": [1]}})  # type: ignore[arg-type]


async def test_duplicate_id_is_rejected(engine: ExecutionEngine) -> None:
    request = run("true")
    await engine.execute(request)
    with pytest.raises(InvalidCommand, match="already exists"):
        await engine.execute(request)
    await engine.wait(request.id, timeout=20)


async def test_unknown_ids(engine: ExecutionEngine) -> None:
    unknown = uuid4()
    for call in (
        engine.get_status,
        engine.get_result,
        engine.cancel,
        engine.read_logs,
        engine.wait,
        engine.get_plan_result,
    ):
        with pytest.raises(NotFound, match=str(unknown)):
            await call(unknown)
    with pytest.raises(NotFound):
        await engine.get_status("not-a-uuid")
    assert engine.get_log_path(unknown).name == f"{unknown}.log"


async def test_wait_timeout_raises_builtin_timeout_and_execution_goes_on(
    engine: ExecutionEngine, recorder: Recorder
) -> None:
    eid = await engine.execute(shell("echo started; exec sleep 30"))
    await recorder.until(lambda _: "stdout" in recorder.types_of(eid))
    with pytest.raises(TimeoutError):
        await engine.wait(eid, timeout=0.05)
    assert await engine.get_status(eid) is ExecutionStatus.RUNNING
    await engine.cancel(eid)
    await engine.wait(eid, timeout=20)


@pytest.mark.parametrize(
    ("timeout", "error", "message"),
    [
        ("1", TypeError, "timeout must be a number of seconds or None, not str"),
        (True, TypeError, "timeout must be a number of seconds or None, not bool"),
        (float("nan"), ValueError, "timeout must be a number of seconds, not NaN"),
    ],
)
async def test_a_wait_timeout_that_is_not_a_number_of_seconds_is_refused_at_once(
    engine: ExecutionEngine, timeout: Any, error: type[Exception], message: str
) -> None:
    """Not a comparison failing inside asyncio, nor (NaN) a wait with no end."""
    eid = await engine.execute(shell("exec sleep 30"))
    with pytest.raises(error, match=message):
        await asyncio.wait_for(engine.wait(eid, timeout=timeout), 5)
    assert await engine.get_status(eid) in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)
    await engine.cancel(eid)
    assert (await engine.wait(eid, timeout=20)).status is ExecutionStatus.CANCELLED


async def test_list_executions_summarises_everything(engine: ExecutionEngine) -> None:
    first = await engine.execute(run("true"))
    second = await engine.execute(shell("exit 1"))
    await engine.wait(first, timeout=20)
    await engine.wait(second, timeout=20)
    summaries = {s.id: s for s in await engine.list_executions()}
    assert summaries[first].status is ExecutionStatus.COMPLETED
    assert summaries[second].status is ExecutionStatus.FAILED
    assert summaries[first].duration is not None


async def test_read_logs_of_a_pending_execution_is_an_io_error(tmp_path: Path) -> None:
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=1)) as engine:
        blocker = await engine.execute(run("sleep", "30"))
        waiting = await engine.execute(run("true"))
        with pytest.raises(IoError, match="cannot read log file"):
            await engine.read_logs(waiting)
        await engine.cancel(blocker)


async def test_env_overlay_and_working_dir(engine: ExecutionEngine, tmp_path: Path) -> None:
    """The host's environment with the request's laid over it; the command runs in working_dir."""
    os.environ["CEE_FROM_HOST"] = "host"
    try:
        eid = await engine.execute(
            shell(
                'echo "$CEE_FROM_HOST $CEE_FROM_REQUEST"; pwd',
                env={"CEE_FROM_REQUEST": "req"},
                working_dir=tmp_path,
            )
        )
        result = await result_of(engine, eid, timeout=20)
    finally:
        del os.environ["CEE_FROM_HOST"]
    assert result.stdout == f"host req\n{tmp_path}\n"


async def test_shutdown_cancels_everything_and_is_idempotent(tmp_path: Path, recorder: Recorder) -> None:
    engine = ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(recorder)
    await engine.start()
    running = await engine.execute(shell("echo go; exec sleep 30"))
    pending = await engine.execute(run("true"))
    await recorder.until(lambda _: "stdout" in recorder.types_of(running))
    await engine.shutdown()
    await engine.shutdown()
    assert recorder.types_of(running)[-1] == "cancelled"
    assert recorder.types_of(pending) == ["cancelled"]
    for call in (engine.execute(run("true")), engine.get_status(running), engine.list_executions()):
        with pytest.raises(EngineClosed, match="Engine is shut down"):
            await call


async def test_shutdown_without_cancel_lets_work_finish(tmp_path: Path) -> None:
    engine = ExecutionEngine(config(tmp_path))
    await engine.start()
    eid = await engine.execute(shell("sleep 0.3; echo finished"))
    await engine.shutdown(cancel=False)
    assert "stdout finished" in engine.get_log_path(eid).read_text()
    assert "status=completed" in engine.get_log_path(eid).read_text()


async def test_shutdown_asked_again_to_cancel_stops_a_graceful_one_at_once(
    tmp_path: Path, recorder: Recorder
) -> None:
    """shutdown(cancel=False) waits for the work; a later shutdown() cancels what is left, as it
    would have alone, and both calls return once it is all stopped."""
    engine = ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(recorder)
    await engine.start()
    running = await engine.execute(shell("echo up; exec sleep 30"))
    queued = await engine.execute(shell("echo never"))
    await recorder.until(lambda _: "stdout" in recorder.types_of(running))
    graceful = asyncio.ensure_future(engine.shutdown(cancel=False))
    await asyncio.sleep(0)  # its first step: shutdown has begun, and waits for the work
    assert engine._supervisor.winding_down
    assert not graceful.done()
    async with asyncio.timeout(10):
        await engine.shutdown()
        await graceful
    assert recorder.types_of(running)[-1] == "cancelled"
    assert recorder.types_of(queued) == ["cancelled"]


async def test_engine_starts_lazily_without_a_context_manager(tmp_path: Path) -> None:
    engine = ExecutionEngine(config(tmp_path))
    try:
        eid = await engine.execute(ExecutionRequest(command=ExecCommand(program="true")))
        assert (await engine.wait(eid, timeout=20)).status is ExecutionStatus.COMPLETED
    finally:
        await engine.shutdown()


async def test_events_iterator_ends_after_the_last_event(engine: ExecutionEngine) -> None:
    eid = await engine.execute(shell("echo one; sleep 0.2; echo two"))
    seen = [event.event_type async for event in engine.events(eid)]
    assert seen[-1] == "completed"
    assert seen.count("stdout") == 2


async def test_malformed_json_text_is_a_serialization_error(engine: ExecutionEngine) -> None:
    with pytest.raises(SerializationError, match="Serialization error"):
        await engine.execute('{"command": {"type": "exec", "program": ')  # type: ignore[arg-type]
    assert await engine.list_executions() == []


async def test_logging_is_quiet_by_default_and_named_after_the_package(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Records go to `logging` under the package's name; nothing is printed unless the host asks."""

    class Raising:
        async def on_event(self, event: object) -> None:
            raise RuntimeError("logged, not printed")

    recorder = Recorder()
    async with (
        ExecutionEngine(config(tmp_path)).with_event_handler(Raising()).with_event_handler(recorder) as engine
    ):
        eid = await engine.execute(run("true"))
        await recorder.until_final(eid)
    names = {r.name for r in caplog.records if "logged, not printed" in r.getMessage() or r.exc_info}
    assert names
    assert all(name.startswith("cloudops_execution_engine") for name in names)
    out, err = capfd.readouterr()
    assert "logged, not printed" not in out + err


async def test_host_environment_changes_reach_later_commands(engine: ExecutionEngine) -> None:
    """The environment is read at each dispatch, so a variable set between runs is seen."""
    first = await engine.wait(await engine.execute(shell('echo "[$CEE_LATE]"')), timeout=20)
    os.environ["CEE_LATE"] = "now set"
    try:
        second = await engine.wait(await engine.execute(shell('echo "[$CEE_LATE]"')), timeout=20)
    finally:
        del os.environ["CEE_LATE"]
    third = await engine.wait(await engine.execute(shell('echo "[$CEE_LATE]"')), timeout=20)
    assert [r.stdout for r in (first, second, third)] == ["[]\n", "[now set]\n", "[]\n"]  # type: ignore[union-attr]


async def test_relative_working_dir_is_the_hosts_and_does_not_stick(
    engine: ExecutionEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative working_dir means relative to the host's directory at execute(); the next
    command without one runs in the host's directory, not where the previous one ran."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    inside = await engine.wait(await engine.execute(run("pwd", working_dir=Path("sub"))), timeout=20)
    after = await engine.wait(await engine.execute(run("pwd")), timeout=20)
    assert inside.stdout == f"{tmp_path / 'sub'}\n"  # type: ignore[union-attr]
    assert after.stdout == f"{tmp_path}\n"  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["await", "wait_for"])
async def test_a_handler_that_awaits_shutdown_is_not_waited_for_by_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """`await engine.shutdown()` inside a handler: the drain cannot wait for the handler awaiting it.

    Through `asyncio.wait_for` too, which awaits it in a task of its own.
    """
    engine = ExecutionEngine(config(tmp_path))
    inner: list[float] = []

    class StopOnFirstEnd:
        async def on_event(self, event: object) -> None:
            if getattr(event, "event_type", None) == "completed" and not inner:
                began = asyncio.get_running_loop().time()
                if how == "await":
                    await engine.shutdown()
                else:
                    await asyncio.wait_for(engine.shutdown(), 30)
                inner.append(asyncio.get_running_loop().time() - began)

    engine.with_event_handler(StopOnFirstEnd())
    await engine.start()
    first = await engine.execute(shell("echo one"))
    other = await engine.execute(run("sleep", "30"))
    await engine.wait(first, timeout=20)
    assert (await engine.wait(other, timeout=20)).status is ExecutionStatus.CANCELLED
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(engine.shutdown(), 30)
    outer = asyncio.get_running_loop().time() - began
    assert outer < 5, f"shutdown() took {outer:.1f} s"
    for _ in range(100):
        if inner:
            break
        await asyncio.sleep(0.01)  # the handler's call returns on a later turn of the loop
    assert inner, "the handler's shutdown() never returned"
    assert inner[0] < 5
    assert "still busy at shutdown" not in caplog.text


@pytest.mark.parametrize("how", ["wait", "events"])
async def test_a_handler_waiting_for_a_wordy_execution_does_not_hold_its_output_back(
    tmp_path: Path, how: str
) -> None:
    """The output it waits for fills its queue past the backlog's bound: that must not stop the output."""
    engine = ExecutionEngine(config(tmp_path, stream_output=True))
    outcome: list[object] = []
    wordy = shell("yes 0123456789012345678901234567890123456789 | head -c 40000000")

    class RunAnotherAndWait:
        async def on_event(self, event: object) -> None:
            if getattr(event, "event_type", None) != "completed" or outcome:
                return
            outcome.append("started")
            other = await engine.execute(wordy)
            try:
                if how == "wait":
                    result = await asyncio.wait_for(engine.wait(other), 20)
                    outcome.append(result.status)
                else:

                    async def drain() -> int:
                        return sum([1 async for e in engine.events(other) if e.event_type == "stdout"])

                    outcome.append(await asyncio.wait_for(drain(), 20))
            except TimeoutError:
                outcome.append("stuck")

    engine.with_event_handler(RunAnotherAndWait())
    async with engine:
        await engine.wait(await engine.execute(shell("echo one")), timeout=20)
        for _ in range(3000):
            if len(outcome) > 1:
                break
            await asyncio.sleep(0.01)  # the handler's wait ends on a later turn of the loop
    expected = ExecutionStatus.COMPLETED if how == "wait" else -(-40_000_000 // 41)  # the last line is cut
    assert outcome == ["started", expected]


def let_go(held: list[Any]) -> None:
    """Drop the only reference to what `held` holds, and collect it."""
    held.clear()
    gc.collect()


async def test_an_engine_let_go_without_shutdown_stops_its_workers_and_commands(tmp_path: Path) -> None:
    """A host that drops an engine without `shutdown()` gets a ResourceWarning, not leaked processes."""
    before = host_children()
    held = [ExecutionEngine(config(tmp_path))]
    eid = await held[0].execute(run("sleep", "30"))
    for _ in range(1000):
        # `running` once sent to a worker; its pid comes with its start, on a later turn of the loop.
        running = await held[0].get_status(eid) is ExecutionStatus.RUNNING
        if running and held[0]._supervisor.entry(eid).pid:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    sleeper = held[0]._supervisor.entry(eid).pid  # type: ignore[union-attr]
    assert sleeper
    assert not gone(sleeper)
    assert host_children() > before
    workers = [w.pid for w in held[0]._supervisor._pool.workers]  # type: ignore[union-attr]
    with pytest.warns(ResourceWarning, match="without shutdown"):
        let_go(held)
    for _ in range(1000):
        if host_children() <= before and gone(sleeper) and not any(map(psutil.pid_exists, workers)):
            break
        await asyncio.sleep(0.01)  # it is stopped on the loop, as `shutdown()` would
    assert host_children() <= before, "the engine's workers outlived it"
    assert gone(sleeper), "its command outlived it"
    # Reaped, not only ended: the engine let go of them, and of their descriptors.
    assert not any(map(psutil.pid_exists, workers)), "its workers were left unreaped"


def test_an_engine_let_go_after_its_loop_closed_stops_its_workers(tmp_path: Path) -> None:
    """The loop it ran on is gone (a finished `asyncio.run`): its workers are stopped without it."""
    before = host_children()
    kept: list[ExecutionEngine] = []

    async def start_and_keep() -> None:
        engine = ExecutionEngine(config(tmp_path))
        await engine.wait(await engine.execute(run("true")), timeout=20)
        kept.append(engine)

    asyncio.run(start_and_keep())
    assert host_children() > before
    with pytest.warns(ResourceWarning, match="without shutdown"):
        let_go(kept)
    wait_until(lambda: host_children() <= before, 10, "the engine's workers to end")


def test_a_loop_closing_during_a_shutdown_its_caller_gave_up_on_logs_nothing_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`wait_for(engine.shutdown(), t)` times out while a command takes its grace period; `asyncio.run` ends.

    The shutdown goes on as the loop closes: every process ends, and asyncio
    has nothing to complain of (no "exception was never retrieved").
    """
    before = host_children()
    sleeper: list[int] = []

    async def give_up_on_shutdown() -> None:
        engine = ExecutionEngine(config(tmp_path, workers=1, kill_grace_ms=3000))
        eid = await engine.execute(shell("trap 'echo term' TERM; echo $$; while :; do sleep 0.05; done"))
        async for event in engine.events(eid):
            if event.event_type == "stdout":
                sleeper.append(int(event.line))
                break
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.shutdown(), 0.3)

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(give_up_on_shutdown())
        gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert gone(sleeper[0]), "its command outlived the loop"
    wait_until(lambda: host_children() <= before, 10, "the engine's workers to end")


async def test_a_handler_added_once_shutdown_began_is_refused(tmp_path: Path) -> None:
    """EngineClosed while shutdown drains the handlers and after it; nothing is left on the host's loop."""
    release = asyncio.Event()
    draining = asyncio.Event()

    class Slow:
        async def on_event(self, event: Any) -> None:
            if event.event_type == "completed":
                draining.set()
                await release.wait()

    engine = ExecutionEngine(config(tmp_path)).with_event_handler(Slow())
    await engine.start()
    await engine.wait(await engine.execute(shell("true")), timeout=20)
    await draining.wait()
    stopping = asyncio.ensure_future(engine.shutdown())
    await asyncio.sleep(0)  # the task's first step: shutdown begins, and waits for the slow handler
    assert engine._supervisor.winding_down
    with pytest.raises(EngineClosed):
        engine.with_event_handler(Recorder())
    release.set()
    await stopping
    tasks = len(asyncio.all_tasks())
    with pytest.raises(EngineClosed):
        engine.with_event_handler(Recorder())
    assert len(asyncio.all_tasks()) == tasks


def test_a_handler_added_to_a_blocking_engine_once_shutdown_began_is_refused(tmp_path: Path) -> None:
    release = threading.Event()
    draining = threading.Event()

    def slow(event: Any) -> None:
        if event.event_type == "completed":
            draining.set()
            release.wait(10)

    engine = SyncExecutionEngine(config(tmp_path)).with_event_handler(slow)
    engine.wait(engine.execute(shell("true")), timeout=20)
    assert draining.wait(10)
    stopping = threading.Thread(target=engine.shutdown)
    stopping.start()
    try:
        wait_until(lambda: engine._engine._supervisor.winding_down, 10, "shutdown to begin")
        with pytest.raises(EngineClosed):
            engine.with_event_handler(lambda event: None)
    finally:
        release.set()
        stopping.join(20)
    with pytest.raises(EngineClosed):
        engine.with_event_handler(lambda event: None)

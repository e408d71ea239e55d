"""Isolation under attack: hostile commands and malformed input end in a bounded outcome for themselves alone.

Each test is one attack, against real processes, and checks what a user would:
the hostile execution's own result, that a bystander did not notice, and that
nothing is left running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest
from conftest import HELPERS, PYTHON, config, gone, result_of, run, shell, wait_until

from cloudops_execution_engine import (
    DependencyGraphStrategy,
    EngineClosed,
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionMetadata,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    InvalidCommand,
    InvalidPlan,
    InvalidWorkingDir,
    IoError,
    RayConfig,
    ResourceLimits,
    RetentionPolicy,
    RetryPolicy,
    SerialStrategy,
    ShellCommand,
    ValidationError,
)
from cloudops_execution_engine.actors import supervisor

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

MIB = 1024 * 1024


def _written_pid(path: Path) -> int | None:
    text = path.read_text() if path.exists() else ""
    return int(text) if text.endswith("\n") else None


async def pid_from(path: Path, timeout: float = 20) -> int:
    """The pid a command wrote to `path`, once it has written it."""
    async with asyncio.timeout(timeout):
        while True:
            pid = _written_pid(path)
            if pid is not None:
                return pid
            await asyncio.sleep(0.01)


async def until_gone(pid: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if gone(pid):
                return
            await asyncio.sleep(0.01)


# -- 1. results larger than a frame -------------------------------------------------


@pytest.mark.parametrize(
    ("max_output", "script"),
    [
        # Both streams at the default limit: 32 MiB of output in one result.
        (None, "head -c 16777216 /dev/zero | tr '\\0' a; head -c 16777216 /dev/zero | tr '\\0' b >&2"),
        # Each invalid byte decodes to a three-byte U+FFFD.
        (None, "head -c 11534336 /dev/zero | tr '\\0' '\\377'"),
        # A limit above half the default frame: the frame limit follows it.
        (20 * MIB, "head -c 20971520 /dev/zero | tr '\\0' a; head -c 20971520 /dev/zero | tr '\\0' b >&2"),
    ],
    ids=["two-full-streams", "invalid-utf8", "raised-limit"],
)
async def test_a_result_larger_than_a_frame_ends_alone(
    tmp_path: Path, max_output: int | None, script: str
) -> None:
    overrides: dict[str, Any] = {"workers": 1, "stream_output": False}
    if max_output is not None:
        overrides["max_output_bytes"] = max_output
    async with ExecutionEngine(config(tmp_path, **overrides)) as engine:
        bystander = await engine.execute(shell("sleep 1; echo still here"))
        big = await engine.execute(shell(script))
        result = await result_of(engine, big, 60)
        assert result.status is ExecutionStatus.COMPLETED, result.error
        limit = engine.config.max_output_bytes
        assert len(result.stdout.encode()) <= limit
        assert len(result.stderr.encode()) <= limit
        if "377" in script:
            assert result.stdout_truncated
            assert set(result.stdout) == {"\ufffd"}
        else:
            assert (len(result.stdout), len(result.stderr)) == (limit, limit)
        other = await result_of(engine, bystander, 30)
        assert (other.status, other.stdout) == (ExecutionStatus.COMPLETED, "still here\n")


# -- 2. requests that cannot fit ------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        run("true", "x" * 40 * MIB),
        run("true", *(["x" * 1000] * 3000)),
        run("true", "x" * 200_000),
        ExecutionRequest(command=ExecCommand(program="true"), env={"BIG": "x" * 3 * MIB}),
        ExecutionRequest(command=ShellCommand(command="true # " + "x" * 3 * MIB)),
    ],
    ids=["40-mib-argument", "3-mb-of-arguments", "argument-over-128-kib", "3-mib-variable", "3-mib-script"],
)
async def test_a_request_too_large_for_exec_is_refused_at_execute(
    engine: ExecutionEngine, request_: ExecutionRequest
) -> None:
    bystander = await engine.execute(shell("sleep 0.5; echo fine"))
    with pytest.raises(InvalidCommand, match="bytes"):
        await engine.execute(request_)
    assert request_.id not in {s.id for s in await engine.list_executions()}
    result = await result_of(engine, bystander, 30)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "fine\n")


# -- 3. text that cannot be encoded ------------------------------------------------------


@contextlib.contextmanager
def in_a_removed_directory(path: Path) -> Iterator[None]:
    """Run the block with the current directory made at `path` and then removed, as a deploy may."""
    here = os.getcwd()
    path.mkdir()
    os.chdir(path)
    try:
        path.rmdir()
        yield
    finally:
        os.chdir(here)


async def test_an_engine_in_a_removed_directory_starts_and_replaces_its_workers(tmp_path: Path) -> None:
    """A long-lived host's directory may go (a deploy removing an old release): workers need none.

    multiprocessing asks for the host's directory to start a worker; a killed
    worker could then never be replaced, and every command failed.
    """
    with in_a_removed_directory(tmp_path / "release"):
        async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
            elsewhere = ExecutionRequest(command=ExecCommand(program="pwd"), working_dir=tmp_path)
            first = await result_of(engine, await engine.execute(elsewhere), 30)
            pool = engine._supervisor._pool
            assert pool is not None
            dead = pool.workers[0].pid
            os.kill(dead, signal.SIGKILL)
            for _ in range(2000):
                if any(w.ready and w.pid != dead for w in pool.workers):
                    break
                await asyncio.sleep(0.01)  # the death is noticed, and a worker started, on the loop
            assert any(w.ready and w.pid != dead for w in pool.workers), "the worker was not replaced"
            again = ExecutionRequest(command=ExecCommand(program="pwd"), working_dir=tmp_path)
            second = await result_of(engine, await engine.execute(again), 30)
    assert (first.status, first.stdout) == (ExecutionStatus.COMPLETED, f"{tmp_path}\n"), first.error
    assert (second.status, second.stdout) == (ExecutionStatus.COMPLETED, f"{tmp_path}\n"), second.error


async def test_a_host_whose_directory_was_removed_gets_invalid_working_dir(
    engine: ExecutionEngine, tmp_path: Path
) -> None:
    """A command without `working_dir` runs in the host's current directory: gone, it is refused clearly.

    `os.getcwd()` raises `FileNotFoundError` then; no `OSError` may reach the caller.
    """
    with in_a_removed_directory(tmp_path / "gone"):
        with pytest.raises(InvalidWorkingDir, match=r"Invalid working directory: .*gone \(deleted\)"):
            await engine.execute(run("pwd"))
        plan = ExecutionPlan(commands=[run("pwd")], strategy=SerialStrategy())
        with pytest.raises(InvalidPlan, match=r"command 0 .*Invalid working directory"):
            await engine.execute_plan(plan)
    assert await engine.list_executions() == [], "a refused request was registered"
    result = await result_of(engine, await engine.execute(run("pwd")), 30)
    assert result.stdout == f"{os.getcwd()}\n"


def test_a_relative_log_dir_in_a_removed_directory_is_an_io_error_where_the_engine_is_made(
    tmp_path: Path,
) -> None:
    """Relative to nothing: refused at once and clearly, not a `FileNotFoundError` from `os.getcwd()`."""
    with in_a_removed_directory(tmp_path / "gone"), pytest.raises(IoError, match="'logs' is relative"):
        ExecutionEngine(ExecutionConfig(log_dir=Path("logs")))


@pytest.mark.parametrize(
    "request_",
    [
        run("echo", "bad \udcff argument"),
        ExecutionRequest(command=ExecCommand(program="true"), env={"BAD": "\udcfe"}),
        ExecutionRequest(command=ExecCommand(program="true"), env={"BAD\udcfe": "x"}),
        ExecutionRequest(command=ExecCommand(program="true"), working_dir=Path("/tmp/\udcff")),
        shell("echo \ud800"),
        ExecutionRequest(command=ExecCommand(program="true"), metadata=ExecutionMetadata(source="a\udcff")),
        ExecutionRequest(
            command=ExecCommand(program="true"), metadata=ExecutionMetadata(tags={"k": "\udcff"})
        ),
        ExecutionRequest(
            command=ExecCommand(program="true"), metadata=ExecutionMetadata(tags={"\udcff": "v"})
        ),
        ExecutionRequest(command=ExecCommand(program="true"), secret_env={"TOKEN": "long-\udcff-secret"}),
    ],
    ids=["argument", "env-value", "env-name", "working-dir", "script", "source", "tag", "tag-name", "secret"],
)
async def test_a_lone_surrogate_is_refused_and_nothing_waits_behind_it(
    tmp_path: Path, request_: ExecutionRequest
) -> None:
    async with ExecutionEngine(config(tmp_path, workers=1, max_concurrent_executions=1)) as engine:
        running = await engine.execute(shell("sleep 0.3"))
        with pytest.raises(InvalidCommand, match="Unicode"):
            await engine.execute(request_)
        assert request_.id not in {s.id for s in await engine.list_executions()}
        after = await engine.execute(shell("echo next"))
        assert (await result_of(engine, after, 30)).stdout == "next\n"
        assert (await result_of(engine, running, 30)).status is ExecutionStatus.COMPLETED


@pytest.mark.parametrize(
    "change",
    [
        {"description": "deploy \udcff"},
        {"metadata": ExecutionMetadata(source="\ud800")},
        {"metadata": ExecutionMetadata(tags={"stage": "\udcfe"})},
    ],
    ids=["description", "source", "tag"],
)
async def test_a_plan_with_a_lone_surrogate_is_refused_and_the_journal_records_what_follows(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """Text the journal could not write is refused at execute_plan, never accepted to be lost with others."""
    journal = tmp_path / "journal.sqlite3"
    plan = ExecutionPlan(commands=[shell("true")], strategy=SerialStrategy()).model_copy(update=change)
    async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
        with pytest.raises(InvalidPlan, match="Unicode"):
            await engine.execute_plan(plan)
        after = await engine.execute(shell("echo next"))
        assert (await result_of(engine, after, 30)).stdout == "next\n"
    async with ExecutionEngine(config(tmp_path, journal=journal)) as later:
        assert (await later.get_result(after)).stdout == "next\n"
        assert [s.id for s in await later.list_executions()] == [after]


def _float_limit(request: ExecutionRequest) -> None:
    request.limits = ResourceLimits(open_files=64)
    request.limits.open_files = 1.5  # type: ignore[assignment]


def _bogus_retry_cause(request: ExecutionRequest) -> None:
    request.retry = RetryPolicy(max_attempts=2, backoff_ms=0)
    request.retry.retry_on.append("bogus")  # type: ignore[arg-type]


def _bool_cpu(request: ExecutionRequest) -> None:
    request.limits = ResourceLimits(cpu_affinity=[0])
    assert request.limits.cpu_affinity is not None
    request.limits.cpu_affinity.append(True)


def _changed(change: Callable[[ExecutionRequest], object]) -> ExecutionRequest:
    request = shell("echo changed")
    change(request)
    return request


@pytest.mark.parametrize(
    "change",
    [
        lambda r: setattr(r, "timeout_ms", 1500.5),
        lambda r: setattr(r, "timeout_ms", True),
        lambda r: setattr(r, "timeout_ms", "5000"),
        lambda r: setattr(r, "success_exit_codes", [True]),
        lambda r: r.success_exit_codes.append(True),
        lambda r: r.success_exit_codes.append(2.5),
        lambda r: setattr(r, "env", {"A": 1}),
        lambda r: r.env.update({"A": 1}),
        lambda r: setattr(r, "env", None),
        lambda r: setattr(r, "stdin", 5),
        lambda r: _float_limit(r),
        lambda r: setattr(r.command, "command", None),
        lambda r: setattr(r, "working_dir", "/tmp"),
        lambda r: r.secret_env.update({"S": 123456}),
        _bogus_retry_cause,
        _bool_cpu,
    ],
    ids=[
        "float-timeout",
        "bool-timeout",
        "str-timeout",
        "bool-exit-codes",
        "bool-appended",
        "float-appended",
        "int-env",
        "int-env-in-place",
        "no-env",
        "int-stdin",
        "float-limit",
        "no-shell-command",
        "str-working-dir",
        "int-secret",
        "bogus-retry-cause",
        "bool-cpu",
    ],
)
async def test_a_request_changed_after_it_was_made_is_refused_or_runs_and_no_worker_dies_of_it(
    tmp_path: Path, change: Callable[[ExecutionRequest], object]
) -> None:
    """A host that edits a request's attributes gets a ValidationError (at the edit or at execute), or
    the value it meant; never a worker's death that fails the commands beside it."""
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        beside = await engine.execute(shell("read line; echo $line", stdin="beside\n"))
        try:
            request = _changed(change)
            changed = await engine.execute(request)
        except ValidationError:
            changed = None
        if changed is not None:
            result = await result_of(engine, changed, 20)
            assert result.error is None or "Worker" not in result.error, result.error
        assert (await result_of(engine, beside, 20)).stdout == "beside\n"


@pytest.mark.parametrize("change", [_bogus_retry_cause, _bool_cpu], ids=["bogus-retry-cause", "bool-cpu"])
async def test_an_edit_a_journal_could_not_read_back_is_refused_at_execute(
    tmp_path: Path, change: Callable[[ExecutionRequest], object]
) -> None:
    """Values its JSON would carry but no later engine could read (a retry cause that is none, a CPU
    that is a bool): refused, not run and recorded unreadable."""
    async with ExecutionEngine(config(tmp_path, journal=tmp_path / "journal.sqlite3")) as engine:
        with pytest.raises(InvalidCommand):
            await engine.execute(_changed(change))


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.commands.append("not a request"),
        lambda p: p.commands.append({"command": {"type": "shell", "command": "true"}}),
        lambda p: p.strategy.dependencies.update({1: ["0"]}),
        lambda p: p.strategy.dependencies.update({"1": [0]}),
        lambda p: p.strategy.dependencies.update({1: [True]}),
        lambda p: p.metadata.tags.update({"stage": 1}),
    ],
    ids=["str-command", "dict-command", "str-dependency", "str-node", "bool-dependency", "int-tag"],
)
async def test_a_plan_changed_after_it_was_made_is_refused_as_invalid(
    tmp_path: Path, change: Callable[[ExecutionPlan], object]
) -> None:
    plan = ExecutionPlan(
        commands=[shell("true"), shell("true")], strategy=DependencyGraphStrategy(dependencies={1: [0]})
    )
    change(plan)
    async with ExecutionEngine(config(tmp_path)) as engine:
        with pytest.raises(InvalidPlan):
            await engine.execute_plan(plan)
        assert await engine.list_executions() == []


@pytest.mark.parametrize("field", ["kill_grace_ms", "default_timeout_ms", "max_output_bytes"])
async def test_a_config_changed_after_the_engine_was_made_changes_nothing_it_runs(
    tmp_path: Path, field: str
) -> None:
    """The engine keeps the configuration it was given, as it was then: a later edit neither breaks it
    nor half-applies."""
    settings = config(tmp_path, workers=1)
    engine = ExecutionEngine(settings)
    with contextlib.suppress(ValidationError):
        setattr(settings, field, 1500.5)
    async with engine:
        result = await result_of(engine, await engine.execute(shell("echo kept")), 20)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "kept\n")


def test_a_config_is_checked_whole_when_an_engine_is_made_from_it(tmp_path: Path) -> None:
    """A config edited field by field may pass through states that are not valid (the default raised
    before the maximum): the engine checks the whole of it as it is when made, as the constructor would."""
    settings = config(tmp_path)
    settings.default_timeout_ms = 900_000
    settings.max_timeout_ms = 1_800_000
    assert ExecutionEngine(settings).config.default_timeout_ms == 900_000
    settings.max_timeout_ms = 600_000  # now below the default
    with pytest.raises(ValidationError, match="default_timeout_ms"):
        ExecutionEngine(settings)


def test_a_config_holding_what_cannot_be_copied_still_makes_an_engine(tmp_path: Path) -> None:
    """A Ray runtime_env may name modules (`py_modules`), which cannot be deep-copied: kept as given."""
    import cloudops_execution_engine

    settings = config(
        tmp_path,
        ray=RayConfig(runtime_env={"py_modules": [cloudops_execution_engine]}),
        retention=RetentionPolicy(max_executions=100),
    )
    engine = ExecutionEngine(settings)
    assert engine.config.ray is not None
    assert engine.config.ray.runtime_env == {"py_modules": [cloudops_execution_engine]}
    assert settings.ray is not None
    assert settings.retention is not None
    settings.ray.address = "10.9.9.9:1"
    settings.retention.max_executions = 5
    assert engine.config.ray.address == "auto"
    assert engine.config.retention == RetentionPolicy(max_executions=100)


def test_what_is_set_on_an_engines_own_config_is_checked_as_it_is_set(tmp_path: Path) -> None:
    """A value of the wrong type is refused there, not found by every command's worker later."""
    engine = ExecutionEngine(config(tmp_path))
    with pytest.raises(ValidationError):
        engine.config.kill_grace_ms = 0.5  # type: ignore[assignment]
    assert engine.config.kill_grace_ms == config(tmp_path).kill_grace_ms


async def test_a_host_environment_that_is_not_utf8_reaches_commands_byte_exact(tmp_path: Path) -> None:
    os.environb[b"CLOUDOPS_TEST_ODD"] = b"caf\xe9 \xff\xfe"
    os.environb[b"CLOUDOPS_TEST_\xfe"] = b"name"
    try:
        async with ExecutionEngine(config(tmp_path)) as engine:
            eid = await engine.execute(
                shell("printf %s \"$CLOUDOPS_TEST_ODD\" | od -An -tx1; env | grep -c '^CLOUDOPS_TEST_'")
            )
            result = await result_of(engine, eid, 30)
    finally:
        del os.environb[b"CLOUDOPS_TEST_ODD"]
        del os.environb[b"CLOUDOPS_TEST_\xfe"]
    assert result.status is ExecutionStatus.COMPLETED, result.error
    assert result.stdout.split() == ["63", "61", "66", "e9", "20", "ff", "fe", "2"]


# -- 4. long timeouts ---------------------------------------------------------------------


async def test_a_thirty_day_timeout_works(tmp_path: Path) -> None:
    thirty_days = int(timedelta(days=30) / timedelta(milliseconds=1))
    cfg = config(tmp_path, workers=1, max_timeout_ms=thirty_days)
    async with ExecutionEngine(cfg) as engine:
        # Alone on its worker, so that its timer is the one the worker's loop waits for.
        long_one = await engine.execute(shell("sleep 1; echo done", timeout_ms=thirty_days))
        assert (await result_of(engine, long_one, 30)).stdout == "done\n"
        other = await engine.execute(shell("echo other"))
        assert (await result_of(engine, other, 30)).status is ExecutionStatus.COMPLETED


@pytest.mark.parametrize("timeout_ms", [2**64, 2**64 - 1, -1, 0])
async def test_a_timeout_out_of_range_is_a_validation_error(engine: ExecutionEngine, timeout_ms: int) -> None:
    with pytest.raises(ValidationError):
        await engine.execute(run("true", timeout_ms=timeout_ms))
    assert await engine.list_executions() == []


def test_a_configured_maximum_beyond_u64_is_refused() -> None:
    with pytest.raises(ValueError, match="max_timeout_ms"):
        ExecutionConfig(max_timeout_ms=2**64)


# -- 5. a stopped worker -------------------------------------------------------------------


async def test_a_host_whose_loop_was_blocked_keeps_its_quiet_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host, not the worker, was late: no ping went out while its loop was blocked, so a worker
    that said nothing meanwhile had nothing to answer, and its commands run on."""
    monkeypatch.setattr(supervisor, "_SILENCE_LIMIT", 1.0)
    async with ExecutionEngine(config(tmp_path, workers=2)) as engine:
        quiet = [await engine.execute(shell("read line; echo $line", stdin="done\n")) for _ in range(2)]
        quiet += [await engine.execute(shell(f"while [ ! -e {tmp_path / 'go'} ]; do sleep 0.05; done"))]
        await result_of(engine, quiet[0], 20)
        time.sleep(2.5)  # the host's own sync work, on its loop: longer than the limit  # noqa: ASYNC251
        (tmp_path / "go").touch()
        results = [await result_of(engine, eid, 20) for eid in quiet]
    assert [(r.status, r.error) for r in results] == [(ExecutionStatus.COMPLETED, None)] * 3


async def test_a_dead_workers_unsent_commands_are_let_go_of_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What was queued for a worker that died unread (commands with 4 MiB of stdin each) is freed,
    though the records of its failed executions, which name it, are kept."""
    monkeypatch.setattr(supervisor, "_SILENCE_LIMIT", 1.0)
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        pool = engine._supervisor._pool
        assert pool is not None
        [worker] = pool.workers
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            ids = [await engine.execute(run("cat", stdin=b"x" * (4 << 20))) for _ in range(4)]
            results = [await result_of(engine, eid, 20) for eid in ids]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGCONT)
        assert all("stopped responding" in (r.error or "") for r in results)
        assert engine._supervisor.entry(ids[0]).worker is worker  # type: ignore[union-attr]
        assert worker._writer.backlog == 0  # type: ignore[union-attr]


async def test_a_stopped_worker_is_replaced_and_its_executions_fail(tmp_path: Path) -> None:
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        bystander = await engine.execute(shell("echo $$ > by.pid; exec sleep 60", working_dir=tmp_path))
        by_pid = await pid_from(tmp_path / "by.pid")
        stopper = await engine.execute(shell("kill -STOP $PPID; exec sleep 60", timeout_ms=1000))
        started = time.monotonic()
        for eid in (bystander, stopper):
            result = await result_of(engine, eid, 30)
            assert result.status is ExecutionStatus.FAILED
            assert result.error is not None
            assert "stopped responding" in result.error
        assert time.monotonic() - started < 15
        await until_gone(by_pid)
        after = await engine.execute(shell("echo served"))
        assert (await result_of(engine, after, 30)).stdout == "served\n"


# -- 6. escapees -----------------------------------------------------------------------------

# A descendant that leaves everything behind: no marker (env -i), its own session
# (setsid), its parent gone (the subshell exits), its output elsewhere.
ESCAPE = "( env -i PATH=\"$PATH\" setsid sh -c 'echo $$ > escapee.pid; exec sleep 60' {redirect} & ); "
WAIT_FOR_PIDFILE = "until [ -s escapee.pid ]; do sleep 0.01; done; "


async def test_an_escapee_holding_stdout_cannot_keep_the_execution_running(tmp_path: Path) -> None:
    async with ExecutionEngine(config(tmp_path, kill_grace_ms=300)) as engine:
        eid = await engine.execute(shell(ESCAPE.format(redirect="") + "echo main done", working_dir=tmp_path))
        result = await result_of(engine, eid, 20)
        assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "main done\n")
        assert result.duration < timedelta(seconds=5)
        await until_gone(await pid_from(tmp_path / "escapee.pid"))


@pytest.mark.parametrize("ending", ["end", "cancel", "timeout", "shutdown"])
async def test_an_escapee_dies_with_its_execution(tmp_path: Path, ending: str) -> None:
    detached = ESCAPE.format(redirect=">/dev/null 2>&1 </dev/null")
    tail = "" if ending == "end" else "exec sleep 60"
    timeout_ms = 1000 if ending == "timeout" else None
    engine = ExecutionEngine(config(tmp_path, kill_grace_ms=300))
    async with engine:
        eid = await engine.execute(
            shell(detached + WAIT_FOR_PIDFILE + tail, working_dir=tmp_path, timeout_ms=timeout_ms)
        )
        escapee = await pid_from(tmp_path / "escapee.pid")
        if ending != "end":  # that one may be ended already: its command is over
            assert psutil.Process(escapee).environ().get("CLOUDOPS_EXECUTION_ID") is None
        if ending == "cancel":
            await engine.cancel(eid)
        if ending != "shutdown":
            result = await result_of(engine, eid, 20)
            expected = {
                "end": ExecutionStatus.COMPLETED,
                "cancel": ExecutionStatus.CANCELLED,
                "timeout": ExecutionStatus.TIMEOUT,
            }[ending]
            assert result.status is expected
            await until_gone(escapee)
    await until_gone(escapee)


async def test_an_escapee_of_an_ended_command_does_not_touch_a_running_one(tmp_path: Path) -> None:
    async with ExecutionEngine(config(tmp_path, workers=1, kill_grace_ms=300)) as engine:
        # A running command's own detached child is part of it: the end of
        # another command on the same worker must not take it.
        keeper = await engine.execute(
            shell(
                "( env -i setsid sh -c 'echo $$ > kept.pid; exec sleep 60' >/dev/null 2>&1 & ); "
                "until [ -s kept.pid ]; do sleep 0.01; done; sleep 60",
                working_dir=tmp_path,
            )
        )
        kept = await pid_from(tmp_path / "kept.pid")
        leaver = await engine.execute(
            shell(ESCAPE.format(redirect=">/dev/null 2>&1") + WAIT_FOR_PIDFILE, working_dir=tmp_path)
        )
        await result_of(engine, leaver, 20)
        await until_gone(await pid_from(tmp_path / "escapee.pid"))
        assert not gone(kept)
        assert (await engine.get_status(keeper)) is ExecutionStatus.RUNNING
        await engine.cancel(keeper)
        await result_of(engine, keeper, 20)
        await until_gone(kept)


# -- 7. file descriptors ------------------------------------------------------------------------


async def test_a_command_holds_only_fds_0_1_and_2(engine: ExecutionEngine) -> None:
    probe = "import os; print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
    result = await result_of(engine, await engine.execute(run(PYTHON, "-c", probe)), 30)
    # listdir's own fd is the fourth.
    assert result.stdout == "[0, 1, 2, 3]\n"


async def test_a_command_starts_with_no_signal_blocked_or_ignored_whatever_the_host_did(
    tmp_path: Path,
) -> None:
    """Blocked signals and ignored ones survive exec: a host's would reach the command through the workers.

    A command with SIGTERM blocked cannot hear a cancel or a timeout; only the
    SIGKILL a grace period later ends it.
    """
    blocked = {signal.SIGTERM, signal.SIGUSR1}
    ignored = (signal.SIGUSR2, signal.SIGHUP)
    before_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    before = [signal.signal(sig, signal.SIG_IGN) for sig in ignored]
    try:
        async with ExecutionEngine(config(tmp_path)) as engine:
            probe = run("grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status")
            result = await result_of(engine, await engine.execute(probe), 30)
            stopped = await engine.execute(shell("echo ready; sleep 30", timeout_ms=300))
            timed_out = await engine.wait(stopped, timeout=30)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before_mask)
        for sig, handler in zip(ignored, before, strict=True):
            signal.signal(sig, handler)
    masks = dict(line.split(":\t") for line in result.stdout.splitlines())
    # glibc keeps two real-time signals for itself (32 and 33), out of any program's reach:
    # what an ancestor of the host left there is not the engine's to change.
    ours = set(signal.valid_signals())
    for name in ("SigBlk", "SigIgn"):
        bits = int(masks[name], 16)
        assert {sig for sig in ours if bits >> (sig - 1) & 1} == set(), f"{name} {masks[name]}"
    assert isinstance(timed_out, ExecutionResult)
    assert timed_out.exit_code == -signal.SIGTERM, "the timeout's SIGTERM did not reach it"


# -- 8. the common fd limit -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("soft", "hard", "count", "seconds"),
    [(1024, 8192, 1000, 2.0), (256, 256, 400, 0.3)],
    ids=["soft-1024-hard-8192", "hard-256"],
)
def test_many_commands_under_a_low_fd_limit_all_complete(
    tmp_path: Path, soft: int, hard: int, count: int, seconds: float
) -> None:
    host = subprocess.run(
        [
            PYTHON,
            str(HELPERS / "fd_limit_host.py"),
            str(tmp_path / "logs"),
            str(soft),
            str(hard),
            str(count),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert host.returncode == 0, host.stderr[-3000:]
    assert host.stdout.split() == [f"completed={count}", "failed=0"], host.stdout[-2000:]


# -- 9. slow consumers -------------------------------------------------------------------------------

# 3,200 lines of 64 KiB: 200 MiB of output.
FLOOD = "import sys\nline = b'x' * 65535 + b'\\n'\nfor _ in range(3200): sys.stdout.buffer.write(line)\n"


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


class SlowHandler:
    def __init__(self) -> None:
        self.lines = 0
        self.peak = 0

    async def on_event(self, event: Any) -> None:
        if event.event_type == "stdout":
            self.lines += 1
            self.peak = max(self.peak, _rss())
            await asyncio.sleep(0.001)


async def test_a_slow_handler_keeps_host_memory_bounded_and_loses_nothing(tmp_path: Path) -> None:
    handler = SlowHandler()
    async with ExecutionEngine(config(tmp_path)).with_event_handler(handler) as engine:
        baseline = _rss()
        eid = await engine.execute(run(PYTHON, "-c", FLOOD))
        result = await result_of(engine, eid, 100)
    assert result.status is ExecutionStatus.COMPLETED
    assert handler.lines == 3200
    assert handler.peak - baseline < 64 * MIB, f"host grew by {(handler.peak - baseline) // MIB} MiB"
    log = (tmp_path / "logs" / f"{eid}.log").read_bytes()
    assert log.count(b" stdout ") == 3200


async def test_a_slow_events_reader_keeps_host_memory_bounded_and_loses_nothing(tmp_path: Path) -> None:
    async with ExecutionEngine(config(tmp_path)) as engine:
        baseline = _rss()
        eid = await engine.execute(run(PYTHON, "-c", FLOOD))
        lines = peak = 0
        async for event in engine.events(eid):
            if event.event_type == "stdout":
                lines += 1
                peak = max(peak, _rss())
                await asyncio.sleep(0.001)
        result = await result_of(engine, eid, 30)
    assert result.status is ExecutionStatus.COMPLETED
    assert lines == 3200
    assert peak - baseline < 64 * MIB, f"host grew by {(peak - baseline) // MIB} MiB"


# -- 15. honest resource usage ---------------------------------------------------------------------


async def test_the_peak_resident_size_is_the_commands_own(engine: ExecutionEngine) -> None:
    small = await result_of(engine, await engine.execute(run("true")), 30)
    alloc = "x = bytearray(300 * 1024 * 1024); print(len(x))"
    large = await result_of(engine, await engine.execute(run(PYTHON, "-c", alloc)), 30)
    assert small.resource_usage is not None
    assert large.resource_usage is not None
    # `/usr/bin/time true` reports about 1 MiB; the worker that starts it is about 40.
    assert small.resource_usage.max_rss_bytes < 2 * MIB
    assert 300 * MIB <= large.resource_usage.max_rss_bytes < 340 * MIB


async def test_a_command_that_stops_the_spawner_costs_at_most_one_start(tmp_path: Path) -> None:
    """The spawner is the worker's other child: a command can stop it. The worker is not lost for it."""
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        bystander = await engine.execute(shell("echo $$ > by.pid; exec sleep 30", working_dir=tmp_path))
        await pid_from(tmp_path / "by.pid")
        stop_sibling = (
            'for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = _spawner ] && '
            'grep -qx "PPid:\t$PPID" $p/status && kill -STOP ${p#/proc/}; done; true'
        )
        stopper = await engine.execute(shell(stop_sibling))
        assert (await result_of(engine, stopper, 30)).status is ExecutionStatus.COMPLETED
        # The next start meets the stopped spawner: it may fail, alone, and nothing else may.
        started = time.monotonic()
        await result_of(engine, await engine.execute(run("true")), 30)
        assert time.monotonic() - started < 4, "a stalled spawner held the worker too long"
        after = await result_of(engine, await engine.execute(shell("echo after")), 30)
        assert (after.status, after.stdout) == (ExecutionStatus.COMPLETED, "after\n")
        assert await engine.get_status(bystander) is ExecutionStatus.RUNNING
        await engine.cancel(bystander)
        assert (await result_of(engine, bystander, 30)).status is ExecutionStatus.CANCELLED


def test_a_stalled_spawner_is_given_up_well_before_its_worker_would_be() -> None:
    # Two limits that meet: the worker waits for its spawner while the host waits for the worker.
    from cloudops_execution_engine.actors import spawner

    assert spawner._ANSWER_TIMEOUT * 2 <= supervisor._SILENCE_LIMIT


# -- 11. a second event loop ---------------------------------------------------------------------------


def test_an_engine_used_from_a_second_event_loop_fails_clearly_and_leaves_no_worker(tmp_path: Path) -> None:
    engine = ExecutionEngine(config(tmp_path))
    workers: list[int] = []
    before = {p.pid for p in psutil.Process().children()}

    async def first() -> None:
        eid = await engine.execute(run("true"))
        await engine.wait(eid, timeout=30)
        workers.extend(p.pid for p in psutil.Process().children() if p.pid not in before)

    async def second() -> UUID:
        return await engine.execute(run("true"))

    asyncio.run(first())
    assert workers
    with pytest.raises(EngineClosed, match="event loop"):
        asyncio.run(second())
    asyncio.run(engine.shutdown())
    wait_until(lambda: all(gone(pid) for pid in workers), 10, "the workers to exit")


async def test_a_host_whose_default_executor_is_busy_still_has_a_whole_engine(tmp_path: Path) -> None:
    """The loop's default executor is the host's: its own blocking calls may fill it for minutes.

    The engine's blocking work (opening its journal, reading a log, cleaning up
    after a dead worker, stopping its journal's writer) must not queue behind them.
    """
    loop = asyncio.get_running_loop()
    hosts_own = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(hosts_own)
    release = threading.Event()
    busy = loop.run_in_executor(None, release.wait, 60)
    engine = ExecutionEngine(config(tmp_path, journal=tmp_path / "journal.sqlite3", workers=1))
    try:
        await asyncio.wait_for(engine.start(), 10)
        eid = await engine.execute(shell("echo $PPID; exec sleep 60"))
        events = engine.events(eid)
        async for event in events:
            if event.event_type == "stdout":
                break
        log = await asyncio.wait_for(engine.read_logs(eid), 10)
        worker = int(log.splitlines()[-1].split()[-1])
        os.kill(worker, signal.SIGKILL)
        result = await engine.wait(eid, timeout=10)
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.FAILED
        assert f"Worker process {worker} died" in (result.error or "")
        await asyncio.wait_for(engine.shutdown(), 10)
        assert not busy.done(), "the host's own call was still holding the default executor"
    finally:
        release.set()
        await busy
        await engine.shutdown()
        hosts_own.shutdown()


SETTINGS = (
    "import os, resource as r;"
    "print([r.getrlimit(getattr(r, n)) for n in sorted(dir(r)) if n.startswith('RLIMIT_')],"
    " os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)))"
)


@pytest.mark.skipif(os.cpu_count() == 1, reason="a CPU set of one CPU cannot be told from all of them")
@pytest.mark.parametrize("how", ["soft", "hard"])
async def test_a_command_that_changes_its_workers_limits_nice_and_cpus_leaves_later_commands_as_before(
    tmp_path: Path, how: str
) -> None:
    """prlimit, renice and taskset on `$PPID` and the spawner: later commands start as earlier ones did.

    What the worker may undo (soft limits, nice, CPU set) it undoes in place;
    a lowered hard limit it may not raise again (without CAP_SYS_RESOURCE,
    which even root may lack in a container) makes it retire for a new worker.
    """
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        worker = engine._supervisor._pool.workers[0].pid  # type: ignore[union-attr]
        before = await result_of(engine, await engine.execute(run(PYTHON, "-c", SETTINGS)), timeout=20)
        taint = await result_of(
            engine, await engine.execute(run(PYTHON, str(HELPERS / "taint_parent.py"), how)), timeout=20
        )
        assert taint.status == "completed", taint.stderr
        assert len(taint.stdout.split()) == 2, "expected the worker and its spawner to be changed"
        after = await result_of(engine, await engine.execute(run(PYTHON, "-c", SETTINGS)), timeout=20)
        assert (after.status, after.stdout) == ("completed", before.stdout), after.error
        # The worker's own fd and file size limits are back too: its logs open, and are written whole.
        big = await result_of(
            engine, await engine.execute(shell("head -c 300000 /dev/zero | tr '\\0' x")), timeout=20
        )
        assert big.status == "completed", big.error
        assert big.log_path.stat().st_size > 300_000
        results = [
            await result_of(engine, await engine.execute(run("echo", str(i))), timeout=20) for i in range(20)
        ]
        assert [r.status for r in results] == ["completed"] * 20, [r.error for r in results]
        if how == "soft":
            now = [w.pid for w in engine._supervisor._pool.workers]  # type: ignore[union-attr]
            assert now == [worker], "a worker that could undo every change was replaced"


_HOST_WITHOUT_STANDARD_FDS = """
import asyncio, json, sys
from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionRequest, ShellCommand

async def main(report, log_dir):
    line = "echo out; echo err >&2; cat; echo cat=$?; readlink /proc/$PPID/fd/1 /proc/$PPID/fd/2"
    async with ExecutionEngine(ExecutionConfig(log_dir=log_dir, workers=1)) as engine:
        results = []
        for _ in range(3):
            eid = await engine.execute(ExecutionRequest(command=ShellCommand(command=line)))
            result = await engine.wait(eid, timeout=30)
            results.append({"status": result.status.value, "stdout": result.stdout, "stderr": result.stderr})
    with open(report, "w") as out:
        json.dump(results, out)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.timeout(60)
def test_a_host_started_without_standard_fds_runs_commands_with_all_three(tmp_path: Path) -> None:
    """Its workers' pipes to it took the numbers 1 and 2: what a worker wrote there went into its frames.

    The worker (the command's parent) has `/dev/null` there instead; its commands get all three.
    """
    report = tmp_path / "report.json"
    script = tmp_path / "host.py"
    script.write_text(_HOST_WITHOUT_STANDARD_FDS)
    command = shlex.join([PYTHON, str(script), str(report), str(tmp_path / "logs")])
    done = subprocess.run(["bash", "-c", f"exec {command} <&- >&- 2>&-"], timeout=50)
    assert done.returncode == 0
    results = json.loads(report.read_text())
    expected = {"status": "completed", "stdout": "out\ncat=0\n/dev/null\n/dev/null\n", "stderr": "err\n"}
    assert results == [expected] * 3

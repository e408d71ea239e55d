"""Retries under a request's `RetryPolicy`: attempts, backoff, causes, cancels, logs and plans."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import Recorder, config, result_of, shell

from cloudops_execution_engine import (
    DependencyGraphStrategy,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStatus,
    PlanExecutionResult,
    RayConfig,
    RetryPolicy,
    SerialStrategy,
    SyncExecutionEngine,
)
from cloudops_execution_engine.actors import retries
from cloudops_execution_engine.logfiles import open_log, reopen_log

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

COMPLETED = ExecutionStatus.COMPLETED
FAILED = ExecutionStatus.FAILED
CANCELLED = ExecutionStatus.CANCELLED
TIMEOUT = ExecutionStatus.TIMEOUT


def flaky(counter: Path, succeed_on: int, **retry: Any) -> ExecutionRequest:
    """A command that counts its runs in `counter` and fails until run number `succeed_on`."""
    script = (
        f"n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter}; "
        f'echo "attempt $CLOUDOPS_ATTEMPT run $n"; [ $n -ge {succeed_on} ]'
    )
    return shell(script, retry=RetryPolicy(**retry))


def always_failing(**retry: Any) -> ExecutionRequest:
    return shell('echo "attempt $CLOUDOPS_ATTEMPT"; exit 3', retry=RetryPolicy(**retry))


def types(recorder: Recorder, eid: UUID) -> list[str]:
    return recorder.types_of(eid)


def started_times(recorder: Recorder, eid: UUID) -> list[float]:
    return [e.timestamp.timestamp() for e in recorder.of(eid) if e.event_type == "started"]


def backing_off(engine: ExecutionEngine, eid: UUID) -> bool:
    """Whether the execution waits out a backoff now (the engine's own record says so)."""
    record: Any = engine._supervisor.entry(eid)
    return record.retry is not None and record.retry.timer is not None


async def until_backing_off(engine: ExecutionEngine, eid: UUID, timeout: float = 20) -> None:
    # Polled with a deadline: the engine has no event for "a backoff began".
    async with asyncio.timeout(timeout):
        while not backing_off(engine, eid):  # noqa: ASYNC110
            await asyncio.sleep(0.002)


# -- the policy's arithmetic -------------------------------------------------


def test_backoff_grows_by_the_multiplier_and_stops_at_the_cap() -> None:
    """The delay before attempt n+1 is backoff_ms * multiplier**(n-1), capped at max_backoff_ms."""
    policy = RetryPolicy(max_attempts=10, backoff_ms=100, backoff_multiplier=3.0, max_backoff_ms=2000)
    assert [retries.backoff_ms(policy, n) for n in range(1, 6)] == [100, 300, 900, 2000, 2000]
    assert retries.backoff_ms(RetryPolicy(backoff_multiplier=1e300, max_backoff_ms=5), 40) == 5
    assert retries.backoff_ms(RetryPolicy(backoff_ms=0), 3) == 0
    plain = RetryPolicy(max_attempts=3, backoff_ms=100, jitter=False)
    assert retries.next_delay(plain, 1, "failed") == pytest.approx(0.1)
    assert retries.next_delay(plain, 2, "timeout") == pytest.approx(0.2)


def test_jitter_is_drawn_uniformly_from_half_the_delay_to_the_delay() -> None:
    """With jitter, each delay lies in [delay/2, delay] and spreads over the whole range."""
    policy = RetryPolicy(max_attempts=5, backoff_ms=100, backoff_multiplier=2.0)
    rng = random.Random(7)
    draws = [retries.next_delay(policy, 2, "failed", rng) for _ in range(2000)]
    values = [d for d in draws if d is not None]
    assert len(values) == 2000
    assert all(0.1 <= d <= 0.2 for d in values)
    assert min(values) < 0.102
    assert max(values) > 0.198
    assert sum(values) / len(values) == pytest.approx(0.15, abs=0.005)


def test_which_endings_are_retried() -> None:
    """`cancelled` and `completed` never are, `worker_lost` only when listed, and never past max_attempts."""
    default = RetryPolicy(max_attempts=3, backoff_ms=0)
    assert retries.next_delay(default, 1, "failed") == 0
    assert retries.next_delay(default, 1, "timeout") == 0
    assert retries.next_delay(default, 1, "worker_lost") is None
    assert retries.next_delay(default, 1, "cancelled") is None
    assert retries.next_delay(default, 1, "completed") is None
    assert retries.next_delay(default, 3, "failed") is None
    lost = RetryPolicy(backoff_ms=0, retry_on=["worker_lost"])
    assert retries.next_delay(lost, 1, "worker_lost") == 0
    assert retries.next_delay(lost, 1, "failed") is None
    # Not even a policy built around validation retries a cancel.
    forced = RetryPolicy.model_construct(max_attempts=3, backoff_ms=0, retry_on=["cancelled"])  # type: ignore[list-item]
    assert retries.next_delay(forced, 1, "cancelled") is None


def test_a_later_attempt_appends_only_to_its_own_log_file(tmp_path: Path) -> None:
    """Reopening a log appends to our regular file; a link or FIFO put at its name is never written."""
    log = tmp_path / "x.log"
    name = str(log)
    fd = open_log(name)
    os.write(fd, b"attempt 1\n")
    os.close(fd)
    fd = reopen_log(name)
    os.write(fd, b"attempt 2\n")
    os.close(fd)
    assert log.read_bytes() == b"attempt 1\nattempt 2\n"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    plants: list[Callable[[], None]] = [
        lambda: log.symlink_to(victim),
        lambda: os.link(victim, log),
        lambda: os.mkfifo(log),
    ]
    for plant in plants:
        log.unlink()
        plant()
        fd = reopen_log(name)
        os.write(fd, b"attempt 3\n")
        os.close(fd)
        assert victim.read_bytes() == b"keep"
        assert not log.is_symlink()
        assert log.read_bytes() == b"attempt 3\n"
    log.unlink()
    os.close(reopen_log(name))
    assert log.read_bytes() == b""


# -- attempts, events, environment and logs --------------------------------


async def test_flaky_command_succeeds_on_its_third_attempt(tmp_path: Path, recorder: Recorder) -> None:
    """One id for every attempt, `started` per attempt, one terminal event; the last attempt's output wins."""
    counter = tmp_path / "count"
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(flaky(counter, 3, backoff_ms=10))
        result = await result_of(engine, eid, timeout=20)
        await recorder.until_final(eid)
        log = await engine.read_logs(eid)
    assert result.status is COMPLETED
    assert result.attempts == 3
    assert result.stdout == "attempt 3 run 3\n"
    assert result.id == eid
    assert types(recorder, eid) == ["started", "stdout"] * 3 + ["completed"]
    lines = [e.line for e in recorder.of(eid) if e.event_type == "stdout"]
    assert lines == ["attempt 1 run 1", "attempt 2 run 2", "attempt 3 run 3"]
    assert '"attempts":3' in result.model_dump_json()
    # The log keeps every attempt, each after a separator line, each with its own footer.
    for n in (1, 2, 3):
        assert f"attempt {n} run {n}" in log
    assert log.count("# execution ") == 3
    assert log.index("# --- attempt 2 ---") < log.index("attempt 2 run 2") < log.index("# --- attempt 3 ---")
    assert log.count("# finished:") == 3
    assert log.count("status=failed") == 2
    assert log.count("status=completed") == 1


async def test_exhausted_attempts_end_failed_with_the_last_attempt(
    tmp_path: Path, recorder: Recorder
) -> None:
    """Past max_attempts the execution fails once, with attempts counted and the last attempt's output."""
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(always_failing(max_attempts=2, backoff_ms=10))
        result = await result_of(engine, eid, timeout=20)
        await recorder.until_final(eid)
    assert result.status is FAILED
    assert result.attempts == 2
    assert result.exit_code == 3
    assert result.stdout == "attempt 2\n"
    assert types(recorder, eid) == ["started", "stdout", "started", "stdout", "failed"]


async def test_only_a_command_under_a_policy_sees_its_attempt(engine: ExecutionEngine) -> None:
    """CLOUDOPS_ATTEMPT is set (from 1) for a command with a retry policy, and absent otherwise."""
    show = 'echo "${CLOUDOPS_ATTEMPT-unset}"'
    with_policy = await engine.execute(shell(show, retry=RetryPolicy()))
    without = await engine.execute(shell(show))
    assert (await result_of(engine, with_policy, timeout=20)).stdout == "1\n"
    plain = await result_of(engine, without, timeout=20)
    assert plain.stdout == "unset\n"
    assert plain.attempts == 1
    assert "attempts" not in plain.model_dump_json()


async def test_a_host_that_is_itself_an_attempt_does_not_pass_its_number_on(
    engine: ExecutionEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host running as attempt 7 of some outer engine: its commands see their own attempt, or none."""
    monkeypatch.setenv("CLOUDOPS_ATTEMPT", "7")
    show = 'echo "${CLOUDOPS_ATTEMPT-unset}"'
    without = await engine.execute(shell(show))
    with_policy = await engine.execute(shell(show, retry=RetryPolicy()))
    assert (await result_of(engine, without, timeout=20)).stdout == "unset\n"
    assert (await result_of(engine, with_policy, timeout=20)).stdout == "1\n"


async def test_backoff_between_attempts_grows_and_is_capped(tmp_path: Path, recorder: Recorder) -> None:
    """The gaps between `started` events follow 60 ms, 240 ms, then the 300 ms cap (not 960 ms)."""
    slack = 0.3
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        request = always_failing(
            max_attempts=4, backoff_ms=60, backoff_multiplier=4.0, max_backoff_ms=300, jitter=False
        )
        eid = await engine.execute(request)
        result = await result_of(engine, eid, timeout=20)
    assert result.attempts == 4
    times = started_times(recorder, eid)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(gaps) == 3
    for gap, delay in zip(gaps, (0.06, 0.24, 0.30), strict=True):
        assert delay - 0.002 <= gap < delay + slack, f"gaps {gaps}"


async def test_backoff_with_jitter_stays_within_its_bounds(tmp_path: Path, recorder: Recorder) -> None:
    """With jitter each gap is at least half the delay, and never much more than the delay."""
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(always_failing(max_attempts=4, backoff_ms=200, backoff_multiplier=1.0))
        await result_of(engine, eid, timeout=20)
    times = started_times(recorder, eid)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(gaps) == 3
    assert all(0.1 - 0.002 <= gap < 0.2 + 0.3 for gap in gaps), f"gaps {gaps}"


# -- cancels and shutdown during a backoff --------------------------------


async def test_cancel_during_backoff_ends_it_cancelled_at_once(tmp_path: Path, recorder: Recorder) -> None:
    """A cancel while the execution waits to retry ends it `cancelled` within 10 ms; no attempt follows."""
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(always_failing(backoff_ms=30_000, jitter=False))
        await until_backing_off(engine, eid)
        assert await engine.get_status(eid) is ExecutionStatus.RUNNING
        timer = engine._supervisor.entry(eid).retry.timer  # type: ignore[union-attr]
        began = time.perf_counter()
        await engine.cancel(eid)
        result = await result_of(engine, eid, timeout=5)
        waited = time.perf_counter() - began
        await recorder.until_final(eid)
        heard = time.perf_counter() - began
        assert timer is not None
        assert timer.cancelled()
    assert waited < 0.010, f"wait() returned {waited * 1000:.1f} ms after cancel()"
    assert heard < 0.010, f"the terminal event came {heard * 1000:.1f} ms after cancel()"
    assert result.status is CANCELLED
    assert result.error == "Execution cancelled"
    assert result.attempts == 1
    assert result.stdout == "attempt 1\n"
    assert types(recorder, eid) == ["started", "stdout", "cancelled"]


async def test_shutdown_during_backoff_cancels_without_waiting_it_out(
    tmp_path: Path, recorder: Recorder
) -> None:
    """Shutting down while an execution backs off ends it cancelled at once and leaves no timer."""
    engine = ExecutionEngine(config(tmp_path)).with_event_handler(recorder)
    async with engine:
        eid = await engine.execute(always_failing(backoff_ms=30_000, jitter=False))
        await until_backing_off(engine, eid)
        timer = engine._supervisor.entry(eid).retry.timer  # type: ignore[union-attr]
        waiting = asyncio.ensure_future(engine.wait(eid, timeout=20))
        began = time.perf_counter()
    took = time.perf_counter() - began
    result = await waiting
    assert took < 5, f"shutdown took {took:.1f}s"
    assert timer is not None
    assert timer.cancelled()
    assert result.status is CANCELLED
    assert types(recorder, eid) == ["started", "stdout", "cancelled"]


async def test_a_waiting_retry_holds_no_concurrency_slot(tmp_path: Path, recorder: Recorder) -> None:
    """With one slot, other work runs to completion while a retried execution backs off."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=1)) as engine:
        retried = await engine.execute(always_failing(backoff_ms=30_000, jitter=False))
        await until_backing_off(engine, retried)
        other = await engine.execute(shell("echo other"))
        assert (await result_of(engine, other, timeout=20)).stdout == "other\n"
        assert await engine.get_status(retried) is ExecutionStatus.RUNNING
        await engine.cancel(retried)
        assert (await result_of(engine, retried, timeout=5)).status is CANCELLED


# -- causes: timeouts and lost workers ---------------------------------------


async def test_the_timeout_applies_to_each_attempt(tmp_path: Path, recorder: Recorder) -> None:
    """Two attempts time out and the third, given its own full timeout, completes."""
    script = 'echo "attempt $CLOUDOPS_ATTEMPT"; [ "$CLOUDOPS_ATTEMPT" -ge 3 ] || exec sleep 30'
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(shell(script, timeout_ms=200, retry=RetryPolicy(backoff_ms=10)))
        not_retried = await engine.execute(
            shell(script, timeout_ms=200, retry=RetryPolicy(backoff_ms=10, retry_on=["failed"]))
        )
        result = await result_of(engine, eid, timeout=20)
        once = await result_of(engine, not_retried, timeout=20)
    assert result.status is COMPLETED
    assert result.attempts == 3
    assert result.stdout == "attempt 3\n"
    assert types(recorder, eid).count("started") == 3
    assert once.status is TIMEOUT
    assert once.attempts == 1


async def sigkill_worker_mid_attempt(
    retry_on: list[Any], tmp_path: Path, recorder: Recorder
) -> tuple[Any, str]:
    """Run a command whose first attempt hangs, SIGKILL its worker; return the result and the log."""
    script = 'echo "attempt $CLOUDOPS_ATTEMPT worker $PPID"; [ "$CLOUDOPS_ATTEMPT" -ge 2 ] || exec sleep 30'
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(shell(script, retry=RetryPolicy(backoff_ms=10, retry_on=retry_on)))
        await recorder.until(lambda _: "stdout" in types(recorder, eid))
        first = next(e.line for e in recorder.of(eid) if e.event_type == "stdout")
        os.kill(int(first.split()[-1]), signal.SIGKILL)
        result = await result_of(engine, eid, timeout=30)
        await recorder.until_final(eid)
        return result, await engine.read_logs(eid)


async def test_a_lost_worker_is_retried_when_listed(tmp_path: Path, recorder: Recorder) -> None:
    """With `worker_lost` in retry_on, an attempt whose worker was SIGKILLed runs again, in the same log."""
    result, log = await sigkill_worker_mid_attempt(["failed", "worker_lost"], tmp_path, recorder)
    assert result.status is COMPLETED
    assert result.attempts == 2
    assert result.stdout.startswith("attempt 2 worker ")
    assert types(recorder, result.id) == ["started", "stdout", "started", "stdout", "completed"]
    assert log.index("attempt 1 worker") < log.index("# --- attempt 2 ---") < log.index("attempt 2 worker")
    # Why a second attempt began: the first's outcome, which its dead worker could not write.
    lost = log[log.index("attempt 1 worker") : log.index("# --- attempt 2 ---")]
    assert "# finished: " in lost
    assert " status=failed " in lost
    assert "died" in lost


async def test_a_lost_worker_is_not_retried_unless_listed(tmp_path: Path, recorder: Recorder) -> None:
    """By default a worker's death fails the execution: its command may have partly run."""
    result, log = await sigkill_worker_mid_attempt(["failed", "timeout"], tmp_path, recorder)
    assert result.status is FAILED
    assert result.attempts == 1
    assert result.error is not None
    assert "died" in result.error
    assert types(recorder, result.id) == ["started", "stdout", "failed"]
    finished = [line for line in log.splitlines() if line.startswith("# finished: ")]
    assert len(finished) == 1
    assert " status=failed " in finished[0]


async def test_a_cancel_during_a_backoff_is_the_logs_last_outcome(tmp_path: Path) -> None:
    """The log's last outcome was the attempt's `failed`, for an execution that ended `cancelled`."""
    async with ExecutionEngine(config(tmp_path)) as engine:
        eid = await engine.execute(
            shell("echo once; exit 1", retry=RetryPolicy(max_attempts=3, backoff_ms=60_000))
        )
        await until_backing_off(engine, eid)
        await engine.cancel(eid)
        result = await result_of(engine, eid, timeout=20)
        log = await engine.read_logs(eid)
    assert result.status is CANCELLED
    finished = [line for line in log.splitlines() if line.startswith("# finished: ")]
    assert [" status=failed " in finished[0], " status=cancelled " in finished[-1]] == [True, True]


async def test_the_outcome_said_after_a_backoff_never_goes_through_what_the_command_put_at_its_log(
    tmp_path: Path,
) -> None:
    """A command knows its log's name: one that put a symlink there must not have the host write to it."""
    target = tmp_path / "not-a-log"
    target.write_text("untouched\n")
    settings = config(tmp_path)
    assert settings.log_dir is not None
    marker = "$CLOUDOPS_EXECUTION_ID"  # its own id, so its log's name
    replace = f'log="{settings.log_dir}/{marker}.log"; rm -f "$log"; ln -s {target} "$log"; exit 1'
    async with ExecutionEngine(settings) as engine:
        eid = await engine.execute(shell(replace, retry=RetryPolicy(max_attempts=3, backoff_ms=60_000)))
        await until_backing_off(engine, eid)
        await engine.cancel(eid)
        result = await result_of(engine, eid, timeout=20)
    assert result.status is CANCELLED
    assert target.read_text() == "untouched\n"


# -- plans ---------------------------------------------------------------------


async def test_a_dependent_waits_for_the_last_attempt(tmp_path: Path, recorder: Recorder) -> None:
    """A command that depends on a retried one starts only after its final, successful attempt."""
    counter = tmp_path / "count"
    plan = ExecutionPlan(
        commands=[flaky(counter, 3, backoff_ms=20), shell(f"echo after $(cat {counter})")],
        strategy=DependencyGraphStrategy(dependencies={1: [0]}),
    )
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        pid = await engine.execute_plan(plan)
        outcome = await engine.wait(pid, timeout=20)
    assert isinstance(outcome, PlanExecutionResult)
    assert outcome.status is COMPLETED
    assert [r.attempts for r in outcome.results] == [3, 1]
    assert outcome.results[1].stdout == "after 3\n"
    progress = [e for e in recorder.events if e.event_type == "progress"]
    assert [p.completed for p in progress] == [1, 2]
    retried, dependent = (c.id for c in plan.commands)
    last_start = max(started_times(recorder, retried))
    assert min(started_times(recorder, dependent)) > last_start
    first_progress = recorder.events.index(progress[0])
    third_started = [i for i, e in enumerate(recorder.events) if e in recorder.of(retried)][-3]
    assert first_progress > third_started


async def test_stop_on_error_decides_after_the_last_attempt(tmp_path: Path, recorder: Recorder) -> None:
    """A serial plan goes on past a command that a retry saved, and stops after one that kept failing.

    stop_on_error looks only at the last attempt.
    """
    counter = tmp_path / "count"
    recovered = ExecutionPlan(
        commands=[flaky(counter, 2, backoff_ms=10), shell("echo next")],
        strategy=SerialStrategy(stop_on_error=True),
    )
    doomed = ExecutionPlan(
        commands=[always_failing(max_attempts=2, backoff_ms=10), shell("echo never")],
        strategy=SerialStrategy(stop_on_error=True),
    )
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        good = await engine.wait(await engine.execute_plan(recovered), timeout=20)
        bad = await engine.wait(await engine.execute_plan(doomed), timeout=20)
    assert isinstance(good, PlanExecutionResult)
    assert isinstance(bad, PlanExecutionResult)
    assert good.status is COMPLETED
    assert [r.attempts for r in good.results] == [2, 1]
    assert good.results[1].stdout == "next\n"
    assert bad.status is FAILED
    assert [r.status for r in bad.results] == [FAILED, CANCELLED]
    assert bad.results[0].attempts == 2
    assert "started" not in types(recorder, doomed.commands[1].id)


async def test_cancelling_a_plan_ends_its_backing_off_command(tmp_path: Path, recorder: Recorder) -> None:
    """A plan cancelled while one of its commands waits to retry ends at once, that command cancelled."""
    plan = ExecutionPlan(
        commands=[always_failing(backoff_ms=30_000, jitter=False), shell("echo never")],
        strategy=SerialStrategy(),
    )
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        pid = await engine.execute_plan(plan)
        await until_backing_off(engine, plan.commands[0].id)
        await engine.cancel(pid)
        outcome = await engine.wait(pid, timeout=5)
    assert isinstance(outcome, PlanExecutionResult)
    assert outcome.status is CANCELLED
    assert [r.status for r in outcome.results] == [CANCELLED, CANCELLED]


# -- the blocking engine ------------------------------------------------------


def test_a_retried_request_on_the_sync_engine(tmp_path: Path) -> None:
    """SyncExecutionEngine runs every attempt too, and reports the last."""
    counter = tmp_path / "count"
    with SyncExecutionEngine(config(tmp_path)) as engine:
        eid = engine.execute(flaky(counter, 2, backoff_ms=10))
        result = engine.wait(eid, timeout=20)
    assert result.status is COMPLETED
    assert getattr(result, "attempts", None) == 2


# -- on a Ray cluster -----------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(120)
async def test_retries_on_ray_keep_every_attempt_in_one_log(
    tmp_path: Path, recorder: Recorder, ray_address: str
) -> None:
    """On the Ray backend a flaky command is retried the same way, its attempts in one log on its node."""
    counter = tmp_path / "count"
    ray = RayConfig(address=ray_address, workers=2)
    async with ExecutionEngine(config(tmp_path, ray=ray)).with_event_handler(recorder) as engine:
        eid = await engine.execute(flaky(counter, 3, backoff_ms=10))
        result = await result_of(engine, eid, timeout=60)
        await recorder.until_final(eid)
        log = await engine.read_logs(eid)
    assert result.status is COMPLETED
    assert result.attempts == 3
    assert result.stdout == "attempt 3 run 3\n"
    assert types(recorder, eid) == ["started", "stdout"] * 3 + ["completed"]
    assert all(f"attempt {n} run {n}" in log for n in (1, 2, 3))
    assert log.index("# --- attempt 2 ---") < log.index("# --- attempt 3 ---")

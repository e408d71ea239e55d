"""The supervisor's parts on their own, without processes: store, scheduler, outcomes, admission."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStatus,
    InvalidCommand,
    NotFound,
    ParallelStrategy,
    SerialStrategy,
)
from cloudops_execution_engine.actors import outcomes
from cloudops_execution_engine.actors.admission import Admission, HostEnvironment
from cloudops_execution_engine.actors.pool import WorkerHandle
from cloudops_execution_engine.actors.records import PlanRun, Record
from cloudops_execution_engine.actors.scheduler import Scheduler
from cloudops_execution_engine.actors.store import MemoryStore
from cloudops_execution_engine.protocol import Finished

pytestmark = pytest.mark.timeout(30)

WORKER = cast(WorkerHandle, object())


def record(index: int = -1) -> Record:
    request = ExecutionRequest(command=ExecCommand(program="true"))
    return Record(request, ["true"], Path(f"/logs/{request.id}.log"), 1000, index=index)


def plan_run(count: int, **strategy: Any) -> PlanRun:
    commands = [ExecutionRequest(command=ExecCommand(program="true")) for _ in range(count)]
    plan = ExecutionPlan(
        commands=commands, strategy=ParallelStrategy(**strategy) if strategy else SerialStrategy()
    )
    records = [
        Record(request, ["true"], Path(f"/logs/{request.id}.log"), 1000, index=i)
        for i, request in enumerate(commands)
    ]
    return PlanRun(plan, records)


def end(item: Record, status: ExecutionStatus = ExecutionStatus.COMPLETED) -> None:
    item.result = outcomes.result_without_worker(item, status, "")
    item.status = status


# -- store -----------------------------------------------------------------------


def test_the_memory_store_answers_for_what_it_keeps_and_forgets_the_oldest_finished() -> None:
    store = MemoryStore(max_retained=2)
    first, second = record(), record()
    run = plan_run(2)
    third = record()
    for item in (first, second):
        store.add(item)
    store.add_plan(run)
    store.add(third)
    assert first.id in store
    assert run.records[1].id in store
    assert run.id in store
    assert store.entry(run.id) is run
    assert store.plan(run.id) is run
    assert store.record(first.id) is first
    with pytest.raises(NotFound):
        store.plan(first.id)
    with pytest.raises(NotFound):
        store.record(run.id)
    ids = [s.id for s in store.summaries()]
    assert set(ids) == {first.id, second.id, run.id, *(r.id for r in run.records), third.id}
    assert ids[:2] == [first.id, second.id]
    assert ids[-1] == third.id
    # Two executions retained, a plan counting as its commands: the oldest go first.
    store.retire(first)
    store.retire(run)
    assert first.id not in store
    assert run.id in store
    store.retire(second)
    assert run.id not in store
    assert run.records[0].id not in store
    assert second.id in store
    store.retire(third)
    assert [s.id for s in store.summaries()] == [second.id, third.id]


def test_a_plan_larger_than_the_retention_limit_is_kept_until_something_ends_after_it() -> None:
    """Its waiter may still ask for it; the next end makes it the oldest, and it goes."""
    store = MemoryStore(max_retained=2)
    big, later = plan_run(5), record()
    store.add_plan(big)
    store.add(later)
    store.retire(big)
    assert big.id in store
    assert big.records[4].id in store
    store.retire(later)
    assert big.id not in store
    assert [r.id for r in big.records if r.id in store] == []
    assert [s.id for s in store.summaries()] == [later.id]


# -- scheduler --------------------------------------------------------------------


class Starts:
    def __init__(self, refuse: set[int] | None = None) -> None:
        self.started: list[Record] = []
        self.refuse = refuse or set()

    def __call__(self, worker: WorkerHandle, item: Record) -> bool:
        if id(item) in self.refuse:
            return False
        item.status = ExecutionStatus.RUNNING
        item.worker = worker
        self.started.append(item)
        return True


def test_the_queue_is_fair_between_single_requests_and_a_plan_and_holds_the_limit() -> None:
    starts = Starts()
    scheduler = Scheduler(3, lambda: WORKER, starts)
    run = plan_run(5, max_concurrency=None)
    scheduler.add_plan(run)
    singles = [record() for _ in range(3)]
    for item in singles:
        scheduler.add(item)
    assert len(starts.started) == 3
    assert scheduler.running == 3
    # The plan took the first slots before the singles arrived. As slots free up,
    # each source in the queue takes one turn: the plan at the head takes one
    # command and goes to the back, behind the three singles.
    for _ in range(5):
        scheduler.ran()
        scheduler.dispatch()
    order = ["plan" if item.plan is run else "single" for item in starts.started[3:]]
    assert order == ["plan", "single", "single", "single", "plan"]


def test_a_plan_limit_and_no_worker_keep_commands_pending() -> None:
    starts = Starts()
    worker: list[WorkerHandle | None] = [None]
    scheduler = Scheduler(10, lambda: worker[0], starts)
    run = plan_run(4, max_concurrency=2)
    scheduler.add_plan(run)
    assert starts.started == []
    worker[0] = WORKER
    scheduler.dispatch()
    assert len(starts.started) == 2
    assert run.running == 2


def test_a_refused_start_takes_no_slot() -> None:
    refused = record()
    starts = Starts({id(refused)})
    scheduler = Scheduler(1, lambda: WORKER, starts)
    scheduler.add(refused)
    accepted = record()
    scheduler.add(accepted)
    assert starts.started == [accepted]
    assert scheduler.running == 1


def test_a_serial_plan_releases_the_next_command_only_after_a_success() -> None:
    starts = Starts()
    scheduler = Scheduler(10, lambda: WORKER, starts)
    run = plan_run(3)
    scheduler.add_plan(run)
    first = starts.started[0]
    end(first)
    scheduler.ran()
    scheduler.plan_command_ended(run, first)
    assert scheduler.release(run, first) == []
    scheduler.queue_plan(run)
    scheduler.dispatch()
    second = starts.started[1]
    assert second is run.records[1]
    end(second, ExecutionStatus.FAILED)
    scheduler.plan_command_ended(run, second)
    assert scheduler.release(run, second) == [run.records[2]]


def test_yielding_happens_only_while_the_queue_is_deeper_than_the_limit() -> None:
    scheduler = Scheduler(2, lambda: None, Starts())
    assert not scheduler.should_yield()
    for _ in range(2):
        scheduler.add(record())
    answers = [scheduler.should_yield() for _ in range(32)]
    assert answers.count(True) == 2
    assert answers[15]
    assert answers[31]


def test_draining_takes_every_pending_command_once() -> None:
    scheduler = Scheduler(10, lambda: None, Starts())
    single = record()
    run = plan_run(2, max_concurrency=None)
    scheduler.add(single)
    scheduler.add_plan(run)
    assert list(scheduler.drain_pending()) == [single, *run.records]
    assert list(scheduler.drain_pending()) == []


# -- outcomes ----------------------------------------------------------------------


def test_one_terminal_event_per_final_status() -> None:
    item = record()
    kinds = {}
    for status in (
        ExecutionStatus.COMPLETED,
        ExecutionStatus.FAILED,
        ExecutionStatus.TIMEOUT,
        ExecutionStatus.CANCELLED,
    ):
        result = outcomes.result_without_worker(item, status, "why")
        kinds[status] = outcomes.end_event(item.id, result).event_type
    assert kinds == {
        ExecutionStatus.COMPLETED: "completed",
        ExecutionStatus.FAILED: "failed",
        ExecutionStatus.TIMEOUT: "failed",
        ExecutionStatus.CANCELLED: "cancelled",
    }


def test_a_result_from_a_finished_message_carries_everything_it_says() -> None:
    item = record()
    message = Finished(
        item.key, "failed", 3, "out", "err", False, True, 100.0, 101.5, "boom", [0.5, 0.25, 4096], None
    )
    result = outcomes.result_of_finished(item, message)
    assert (result.status, result.exit_code, result.stdout, result.stderr, result.error) == (
        ExecutionStatus.FAILED,
        3,
        "out",
        "err",
        "boom",
    )
    assert result.stderr_truncated
    assert not result.stdout_truncated
    assert result.duration == timedelta(seconds=1.5)
    assert result.resource_usage is not None
    assert result.resource_usage.max_rss_bytes == 4096
    assert result.log_path == item.log_path
    assert (
        result.model_dump_json()
        == type(result).model_validate_json(result.model_dump_json()).model_dump_json()
    )


@pytest.mark.parametrize(
    ("statuses", "cancelled", "expected"),
    [
        (["completed", "completed"], False, "completed"),
        (["completed", "timeout"], False, "failed"),
        (["cancelled", "completed"], True, "cancelled"),
        # A cancel that came as the last command ended: every command completed, so the plan did.
        (["completed", "completed"], True, "completed"),
        (["completed", "failed"], True, "cancelled"),
    ],
)
def test_a_plan_result_counts_each_status(statuses: list[str], cancelled: bool, expected: str) -> None:
    run = plan_run(len(statuses))
    run.cancelled = cancelled
    for item, status in zip(run.records, statuses, strict=True):
        end(item, ExecutionStatus(status))
    result = outcomes.plan_result(run)
    assert result.status == run.status == ExecutionStatus(expected)
    assert result.stats.total == len(statuses)
    assert sum(
        (result.stats.completed, result.stats.failed, result.stats.timeout, result.stats.cancelled)
    ) == len(statuses)
    assert [r.id for r in result.results] == [r.id for r in run.records]


# -- admission ---------------------------------------------------------------------


def test_admission_counts_the_host_environment_and_refuses_what_no_exec_takes() -> None:
    admission = Admission(HostEnvironment())
    admission.check(["echo", "hi"], {"A": "b"})
    with pytest.raises(InvalidCommand, match="bytes"):
        admission.check(["true", "x" * 40 * 2**20], {})
    with pytest.raises(InvalidCommand, match="Unicode"):
        admission.check(["true"], {"A": "\udcff"})
    os.environb[b"CLOUDOPS_TEST_BIG"] = b"x" * (3 * 2**20)
    try:
        with pytest.raises(InvalidCommand, match="bytes"):
            admission.check(["true"], {})
    finally:
        del os.environb[b"CLOUDOPS_TEST_BIG"]
    admission.check(["true"], {})

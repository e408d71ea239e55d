"""A request or plan is taken as it is at `execute()` / `execute_plan()`.

They are the host's objects: a host may reuse one as a template, or edit it
after handing it over. What runs, what the log and the journal record, and
what `resume_plan()` rebuilds are what was submitted.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import config, run, shell

from cloudops_execution_engine import (
    DependencyGraphStrategy,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStatus,
    PlanExecutionResult,
    RetryPolicy,
    SerialStrategy,
    ShellCommand,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def journalled_request(journal: Path, execution_id: UUID) -> dict[str, Any]:
    conn = sqlite3.connect(journal)
    try:
        row = conn.execute("SELECT request FROM entries WHERE id = ?", (execution_id.bytes,)).fetchone()
    finally:
        conn.close()
    return dict(json.loads(row[0]))


async def test_a_request_edited_after_execute_runs_and_is_recorded_as_submitted(tmp_path: Path) -> None:
    gate = tmp_path / "go-on"
    journal = tmp_path / "journal.sqlite3"
    cfg = config(tmp_path, journal=journal, max_concurrent_executions=1)
    async with ExecutionEngine(cfg) as engine:
        blocker = await engine.execute(shell(f"while [ ! -e {gate} ]; do sleep 0.02; done"))
        request = run("sh", "-c", 'echo "X=$X $0"', "submitted-arg", env={"X": "submitted"})
        queued = await engine.execute(request)
        # Queued behind the blocker: edited in place, as a template reused for the next one.
        request.env["X"] = "edited"
        request.command.args[2] = "edited-arg"  # type: ignore[union-attr]
        gate.touch()
        await engine.wait(blocker, timeout=20)
        await engine.wait(queued, timeout=20)
        result = await engine.get_result(queued)
        assert result.stdout == "X=submitted submitted-arg\n"
        (header,) = [line for line in (await engine.read_logs(queued)).splitlines() if "# command: " in line]
        assert "submitted-arg" in header
        assert "edited" not in header
    recorded = journalled_request(journal, queued)
    assert recorded["env"] == {"X": "submitted"}
    assert recorded["command"]["args"][-1] == "submitted-arg"


async def test_a_plan_edited_after_execute_plan_runs_records_and_resumes_as_submitted(tmp_path: Path) -> None:
    """Appending a command, or a cycle, to a running plan broke `resume_plan` (bare errors, or a plan
    that never ended) and what the journal held of it."""
    gate = tmp_path / "go-on"
    journal = tmp_path / "journal.sqlite3"
    plan = ExecutionPlan(
        commands=[
            shell(f"while [ ! -e {gate} ]; do sleep 0.02; done"),
            shell('echo "X=$X"; exit 3', env={"X": "submitted"}),
            shell("echo third"),
        ],
        strategy=DependencyGraphStrategy(dependencies={1: [0], 2: [1]}),
        description="as submitted",
    )
    async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
        plan_id = await engine.execute_plan(plan)
        plan.commands.append(shell("echo appended"))
        plan.commands[1].env["X"] = "edited"
        plan.strategy.dependencies[0] = [2]  # type: ignore[union-attr]  # a cycle
        plan.description = "edited"
        gate.touch()
        result = await engine.wait(plan_id, timeout=30)
        assert isinstance(result, PlanExecutionResult)
        assert [r.status for r in result.results] == [
            ExecutionStatus.COMPLETED,
            ExecutionStatus.FAILED,
            ExecutionStatus.CANCELLED,
        ]
        assert result.results[1].stdout == "X=submitted\n"
        again = await engine.wait(await engine.resume_plan(plan_id), timeout=30)
        assert isinstance(again, PlanExecutionResult)
        assert len(again.results) == 3
        assert again.results[1].stdout == "X=submitted\n"
    recorded = journalled_request(journal, plan.id)
    assert recorded["description"] == "as submitted"
    assert len(recorded["commands"]) == 3
    async with ExecutionEngine(config(tmp_path, journal=journal)) as later:
        from_journal = await later.get_plan_result(plan.id)
        assert len(from_journal.results) == 3


def _more_attempts(policy: RetryPolicy) -> None:
    policy.max_attempts = 4


def _no_cause_retried(policy: RetryPolicy) -> None:
    policy.retry_on.clear()  # a list inside the policy: a shallow copy shared it with the host


@pytest.mark.parametrize(
    ("attempts", "edit"), [(1, _more_attempts), (3, _no_cause_retried)], ids=["max_attempts", "retry_on"]
)
async def test_a_retry_policy_edited_after_execute_is_not_the_one_that_runs(
    tmp_path: Path, attempts: int, edit: Callable[[RetryPolicy], None]
) -> None:
    gate = tmp_path / "go-on"
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=1)) as engine:
        blocker = await engine.execute(shell(f"while [ ! -e {gate} ]; do sleep 0.02; done"))
        request = shell("exit 1", retry=RetryPolicy(max_attempts=attempts, backoff_ms=0, jitter=False))
        queued = await engine.execute(request)
        assert request.retry is not None
        edit(request.retry)
        gate.touch()
        await engine.wait(blocker, timeout=20)
        await engine.wait(queued, timeout=20)
        assert (await engine.get_result(queued)).attempts == attempts


def _a_local_kind_of_request() -> type[ExecutionRequest]:
    class Tagged(ExecutionRequest):
        """A host's own kind of request, made in a function (a factory, a test)."""

    return Tagged


async def test_a_plan_of_a_hosts_own_kind_of_request_runs(tmp_path: Path) -> None:
    tagged = _a_local_kind_of_request()
    plan = ExecutionPlan(
        commands=[tagged(command=ShellCommand(command="echo mine"))], strategy=SerialStrategy()
    )
    async with ExecutionEngine(config(tmp_path)) as engine:
        result = await engine.wait(await engine.execute_plan(plan), timeout=20)
        assert isinstance(result, PlanExecutionResult)
        assert result.results[0].stdout == "mine\n"

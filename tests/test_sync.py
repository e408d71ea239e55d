"""SyncExecutionEngine: the same engine for code without an event loop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import config, run, shell

from cloudops_execution_engine import (
    EngineClosed,
    ExecutionPlan,
    ExecutionStatus,
    NotFound,
    ParallelStrategy,
    PlanExecutionResult,
    SyncExecutionEngine,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def test_blocking_calls_mirror_the_async_api(tmp_path: Path) -> None:
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

"""Plans: serial, parallel and dependency-graph execution with progress and results."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import Recorder, config, run, shell

from cloudops_execution_engine import (
    DependencyGraphStrategy,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStatus,
    InvalidPlan,
    NotCompleted,
    NotFound,
    NotRunning,
    ParallelStrategy,
    PlanExecutionResult,
    ProgressEvent,
    SerialStrategy,
)
from cloudops_execution_engine.plans import (
    GraphSchedule,
    ParallelSchedule,
    SerialSchedule,
    check_plan,
    schedule_for,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

C = ExecutionStatus.COMPLETED
F = ExecutionStatus.FAILED
X = ExecutionStatus.CANCELLED
FINAL = ("completed", "failed", "cancelled")


async def run_plan(engine: ExecutionEngine, plan: ExecutionPlan) -> PlanExecutionResult:
    pid = await engine.execute_plan(plan)
    assert pid == plan.id
    result = await engine.wait(pid, timeout=60)
    assert isinstance(result, PlanExecutionResult)
    return result


def order(recorder: Recorder, ids: list[UUID]) -> list[tuple[str, int]]:
    """The plan's lifecycle as (event, command index), in the order the events happened."""
    index = {eid: i for i, eid in enumerate(ids)}
    return [
        (e.event_type, index[e.execution_id])
        for e in recorder.events
        if getattr(e, "execution_id", None) in index and e.event_type in ("started", *FINAL)
    ]


def progress(recorder: Recorder, plan_id: UUID) -> list[ProgressEvent]:
    return [e for e in recorder.events if isinstance(e, ProgressEvent) and e.plan_id == plan_id]


async def settled(recorder: Recorder, plan: ExecutionPlan) -> None:
    total = len(plan.commands)
    await recorder.until(lambda _: len(progress(recorder, plan.id)) == total)


async def test_serial_stops_on_first_error(engine: ExecutionEngine, recorder: Recorder) -> None:
    plan = ExecutionPlan(commands=[run("true"), shell("exit 3"), run("true")], strategy=SerialStrategy())
    result = await run_plan(engine, plan)
    assert result.status is F
    assert [r.status for r in result.results] == [C, F, X]
    assert [r.id for r in result.results] == [c.id for c in plan.commands]
    assert result.stats.model_dump() == {
        "total": 3,
        "completed": 1,
        "failed": 1,
        "cancelled": 1,
        "timeout": 0,
    }
    await settled(recorder, plan)
    ids = [c.id for c in plan.commands]
    assert order(recorder, ids) == [
        ("started", 0),
        ("completed", 0),
        ("started", 1),
        ("failed", 1),
        ("cancelled", 2),
    ]
    assert not result.results[2].log_path.exists()


async def test_serial_without_stop_runs_everything_in_order(
    engine: ExecutionEngine, recorder: Recorder
) -> None:
    plan = ExecutionPlan(
        commands=[shell("exit 1"), run("true"), shell("exit 2")], strategy=SerialStrategy(stop_on_error=False)
    )
    result = await run_plan(engine, plan)
    assert [r.status for r in result.results] == [F, C, F]
    assert [r.exit_code for r in result.results] == [1, 0, 2]
    await settled(recorder, plan)
    ids = [c.id for c in plan.commands]
    assert order(recorder, ids) == [
        ("started", 0),
        ("failed", 0),
        ("started", 1),
        ("completed", 1),
        ("started", 2),
        ("failed", 2),
    ]


async def test_parallel_runs_all_at_once(engine: ExecutionEngine, recorder: Recorder) -> None:
    plan = ExecutionPlan(commands=[run("sleep", "0.3") for _ in range(4)], strategy=ParallelStrategy())
    result = await run_plan(engine, plan)
    assert result.status is C
    await settled(recorder, plan)
    events = [kind for kind, _ in order(recorder, [c.id for c in plan.commands])]
    assert events[:4] == ["started"] * 4, "every command started before any ended"


async def test_parallel_respects_max_concurrency(engine: ExecutionEngine, recorder: Recorder) -> None:
    plan = ExecutionPlan(
        commands=[run("sleep", "0.1") for _ in range(6)], strategy=ParallelStrategy(max_concurrency=2)
    )
    result = await run_plan(engine, plan)
    assert result.stats.completed == 6
    await settled(recorder, plan)
    running = peak = 0
    for kind, _ in order(recorder, [c.id for c in plan.commands]):
        running += 1 if kind == "started" else -1
        peak = max(peak, running)
    assert peak == 2


async def test_diamond_graph_respects_dependencies(engine: ExecutionEngine, recorder: Recorder) -> None:
    plan = ExecutionPlan(
        commands=[run("sleep", "0.1"), run("sleep", "0.2"), run("true"), run("true")],
        strategy=DependencyGraphStrategy(dependencies={1: [0], 2: [0], 3: [1, 2]}),
    )
    result = await run_plan(engine, plan)
    assert result.status is C
    await settled(recorder, plan)
    seq = order(recorder, [c.id for c in plan.commands])
    at = {item: i for i, item in enumerate(seq)}
    assert at[("completed", 0)] < at[("started", 1)]
    assert at[("completed", 0)] < at[("started", 2)]
    assert at[("completed", 1)] < at[("started", 3)]
    assert at[("completed", 2)] < at[("started", 3)]


async def test_failing_middle_node_cancels_its_dependents_only(
    engine: ExecutionEngine, recorder: Recorder
) -> None:
    """0 -> 1 (fails) -> 3 -> 5 and 0 -> 2 -> 4: 3 and 5 never start; the 2/4 branch completes."""
    plan = ExecutionPlan(
        commands=[run("true"), shell("exit 9"), run("true"), run("true"), run("true"), run("true")],
        strategy=DependencyGraphStrategy(dependencies={1: [0], 2: [0], 3: [1], 4: [2], 5: [3]}),
    )
    result = await run_plan(engine, plan)
    assert result.status is F
    assert [r.status for r in result.results] == [C, F, C, X, C, X]
    await settled(recorder, plan)
    ids = [c.id for c in plan.commands]
    assert recorder.types_of(ids[3]) == ["cancelled"]
    assert recorder.types_of(ids[5]) == ["cancelled"]
    marks = progress(recorder, plan.id)
    assert [p.completed for p in marks] == list(range(1, 7))
    assert all(p.total == 6 for p in marks)


async def test_plan_cancelled_midway(engine: ExecutionEngine, recorder: Recorder) -> None:
    plan = ExecutionPlan(
        commands=[run("true"), shell("echo busy; exec sleep 30"), run("true"), run("true")],
        strategy=SerialStrategy(),
    )
    pid = await engine.execute_plan(plan)
    busy = plan.commands[1].id
    await recorder.until(lambda _: "stdout" in recorder.types_of(busy))
    assert await engine.get_status(pid) is ExecutionStatus.RUNNING
    with pytest.raises(NotCompleted):
        await engine.get_plan_result(pid)
    await engine.cancel(pid)
    result = await engine.wait(pid, timeout=30)
    assert isinstance(result, PlanExecutionResult)
    assert result.status is X
    assert [r.status for r in result.results] == [C, X, X, X]
    assert result.stats.cancelled == 3
    await settled(recorder, plan)
    marks = progress(recorder, plan.id)
    assert marks[-1].completed == marks[-1].total == 4
    assert await engine.get_plan_result(pid) == result
    with pytest.raises(NotRunning):
        await engine.cancel(pid)


@pytest.mark.parametrize("stop_on_error", [True, False])
async def test_cancelling_a_later_command_of_a_serial_plan_leaves_those_before_it_to_run(
    engine: ExecutionEngine, recorder: Recorder, tmp_path: Path, stop_on_error: bool
) -> None:
    """Only the command cancelled is: the ones before it in the plan still run, in order."""
    gate = tmp_path / "gate"
    busy = shell(f"echo busy; while [ ! -e '{gate}' ]; do sleep 0.01; done")
    plan = ExecutionPlan(
        commands=[busy, run("true"), run("true"), run("true")],
        strategy=SerialStrategy(stop_on_error=stop_on_error),
    )
    pid = await engine.execute_plan(plan)
    await recorder.until(lambda _: "stdout" in recorder.types_of(busy.id))
    await engine.cancel(plan.commands[3].id)
    assert await engine.get_status(plan.commands[1].id) is ExecutionStatus.PENDING
    gate.touch()
    result = await engine.wait(pid, timeout=30)
    assert isinstance(result, PlanExecutionResult)
    assert [r.status for r in result.results] == [C, C, C, X]
    assert (result.stats.completed, result.stats.cancelled) == (3, 1)


async def test_each_command_is_tracked_under_its_own_id(engine: ExecutionEngine) -> None:
    plan = ExecutionPlan(commands=[run("echo", "one"), run("echo", "two")], strategy=SerialStrategy())
    await run_plan(engine, plan)
    first = await engine.get_result(plan.commands[0].id)
    assert first.stdout == "one\n"
    summaries = {s.id: s for s in await engine.list_executions()}
    assert summaries[plan.id].kind == "plan"
    assert summaries[plan.id].status is C
    assert summaries[plan.commands[1].id].plan_id == plan.id
    logs = await engine.read_logs(plan.id)
    assert "stdout one" in logs
    assert "stdout two" in logs
    with pytest.raises(NotFound):
        await engine.get_plan_result(plan.commands[0].id)


def graph(n: int, deps: dict[int, list[int]]) -> ExecutionPlan:
    return ExecutionPlan(
        commands=[run("true") for _ in range(n)], strategy=DependencyGraphStrategy(dependencies=deps)
    )


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (graph(3, {0: [1], 1: [2], 2: [0]}), "dependency cycle: 0 -> 1 -> 2 -> 0"),
        (graph(4, {3: [2], 2: [1], 1: [2]}), "dependency cycle: 2 -> 1 -> 2"),
        (graph(2, {1: [1]}), "command 1 depends on itself"),
        (graph(2, {1: [5]}), "command 1 depends on command 5, but the plan has commands 0..1"),
        (graph(2, {7: [0]}), "dependencies name command 7, but the plan has commands 0..1"),
        (ExecutionPlan(commands=[], strategy=SerialStrategy()), "the plan has no commands"),
        (
            ExecutionPlan(commands=[run("true")], strategy=ParallelStrategy(max_concurrency=0)),
            "max_concurrency must be at least 1",
        ),
        (
            ExecutionPlan(commands=[run("true", timeout_ms=10**9)], strategy=SerialStrategy()),
            "command 0 .*Timeout exceeds maximum allowed",
        ),
        (
            ExecutionPlan(
                commands=[run("true", working_dir=Path("/no/such/dir"))], strategy=SerialStrategy()
            ),
            "command 0 .*Invalid working directory: /no/such/dir",
        ),
    ],
)
async def test_invalid_plans_are_rejected_and_register_nothing(
    engine: ExecutionEngine, plan: ExecutionPlan, message: str
) -> None:
    with pytest.raises(InvalidPlan, match=message):
        await engine.execute_plan(plan)
    with pytest.raises(NotFound):
        await engine.get_status(plan.id)
    assert await engine.list_executions() == []


async def test_duplicate_ids_are_invalid_plans(engine: ExecutionEngine) -> None:
    request = run("true")
    dup = ExecutionRequest(id=request.id, command=request.command)
    with pytest.raises(InvalidPlan, match="command 1 reuses the id"):
        await engine.execute_plan(ExecutionPlan(commands=[request, dup], strategy=SerialStrategy()))
    await engine.wait(await engine.execute(request), timeout=30)
    with pytest.raises(InvalidPlan, match="already exists"):
        await engine.execute_plan(ExecutionPlan(commands=[request], strategy=SerialStrategy()))
    plan = ExecutionPlan(commands=[run("true")], strategy=SerialStrategy())
    await run_plan(engine, plan)
    with pytest.raises(InvalidPlan, match="already exists"):
        await engine.execute_plan(plan)


async def test_plans_share_the_engine_limit_fairly(tmp_path: Path, recorder: Recorder) -> None:
    """A small plan submitted after a big one finishes long before the big one does."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=2)).with_event_handler(
        recorder
    ) as engine:
        big = ExecutionPlan(commands=[run("sleep", "0.1") for _ in range(30)], strategy=ParallelStrategy())
        small = ExecutionPlan(commands=[run("true"), run("true")], strategy=ParallelStrategy())
        big_id = await engine.execute_plan(big)
        small_id = await engine.execute_plan(small)
        single = await engine.execute(run("true"))
        await engine.wait(small_id, timeout=60)
        await engine.wait(single, timeout=60)
        status = await engine.get_status(big_id)
        assert status is ExecutionStatus.RUNNING, "the small plan waited for the big one"
        started_big = sum(
            1
            for e in recorder.events
            if e.event_type == "started" and e.execution_id in {c.id for c in big.commands}
        )
        assert started_big <= 6
        await engine.wait(big_id, timeout=60)


async def test_plan_json_from_another_service_runs(engine: ExecutionEngine) -> None:
    """A plan in the seed's JSON shape runs as is."""
    text = """{
      "id": "0a0b0c0d-0000-4000-8000-000000000001",
      "description": "from serde",
      "strategy": {"type": "dependency_graph", "dependencies": {"1": [0]}},
      "commands": [
        {"id": "0a0b0c0d-0000-4000-8000-000000000002",
         "command": {"type": "exec", "program": "echo", "args": ["a"]},
         "env": {}, "working_dir": null, "timeout_ms": null,
         "metadata": {"source": "test", "conversation_id": null, "tags": {}}},
        {"id": "0a0b0c0d-0000-4000-8000-000000000003",
         "command": {"type": "shell", "command": "echo b", "shell": "bash"},
         "env": {}, "working_dir": null, "timeout_ms": 5000,
         "metadata": {"source": null, "conversation_id": null, "tags": {}}}
      ],
      "metadata": {"source": null, "conversation_id": null, "tags": {}}
    }"""
    pid = await engine.execute_plan(text)  # type: ignore[arg-type]
    result: Any = await engine.wait(pid, timeout=30)
    assert [r.stdout for r in result.results] == ["a\n", "b\n"]
    assert result.status is C


# -- schedules, without an engine ----------------------------------------------


def plan_of(strategy: Any, size: int) -> ExecutionPlan:
    return ExecutionPlan(commands=[run("true") for _ in range(size)], strategy=strategy)


def test_serial_schedule_releases_one_at_a_time_and_drops_the_rest_on_failure() -> None:
    """One command at a time, in order; the first that does not complete drops the rest."""
    schedule = schedule_for(plan_of(SerialStrategy(), 4))
    assert isinstance(schedule, SerialSchedule)
    assert schedule.limit == 1
    assert schedule.initial() == [0]
    assert schedule.ended(0, True) == ([1], [])
    assert schedule.ended(1, False) == ([], [2, 3])
    assert schedule.ended(2, False) == ([], [])


def test_serial_schedule_without_stop_on_error_goes_on_after_a_failure() -> None:
    """Without `stop_on_error` a failure releases the next command like a success."""
    schedule = schedule_for(plan_of(SerialStrategy(stop_on_error=False), 3))
    assert schedule.initial() == [0]
    assert schedule.ended(0, False) == ([1], [])
    assert schedule.ended(1, True) == ([2], [])
    assert schedule.ended(2, False) == ([], [])


def test_serial_schedule_skips_a_command_that_ended_before_its_turn() -> None:
    """A later command cancelled while it waits is skipped; it fails nothing of the one whose turn it is."""
    schedule = schedule_for(plan_of(SerialStrategy(), 4))
    assert schedule.initial() == [0]
    assert schedule.ended(2, False) == ([], [])
    assert schedule.ended(0, True) == ([1], [])
    assert schedule.ended(1, True) == ([3], [])
    assert schedule.ended(3, True) == ([], [])


def test_parallel_schedule_starts_everything_under_its_limit() -> None:
    """Every command is ready at once; `max_concurrency` is the limit, None leaves only the engine's."""
    schedule = schedule_for(plan_of(ParallelStrategy(max_concurrency=2), 3))
    assert isinstance(schedule, ParallelSchedule)
    assert schedule.limit == 2
    assert schedule.initial() == [0, 1, 2]
    assert schedule.ended(0, False) == ([], [])
    assert schedule_for(plan_of(ParallelStrategy(), 1)).limit is None


def test_graph_schedule_releases_a_command_when_its_last_dependency_completes() -> None:
    """A diamond: 3 waits for 1 and 2, which wait for 0; a repeated edge counts once."""
    schedule = schedule_for(plan_of(DependencyGraphStrategy(dependencies={1: [0, 0], 2: [0], 3: [1, 2]}), 4))
    assert isinstance(schedule, GraphSchedule)
    assert schedule.limit is None
    assert schedule.initial() == [0]
    assert sorted(schedule.ended(0, True)[0]) == [1, 2]
    assert schedule.ended(1, True) == ([], [])
    assert schedule.ended(2, True) == ([3], [])


def test_graph_schedule_drops_every_transitive_dependent_of_a_failure_once() -> None:
    """Independent branches go on; a dependent reachable twice is dropped once and never released."""
    deps = {1: [0], 2: [0], 3: [1, 2], 4: [3], 6: [5]}
    schedule = schedule_for(plan_of(DependencyGraphStrategy(dependencies=deps), 7))
    assert schedule.initial() == [0, 5]
    assert schedule.ended(0, True) == ([1, 2], [])
    assert schedule.ended(1, False) == ([], [3, 4])
    assert schedule.ended(2, True) == ([], [])
    assert schedule.ended(5, True) == ([6], [])


class UnknownStrategy:
    type = "round_robin"


def test_an_unknown_strategy_fails_loudly_rather_than_running_as_another() -> None:
    """A strategy no schedule is written for is an error, not a parallel plan."""
    strategy: Any = UnknownStrategy()
    plan = ExecutionPlan.model_construct(commands=[run("true")], strategy=strategy, id=UUID(int=1))
    with pytest.raises(AssertionError, match="UnknownStrategy"):
        check_plan(plan)
    with pytest.raises(AssertionError, match="UnknownStrategy"):
        schedule_for(plan)


async def test_max_retained_executions_counts_a_plans_commands(tmp_path: Path) -> None:
    """A long-lived host running plans keeps as many finished executions as it asked for, not plans."""
    async with ExecutionEngine(config(tmp_path, max_retained_executions=10)) as engine:
        plans = [
            ExecutionPlan(commands=[run("true") for _ in range(8)], strategy=ParallelStrategy())
            for _ in range(3)
        ]
        for plan in plans:
            await engine.wait(await engine.execute_plan(plan), timeout=30)
        kept = [s.id for s in await engine.list_executions()]
        assert len(kept) == 9  # the newest plan and its commands
        for old in plans[:2]:
            with pytest.raises(NotFound):
                await engine.get_plan_result(old.id)
            with pytest.raises(NotFound):
                await engine.get_result(old.commands[0].id)
        assert (await engine.get_plan_result(plans[2].id)).status is ExecutionStatus.COMPLETED


@pytest.mark.parametrize("drops", ["graph", "stop_on_error"])
async def test_a_plan_whose_failure_drops_its_other_commands_ends_once(
    tmp_path: Path, recorder: Recorder, drops: str
) -> None:
    """A failed command cancels those that now cannot run, and the last of them ends the plan: only once.

    Ended twice, the plan was retired twice: the one that had just ended was
    forgotten at once, and the count of retained executions stayed wrong, so
    that later ones were forgotten early.
    """
    strategy: Any = (
        DependencyGraphStrategy(dependencies={index: [0] for index in range(1, 6)})
        if drops == "graph"
        else SerialStrategy(stop_on_error=True)
    )
    plan = ExecutionPlan(commands=[run("false"), *(run("true") for _ in range(5))], strategy=strategy)
    config_ = config(tmp_path, max_retained_executions=10)
    async with ExecutionEngine(config_).with_event_handler(recorder) as engine:
        await engine.wait(await engine.execute_plan(plan), timeout=30)
        assert (await engine.get_plan_result(plan.id)).status is ExecutionStatus.FAILED
        singles = [await engine.execute(run("true")) for _ in range(8)]
        for single in singles:
            await engine.wait(single, timeout=30)
        for single in singles:
            assert (await engine.get_result(single)).status is ExecutionStatus.COMPLETED
    progress = [event for event in recorder.events if isinstance(event, ProgressEvent)]
    assert [event.completed for event in progress if event.plan_id == plan.id] == [1, 2, 3, 4, 5, 6]

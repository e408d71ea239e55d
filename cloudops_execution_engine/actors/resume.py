"""Resuming a plan: the same commands and strategy, with what completed before counted as done.

`plan_to_resume` makes the new plan from an ended one: a new plan id, the
commands that completed keep their ids (their results are reused), the others
get new ids. `ResumedSchedule` runs the plan's own strategy and, whenever it
makes one of the reused commands ready, ends it at once as completed, so the
strategy carries on past it as if it had just run: serial goes to the next
command, a dependency graph releases its dependents.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from pathlib import Path
from uuid import UUID, uuid4

from ..plans import Schedule
from ..requests import ExecutionPlan, ExecutionRequest
from ..results import ExecutionResult, ExecutionStatus
from .records import PlanRun, Record

__all__ = ["ResumedSchedule", "plan_to_resume", "prepare_resumed", "reused_record"]


def plan_to_resume(old: PlanRun) -> tuple[ExecutionPlan, dict[int, ExecutionResult]]:
    """The new plan, and by index the results of the commands it reuses."""
    reused: dict[int, ExecutionResult] = {}
    commands: list[ExecutionRequest] = []
    for index, (request, record) in enumerate(zip(old.plan.commands, old.records, strict=True)):
        result = record.result
        if record.status is ExecutionStatus.COMPLETED and result is not None:
            reused[index] = result
            commands.append(request.model_copy(update={"id": result.id}))
        else:
            commands.append(request.model_copy(update={"id": uuid4()}))
    plan = old.plan.model_copy(update={"id": uuid4(), "commands": commands})
    return plan, reused


def reused_record(
    request: ExecutionRequest, result: ExecutionResult, index: int, timeout_ms: int, submitted_at: datetime
) -> Record:
    """A command of the new plan that completed before: ended, with its result, never run.

    It keeps its submission, with the plan it ran in: listed, it comes before what the new plan runs.
    """
    record = Record(request, [], Path(result.log_path), timeout_ms, index=index)
    record.submitted_at = submitted_at
    record.status = ExecutionStatus.COMPLETED
    record.result = result
    record.started_at = result.started_at
    record.mark_ended()
    return record


def prepare_resumed(run: PlanRun, reused: dict[int, ExecutionResult], resumed_from: UUID) -> None:
    """Count the reused commands as ended and let the schedule step over them."""
    run.schedule = ResumedSchedule(run.schedule, set(reused))
    run.ended = len(reused)
    run.resumed_from = resumed_from


class ResumedSchedule:
    """A plan's schedule in which the commands in `done` end, completed, as soon as they are ready."""

    def __init__(self, inner: Schedule, done: set[int]) -> None:
        self._inner = inner
        self._done = done

    @property
    def limit(self) -> int | None:
        return self._inner.limit

    def initial(self) -> list[int]:
        ready, _dropped = self._step_over(self._inner.initial(), [])
        return ready

    def ended(self, index: int, succeeded: bool) -> tuple[list[int], list[int]]:
        ready, dropped = self._inner.ended(index, succeeded)
        return self._step_over(ready, list(dropped))

    def _step_over(self, ready: list[int], dropped: list[int]) -> tuple[list[int], list[int]]:
        out: list[int] = []
        queue = deque(ready)
        while queue:
            index = queue.popleft()
            if index in self._done:
                more, gone = self._inner.ended(index, True)
                queue.extend(more)
                dropped.extend(gone)
            else:
                out.append(index)
        return out, dropped

"""The one place that builds events and results from what the supervisor learns.

Events and results on the per-execution path are built without validation
(`construct_unchecked`): every value comes from the engine itself and has the right type,
and validating each would cost more than the rest of the path. One function
builds every `ExecutionResult`, from a worker's `Finished` or for a command no
worker reported on (never started, or its worker died).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from .._model import construct_unchecked, utc_from_timestamp, utcnow
from ..errors import Cancelled
from ..events import (
    CancelledEvent,
    CompletedEvent,
    ExecutionEvent,
    FailedEvent,
    ProgressEvent,
    StartedEvent,
    StderrEvent,
    StdoutEvent,
)
from ..protocol import Finished, Stream
from ..results import ExecutionResult, ExecutionStats, ExecutionStatus, PlanExecutionResult, ResourceUsage
from .records import PlanRun, Record

__all__ = [
    "LineEvents",
    "cancelled_between_attempts",
    "end_event",
    "plan_result",
    "progress_event",
    "result",
    "result_of_finished",
    "result_without_worker",
    "started_event",
]

_LINE_FIELDS = {"event_type", "execution_id", "line", "timestamp"}
_STARTED_FIELDS = {"event_type", "execution_id", "command", "timestamp"}
# Every field, for `construct_unchecked` on the per-execution path.
_RESULT_FIELDS = set(ExecutionResult.model_fields)
_USAGE_FIELDS = set(ResourceUsage.model_fields)
_COMPLETED_FIELDS = set(CompletedEvent.model_fields)
_CANCELLED_FIELDS = set(CancelledEvent.model_fields)
_FAILED_FIELDS = set(FailedEvent.model_fields)


def started_event(record: Record) -> StartedEvent:
    values = {
        "event_type": "started",
        "execution_id": record.id,
        "command": record.display,
        "timestamp": record.started_at,
    }
    return construct_unchecked(StartedEvent, values, _STARTED_FIELDS)


# The slots `construct_unchecked` fills, set through their descriptors: on the
# per-line path, a third less than a call to it with `object.__setattr__`.
_SET_DICT, _SET_FIELDS, _SET_EXTRA, _SET_PRIVATE = (
    vars(BaseModel)[name].__set__
    for name in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")
)


class LineEvents:
    """The `stdout` or `stderr` events of one `Output` frame, one per line, made as they are taken.

    Iterating makes each event just before it is wanted, so a handler that
    drops an event after its call leaves it garbage at once. Made all at once
    (`events`), a frame's events outlive a collection of the cyclic garbage
    collector's youngest generation and are moved to the older ones, whose
    collections then cost more than making the events did. Every event is what
    `construct_unchecked` makes, equal (and equal in JSON) to what the
    validating constructor makes of the same values.
    """

    __slots__ = ("_kind", "_values", "lines")

    def __init__(self, record_id: UUID, stream: int, timestamp: float, lines: list[str]) -> None:
        self._kind: type[StdoutEvent | StderrEvent]
        if stream == Stream.STDOUT:
            self._kind, tag = StdoutEvent, "stdout"
        else:
            self._kind, tag = StderrEvent, "stderr"
        # Every field but the line, the same for every event: each event's
        # values are a copy, a third cheaper than a dict display of them.
        stamp = utc_from_timestamp(timestamp)
        self._values = {"event_type": tag, "execution_id": record_id, "line": "", "timestamp": stamp}
        self.lines = lines

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self) -> Iterator[StdoutEvent | StderrEvent]:
        # Everything in locals: this runs once per line.
        kind, fields, copy = self._kind, _LINE_FIELDS, self._values.copy
        new = kind.__new__
        set_dict, set_fields, set_extra, set_private = _SET_DICT, _SET_FIELDS, _SET_EXTRA, _SET_PRIVATE
        for line in self.lines:
            event = new(kind)
            values = copy()
            values["line"] = line
            set_dict(event, values)
            set_fields(event, fields)
            set_extra(event, None)
            set_private(event, None)
            yield event

    def events(self) -> list[ExecutionEvent]:
        """Every event at once: for a frame that several listeners share, so that all get the same objects."""
        return list(self)


def result(
    record: Record,
    status: ExecutionStatus,
    started: datetime,
    completed: datetime,
    *,
    exit_code: int = -1,
    error: str | None = None,
    stdout: str = "",
    stderr: str = "",
    stdout_truncated: bool = False,
    stderr_truncated: bool = False,
    usage: list[float] | None = None,
) -> ExecutionResult:
    values = {
        "id": record.id,
        "status": status,
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "duration": completed - started,
        "started_at": started,
        "completed_at": completed,
        "log_path": record.log_path,
        "error": error,
        "resource_usage": construct_unchecked(
            ResourceUsage,
            {"user_cpu_s": float(usage[0]), "system_cpu_s": float(usage[1]), "max_rss_bytes": int(usage[2])},
            _USAGE_FIELDS,
        )
        if usage
        else None,
        "stdout_truncated": stdout_truncated,
        "stderr_truncated": stderr_truncated,
        "attempts": record.attempt,
    }
    return construct_unchecked(ExecutionResult, values, _RESULT_FIELDS)


def result_of_finished(record: Record, message: Finished) -> ExecutionResult:
    started = record.started_at
    if started is None or record.started_ts != message.started_at:
        started = utc_from_timestamp(message.started_at)
    return result(
        record,
        ExecutionStatus(message.status),
        started,
        utc_from_timestamp(message.completed_at),
        exit_code=message.exit_code,
        error=message.error,
        stdout=message.stdout,
        stderr=message.stderr,
        stdout_truncated=message.stdout_truncated,
        stderr_truncated=message.stderr_truncated,
        usage=message.rusage,
    )


def result_without_worker(record: Record, status: ExecutionStatus, error: str) -> ExecutionResult:
    """The result of a command that no worker reported on: never started, or its worker died."""
    now = utcnow()
    return result(record, status, record.started_at or now, now, error=error)


def cancelled_between_attempts(record: Record, last: ExecutionResult | None) -> ExecutionResult:
    """A retried execution cancelled while no attempt ran: `cancelled`, with the last attempt's output.

    Also the result when a cancel reached an attempt that had just ended on its
    own and would have been run again: the execution as a whole was cancelled.
    """
    error = str(Cancelled())
    if last is None:
        return result_without_worker(record, ExecutionStatus.CANCELLED, error)
    now = utcnow()
    changes = {
        "status": ExecutionStatus.CANCELLED,
        "error": error,
        "completed_at": now,
        "duration": now - last.started_at,
        "attempts": record.attempt,
    }
    return last.model_copy(update=changes)


def end_event(record_id: UUID, result: ExecutionResult) -> Any:
    """The one terminal event of an execution: `completed`, `cancelled`, or `failed` (timeouts too)."""
    now = result.completed_at or utcnow()
    status = result.status
    if status is ExecutionStatus.COMPLETED:
        values = {"event_type": "completed", "execution_id": record_id, "result": result, "timestamp": now}
        return construct_unchecked(CompletedEvent, values, _COMPLETED_FIELDS)
    if status is ExecutionStatus.CANCELLED:
        values = {"event_type": "cancelled", "execution_id": record_id, "timestamp": now}
        return construct_unchecked(CancelledEvent, values, _CANCELLED_FIELDS)
    values = {
        "event_type": "failed",
        "execution_id": record_id,
        "error": result.error or "failed",
        "timestamp": now,
    }
    return construct_unchecked(FailedEvent, values, _FAILED_FIELDS)


def progress_event(run: PlanRun, record: Record) -> ProgressEvent:
    return ProgressEvent.model_construct(
        plan_id=run.id,
        completed=run.ended,
        total=len(run.records),
        current_command=record.display,
        timestamp=utcnow(),
    )


def plan_result(run: PlanRun) -> PlanExecutionResult:
    """The plan's result from its records' results; sets the plan's final status too."""
    results: list[ExecutionResult] = []
    for record in run.records:
        assert record.result is not None
        results.append(record.result)
    stats = ExecutionStats.of(record.status for record in run.records)
    # In SPEC's order: a cancel that came as the last command ended leaves a plan whose
    # every command completed, and such a plan completed.
    if stats.completed == stats.total:
        run.status = ExecutionStatus.COMPLETED
    elif run.cancelled:
        run.status = ExecutionStatus.CANCELLED
    else:
        run.status = ExecutionStatus.FAILED
    return PlanExecutionResult.model_construct(
        plan_id=run.id,
        status=run.status,
        results=results,
        total_duration=utcnow() - run.started_at,
        stats=stats,
        resumed_from=run.resumed_from,
    )

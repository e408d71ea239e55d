"""Events emitted while executions run, and the handler protocol that receives them."""

from __future__ import annotations

from typing import Annotated, Literal, Protocol, runtime_checkable
from uuid import UUID

from pydantic import Field

from ._model import Usize, UtcDateTime, Value, utcnow
from .results import ExecutionResult

__all__ = [
    "CancelledEvent",
    "CompletedEvent",
    "EventHandler",
    "ExecutionEvent",
    "FailedEvent",
    "ProgressEvent",
    "StartedEvent",
    "StderrEvent",
    "StdoutEvent",
]


class StartedEvent(Value):
    event_type: Literal["started"] = "started"
    """Always "started": the command began."""
    execution_id: UUID
    """The execution it is about."""
    command: str
    """The command, as text."""
    timestamp: UtcDateTime = Field(default_factory=utcnow)
    """When the event was made (UTC, RFC 3339)."""


class StdoutEvent(Value):
    event_type: Literal["stdout"] = "stdout"
    """Always "stdout": a line of standard output."""
    execution_id: UUID
    """The execution it is about."""
    line: str
    """The line, without its newline."""
    timestamp: UtcDateTime = Field(default_factory=utcnow)
    """When the event was made (UTC, RFC 3339)."""


class StderrEvent(Value):
    event_type: Literal["stderr"] = "stderr"
    """Always "stderr": a line of standard error."""
    execution_id: UUID
    """The execution it is about."""
    line: str
    """The line, without its newline."""
    timestamp: UtcDateTime = Field(default_factory=utcnow)
    """When the event was made (UTC, RFC 3339)."""


class CompletedEvent(Value):
    event_type: Literal["completed"] = "completed"
    """Always "completed": the command completed."""
    execution_id: UUID
    """The execution it is about."""
    result: ExecutionResult
    """Its result."""
    timestamp: UtcDateTime = Field(default_factory=utcnow)
    """When the event was made (UTC, RFC 3339)."""


class FailedEvent(Value):
    event_type: Literal["failed"] = "failed"
    """Always "failed": the command failed or timed out."""
    execution_id: UUID
    """The execution it is about."""
    error: str
    """Why, in words."""
    timestamp: UtcDateTime = Field(default_factory=utcnow)
    """When the event was made (UTC, RFC 3339)."""


class CancelledEvent(Value):
    event_type: Literal["cancelled"] = "cancelled"
    """Always "cancelled": the command was cancelled."""
    execution_id: UUID
    """The execution it is about."""
    timestamp: UtcDateTime = Field(default_factory=utcnow)
    """When the event was made (UTC, RFC 3339)."""


class ProgressEvent(Value):
    event_type: Literal["progress"] = "progress"
    """Always "progress": one of a plan's commands ended."""
    plan_id: UUID
    """The plan it is about."""
    completed: Usize
    """Commands of the plan that have ended, whatever their status."""
    total: Usize
    """Commands in the plan."""
    current_command: str | None = None
    """The command that just ended, as text."""
    timestamp: UtcDateTime = Field(default_factory=utcnow)
    """When the event was made (UTC, RFC 3339)."""


ExecutionEvent = Annotated[
    StartedEvent | StdoutEvent | StderrEvent | CompletedEvent | FailedEvent | CancelledEvent | ProgressEvent,
    Field(discriminator="event_type"),
]


@runtime_checkable
class EventHandler(Protocol):
    """Receives every event of the engine it is attached to, in order per execution."""

    async def on_event(self, event: ExecutionEvent) -> None: ...

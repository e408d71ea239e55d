"""Events emitted while executions run, and the handler protocol that receives them."""

from __future__ import annotations

from typing import Annotated, Literal, Protocol, runtime_checkable
from uuid import UUID

from pydantic import Field

from ._model import Model, UtcDateTime, utcnow
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


class StartedEvent(Model):
    event_type: Literal["started"] = "started"
    execution_id: UUID
    command: str
    timestamp: UtcDateTime = Field(default_factory=utcnow)


class StdoutEvent(Model):
    event_type: Literal["stdout"] = "stdout"
    execution_id: UUID
    line: str
    timestamp: UtcDateTime = Field(default_factory=utcnow)


class StderrEvent(Model):
    event_type: Literal["stderr"] = "stderr"
    execution_id: UUID
    line: str
    timestamp: UtcDateTime = Field(default_factory=utcnow)


class CompletedEvent(Model):
    event_type: Literal["completed"] = "completed"
    execution_id: UUID
    result: ExecutionResult
    timestamp: UtcDateTime = Field(default_factory=utcnow)


class FailedEvent(Model):
    event_type: Literal["failed"] = "failed"
    execution_id: UUID
    error: str
    timestamp: UtcDateTime = Field(default_factory=utcnow)


class CancelledEvent(Model):
    event_type: Literal["cancelled"] = "cancelled"
    execution_id: UUID
    timestamp: UtcDateTime = Field(default_factory=utcnow)


class ProgressEvent(Model):
    event_type: Literal["progress"] = "progress"
    plan_id: UUID
    completed: int
    total: int
    current_command: str | None = None
    timestamp: UtcDateTime = Field(default_factory=utcnow)


ExecutionEvent = Annotated[
    StartedEvent | StdoutEvent | StderrEvent | CompletedEvent | FailedEvent | CancelledEvent | ProgressEvent,
    Field(discriminator="event_type"),
]


@runtime_checkable
class EventHandler(Protocol):
    """Receives every event of the engine it is attached to, in order per execution."""

    async def on_event(self, event: ExecutionEvent) -> None: ...

"""What the engine reports: statuses, results, summaries and statistics."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Literal
from uuid import UUID

from pydantic import Field

from ._model import Duration, Model, UtcDateTime

__all__ = [
    "ExecutionResult",
    "ExecutionStats",
    "ExecutionStatus",
    "ExecutionSummary",
    "PlanExecutionResult",
    "ResourceUsage",
]


class ExecutionStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def is_final(self) -> bool:
        return self not in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)


class ResourceUsage(Model):
    """The kernel's accounting for the command and the descendants it waited for."""

    user_cpu_s: float
    system_cpu_s: float
    max_rss_bytes: int
    _positional: ClassVar[tuple[str, ...]] = ("user_cpu_s", "system_cpu_s", "max_rss_bytes")


class ExecutionResult(Model):
    id: UUID
    status: ExecutionStatus
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    duration: Duration
    started_at: UtcDateTime
    completed_at: UtcDateTime | None = None
    log_path: Path
    error: str | None = None
    resource_usage: ResourceUsage | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    attempts: int = Field(default=1, exclude_if=lambda v: v == 1)
    """How many times the command ran (more than one under a `RetryPolicy`)."""


class ExecutionStats(Model):
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timeout: int = 0


class PlanExecutionResult(Model):
    plan_id: UUID
    status: ExecutionStatus
    results: list[ExecutionResult]
    total_duration: Duration
    stats: ExecutionStats
    resumed_from: UUID | None = Field(default=None, exclude_if=lambda v: v is None)
    """The plan this one resumed, through `resume_plan`."""


class ExecutionSummary(Model):
    id: UUID
    status: ExecutionStatus
    started_at: UtcDateTime
    duration: Duration | None = None
    kind: Literal["command", "plan"] = "command"
    plan_id: UUID | None = Field(default=None, description="The plan this command belongs to.")

"""What the engine reports: statuses, results, summaries and statistics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Literal
from uuid import UUID

from pydantic import Field

from ._model import (
    I32,
    U64,
    Duration,
    FiniteF64,
    NanoDateTime,
    NanoDuration,
    PositiveU32,
    StrictBool,
    Usize,
    UtcDateTime,
    Value,
)

__all__ = [
    "ExecutionResult",
    "ExecutionStats",
    "ExecutionStatus",
    "ExecutionSummary",
    "NanoDateTime",
    "NanoDuration",
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


class ResourceUsage(Value):
    """The kernel's accounting for the command and the descendants it waited for."""

    user_cpu_s: FiniteF64
    """CPU time in user mode, in seconds."""
    system_cpu_s: FiniteF64
    """CPU time in the kernel, in seconds."""
    max_rss_bytes: U64
    """Peak resident memory of its largest process, in bytes."""
    _positional: ClassVar[tuple[str, ...]] = ("user_cpu_s", "system_cpu_s", "max_rss_bytes")


class ExecutionResult(Value):
    id: UUID
    """The execution's id."""
    status: ExecutionStatus
    """How it ended: completed, failed, timeout or cancelled."""
    exit_code: I32
    """The command's exit code; -N when signal N killed it; -1 when it did not start or has none."""
    stdout: str = ""
    """Its standard output, up to the engine's max_output_bytes."""
    stderr: str = ""
    """Its standard error, up to the engine's max_output_bytes."""
    duration: Duration
    """How long it ran, as seconds and nanoseconds."""
    started_at: UtcDateTime
    """When it started (UTC, RFC 3339)."""
    completed_at: UtcDateTime | None = None
    """When it ended (UTC, RFC 3339); None while it runs."""
    log_path: Path
    """The log file that holds all of its output."""
    error: str | None = None
    """Why it did not complete, in words; None when it did."""
    resource_usage: ResourceUsage | None = None
    """The kernel's accounting of its CPU time and memory; None when it did not run."""
    stdout_truncated: StrictBool = False
    """stdout was cut at max_output_bytes; the log file has all of it."""
    stderr_truncated: StrictBool = False
    """stderr was cut at max_output_bytes; the log file has all of it."""
    attempts: PositiveU32 = Field(default=1, exclude_if=lambda v: v == 1)
    """How many times the command ran (more than one under a `RetryPolicy`)."""


class ExecutionStats(Value):
    total: Usize = 0
    """Commands in the plan."""
    completed: Usize = 0
    """Commands that completed."""
    failed: Usize = 0
    """Commands that failed."""
    cancelled: Usize = 0
    """Commands cancelled, run or not."""
    timeout: Usize = 0
    """Commands that timed out."""

    @classmethod
    def of(cls, statuses: Iterable[ExecutionStatus]) -> ExecutionStats:
        """The counts of a plan whose commands ended in `statuses`, one each."""
        counts = Counter(statuses)
        return cls(
            total=sum(counts.values()),
            completed=counts[ExecutionStatus.COMPLETED],
            failed=counts[ExecutionStatus.FAILED],
            cancelled=counts[ExecutionStatus.CANCELLED],
            timeout=counts[ExecutionStatus.TIMEOUT],
        )


class PlanExecutionResult(Value):
    plan_id: UUID
    """The plan's id."""
    status: ExecutionStatus
    """completed when every command completed; otherwise failed or cancelled."""
    results: list[ExecutionResult]
    """One result per command, in the plan's order."""
    total_duration: Duration
    """From the plan's start to its end, as seconds and nanoseconds."""
    stats: ExecutionStats
    """How many commands ended in each status."""
    resumed_from: UUID | None = Field(default=None, exclude_if=lambda v: v is None)
    """The plan this one resumed, through `resume_plan`."""


class ExecutionSummary(Value):
    id: UUID
    """The execution's or plan's id."""
    status: ExecutionStatus
    """Its status now: pending, running, completed, failed, timeout or cancelled."""
    started_at: UtcDateTime
    """When it started, or was submitted if it has not (UTC, RFC 3339)."""
    duration: Duration | None = None
    """How long it ran, as seconds and nanoseconds; None while it runs."""
    kind: Literal["command", "plan"] | None = Field(default=None, exclude_if=lambda v: v is None)
    """command or plan; None when not known: a summary written by the crate, which has no such field."""
    plan_id: UUID | None = Field(default=None, exclude_if=lambda v: v is None)
    """The plan this command belongs to; None for a plan or a command of no plan."""

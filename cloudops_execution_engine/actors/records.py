"""What the supervisor keeps for each execution and plan while it runs and after it ends.

A `Record` is one command, submitted alone or as part of a plan; a `PlanRun`
is one plan and its records. Both carry their status and, once ended, their
result, and let waiters wait for the end. They hold what a `Run` needs and
what queries answer, never the request model itself, so a finished record
stays small. Stores (`store.py`) keep them; the scheduler (`scheduler.py`)
moves them along.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from .._model import utcnow
from ..commands import AwsCliCommand, ExecCommand, ShellCommand
from ..logfiles import log_path_for
from ..plans import Schedule, schedule_for
from ..requests import ExecutionPlan, ExecutionRequest
from ..results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult
from .admission import NO_OPTIONS
from .retries import Retrying

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from ..commands import Command
    from .pool import WorkerHandle

__all__ = ["COMPLETED", "FAILED", "PENDING", "RUNNING", "Ending", "PlanRun", "Record"]

PENDING = ExecutionStatus.PENDING
RUNNING = ExecutionStatus.RUNNING
COMPLETED = ExecutionStatus.COMPLETED
FAILED = ExecutionStatus.FAILED


class Ending:
    """What waiters of an execution or plan wait on.

    The `asyncio.Event` is made only when someone waits while it runs, and let
    go once it is set: an Event with its deque costs about 0.8 KB, and a
    long-lived host keeps many finished executions that nobody waits on.
    """

    __slots__ = ("_event", "settled")
    status: ExecutionStatus

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        # Set once the end has been announced: after the store made the result
        # durable, which may come a little after the status became final.
        self.settled = False

    def end_event(self) -> asyncio.Event:
        event = self._event
        if event is None:
            event = asyncio.Event()
            if self.settled:
                event.set()
            else:
                self._event = event
        return event

    def mark_ended(self) -> None:
        self.settled = True
        if self._event is not None:
            self._event.set()
            self._event = None


# Commands whose display is their argv, quoted (`Command.display`).
_SHOWN_AS_ARGV = (ExecCommand, AwsCliCommand)


class Record(Ending):
    """One command: submitted alone or as part of a plan."""

    __slots__ = (
        "_command",
        "_display",
        "_log_dir",
        "_log_path",
        "argv",
        "attempt",
        "cancel_sent",
        "cwd",
        "env",
        "id",
        "index",
        "key",
        "options",
        "pid",
        "plan",
        "result",
        "retry",
        "span",
        "started_at",
        "started_ts",
        "status",
        "submitted_at",
        "timeout_ms",
        "trace_id",
        "worker",
    )

    def __init__(
        self,
        request: ExecutionRequest,
        argv: list[str],
        log_path: Path | None,
        timeout_ms: int,
        index: int = -1,
        log_dir: Path | None = None,
    ) -> None:
        """`log_path`, or else `log_dir`: the log is then `<log_dir>/<id>.log`, made when first asked for.

        A pathlib join is about 15 µs of an `execute()` when its code is cold, most of
        the call; the path is first needed when the command is sent, a turn later.
        """
        self.id = request.id
        self.key = request.id.bytes
        # What the Run needs, not the request: a finished record should not keep the model alive,
        # and the host may edit its request after `execute()` (its env, its command's args).
        self.env = dict(request.env)
        self.argv = argv
        self.cwd = os.fsencode(request.cwd())
        # The command's display (shlex quoting) is made when first asked for, as the log path is:
        # from the argv it runs where that is what the display quotes, else from the command.
        command = request.command
        self._command: Command | None = None
        self._display: str | None = None
        if type(command) is ShellCommand:
            self._display = command.command
        elif not (argv and type(command) in _SHOWN_AS_ARGV):
            self._command = command
        self._log_path = log_path
        self._log_dir = log_dir
        self.timeout_ms = timeout_ms
        self.status = PENDING
        self.result: ExecutionResult | None = None
        self.submitted_at = utcnow()
        self.started_at: datetime | None = None
        self.started_ts = 0.0  # as the worker sent it, so Finished can reuse started_at
        self.worker: WorkerHandle | None = None
        self.pid = 0
        self.plan: PlanRun | None = None
        self.index = index
        # The per-request options as the Run carries them (`admission.RunOptions`).
        self.options = NO_OPTIONS
        # The attempt running now, or the last one made (more than 1 only under a `RetryPolicy`).
        self.attempt = 1
        # A cancel was sent to its worker: should that worker die before it answers, it was cancelled.
        self.cancel_sent = False
        # A copy: the host's policy object may be edited after `execute()`.
        self.retry = Retrying(request.retry.model_copy(deep=True)) if request.retry is not None else None
        # Its OpenTelemetry span while it runs, when the host traces (telemetry.py); once
        # ended only the span's trace id is kept, for log lines: an ended span is kilobytes.
        self.span: Span | None = None
        self.trace_id = 0
        super().__init__()

    @property
    def display(self) -> str:
        """The command as its log header and events show it."""
        display = self._display
        if display is None:
            if self._command is None:
                display = self._display = shlex.join(self.argv)
            else:
                display = self._display = self._command.display()
                self._command = None  # a record does not keep the request's models
        return display

    @display.setter
    def display(self, value: str) -> None:
        self._display = value
        self._command = None

    @property
    def log_path(self) -> Path:
        path = self._log_path
        if path is None:
            # Made on the loop, or by the journal's writer; either makes the same path.
            assert self._log_dir is not None, "a record has a log path or a log directory"
            path = self._log_path = log_path_for(self._log_dir, self.id)
        return path

    def summary(self) -> ExecutionSummary:
        return ExecutionSummary(
            id=self.id,
            status=self.status,
            started_at=self.started_at or self.submitted_at,
            duration=self.result.duration if self.result else None,
            kind="command",
            plan_id=self.plan.id if self.plan else None,
        )


class PlanRun(Ending):
    """One plan: its records, which of them are ready to start, and its progress."""

    __slots__ = (
        "cancelled",
        "ended",
        "id",
        "masked",
        "plan",
        "queued",
        "ready",
        "records",
        "result",
        "resumed_from",
        "running",
        "schedule",
        "span",
        "started_at",
        "status",
        "trace_id",
    )

    def __init__(self, plan: ExecutionPlan, records: list[Record]) -> None:
        self.id = plan.id
        self.plan = plan
        # Read back from a journal row that had the engine's secrets masked: not the plan that ran.
        self.masked = False
        self.records = records
        for record in records:
            record.plan = self
        self.schedule: Schedule = schedule_for(plan)
        self.ready: deque[int] = deque()
        self.running = 0
        self.ended = 0
        self.status = RUNNING
        self.cancelled = False
        self.queued = False
        self.started_at = utcnow()
        self.result: PlanExecutionResult | None = None
        self.resumed_from: UUID | None = None  # the plan this one resumes (`resume_plan`)
        self.span: Span | None = None
        self.trace_id = 0
        super().__init__()

    def can_take(self) -> bool:
        limit = self.schedule.limit
        return bool(self.ready) and (limit is None or self.running < limit)

    def take(self) -> Record | None:
        while self.ready:
            record = self.records[self.ready.popleft()]
            if record.status is PENDING:
                self.running += 1
                return record
        return None

    def summary(self) -> ExecutionSummary:
        return ExecutionSummary(
            id=self.id,
            status=self.status,
            started_at=self.started_at,
            duration=self.result.total_duration if self.result else None,
            kind="plan",
        )

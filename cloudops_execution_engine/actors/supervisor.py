"""The supervisor: the engine's state, in the host process, on the host's loop.

    host code ──execute()/execute_plan()──▶ Supervisor ──Run/Cancel frames──▶ pipe ──▶ Worker
        ▲                                     │   ▲                                       │
        └──────── handlers (EventBus) ◀───────┘   └──── Started/Output/Finished ◀─ pipe ◀─┘
                                                                                 spawns, reads,
                                                                                 kills, reaps the
                                                                                 command trees

The supervisor owns the registry of executions and plans, the queue of work
waiting for one of `max_concurrent_executions` slots, plan scheduling, and the
event bus. It never blocks: everything is a callback on the host loop, and the
one slow job (finding the trees of a dead worker) runs in a thread.

The queue is fair: it holds sources (a single request, or a plan with commands
ready to start) and takes one command from the source at its head, then puts
a plan that still has ready commands at the back. Single requests start in
arrival order; a large plan cannot starve work submitted after it.

The pool (`pool.py`) owns worker processes and pipes; the worker (`worker.py`)
runs commands; `process_tree.py` finds and kills what a command started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from .._model import trusted, utc_from_timestamp, utcnow
from ..config import ExecutionConfig
from ..errors import (
    EngineClosed,
    InvalidCommand,
    InvalidPlan,
    IoError,
    NotCompleted,
    NotFound,
    NotRunning,
    SpawnFailed,
    ValidationError,
)
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
from ..logfiles import log_path_for, prepare_log_dir
from ..plans import PlanSchedule, check_plan
from ..protocol import (
    Cancel,
    Credit,
    Finished,
    Message,
    Output,
    Run,
    Started,
    Stream,
    frame_limit_for,
    output_weight,
)
from ..requests import ExecutionPlan, ExecutionRequest
from ..results import (
    ExecutionResult,
    ExecutionStats,
    ExecutionStatus,
    ExecutionSummary,
    PlanExecutionResult,
    ResourceUsage,
)
from .handlers import EventBus
from .local_pool import LocalWorkerPool
from .pool import WorkerHandle, WorkerPool, WorkerStartError
from .worker import OUTPUT_WINDOW

__all__ = ["Supervisor"]

logger = logging.getLogger("cloudops_execution_engine")

PENDING = ExecutionStatus.PENDING
RUNNING = ExecutionStatus.RUNNING
COMPLETED = ExecutionStatus.COMPLETED
FAILED = ExecutionStatus.FAILED
CANCELLED = ExecutionStatus.CANCELLED
TIMEOUT = ExecutionStatus.TIMEOUT

_ABANDONED_KILL_TIMEOUT = 15.0
# While more is queued than may run, `execute()` lets the loop turn once per this
# many submissions: often enough that ended commands are replaced at once, rarely
# enough that a batch is not slowed by a turn per command.
_SUBMITS_PER_TURN = 16
_SENT_ARGV: list[str] = []  # shared by every record whose Run has gone; never changed
_SHUTDOWN_MARGIN = 10.0
_LINE_FIELDS = {"event_type", "execution_id", "line", "timestamp"}
_STARTED_FIELDS = {"event_type", "execution_id", "command", "timestamp"}
# Every field, for `trusted` construction on the per-execution path.
_RESULT_FIELDS = set(ExecutionResult.model_fields)
_USAGE_FIELDS = set(ResourceUsage.model_fields)
_COMPLETED_FIELDS = set(CompletedEvent.model_fields)
_CANCELLED_FIELDS = set(CancelledEvent.model_fields)
_FAILED_FIELDS = set(FailedEvent.model_fields)
_DRAIN_TIMEOUT = 10.0
# A worker is asked for a sign of life this often, and one that gives none for
# `_SILENCE_LIMIT` seconds is taken for stopped or hung: killed and replaced.
_HEARTBEAT = 1.0
_SILENCE_LIMIT = 5.0
# Output credit goes back to a worker in pieces this large, not frame by frame.
_CREDIT_BATCH = OUTPUT_WINDOW // 4
# What the kernel takes across one execve besides the strings: a pointer each.
_POINTER = 8
_MAX_ARG_STRLEN = 32 * 4096  # Linux: the most one argument or variable may hold
_MAX_REQUEST = 16 * 1024 * 1024


class _Ending:
    """What waiters of an execution or plan wait on.

    The `asyncio.Event` is made only when someone waits while it runs, and let
    go once it is set: an Event with its deque costs about 0.8 KB, and a
    long-lived host keeps many finished executions that nobody waits on.
    """

    __slots__ = ("_event",)
    status: ExecutionStatus

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def end_event(self) -> asyncio.Event:
        event = self._event
        if event is None:
            event = asyncio.Event()
            if self.status.is_final:
                event.set()
            else:
                self._event = event
        return event

    def mark_ended(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None


class _Record(_Ending):
    """One command: submitted alone or as part of a plan."""

    __slots__ = (
        "argv",
        "cwd",
        "display",
        "env",
        "id",
        "index",
        "key",
        "log_path",
        "pid",
        "plan",
        "result",
        "started_at",
        "started_ts",
        "status",
        "submitted_at",
        "timeout_ms",
        "worker",
    )

    def __init__(
        self,
        request: ExecutionRequest,
        argv: list[str],
        log_path: Path,
        timeout_ms: int,
        plan: _PlanRun | None = None,
        index: int = -1,
    ) -> None:
        self.id = request.id
        self.key = request.id.bytes
        # What the Run needs, not the request: a finished record should not keep the model alive.
        self.env = request.env
        self.argv = argv
        self.cwd = os.fsencode(request.cwd())
        self.display = request.command.display()
        self.log_path = log_path
        self.timeout_ms = timeout_ms
        self.status = PENDING
        self.result: ExecutionResult | None = None
        self.submitted_at = utcnow()
        self.started_at: datetime | None = None
        self.started_ts = 0.0  # as the worker sent it, so Finished can reuse started_at
        self.worker: WorkerHandle | None = None
        self.pid = 0
        self.plan = plan
        self.index = index
        super().__init__()

    def summary(self) -> ExecutionSummary:
        return ExecutionSummary(
            id=self.id,
            status=self.status,
            started_at=self.started_at or self.submitted_at,
            duration=self.result.duration if self.result else None,
            kind="command",
            plan_id=self.plan.id if self.plan else None,
        )


class _PlanRun(_Ending):
    __slots__ = (
        "cancelled",
        "ended",
        "id",
        "plan",
        "queued",
        "ready",
        "records",
        "result",
        "running",
        "schedule",
        "started_at",
        "status",
    )

    def __init__(self, plan: ExecutionPlan, records: list[_Record]) -> None:
        self.id = plan.id
        self.plan = plan
        self.records = records
        self.schedule = PlanSchedule(plan)
        self.ready: deque[int] = deque()
        self.running = 0
        self.ended = 0
        self.status = RUNNING
        self.cancelled = False
        self.queued = False
        self.started_at = utcnow()
        self.result: PlanExecutionResult | None = None
        super().__init__()

    def can_take(self) -> bool:
        limit = self.schedule.limit
        return bool(self.ready) and (limit is None or self.running < limit)

    def take(self) -> _Record | None:
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


class _HostEnvironment:
    """The host's environment as bytes, copied again only when it has changed.

    Bytes, because a host's environment may hold names and values that are not
    UTF-8, and commands get them exactly. Comparing the raw mapping with the
    last one seen costs about a microsecond; the size the kernel will count
    for it is worked out once per change.
    """

    def __init__(self) -> None:
        self._raw: dict[Any, Any] | None = None
        self._copy: dict[bytes, bytes] = {}
        self.size = 0

    def current(self) -> dict[bytes, bytes]:
        raw = getattr(os.environ, "_data", None)
        if raw is None:
            raw = dict(os.environb)
        if raw != self._raw:
            # One copy, both compared against and handed out: nothing changes it.
            self._raw = self._copy = dict(raw)
            self.size = sum(len(k) + len(v) + 2 + _POINTER for k, v in self._copy.items())
        return self._copy


class Supervisor:
    def __init__(self, config: ExecutionConfig, bus: EventBus) -> None:
        self.config = config
        self.bus = bus
        self.log_dir = config.resolved_log_dir()
        self._records: dict[UUID, _Record] = {}
        self._plans: dict[UUID, _PlanRun] = {}
        self._running_by_key: dict[bytes, _Record] = {}
        self._ready: deque[_Record | _PlanRun] = deque()
        self._running = 0
        self._retired: deque[UUID] = deque()
        self._pool: WorkerPool[Any] | None = None
        self._state = "new"
        self._start_lock: asyncio.Lock | None = None
        self._closed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._environment = _HostEnvironment()
        self._since_yield = 0
        self._arg_max = _arg_max()
        self._max_frame = frame_limit_for(config.max_output_bytes)
        self._credit_due: dict[WorkerHandle, int] = {}
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broken: str | None = None
        self._winding_down: asyncio.Task[None] | None = None
        bus.on_relief = self._return_credit

    # -- lifecycle --------------------------------------------------------

    def check_open(self) -> None:
        """New work and cancels are refused from the moment shutdown begins."""
        if self._loop is not None:
            self._check_loop(self._loop)
        if self._state in ("closing", "closed"):
            raise EngineClosed()

    def check_usable(self) -> None:
        """Queries keep working while shutdown winds down, and stop once it is done."""
        if self._loop is not None:
            self._check_loop(self._loop)
        if self._state == "closed":
            raise EngineClosed()

    def _check_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Everything the engine owns (pipes, timers, tasks) lives on the loop it started on."""
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            return
        if current is loop:
            return
        if loop.is_closed():
            self.abandon()
            raise EngineClosed("the event loop it ran on was closed")
        raise RuntimeError(
            "this ExecutionEngine runs on the event loop it started on; call it from that loop "
            "(or use SyncExecutionEngine from other threads)"
        )

    def loop_closed(self) -> bool:
        return self._loop is not None and self._loop.is_closed()

    def abandon(self) -> None:
        """Stop the workers without the loop, which is closed: none of its callbacks will run again.

        Each worker sees its pipe close, kills every command tree it holds and
        exits, as it does when the host dies.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        if self._pool is not None:
            for worker in list(self._pool.workers):
                worker.abandon()
            self._pool.workers.clear()

    async def start(self) -> None:
        if self._state == "running":
            return
        self.check_open()
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._state != "new":
                self.check_open()
                return
            prepare_log_dir(self.log_dir)
            self._loop = asyncio.get_running_loop()
            self.bus.start()
            pool = self._new_pool()
            try:
                await pool.start()
            except WorkerStartError as exc:
                raise SpawnFailed(str(exc)) from exc
            self._pool = pool
            for worker in pool.workers:
                worker.set_max_frame(self._max_frame)
            self._state = "running"
            self._heartbeat_timer = asyncio.get_running_loop().call_later(_HEARTBEAT, self._heartbeat)

    def _new_pool(self) -> WorkerPool[Any]:
        callbacks = (self._on_message, self._on_worker_death, self._on_worker_ready)
        if self.config.ray is not None:
            # Imported only here: nothing loads Ray unless the config asks for it.
            try:
                from .ray_pool import RayWorkerPool
            except ImportError as exc:
                raise SpawnFailed(
                    f"the Ray backend needs Ray ({exc}): pip install 'cloudops-execution-engine[ray]'"
                ) from exc

            return RayWorkerPool(
                self.config.ray,
                str(self.log_dir),
                *callbacks,
                on_broken=self._on_pool_broken,
                on_recovered=self._on_pool_recovered,
            )
        return LocalWorkerPool(
            self.config.pool_size(),
            *callbacks,
            on_broken=self._on_pool_broken,
            on_recovered=self._on_pool_recovered,
        )

    def _on_pool_broken(self, cause: str) -> None:
        """No worker runs and none can be started: what waits for one fails now, naming why.

        The pool goes on trying; new work is refused with the same error until
        a worker starts again.
        """
        self._broken = cause
        logger.error("no worker can be started (%s); queued executions fail", cause)
        error = str(SpawnFailed(cause))
        while self._ready:
            source = self._ready.popleft()
            if isinstance(source, _PlanRun):
                source.queued = False
                for index in list(source.ready):
                    record = source.records[index]
                    if record.status is PENDING:
                        self._finalize(record, _ended_without_worker(record, FAILED, error))
                source.ready.clear()
            elif source.status is PENDING:
                self._finalize(source, _ended_without_worker(source, FAILED, error))

    def _on_pool_recovered(self) -> None:
        self._broken = None

    async def shutdown(self, cancel: bool = True) -> None:
        """Stop the engine; a second call, or one while it winds down, waits for the same end.

        The work runs in a task the supervisor holds, shielded from the caller:
        a caller that stops waiting (a timeout, its own cancellation) gets its
        CancelledError, and the pool and every command are stopped all the same.
        """
        if self._state == "closed":
            return
        if self._winding_down is None:
            self._state = "closing"
            self._winding_down = asyncio.get_running_loop().create_task(self._wind_down(cancel))
        await asyncio.shield(self._winding_down)

    async def _wind_down(self, cancel: bool) -> None:
        """Let every execution end (cancelled, or finished first), stop the pool and handlers; then close."""
        try:
            if self._start_lock is not None and self._start_lock.locked():
                # A start under way would put its pool in place after this had looked for one.
                async with self._start_lock:
                    self._state = "closing"
            pool = self._pool
            try:
                if pool is not None:
                    if cancel:
                        for plan in self._plans.values():
                            if not plan.status.is_final:
                                plan.cancelled = True
                        for record in list(self._records.values()):
                            self._cancel_record(record)
                    waits = [r.end_event().wait() for r in self._records.values() if not r.status.is_final]
                    waits += [p.end_event().wait() for p in self._plans.values() if not p.status.is_final]
                    bound = self.config.kill_grace_ms / 1000 + _SHUTDOWN_MARGIN if cancel else None
                    try:
                        await asyncio.wait_for(asyncio.gather(*waits), bound)
                    except TimeoutError:
                        logger.error("executions still running %.0fs into shutdown; killing workers", bound)
                        for worker in list(pool.workers):
                            worker.die("did not stop its commands at shutdown")
                        ending = asyncio.gather(*(r.end_event().wait() for r in self._records.values()))
                        try:
                            await asyncio.wait_for(ending, _ABANDONED_KILL_TIMEOUT + _SHUTDOWN_MARGIN)
                        except TimeoutError:
                            logger.error("executions of dead workers did not end; stopping the pool anyway")
            finally:
                # Even when this task itself is cancelled (its loop closing):
                # no worker, and so no command, outlives the engine.
                if pool is not None:
                    await asyncio.gather(*self._background, return_exceptions=True)
                    await pool.stop()
                    await asyncio.gather(*self._background, return_exceptions=True)
            await self.bus.drain(_DRAIN_TIMEOUT)
        finally:
            self._state = "closed"
            self._closed.set()

    # -- submitting -----------------------------------------------------

    def submit(self, request: ExecutionRequest) -> UUID:
        self.check_open()
        if self._broken is not None:
            raise SpawnFailed(self._broken)
        if request.id in self._records or request.id in self._plans:
            raise InvalidCommand(f"an execution with id {request.id} already exists")
        self._environment.current()
        record = self._new_record(request)
        self._records[record.id] = record
        self._ready.append(record)
        self._dispatch()
        return record.id

    def submitting_ahead(self) -> bool:
        """Whether `execute()` should let the loop turn: every few submissions while the queue is deep."""
        if len(self._ready) < self.config.max_concurrent_executions:
            self._since_yield = 0
            return False
        self._since_yield += 1
        if self._since_yield < _SUBMITS_PER_TURN:
            return False
        self._since_yield = 0
        return True

    def submit_plan(self, plan: ExecutionPlan) -> UUID:
        self.check_open()
        if self._broken is not None:
            raise SpawnFailed(self._broken)
        check_plan(plan)
        if plan.id in self._records or plan.id in self._plans:
            raise InvalidPlan(f"an execution with id {plan.id} already exists")
        records: list[_Record] = []
        self._environment.current()
        for index, request in enumerate(plan.commands):
            if request.id in self._records or request.id in self._plans:
                raise InvalidPlan(f"command {index}: an execution with id {request.id} already exists")
            try:
                request.validate(self.config)
                records.append(self._new_record(request, index=index))
            except ValidationError as exc:
                raise InvalidPlan(f"command {index} ({request.id}): {exc}") from exc
        run = _PlanRun(plan, records)
        for record in records:
            record.plan = run
        self._plans[plan.id] = run
        for record in records:
            self._records[record.id] = record
        run.ready.extend(run.schedule.initial())
        self._queue_plan(run)
        self._dispatch()
        return plan.id

    def _new_record(self, request: ExecutionRequest, index: int = -1) -> _Record:
        argv = request.argv()
        self._check_size(argv, request.env)
        return _Record(
            request,
            argv,
            log_path_for(self.log_dir, request.id),
            request.effective_timeout_ms(self.config),
            index=index,
        )

    def _check_size(self, argv: list[str], env: dict[str, str]) -> None:
        """Refuse what the kernel would refuse at exec, or what could not cross the pipe.

        The count is the kernel's: every argument and `NAME=value` string with its
        NUL and its pointer, the host's environment included, which the command
        inherits. One string over the per-string limit fails the same way.
        """
        size = self._environment.size + 128  # the marker variable
        longest = 0
        for item in argv:
            length = len(_utf8(item, "an argument"))
            longest = max(longest, length)
            size += length + 1 + _POINTER
        for key, value in env.items():
            name = _utf8(key, "an environment variable name")
            length = len(name) + len(_utf8(value, f"variable {key}")) + 1
            longest = max(longest, length)
            size += length + 1 + _POINTER
        limit = min(self._arg_max, _MAX_REQUEST)
        if size > limit:
            raise InvalidCommand(
                f"the command's arguments and environment take {size} bytes, "
                f"more than the {limit} an exec may take"
            )
        if longest > _MAX_ARG_STRLEN and sys.platform.startswith("linux"):
            raise InvalidCommand(
                f"one argument or environment variable takes {longest} bytes, "
                f"more than the {_MAX_ARG_STRLEN} an exec may take for one"
            )

    def _queue_plan(self, run: _PlanRun) -> None:
        if not run.queued and not run.cancelled and run.can_take():
            run.queued = True
            self._ready.append(run)

    def _dispatch(self) -> None:
        if self._pool is None:
            return
        limit = self.config.max_concurrent_executions
        while self._running < limit and self._ready:
            worker = self._pool.pick()
            if worker is None:
                return
            source = self._ready.popleft()
            record: _Record | None
            if isinstance(source, _PlanRun):
                source.queued = False
                record = source.take()
                self._queue_plan(source)
            else:
                record = source if source.status is PENDING else None
            if record is not None:
                self._send_run(worker, record)

    def _send_run(self, worker: WorkerHandle, record: _Record) -> None:
        worker.send_env(self._environment.current())
        try:
            worker.send(
                Run(
                    record.key,
                    record.argv,
                    record.env,
                    record.cwd,
                    record.timeout_ms,
                    os.fsencode(record.log_path),
                    self.config.stream_output,
                    self.config.max_output_bytes,
                    self.config.kill_grace_ms,
                    record.display,
                ).to_wire()
            )
        except (ValueError, TypeError, OverflowError) as exc:
            # Validation lets nothing through that cannot be encoded; should
            # anything slip past, it fails alone rather than block the queue.
            if record.plan is not None:
                record.plan.running -= 1
            self._finalize(record, _ended_without_worker(record, FAILED, str(SpawnFailed(str(exc)))))
            return
        # Sent once and never again: a retained record need not keep its argv,
        # one object fewer per execution for the host's garbage collector to age.
        record.argv = _SENT_ARGV
        record.status = RUNNING
        record.worker = worker
        worker.held.add(record.key)
        self._running_by_key[record.key] = record
        self._running += 1

    # -- messages from workers -------------------------------------------

    def _on_message(self, worker: WorkerHandle, message: Message) -> None:
        if isinstance(message, Output):
            self._on_output(worker, message)
        elif isinstance(message, Started):
            self._on_started(message)
        elif isinstance(message, Finished):
            self._on_finished(worker, message)

    def _on_started(self, message: Started) -> None:
        record = self._running_by_key.get(message.execution_id)
        if record is None:
            return
        record.pid = message.pid
        record.started_at = utc_from_timestamp(message.timestamp)
        record.started_ts = message.timestamp
        if self.bus.active:
            values = {
                "event_type": "started",
                "execution_id": record.id,
                "command": record.display,
                "timestamp": record.started_at,
            }
            self._publish(record, trusted(StartedEvent, values, _STARTED_FIELDS))

    def _on_output(self, worker: WorkerHandle, message: Output) -> None:
        weight = output_weight(message.lines)
        record = self._running_by_key.get(message.execution_id) if self.bus.active else None
        if record is None:
            self._grant(worker, weight)
            return
        stamp = utc_from_timestamp(message.timestamp)
        kind: type[StdoutEvent | StderrEvent]
        if message.stream == Stream.STDOUT:
            kind, tag = StdoutEvent, "stdout"
        else:
            kind, tag = StderrEvent, "stderr"
        record_id = record.id
        events: list[ExecutionEvent] = [
            trusted(
                kind,
                {"event_type": tag, "execution_id": record_id, "line": line, "timestamp": stamp},
                _LINE_FIELDS,
            )
            for line in message.lines
        ]
        if record.plan is not None:
            self.bus.publish_batch(events, record_id, record.plan.id, weight=weight)
        else:
            self.bus.publish_batch(events, record_id, weight=weight)
        self._grant(worker, weight)

    def _grant(self, worker: WorkerHandle, weight: int) -> None:
        """Give a worker back the credit for output the host has taken in.

        While the bus is congested (a handler or an `events()` reader is behind)
        the credit is held back, so the worker stops reading its commands'
        output and they block on their pipes: memory stays bounded and no event
        is dropped. `_return_credit` sends it when the bus has room again.
        """
        due = self._credit_due.get(worker, 0) + weight
        if due >= _CREDIT_BATCH and not self.bus.congested:
            worker.send(Credit(due).to_wire())
            due = 0
        self._credit_due[worker] = due

    def _return_credit(self) -> None:
        for worker, due in self._credit_due.items():
            if due:
                worker.send(Credit(due).to_wire())
                self._credit_due[worker] = 0

    def _on_finished(self, worker: WorkerHandle, message: Finished) -> None:
        record = self._running_by_key.pop(message.execution_id, None)
        if record is None:
            return
        worker.held.discard(record.key)
        self._running -= 1
        started = record.started_at
        if started is None or record.started_ts != message.started_at:
            started = utc_from_timestamp(message.started_at)
        completed = utc_from_timestamp(message.completed_at)
        usage = message.rusage
        values = {
            "id": record.id,
            "status": ExecutionStatus(message.status),
            "exit_code": message.exit_code,
            "stdout": message.stdout,
            "stderr": message.stderr,
            "duration": completed - started,
            "started_at": started,
            "completed_at": completed,
            "log_path": record.log_path,
            "error": message.error,
            "resource_usage": trusted(
                ResourceUsage,
                {
                    "user_cpu_s": float(usage[0]),
                    "system_cpu_s": float(usage[1]),
                    "max_rss_bytes": int(usage[2]),
                },
                _USAGE_FIELDS,
            )
            if usage
            else None,
            "stdout_truncated": message.stdout_truncated,
            "stderr_truncated": message.stderr_truncated,
        }
        result = trusted(ExecutionResult, values, _RESULT_FIELDS)
        self._finalize(record, result)
        self._dispatch()

    # -- ending executions ------------------------------------------------

    def _publish(self, record: _Record, event: Any) -> None:
        if record.plan is not None:
            self.bus.publish(event, record.id, record.plan.id)
        else:
            self.bus.publish(event, record.id)

    def _finalize(self, record: _Record, result: ExecutionResult) -> None:
        record.result = result
        record.status = result.status
        if self.bus.active:
            now = result.completed_at or utcnow()
            event: Any
            if result.status is COMPLETED:
                values = {
                    "event_type": "completed",
                    "execution_id": record.id,
                    "result": result,
                    "timestamp": now,
                }
                event = trusted(CompletedEvent, values, _COMPLETED_FIELDS)
            elif result.status is CANCELLED:
                values = {"event_type": "cancelled", "execution_id": record.id, "timestamp": now}
                event = trusted(CancelledEvent, values, _CANCELLED_FIELDS)
            else:
                values = {
                    "event_type": "failed",
                    "execution_id": record.id,
                    "error": result.error or "failed",
                    "timestamp": now,
                }
                event = trusted(FailedEvent, values, _FAILED_FIELDS)
            self._publish(record, event)
        self.bus.end_stream(record.id)
        record.mark_ended()
        if record.plan is not None:
            self._plan_command_ended(record.plan, record)
        else:
            self._retire(record.id)

    def _cancel_unstarted(self, record: _Record) -> None:
        self._finalize(record, _ended_without_worker(record, CANCELLED, "Execution cancelled"))

    def _cancel_record(self, record: _Record) -> None:
        if record.status is PENDING:
            self._cancel_unstarted(record)
        elif record.status is RUNNING and record.worker is not None:
            record.worker.send(Cancel(record.key).to_wire())

    def _plan_command_ended(self, run: _PlanRun, record: _Record) -> None:
        run.ended += 1
        if record.worker is not None:
            run.running -= 1
        if self.bus.active:
            self.bus.publish(
                ProgressEvent.model_construct(
                    plan_id=run.id,
                    completed=run.ended,
                    total=len(run.records),
                    current_command=record.display,
                    timestamp=utcnow(),
                ),
                run.id,
            )
        if not run.cancelled:
            ready, dropped = run.schedule.ended(record.index, record.status is COMPLETED)
            run.ready.extend(ready)
            for index in dropped:
                dependent = run.records[index]
                if dependent.status is PENDING:
                    self._cancel_unstarted(dependent)
            self._queue_plan(run)
        if run.ended == len(run.records):
            self._finish_plan(run)

    def _finish_plan(self, run: _PlanRun) -> None:
        stats = ExecutionStats(total=len(run.records))
        results: list[ExecutionResult] = []
        for record in run.records:
            assert record.result is not None
            results.append(record.result)
            status = record.status
            if status is COMPLETED:
                stats.completed += 1
            elif status is FAILED:
                stats.failed += 1
            elif status is CANCELLED:
                stats.cancelled += 1
            elif status is TIMEOUT:
                stats.timeout += 1
        if run.cancelled:
            run.status = CANCELLED
        elif stats.completed == stats.total:
            run.status = COMPLETED
        else:
            run.status = FAILED
        run.result = PlanExecutionResult.model_construct(
            plan_id=run.id,
            status=run.status,
            results=results,
            total_duration=utcnow() - run.started_at,
            stats=stats,
        )
        self.bus.end_stream(run.id)
        run.mark_ended()
        self._retire(run.id)

    def _retire(self, entry_id: UUID) -> None:
        """Forget the oldest finished entries beyond `max_retained_executions`."""
        limit = self.config.max_retained_executions
        if limit is None:
            return
        self._retired.append(entry_id)
        while len(self._retired) > limit:
            old = self._retired.popleft()
            plan = self._plans.pop(old, None)
            if plan is not None:
                for record in plan.records:
                    self._records.pop(record.id, None)
            else:
                self._records.pop(old, None)

    # -- worker lifecycle -------------------------------------------------

    def _on_worker_ready(self, worker: WorkerHandle) -> None:
        worker.set_max_frame(self._max_frame)
        self._dispatch()

    def _heartbeat(self) -> None:
        """Ping every worker; kill one that has said nothing for too long.

        A worker that is stopped (SIGSTOP, or a command that stopped its parent)
        or hung would hold its executions, and their timeouts, forever: its
        death fails them and kills their trees like any other worker death.
        """
        if self._state != "running" or self._pool is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for worker in list(self._pool.workers):
            if not worker.ready:
                continue
            silent = now - worker.last_heard
            if silent > _SILENCE_LIMIT:
                worker.die(f"stopped responding (no answer in {silent:.1f}s)")
            else:
                worker.ping()
        self._heartbeat_timer = loop.call_later(_HEARTBEAT, self._heartbeat)

    def _on_worker_death(self, worker: WorkerHandle, why: str) -> None:
        held = [self._running_by_key.pop(k) for k in list(worker.held) if k in self._running_by_key]
        worker.held.clear()
        self._credit_due.pop(worker, None)
        assert self._pool is not None
        # Asked now, before the pool starts a successor: a remote pool cleans up
        # through the successor it places on the same node.
        cleanup = self._pool.clean_up_after(worker, {str(r.id) for r in held}, {r.pid for r in held if r.pid})
        if self._state == "running":
            logger.warning("%s; %d execution(s) it held fail", why, len(held))
        task = asyncio.get_running_loop().create_task(self._fail_abandoned(held, why, cleanup))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail_abandoned(self, held: list[_Record], why: str, cleanup: Awaitable[None]) -> None:
        """Wait until the trees a dead worker left behind are gone, then fail its executions."""
        try:
            await asyncio.wait_for(cleanup, _ABANDONED_KILL_TIMEOUT)
        except TimeoutError:
            if held:
                logger.error("could not confirm the end of every process left by a dead worker")
        except Exception:
            logger.exception("cleaning up after a dead worker failed")
        finally:
            for record in held:
                self._running -= 1
                self._finalize(
                    record, _ended_without_worker(record, FAILED, f"{why} while running this execution")
                )
            self._dispatch()

    # -- queries ------------------------------------------------------------

    def record(self, entry_id: UUID) -> _Record:
        record = self._records.get(entry_id)
        if record is None:
            raise NotFound(entry_id)
        return record

    def entry(self, entry_id: UUID) -> _Record | _PlanRun:
        found = self._records.get(entry_id) or self._plans.get(entry_id)
        if found is None:
            raise NotFound(entry_id)
        return found

    def status(self, entry_id: UUID) -> ExecutionStatus:
        return self.entry(entry_id).status

    def result(self, entry_id: UUID) -> ExecutionResult:
        record = self.record(entry_id)
        if record.result is None:
            raise NotCompleted(entry_id)
        return record.result

    def plan_result(self, plan_id: UUID) -> PlanExecutionResult:
        run = self._plans.get(plan_id)
        if run is None:
            raise NotFound(plan_id)
        if run.result is None:
            raise NotCompleted(plan_id)
        return run.result

    async def wait(self, entry_id: UUID, timeout: float | None) -> ExecutionResult | PlanExecutionResult:
        entry = self.entry(entry_id)
        if not entry.status.is_final:
            if timeout is None:
                await entry.end_event().wait()
            else:
                await asyncio.wait_for(entry.end_event().wait(), timeout)
        if isinstance(entry, _PlanRun):
            assert entry.result is not None
            return entry.result
        assert entry.result is not None
        return entry.result

    def summaries(self) -> list[ExecutionSummary]:
        items: list[_Record | _PlanRun] = [*self._plans.values(), *self._records.values()]
        items.sort(key=lambda e: e.submitted_at if isinstance(e, _Record) else e.started_at)
        return [item.summary() for item in items]

    def cancel(self, entry_id: UUID) -> None:
        self.check_open()
        entry = self.entry(entry_id)
        if entry.status.is_final:
            raise NotRunning(entry_id)
        if isinstance(entry, _PlanRun):
            entry.cancelled = True
            for record in entry.records:
                self._cancel_record(record)
        else:
            self._cancel_record(entry)

    async def read_logs(self, entry_id: UUID) -> str:
        """A command's log; for a plan, the logs its commands have, one after another."""
        entry = self.entry(entry_id)
        if self._pool is None:
            raise IoError("the engine has not started, so no log exists yet")
        if isinstance(entry, _Record):
            return await self._pool.read_log(entry.worker, entry.log_path)
        texts = await asyncio.gather(
            *(self._pool.read_log(r.worker, r.log_path, missing_ok=True) for r in entry.records if r.worker)
        )
        return "".join(texts)

    def log_location(self, entry_id: UUID) -> str | None:
        """The node holding a command's log when it is not this machine."""
        record = self.record(entry_id)
        return self._pool.log_location(record.worker) if self._pool is not None else None


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        # A lone surrogate (PEP 383) stands for bytes that are not text, which
        # neither the wire nor a Rust peer can carry.
        raise InvalidCommand(f"{what} is not valid Unicode text: {exc.reason} at {exc.start}") from None


def _arg_max() -> int:
    try:
        value = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        value = -1
    return value if value > 0 else 128 * 1024


def _ended_without_worker(record: _Record, status: ExecutionStatus, error: str) -> ExecutionResult:
    """The result of a command that no worker reported on: never started, or its worker died."""
    now = utcnow()
    started = record.started_at or now
    return ExecutionResult.model_construct(
        id=record.id,
        status=status,
        exit_code=-1,
        stdout="",
        stderr="",
        duration=now - started,
        started_at=started,
        completed_at=now,
        log_path=record.log_path,
        error=error,
        resource_usage=None,
        stdout_truncated=False,
        stderr_truncated=False,
    )

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
from ..protocol import Cancel, Finished, Message, Output, Run, Started, Stream
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
        self.cwd = request.cwd()
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
    """The host's environment as a dict, decoded again only when it has changed.

    Decoding `os.environ` costs tens of microseconds, a quarter of `execute()`;
    comparing its raw mapping with the last one seen costs about one.
    """

    def __init__(self) -> None:
        self._raw: dict[Any, Any] | None = None
        self._decoded: dict[str, str] = {}

    def current(self) -> dict[str, str]:
        raw = getattr(os.environ, "_data", None)
        if raw is None:
            return dict(os.environ)
        if raw != self._raw:
            self._raw = dict(raw)
            self._decoded = dict(os.environ)
        return self._decoded


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

    # -- lifecycle --------------------------------------------------------

    def check_open(self) -> None:
        """New work and cancels are refused from the moment shutdown begins."""
        if self._state in ("closing", "closed"):
            raise EngineClosed()

    def check_usable(self) -> None:
        """Queries keep working while shutdown winds down, and stop once it is done."""
        if self._state == "closed":
            raise EngineClosed()

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
            self.bus.start()
            pool = self._new_pool()
            try:
                await pool.start()
            except WorkerStartError as exc:
                raise SpawnFailed(str(exc)) from exc
            self._pool = pool
            self._state = "running"

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

            return RayWorkerPool(self.config.ray, str(self.log_dir), *callbacks)
        return LocalWorkerPool(self.config.pool_size(), *callbacks)

    async def shutdown(self, cancel: bool = True) -> None:
        if self._state == "closed":
            return
        if self._state == "closing":
            await self._closed.wait()
            return
        was_running = self._state == "running"
        self._state = "closing"
        try:
            if was_running:
                await self._wind_down(cancel)
        finally:
            self._state = "closed"
            self._closed.set()

    async def _wind_down(self, cancel: bool) -> None:
        assert self._pool is not None
        if cancel:
            for plan in self._plans.values():
                if not plan.status.is_final:
                    plan.cancelled = True
            for record in list(self._records.values()):
                self._cancel_record(record)
        waits = [r.end_event().wait() for r in self._records.values() if not r.status.is_final]
        waits += [p.end_event().wait() for p in self._plans.values() if not p.status.is_final]
        if waits:
            bound = self.config.kill_grace_ms / 1000 + _SHUTDOWN_MARGIN if cancel else None
            try:
                await asyncio.wait_for(asyncio.gather(*waits), bound)
            except TimeoutError:
                logger.error("executions did not end within %.0fs of shutdown; killing workers", bound)
                for worker in list(self._pool.workers):
                    worker.die("did not stop its commands at shutdown")
                await asyncio.wait_for(
                    asyncio.gather(*(r.end_event().wait() for r in self._records.values())),
                    _ABANDONED_KILL_TIMEOUT + _SHUTDOWN_MARGIN,
                )
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._pool.stop()
        await self.bus.drain(_DRAIN_TIMEOUT)

    # -- submitting -----------------------------------------------------

    def submit(self, request: ExecutionRequest) -> UUID:
        self.check_open()
        if request.id in self._records or request.id in self._plans:
            raise InvalidCommand(f"an execution with id {request.id} already exists")
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
        check_plan(plan)
        if plan.id in self._records or plan.id in self._plans:
            raise InvalidPlan(f"an execution with id {plan.id} already exists")
        records: list[_Record] = []
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
        return _Record(
            request,
            request.argv(),
            log_path_for(self.log_dir, request.id),
            request.effective_timeout_ms(self.config),
            index=index,
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
        worker.send(
            Run(
                record.key,
                record.argv,
                record.env,
                record.cwd,
                record.timeout_ms,
                str(record.log_path),
                self.config.stream_output,
                self.config.max_output_bytes,
                self.config.kill_grace_ms,
                record.display,
            ).to_wire()
        )
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
            self._on_output(message)
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

    def _on_output(self, message: Output) -> None:
        if not self.bus.active:
            return
        record = self._running_by_key.get(message.execution_id)
        if record is None:
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
            self.bus.publish_batch(events, record_id, record.plan.id)
        else:
            self.bus.publish_batch(events, record_id)

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
        self._dispatch()

    def _on_worker_death(self, worker: WorkerHandle, why: str) -> None:
        held = [self._running_by_key.pop(k) for k in list(worker.held) if k in self._running_by_key]
        worker.held.clear()
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

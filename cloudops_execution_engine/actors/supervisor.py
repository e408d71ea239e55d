"""The supervisor: the engine's lifecycle, in the host process, on the host's loop.

    host code ──execute()/execute_plan()──▶ Supervisor ──Run/Cancel frames──▶ pipe ──▶ Worker
        ▲                                     │   ▲                                       │
        └──────── handlers (EventBus) ◀───────┘   └──── Started/Output/Finished ◀─ pipe ◀─┘
                                                                                 spawns, reads,
                                                                                 kills, reaps the
                                                                                 command trees

The supervisor starts and stops the engine (`EngineState`), admits requests,
hears its workers and tells the rest. Each concern lives in a module of its own:

- `records.py`: what is kept for each execution and plan;
- `store.py`: where they are kept and looked up (the in-memory store; the seam
  for a durable one);
- `scheduler.py`: the fair queue, dispatch within the concurrency limit, plan
  progression;
- `outcomes.py`: every event and result the engine builds;
- `retries.py`: whether an attempt runs again under a `RetryPolicy`, and when;
- `admission.py`: what a request must satisfy to be admitted;
- `flow.py`: the output credit that bounds host memory when listeners are slow;
- `pool.py` and its backends: the worker processes, their pipes and deaths.

It never blocks: everything is a callback on the host loop, and the one slow
job (finding the trees of a dead worker) runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Iterable
from typing import Any
from uuid import UUID, uuid4

from .._model import utc_from_timestamp, utcnow
from ..config import ExecutionConfig
from ..errors import (
    Cancelled,
    EngineClosed,
    InvalidCommand,
    InvalidPlan,
    IoError,
    NotCompleted,
    NotFound,
    NotRunning,
    SpawnFailed,
    ValidationError,
    map_errors,
    mapped,
)
from ..logfiles import LogNode, append_to_log, prepare_log_dir
from ..plans import check_plan
from ..protocol import Cancel, Finished, Message, Output, Retire, Run, Started, frame_limit_for, output_weight
from ..requests import ExecutionPlan, ExecutionRequest
from ..results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult
from . import after_fork, outcomes, process_tree, resume, retries
from .admission import NO_OPTIONS, Admission, HostEnvironment
from .flow import OutputCredit
from .handlers import EventBus
from .local_pool import LocalWorkerPool
from .output import log_footer, log_retry_note
from .pool import WorkerHandle, WorkerPool, WorkerStartError
from .records import PENDING, RUNNING, PlanRun, Record
from .scheduler import Scheduler
from .store import Store, store_for
from .telemetry import Telemetry, correlate
from .telemetry import load as load_telemetry

__all__ = ["EngineState", "Supervisor"]

logger = logging.getLogger("cloudops_execution_engine")

FAILED = ExecutionStatus.FAILED
CANCELLED = ExecutionStatus.CANCELLED

_ABANDONED_KILL_TIMEOUT = 15.0
_SENT_ARGV: list[str] = []  # shared by every record whose Run has gone; never changed
_SHUTDOWN_MARGIN = 10.0
_DRAIN_TIMEOUT = 10.0
# A worker is asked for a sign of life this often, and one that gives none for
# `_SILENCE_LIMIT` seconds is taken for stopped or hung: killed and replaced.
_HEARTBEAT = 1.0
# The signals on which a worker kills its trees and ends itself (`worker._ENDING_SIGNALS`).
_STOPPING_SIGNALS = frozenset({signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM})
_SILENCE_LIMIT = 5.0


class EngineState(enum.Enum):
    NEW = "new"  # nothing started; the first use starts the pool
    RUNNING = "running"
    CLOSING = "closing"  # shutdown began: queries answer, new work and cancels are refused
    CLOSED = "closed"


class Supervisor:
    def __init__(self, config: ExecutionConfig, bus: EventBus, store: Store | None = None) -> None:
        self.config = config
        self.bus = bus
        self.log_dir = config.resolved_log_dir()
        # Names this engine to its commands: another engine may run an execution of the same id.
        self.engine_id = uuid4().hex
        self._store: Store = store if store is not None else store_for(config, self.log_dir, self.engine_id)
        self._running_by_key: dict[bytes, Record] = {}
        self._scheduler = Scheduler(
            config.max_concurrent_executions,
            self._pick,
            self._send_run,
            pick_again=self._pick_again,
            sent=self._flush_sends,
        )
        self._pool: WorkerPool[Any] | None = None
        self._state = EngineState.NEW
        self._start_lock: asyncio.Lock | None = None
        self._closed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._environment = HostEnvironment(self.engine_id)
        self._admission = Admission(self._environment, config.secrets)
        self._max_frame = frame_limit_for(config.max_output_bytes)
        self._credit = OutputCredit(bus)
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broken: str | None = None
        # Set in a process forked from the host (`after_fork`): why every call is refused there.
        self._forked_away: str | None = None
        self._owner_pid = 0
        self._winding_down: asyncio.Task[None] | None = None
        # Set by a shutdown that cancels: one that waits for the work stops waiting for it.
        self._cancel_asked = asyncio.Event()
        # None unless OpenTelemetry is installed: then every hook below is skipped by one check.
        self._telemetry: Telemetry | None = None
        # (pid, hostname, start time) of this host, as a log's retry note names it.
        self._identity: tuple[int, str, int] | None = None

    # -- lifecycle --------------------------------------------------------

    def check_open(self) -> None:
        """New work and cancels are refused from the moment shutdown begins."""
        if self._forked_away is not None:
            raise EngineClosed(self._forked_away)
        if self._loop is not None:
            self._check_loop(self._loop)
        if self._state is EngineState.CLOSING or self._state is EngineState.CLOSED:
            raise EngineClosed()

    @property
    def winding_down(self) -> bool:
        """Shutdown has begun (or is done)."""
        return self._state is EngineState.CLOSING or self._state is EngineState.CLOSED

    def check_usable(self) -> None:
        """Queries keep working while shutdown winds down, and stop once it is done."""
        if self._forked_away is not None:
            raise EngineClosed(self._forked_away)
        if self._loop is not None:
            self._check_loop(self._loop)
        if self._state is EngineState.CLOSED:
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

    def forked(self) -> None:
        """In a process forked from the host: the engine is the parent's, closed to this one (`after_fork`).

        Nothing is stopped or sent: the workers, pipes and loop are the parent's.
        """
        self._forked_away = after_fork.refusal(self._owner_pid)
        self._state = EngineState.CLOSED

    def loop_closed(self) -> bool:
        return self._loop is not None and self._loop.is_closed()

    def let_go(self) -> bool:
        """The engine was garbage collected without `shutdown()`: stop what it started, as shutdown would.

        From the engine's finalizer, on whatever thread collected it: on the
        loop while it runs (the workers' pipes are registered with it), without
        it otherwise. An idle loop (a host that runs it now and then, with
        `run_until_complete`) may never run again, or be closed, throwing away
        a stop queued on it. Says whether there was anything to stop: nothing
        in a forked child, whose copy of the engine is the parent's.
        """
        if self._state is not EngineState.RUNNING or self._owner_pid != os.getpid():
            return False
        loop = self._loop
        if loop is not None and not loop.is_closed():
            if not loop.is_running() and isinstance(self._pool, LocalWorkerPool):
                # Idle: its stop, queued, would wait for a run of the loop that may never come.
                # (Ray's handles need the loop to let go of their links: theirs stays queued.)
                self.abandon()
                return True
            with contextlib.suppress(RuntimeError):  # closed meanwhile: stopped below
                loop.call_soon_threadsafe(self._shut_down_unawaited)
                return True
        self.abandon()
        return True

    def _shut_down_unawaited(self) -> None:
        if self._state is EngineState.RUNNING:
            self._begin_wind_down(True)

    def _begin_wind_down(self, cancel: bool) -> asyncio.Task[None]:
        """The task that stops the engine, started by the first shutdown asked for."""
        if self._winding_down is None:
            self._state = EngineState.CLOSING
            self._winding_down = asyncio.get_running_loop().create_task(self._wind_down(cancel))
        return self._winding_down

    def abandon(self) -> None:
        """Stop the workers without the loop, which is closed: none of its callbacks will run again.

        Each worker sees its pipe close, kills every command tree it holds and
        exits, as it does when the host dies.
        """
        if self._state is EngineState.CLOSED:
            return
        self._state = EngineState.CLOSED
        if self._pool is not None:
            for worker in list(self._pool.workers):
                worker.abandon()
            self._pool.workers.clear()
        if self._telemetry is not None:
            # What was running or queued will never end here: its counts go, its spans end.
            live = self._store.live_ids()
            records = [record for record in self._store.records() if record.id in live]
            plans = [run for run in self._store.plans() if run.id in live]
            self._telemetry.abandoned(records, plans)
        self._store.abandon()

    async def start(self) -> None:
        if self._state is EngineState.RUNNING:
            return
        self.check_open()
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._state is not EngineState.NEW:
                self.check_open()
                return
            prepare_log_dir(self.log_dir)
            # A journal is opened and recovered before anything starts: if it
            # cannot be, the engine is not started at all.
            await self._store.open()
            try:
                # An import that finds no descriptor left (EMFILE) raises a bare OSError.
                with map_errors({OSError: IoError}, "cannot load OpenTelemetry"):
                    self._telemetry = load_telemetry(self._store)
                self._loop = asyncio.get_running_loop()
                self._owner_pid = os.getpid()
                after_fork.track(self)
                self.bus.start()
                pool = self._new_pool()
                with map_errors({WorkerStartError: SpawnFailed}):
                    await pool.start()
            except BaseException:
                await self._store.close()  # a journal's lock is not kept by an engine that did not start
                raise
            self._pool = pool
            for worker in pool.workers:
                worker.set_max_frame(self._max_frame)
            self._state = EngineState.RUNNING
            self._heartbeat_timer = self._loop.call_later(_HEARTBEAT, self._heartbeat)

    def _new_pool(self) -> WorkerPool[Any]:
        callbacks = (self._on_message, self._on_worker_death, self._on_worker_ready)
        if self.config.ray is not None:
            # Imported only here: nothing loads Ray unless the config asks for it.
            with map_errors({ImportError: _ray_missing}):
                from .ray_pool import RayWorkerPool

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
        error = str(SpawnFailed(cause))
        failed = []
        for record in self._scheduler.drain_pending():
            failed.append(record.id)
            self._finalize(record, outcomes.result_without_worker(record, FAILED, error))
        suffix, extra = correlate(failed)
        logger.error("no worker can be started (%s); queued executions fail%s", cause, suffix, extra=extra)

    def _on_pool_recovered(self) -> None:
        self._broken = None

    async def shutdown(self, cancel: bool = True) -> None:
        """Stop the engine; a second call, or one while it winds down, waits for the same end.

        One that cancels, while a graceful one waits for the work, cancels what is left.

        The work runs in a task the supervisor holds, shielded from the caller:
        a caller that stops waiting (a timeout, its own cancellation) gets its
        CancelledError, and the pool and every command are stopped all the same.
        """
        if self._state is EngineState.CLOSED:
            return
        winding_down = self._begin_wind_down(cancel)
        if cancel:
            # Asked to cancel while a graceful shutdown waits for the work: cancel it now.
            self._cancel_asked.set()
        # A handler may be the caller: the drain of handlers must not wait for it.
        self.bus.spare(threading.current_thread())
        await asyncio.shield(winding_down)

    async def _wind_down(self, cancel: bool) -> None:
        """Let every execution end (cancelled, or finished first), stop the pool and handlers; then close."""
        try:
            if self._start_lock is not None and self._start_lock.locked():
                # A start under way would put its pool in place after this had looked for one.
                async with self._start_lock:
                    self._state = EngineState.CLOSING
            pool = self._pool
            try:
                if pool is not None:
                    if cancel:
                        self._cancel_everything()
                    waits = [r.end_event().wait() for r in self._store.records() if not r.settled]
                    waits += [p.end_event().wait() for p in self._store.plans() if not p.settled]
                    everything = _all_of(waits)
                    if not cancel and not await _first_of(everything, self._cancel_asked):
                        cancel = True  # a later shutdown asked to cancel what is left
                        self._cancel_everything()
                    bound = self.config.kill_grace_ms / 1000 + _SHUTDOWN_MARGIN if cancel else None
                    try:
                        await asyncio.wait_for(everything, bound)
                    except TimeoutError:
                        self._log_unfinished(
                            f"executions still running {bound:.0f}s into shutdown; killing workers"
                        )
                        for worker in list(pool.workers):
                            worker.die("did not stop its commands at shutdown")
                        ending = _all_of(r.end_event().wait() for r in self._store.records())
                        try:
                            await asyncio.wait_for(ending, _ABANDONED_KILL_TIMEOUT + _SHUTDOWN_MARGIN)
                        except TimeoutError:
                            self._log_unfinished(
                                "executions of dead workers did not end; stopping the pool anyway"
                            )
            finally:
                # Even when this task itself is cancelled (its loop closing):
                # no worker, and so no command, outlives the engine.
                if pool is not None:
                    await asyncio.gather(*self._background, return_exceptions=True)
                    await pool.stop()
                    await asyncio.gather(*self._background, return_exceptions=True)
            # Ends are told once the store has kept them: every one is told before the handlers stop.
            entries = [*self._store.records(), *self._store.plans()]
            unsettled = [entry.end_event().wait() for entry in entries if not entry.settled]
            if unsettled:
                try:
                    await asyncio.wait_for(_all_of(unsettled), _DRAIN_TIMEOUT)
                except TimeoutError:
                    suffix, extra = correlate(r.id for r in self._store.records() if not r.settled)
                    logger.error(
                        "the store did not confirm every end within %.0fs of shutdown%s",
                        _DRAIN_TIMEOUT,
                        suffix,
                        extra=extra,
                    )
            await self.bus.drain(_DRAIN_TIMEOUT)
        finally:
            self._state = EngineState.CLOSED
            try:
                await self._store.close()
            finally:
                self._closed.set()

    # -- submitting -----------------------------------------------------

    def _log_unfinished(self, what: str) -> None:
        """An error naming every execution not yet ended, so that each can be joined to its span."""
        suffix, extra = correlate(r.id for r in self._store.records() if not r.status.is_final)
        logger.error("%s%s", what, suffix, extra=extra)

    @property
    def running(self) -> bool:
        """Started and not shutting down: `start()` has nothing to do."""
        return self._state is EngineState.RUNNING

    def submit(self, request: ExecutionRequest) -> UUID:
        """Admit a validated request and queue it; it is sent to a worker on the next loop turn.

        Everything that can refuse it is checked here, before it is registered.
        """
        if self._state is not EngineState.RUNNING:
            self.check_open()
        if self._broken is not None:
            raise SpawnFailed(self._broken)
        if request.id in self._store:
            raise InvalidCommand(f"an execution with id {request.id} already exists")
        record = self._new_record(request)
        self._store.add(record, request)
        if self._telemetry is not None:
            self._telemetry.submitted(record)
        self._scheduler.add_soon(record)
        return record.id

    def should_yield(self) -> bool:
        """Whether `execute()` should let the loop turn, so that ended commands are replaced."""
        return self._scheduler.should_yield()

    def submit_plan(self, plan: ExecutionPlan) -> UUID:
        self.check_open()
        if self._broken is not None:
            raise SpawnFailed(self._broken)
        check_plan(plan)
        if plan.id in self._store:
            raise InvalidPlan(f"an execution with id {plan.id} already exists")
        records: list[Record] = []
        for index, request in enumerate(plan.commands):
            if request.id in self._store:
                raise InvalidPlan(f"command {index}: an execution with id {request.id} already exists")
            try:
                request.validate(self.config)
                records.append(self._new_record(request, index=index))
            except ValidationError as exc:
                raise InvalidPlan(f"command {index} ({request.id}): {exc}") from exc
        run = PlanRun(plan, records)
        self._store.add_plan(run)
        if self._telemetry is not None:
            self._telemetry.plan_submitted(run)
        self._scheduler.add_plan(run)
        return plan.id

    def resume_plan(self, plan_id: UUID) -> UUID:
        """Start a new plan of an ended plan's commands, those that completed counted as done (`resume`)."""
        self.check_open()
        if self._broken is not None:
            raise SpawnFailed(self._broken)
        old = self._store.plan(plan_id)
        if not old.settled:
            raise NotCompleted(plan_id)
        plan, reused = resume.plan_to_resume(old)
        records: list[Record] = []
        for index, request in enumerate(plan.commands):
            done = reused.get(index)
            if done is not None:
                timeout_ms = request.effective_timeout_ms(self.config)
                submitted = old.records[index].submitted_at
                records.append(resume.reused_record(request, done, index, timeout_ms, submitted))
                continue
            try:
                request.validate(self.config)
                records.append(self._new_record(request, index=index))
            except ValidationError as exc:
                raise InvalidPlan(f"command {index} ({request.id}): {exc}") from exc
        if old.masked:  # after the commands' own refusals, which say more (a masked `secret_env`)
            raise InvalidPlan(
                f"plan {plan_id} was recorded with the engine's secrets masked (***) in its commands: "
                "it cannot be resumed from the journal; submit it again"
            )
        run = PlanRun(plan, records)
        resume.prepare_resumed(run, reused, old.id)
        self._store.add_plan(run)
        if self._telemetry is not None:
            self._telemetry.plan_submitted(run)
        self._scheduler.add_plan(run)
        if run.ended == len(run.records):
            self._end_plan(run)
        return plan.id

    def _new_record(self, request: ExecutionRequest, index: int = -1) -> Record:
        argv = request.argv()
        options = self._admission.options(request, argv)
        record = Record(
            request, argv, None, request.effective_timeout_ms(self.config), index=index, log_dir=self.log_dir
        )
        record.options = options
        if options.secrets:
            record.display = options.mask(record.display)
        return record

    def _pick(self) -> WorkerHandle | None:
        return self._pool.pick() if self._pool is not None else None

    def _flush_sends(self) -> None:
        """After a deferred dispatch: write each worker's Runs now, in one write per worker."""
        if self._pool is not None:
            for worker in self._pool.workers:
                worker.flush()

    def _send_run(self, worker: WorkerHandle, record: Record) -> bool:
        retry = record.retry
        if retry is not None and retry.queued:
            retry.queued = False
            record.attempt += 1
        env = record.env if retry is None else retries.attempt_env(record.env, record.attempt)
        options = record.options
        if options.secret_env:
            env = {**env, **options.secret_env}
        if self._telemetry is not None:
            # After `secret_env`, which sets a command's variables as `env` does, trace context included.
            env = self._telemetry.env_for(record, env)
        worker.send_env(self._environment.current())
        try:
            worker.send(
                Run(
                    record.key,
                    record.argv,
                    env,
                    record.cwd,
                    record.timeout_ms,
                    os.fsencode(record.log_path),
                    self.config.stream_output,
                    self.config.max_output_bytes,
                    self.config.kill_grace_ms,
                    record.display,
                    record.attempt,
                    options.stdin,
                    options.success_exit_codes,
                    options.limits,
                    options.cpu_affinity,
                    options.secrets,
                ).to_wire()
            )
        except (ValueError, TypeError, OverflowError) as exc:
            # Admission lets nothing through that cannot be encoded; should
            # anything slip past, it fails alone rather than block the queue.
            if record.worker is None:  # a later attempt's plan slot is given back when it ends
                self._scheduler.not_started(record)
            self._finalize(
                record, outcomes.result_without_worker(record, FAILED, str(mapped(exc, SpawnFailed)))
            )
            return False
        # Sent once and never again: a retained record need not keep its argv,
        # one object fewer per execution for the host's garbage collector to age.
        if retry is None or record.attempt >= retry.policy.max_attempts:
            record.argv = _SENT_ARGV
            record.options = NO_OPTIONS  # a stdin of megabytes among them
        if self._telemetry is not None:
            self._telemetry.dispatched(record)
        record.status = RUNNING
        record.worker = worker
        worker.held.add(record.key)
        self._running_by_key[record.key] = record
        return True

    # -- messages from workers -------------------------------------------

    def _on_message(self, worker: WorkerHandle, message: Message) -> None:
        if isinstance(message, Output):
            self._on_output(worker, message)
        elif isinstance(message, Started):
            self._on_started(message)
        elif isinstance(message, Finished):
            self._on_finished(worker, message)
        elif isinstance(message, Retire):
            self._on_retire(worker, message)

    def _on_started(self, message: Started) -> None:
        record = self._running_by_key.get(message.execution_id)
        if record is None:
            return
        record.pid = message.pid
        record.started_at = utc_from_timestamp(message.timestamp)
        record.started_ts = message.timestamp
        self._store.started(record)
        if self._telemetry is not None:
            self._telemetry.started(record, record.attempt)
        if self.bus.active:
            self._publish(record, outcomes.started_event(record))

    def _on_output(self, worker: WorkerHandle, message: Output) -> None:
        weight = output_weight(message.lines)
        record = self._running_by_key.get(message.execution_id) if self.bus.active else None
        if record is not None:
            lines = outcomes.LineEvents(record.id, message.stream, message.timestamp, message.lines)
            if record.plan is not None:
                self.bus.publish_lines(lines, record.id, record.plan.id, weight=weight)
            else:
                self.bus.publish_lines(lines, record.id, weight=weight)
        self._credit.taken(worker, weight)

    def _on_finished(self, worker: WorkerHandle, message: Finished) -> None:
        record = self._running_by_key.pop(message.execution_id, None)
        if record is None:
            return
        worker.held.discard(record.key)
        if worker.retiring and not worker.held:
            self._stop_retired(worker)
        self._scheduler.ran()
        if message.log_error is not None:
            suffix, extra = correlate([record.id])
            logger.warning(
                "the log of execution %s is incomplete: %s%s",
                record.id,
                message.log_error,
                suffix,
                extra=extra,
            )
        result = outcomes.result_of_finished(record, message)
        if record.retry is None or not self._retry_later(record, result, retries.cause_of(result.status)):
            self._finalize(record, result)
        self._scheduler.dispatch()

    def _on_retire(self, worker: WorkerHandle, message: Retire) -> None:
        """The worker cannot start commands as it should: nothing more goes to it, and once
        what it holds has ended it is stopped, and replaced as any worker that ended is."""
        if worker.retiring or self._state is not EngineState.RUNNING:
            return
        worker.retiring = True
        worker.ready = False
        logger.warning(
            "worker process %d retires: %s; a new worker takes its place", worker.pid, message.reason
        )
        if not worker.held:
            self._stop_retired(worker)

    def _stop_retired(self, worker: WorkerHandle) -> None:
        task = asyncio.get_running_loop().create_task(worker.stop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- retries ------------------------------------------------------------

    def _retry_later(self, record: Record, result: ExecutionResult, cause: retries.Cause) -> bool:
        """Start the backoff before another attempt if the policy asks for one; False if this was the last.

        The execution stays `running` and gives back its concurrency slot while
        it waits. A cancel that came while the attempt ended on its own ends it
        `cancelled` here instead.
        """
        retry = record.retry
        if retry is None or self._pool is None or self._state is EngineState.CLOSED:
            return False
        delay = retries.next_delay(retry.policy, record.attempt, cause)
        if delay is None:
            return False
        if retry.cancelled:
            ended = outcomes.cancelled_between_attempts(record, result)
            self._say_in_log(record, ended)
            self._finalize(record, ended)
            return True
        retry.last = result
        retry.timer = asyncio.get_running_loop().call_later(delay, self._retry_now, record)
        self._add_to_log(record, self._retry_note(record, delay))
        return True

    def _retry_note(self, record: Record, delay: float) -> str:
        retry = record.retry
        assert retry is not None
        if self._identity is None:
            pid = os.getpid()
            self._identity = (pid, socket.gethostname(), process_tree.started_at(pid) or 0)
        pid, host, since = self._identity
        return log_retry_note(record.attempt + 1, retry.policy.max_attempts, delay, pid, host, since)

    def _retry_now(self, record: Record) -> None:
        """The backoff is over: queue the next attempt, ahead of work not yet started."""
        retry = record.retry
        assert retry is not None
        retry.timer = None
        if self._broken is not None:
            error = str(SpawnFailed(self._broken))
            ended = outcomes.result_without_worker(record, FAILED, error)
            self._say_in_log(record, ended)
            self._finalize(record, ended)
            return
        retry.queued = True
        self._scheduler.retry(record)

    def _pick_again(self, record: Record) -> WorkerHandle | None:
        """A worker for a later attempt: on the node that has the earlier attempts' log, when one has room."""
        pool: WorkerPool[Any] | None = self._pool
        if pool is None:
            return None
        last = record.worker
        node = pool.log_location(last) if last is not None else None
        if node is not None:
            for worker in pool.workers:
                here = pool.log_location(worker)
                if here is not None and here.node_id == node.node_id and _has_room(worker):
                    found: WorkerHandle = worker
                    return found
        return self._pick()

    def _cancel_between_attempts(self, record: Record) -> bool:
        """Cancel a retried execution; True when it ended at once, as it waited between attempts."""
        retry = record.retry
        assert retry is not None
        retry.cancelled = True
        if not retry.between_attempts:
            return False
        retry.stop_timer()
        if retry.queued:
            retry.queued = False
            self._scheduler.forget_retry(record)
        ended = outcomes.cancelled_between_attempts(record, retry.last)
        self._say_in_log(record, ended)
        self._finalize(record, ended)
        return True

    # -- ending executions ------------------------------------------------

    def _publish(self, record: Record, event: Any) -> None:
        if record.plan is not None:
            self.bus.publish(event, record.id, record.plan.id)
        else:
            self.bus.publish(event, record.id)

    def _finalize(self, record: Record, result: ExecutionResult) -> None:
        if self._telemetry is not None:
            self._telemetry.ended(record, result, self._pool)
        record.result = result
        record.status = result.status
        # The end is told once the store has kept the result (a journal: committed it).
        self._store.ended(record, self._announce_end)
        if self._scheduler.idle:
            # No end is coming to share a commit with: whoever waits for this one need not wait.
            self._store.flush()

    def _announce_end(self, record: Record) -> None:
        result = record.result
        assert result is not None
        if self.bus.active:
            self._publish(record, outcomes.end_event(record.id, result))
        self.bus.end_stream(record.id)
        record.mark_ended()
        if record.plan is not None:
            self._plan_command_ended(record.plan, record)
            if self._loop is not None:
                # The end may be told after its caller dispatched (a journal commits first):
                # what it made ready is started on the next turn.
                self._loop.call_soon(self._scheduler.dispatch)
        else:
            self._store.retire(record)

    def _cancel_unstarted(self, record: Record) -> None:
        self._finalize(record, outcomes.result_without_worker(record, CANCELLED, str(Cancelled())))

    def _cancel_record(self, record: Record) -> None:
        if self._telemetry is not None:
            self._telemetry.cancelling(record)
        if record.status is PENDING:
            self._cancel_unstarted(record)
        elif record.status is RUNNING and record.retry is not None and self._cancel_between_attempts(record):
            return
        elif record.status is RUNNING and record.worker is not None:
            record.cancel_sent = True
            record.worker.send(Cancel(record.key).to_wire())

    def _plan_command_ended(self, run: PlanRun, record: Record) -> None:
        self._scheduler.plan_command_ended(run, record)
        if self.bus.active:
            self.bus.publish(outcomes.progress_event(run, record), run.id)
        if not run.cancelled:
            for dependent in self._scheduler.release(run, record):
                if dependent.status is PENDING:
                    self._cancel_unstarted(dependent)
            self._scheduler.queue_plan(run)
        if run.ended == len(run.records):
            self._end_plan(run)

    def _end_plan(self, run: PlanRun) -> None:
        if run.result is not None:
            # Ended already, by the last of the commands its failure cancelled above (an
            # end announced at once, without a journal, comes back through here).
            return
        run.result = outcomes.plan_result(run)
        if self._telemetry is not None:
            self._telemetry.plan_ended(run)
        self._store.ended(run, self._announce_plan_end)
        if self._scheduler.idle:
            self._store.flush()

    def _announce_plan_end(self, run: PlanRun) -> None:
        self.bus.end_stream(run.id)
        run.mark_ended()
        self._store.retire(run)

    # -- worker lifecycle -------------------------------------------------

    def _on_worker_ready(self, worker: WorkerHandle) -> None:
        worker.set_max_frame(self._max_frame)
        self._scheduler.dispatch()

    def _cancel_everything(self) -> None:
        for plan in self._store.plans():
            if not plan.status.is_final:
                plan.cancelled = True
        for record in self._store.records():
            self._cancel_record(record)

    def _heartbeat(self) -> None:
        """Ping every worker; kill one that has said nothing for too long.

        A worker that is stopped (SIGSTOP, or a command that stopped its parent)
        or hung would hold its executions, and their timeouts, forever: its
        death fails them and kills their trees like any other worker death.
        """
        if self._state is not EngineState.RUNNING or self._pool is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for worker in list(self._pool.workers):
            if not worker.ready:
                continue
            asked = worker.unanswered_since
            if asked is not None and now - asked > _SILENCE_LIMIT:
                worker.die(f"stopped responding (no answer in {now - asked:.1f}s)")
            else:
                worker.ping()
        self._heartbeat_timer = loop.call_later(_HEARTBEAT, self._heartbeat)

    def _on_worker_death(self, worker: WorkerHandle, why: str) -> None:
        if self._forked_away is not None:
            # In a forked child's copy of the loop: the worker, its executions and trees are the parent's.
            return
        held = [self._running_by_key.pop(k) for k in list(worker.held) if k in self._running_by_key]
        worker.held.clear()
        self._credit.forget(worker)
        assert self._pool is not None
        # Asked now, before the pool starts a successor: a remote pool cleans up
        # through the successor it places on the same node.
        markers = {process_tree.marker_key(str(r.id), self.engine_id) for r in held}
        # Started now, as its own task: it runs even if the loop closes before the task below starts.
        cleanup = asyncio.ensure_future(
            self._pool.clean_up_after(worker, markers, {r.pid for r in held if r.pid})
        )
        # A worker ends itself on a hangup, SIGTERM or SIGQUIT after killing its trees: sent to a
        # terminal's whole process group, the signal reached the host too, which cancels.
        stopped = worker.exit_signal in _STOPPING_SIGNALS
        if self._state is EngineState.RUNNING:  # not a worker stopped at shutdown
            if self._telemetry is not None:
                self._telemetry.worker_died()
            suffix, extra = correlate(r.id for r in held)
            cancelled = sum(1 for r in held if stopped and r.cancel_sent)
            outcome = f"{len(held) - cancelled} fail, and {cancelled} it was cancelling end cancelled"
            logger.warning(
                "%s; of the %d execution(s) it held, %s%s",
                why,
                len(held),
                outcome if cancelled else "all fail",
                suffix,
                extra=extra,
            )
        if worker.cut_short:
            # The loop is closing: a task started now would not run. Its trees are being
            # killed on a thread of their own; its executions are failed without waiting for that.
            self._fail_held(held, why, stopped)
            return
        task = asyncio.get_running_loop().create_task(self._fail_abandoned(held, why, cleanup, stopped))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail_abandoned(
        self, held: list[Record], why: str, cleanup: Awaitable[None], stopped: bool
    ) -> None:
        """Wait until the trees a dead worker left behind are gone, then fail its executions."""
        try:
            await asyncio.wait_for(cleanup, _ABANDONED_KILL_TIMEOUT)
        except TimeoutError:
            if held:
                suffix, extra = correlate(r.id for r in held)
                logger.error(
                    "could not confirm the end of every process left by a dead worker%s", suffix, extra=extra
                )
        except Exception:
            suffix, extra = correlate(r.id for r in held)
            logger.exception("cleaning up after a dead worker failed%s", suffix, extra=extra)
        finally:
            self._fail_held(held, why, stopped)

    def _fail_held(self, held: list[Record], why: str, stopped: bool = False) -> None:
        """Fail what a dead worker held; with `stopped` (it ended itself on a stopping signal), what
        the host had asked it to cancel is cancelled."""
        error = f"{why} while running this execution"
        for record in held:
            self._scheduler.ran()
            if stopped and record.cancel_sent:
                # Asked to end, and ended (the trees are gone): the cancel's outcome.
                ended = outcomes.result_without_worker(record, CANCELLED, str(Cancelled()))
                self._say_in_log(record, ended)
                self._finalize(record, ended)
                continue
            lost = outcomes.result_without_worker(record, FAILED, error)
            # Said before any next attempt's header: the log tells why another began.
            self._say_in_log(record, lost)
            if record.retry is None or not self._retry_later(record, lost, "worker_lost"):
                self._finalize(record, lost)
        self._scheduler.dispatch()

    def _say_in_log(self, record: Record, result: ExecutionResult) -> None:
        """End the log with `result`, an outcome no worker wrote there, as a worker's footer would.

        Written on the loop, a line's append: it comes before a next attempt's
        header, which the worker that starts the attempt writes. Only for a
        command that ran (one that did not has no log) on this machine.
        """
        completed = (result.completed_at or utcnow()).timestamp()
        footer = log_footer(
            result.started_at.timestamp(), completed, result.status.value, result.exit_code, result.error
        )
        self._add_to_log(record, footer)

    def _add_to_log(self, record: Record, text: str) -> None:
        """Append `text` to the log of `record`, a command that ran on this machine (see `_say_in_log`)."""
        if record.started_at is None or self._pool is None:
            return
        if record.worker is not None and self._pool.log_location(record.worker) is not None:
            return  # on another node's disk
        try:
            append_to_log(record.log_path, text)
        except (OSError, IoError) as exc:
            suffix, extra = correlate([record.id])
            logger.warning("could not add to the log%s: %s", suffix, exc, extra=extra)

    # -- queries ------------------------------------------------------------

    def entry(self, entry_id: UUID) -> Record | PlanRun:
        return self._store.entry(entry_id)

    def status(self, entry_id: UUID) -> ExecutionStatus:
        return self._store.status(entry_id)

    def result(self, entry_id: UUID) -> ExecutionResult:
        try:
            record = self._store.record(entry_id)
        except NotFound as exc:
            if self._is_plan(entry_id):
                # The id is known, just not as a single command: say where its result is.
                exc.args = (f"{exc} is a plan: get_plan_result() (or wait()) returns its result",)
            raise
        if record.result is None:
            raise NotCompleted(entry_id)
        return record.result

    def _is_plan(self, entry_id: UUID) -> bool:
        try:
            self._store.plan(entry_id)
        except NotFound:
            return False
        return True

    def plan_result(self, plan_id: UUID) -> PlanExecutionResult:
        run = self._store.plan(plan_id)
        if run.result is None:
            raise NotCompleted(plan_id)
        return run.result

    async def wait(self, entry_id: UUID, timeout: float | None) -> ExecutionResult | PlanExecutionResult:
        entry = self._store.entry(entry_id)
        if not entry.settled:
            with self.bus.handler_waiting():
                if timeout is None:
                    await entry.end_event().wait()
                else:
                    await asyncio.wait_for(entry.end_event().wait(), timeout)
        assert entry.result is not None
        return entry.result

    def summaries(self, **filters: Any) -> list[ExecutionSummary]:
        return self._store.summaries(**filters)

    def cancel(self, entry_id: UUID) -> None:
        self.check_open()
        entry = self._store.entry(entry_id)
        if entry.status.is_final:
            raise NotRunning(entry_id)
        if isinstance(entry, PlanRun):
            entry.cancelled = True
            for record in entry.records:
                self._cancel_record(record)
        else:
            self._cancel_record(entry)

    async def read_logs(self, entry_id: UUID) -> str:
        """A command's log; for a plan, the logs its commands have, one after another."""
        entry = self._store.entry(entry_id)
        if self._pool is None:
            raise IoError("the engine has not started, so no log exists yet")
        budget = self.config.max_log_read_bytes
        if isinstance(entry, Record):
            return await self._pool.read_log(entry.worker, entry.log_path, limit=budget)
        # Commands that ran: on a worker of this engine, or of an earlier one on the journal.
        # Read one after another, each within what the others left of the budget.
        texts = []
        for record in entry.records:
            if record.worker is None and record.started_at is None:
                continue
            text = await self._pool.read_log(record.worker, record.log_path, missing_ok=True, limit=budget)
            budget -= len(text)  # at least a byte of the file for each character
            texts.append(text)
        return "".join(texts)

    def log_location(self, entry_id: UUID) -> LogNode | None:
        """The node holding a command's log when it is not this machine."""
        record = self._store.record(entry_id)
        return self._pool.log_location(record.worker) if self._pool is not None else None


def _has_room(worker: WorkerHandle) -> bool:
    return worker.ready and len(worker.held) < worker.capacity


def _ray_missing(reason: str) -> SpawnFailed:
    return SpawnFailed(f"the Ray backend needs Ray ({reason}): pip install 'cloudops-execution-engine[ray]'")


async def _first_of(work: asyncio.Future[Any], asked: asyncio.Event) -> bool:
    """Wait for `work`, or for `asked`: True when the work is done."""
    if work.done() or asked.is_set():
        return work.done()
    asking = asyncio.ensure_future(asked.wait())
    try:
        await asyncio.wait({work, asking}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        asking.cancel()
    return work.done()


def _all_of(waits: Iterable[Awaitable[Any]]) -> asyncio.Future[list[Any]]:
    """`asyncio.gather`, whose end counts as read even when it ends cancelled.

    Cancelled through `wait_for` (the host's loop closing during a shutdown
    its caller stopped waiting for), a gather ends with a CancelledError that
    nobody reads, and asyncio then logs "exception was never retrieved".
    """
    gathered = asyncio.gather(*waits)
    gathered.add_done_callback(_read_outcome)
    return gathered


def _read_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()

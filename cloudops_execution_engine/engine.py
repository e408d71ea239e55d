"""`ExecutionEngine`: the public face of the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import sqlite3
import warnings
import weakref
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

import pydantic
from pydantic import BaseModel, ConfigDict

from ._model import own_copy
from .actors.handlers import STOP, EventBus
from .actors.records import Record
from .actors.supervisor import Supervisor
from .config import ExecutionConfig
from .errors import EngineClosed, InvalidCommand, InvalidPlan, IoError, NotFound, NotRunning, map_errors
from .events import EventHandler, ExecutionEvent
from .logfiles import LogNode, log_path_for
from .requests import ExecutionPlan, ExecutionRequest
from .results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult

__all__ = ["ExecutionEngine", "LogNode"]

_M = TypeVar("_M", bound=pydantic.BaseModel)


def _coerce_id(value: UUID | str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        raise NotFound(str(value)) from None


def _let_go(supervisor: Supervisor) -> None:
    if supervisor.let_go():
        warnings.warn(
            "an ExecutionEngine was garbage collected without shutdown(): its workers and commands "
            "are being stopped now",
            ResourceWarning,
            stacklevel=1,
        )


def _coerce_model(value: Any, model: type[_M], invalid: type[InvalidCommand | InvalidPlan]) -> _M:
    """Accept the model itself, a dict or JSON text; pydantic's complaint becomes ours."""
    if isinstance(value, model):
        return value
    with map_errors({pydantic.ValidationError: invalid}):
        if isinstance(value, str | bytes):
            return model.model_validate_json(value)
        return model.model_validate(value)


def _own_plan(plan: ExecutionPlan) -> ExecutionPlan:
    """The engine's own copy of a host's plan, as it is now.

    The plan is the host's object: edited after `execute_plan()` (a command
    appended, an env changed), it would change what its pending commands run,
    what the journal records, and what `resume_plan()` rebuilds, which then
    failed on commands and records that no longer matched.
    """
    return own_copy(plan)


class ExecutionEngine:
    """Runs commands and plans on a pool of worker processes.

    Use it as an async context manager, or call `shutdown()` when done; the pool
    starts on first use. All methods must be called from the same event loop.
    """

    def __init__(self, config: ExecutionConfig | None = None) -> None:
        self.config = _own_copy(config) if config is not None else ExecutionConfig()
        self._bus = EventBus()
        self._supervisor = Supervisor(self.config, self._bus)
        # An engine dropped without shutdown() would leave its workers, and their
        # commands, running for as long as the host lives.
        self._let_go = weakref.finalize(self, _let_go, self._supervisor)
        self._let_go.atexit = False

    def with_event_handler(self, handler: EventHandler) -> ExecutionEngine:
        """Add a handler that receives every event; returns the engine for chaining.

        `EngineClosed` once shutdown has begun: it would never be told to stop.
        """
        if self._supervisor.winding_down:
            raise EngineClosed()
        self._bus.add_handler(handler)
        return self

    def remove_event_handler(self, handler: EventHandler) -> None:
        """Stop delivering events to `handler`; events already queued for it are dropped."""
        self._bus.remove_handler(handler)

    async def __aenter__(self) -> ExecutionEngine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start the worker pool now rather than on first use."""
        await self._supervisor.start()

    async def shutdown(self, cancel: bool = True) -> None:
        """Stop the engine; leaves no worker or command process behind.

        With `cancel` (the default) pending and running executions are cancelled
        and their trees killed; otherwise they are let finish first, unless a
        later call with `cancel` asks to cancel what is left.
        """
        if self._supervisor.loop_closed():
            # Started under a loop that is gone (a finished `asyncio.run`): what
            # it left running is stopped without it.
            self._supervisor.abandon()
            return
        await self._supervisor.shutdown(cancel)

    async def execute(self, request: ExecutionRequest) -> UUID:
        """Validate and queue one command; returns its id at once.

        Every refusal (a `ValidationError`, `EngineClosed`, `SpawnFailed` while
        no worker can start) is raised here; the command goes to a worker on
        the loop's next turn, together with the others queued in this one.
        """
        supervisor = self._supervisor
        supervisor.check_open()
        if not isinstance(request, ExecutionRequest):
            request = _coerce_model(request, ExecutionRequest, InvalidCommand)
        request.validate(self.config)
        if not supervisor.running:
            await supervisor.start()
        execution_id = supervisor.submit(request)
        if supervisor.should_yield():
            # A caller queueing many commands in one go would otherwise keep the
            # loop from hearing that running ones ended, and the workers would
            # sit idle until the whole batch was queued.
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                # The caller, cancelled here, never learns the id: the command
                # must not run behind its back. It is still queued, so it never starts.
                with contextlib.suppress(EngineClosed, NotRunning):
                    supervisor.cancel(execution_id)
                raise
        return execution_id

    async def execute_plan(self, plan: ExecutionPlan) -> UUID:
        """Validate and start a plan; returns its id at once."""
        self._supervisor.check_open()
        if isinstance(plan, ExecutionPlan):
            plan = _own_plan(plan)
        else:
            plan = _coerce_model(plan, ExecutionPlan, InvalidPlan)
        await self._supervisor.start()
        return self._supervisor.submit_plan(plan)

    async def get_status(self, execution_id: UUID | str) -> ExecutionStatus:
        await self._ready_to_answer()
        return self._supervisor.status(_coerce_id(execution_id))

    async def get_result(self, execution_id: UUID | str) -> ExecutionResult:
        await self._ready_to_answer()
        return self._supervisor.result(_coerce_id(execution_id))

    async def get_plan_result(self, plan_id: UUID | str) -> PlanExecutionResult:
        await self._ready_to_answer()
        return self._supervisor.plan_result(_coerce_id(plan_id))

    async def wait(
        self, execution_id: UUID | str, timeout: float | None = None
    ) -> ExecutionResult | PlanExecutionResult:
        """Wait for an execution or plan to end; `TimeoutError` if `timeout` seconds pass first."""
        await self._ready_to_answer()
        return await self._supervisor.wait(_coerce_id(execution_id), _checked_timeout(timeout))

    async def list_executions(
        self,
        *,
        status: ExecutionStatus | str | None = None,
        plan_id: UUID | str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ExecutionSummary]:
        """Executions and plans in submission order, oldest first; the filters given all apply.

        `status` keeps those in that status; `plan_id` keeps that plan's
        commands; `since` (an aware datetime) keeps those submitted at or after
        it; `limit`, applied last, keeps the newest `limit`. With a journal,
        earlier engines' executions and plans are listed too.
        """
        filters = _list_filters(status, plan_id, since, limit)
        await self._ready_to_answer()
        with map_errors({sqlite3.Error: IoError}, "cannot read journal"):
            return self._supervisor.summaries(**filters)

    async def _ready_to_answer(self) -> None:
        """Queries work until shutdown is done; with a journal, the first one starts the engine.

        The journal is what answers for earlier engines' work, and it is opened
        (and what a dead host left recovered) by `start()`.
        """
        supervisor = self._supervisor
        supervisor.check_usable()
        if self.config.journal is not None and not supervisor.running and not supervisor.winding_down:
            await supervisor.start()

    async def resume_plan(self, plan_id: UUID | str) -> UUID:
        """Run an ended plan again as a new plan: what completed counts as done, the rest runs again.

        The new plan has a new id, the same commands and strategy. Commands that
        completed keep their ids and results and do not run; the others run with
        new ids, as the strategy lets them. Its result names the old plan in
        `resumed_from`. `NotFound` for an id that is not a plan, `NotCompleted`
        for a plan still running.
        """
        self._supervisor.check_open()
        key = _coerce_id(plan_id)
        await self._supervisor.start()
        return self._supervisor.resume_plan(key)

    async def cancel(self, execution_id: UUID | str) -> None:
        """Cancel an execution or every unfinished command of a plan."""
        self._supervisor.cancel(_coerce_id(execution_id))

    async def read_logs(self, execution_id: UUID | str) -> str:
        """The log file's contents; for a plan, its commands' logs one after another."""
        key = _coerce_id(execution_id)
        await self._ready_to_answer()
        try:
            return await self._supervisor.read_logs(key)
        except IoError:
            self._explain_missing_log(key)
            raise

    def _explain_missing_log(self, key: UUID) -> None:
        """A finished execution's log that is gone under a retention policy: say so, not just ENOENT."""
        if self.config.retention is None:
            return
        entry = self._supervisor.entry(key)
        if not isinstance(entry, Record) or not entry.status.is_final or entry.log_path.exists():
            return
        raise IoError(
            f"the log file of {key} ({entry.log_path}) no longer exists: the retention policy removed it"
        )

    def get_log_path(self, execution_id: UUID | str) -> Path:
        """Where the execution's log file is (or will be); does not check that it exists.

        For an execution an earlier engine recorded in the journal, the path it
        was written to.
        """
        key = _coerce_id(execution_id)
        try:
            entry = self._supervisor.entry(key)
        except (NotFound, IoError):
            pass
        else:
            if isinstance(entry, Record) and entry.log_path != Path():
                return entry.log_path
        return log_path_for(self._supervisor.log_dir, key)

    def get_log_node(self, execution_id: UUID | str) -> LogNode | None:
        """The Ray node whose disk holds the execution's log file; None when it is this machine's.

        A `LogNode`: the node's address as a string, with its Ray node id as `node_id`.
        """
        node = self._supervisor.log_location(_coerce_id(execution_id))
        assert node is None or isinstance(node, LogNode), "a pool names a remote node as a LogNode"
        return node

    async def events(self, execution_id: UUID | str) -> AsyncIterator[ExecutionEvent]:
        """Yield the events of one execution or plan from now on, ending after its last one.

        Events wait for this iterator in a queue of its own. The output lines
        waiting there count toward the engine's backlog of undelivered output,
        like those waiting for a handler, so a reader that falls far behind holds
        back the flow of output; nothing is dropped.
        """
        self._supervisor.check_usable()
        key = _coerce_id(execution_id)
        entry = self._supervisor.entry(key)
        if entry.settled:
            return
        subscription = self._bus.subscribe(key)
        try:
            while True:
                with self._bus.handler_waiting():
                    event = await subscription.get()
                if event is STOP:
                    return
                yield event
        finally:
            self._bus.unsubscribe(subscription)


def _own_copy(config: ExecutionConfig) -> ExecutionConfig:
    """The engine's own config: checked whole as it is now, and copied, so that the host's object,
    edited later, neither changes nor breaks the engine.

    What cannot be deep-copied (a Ray `runtime_env` naming modules) is kept as given.
    """
    values = {name: _copied(getattr(config, name)) for name in type(config).model_fields}
    return _EngineConfig(**values)


class _EngineConfig(ExecutionConfig):
    """An engine's own config: what is set on it later is checked as it is set.

    The host's `ExecutionConfig` is not (a host may pass through states that are
    not valid while it sets fields one at a time); the engine's is used as it runs.
    """

    model_config = ConfigDict(**{**ExecutionConfig.model_config, "validate_assignment": True})


def _copied(value: Any) -> Any:
    """A deep copy of `value`; of a model that holds what cannot be copied, a copy of the rest."""
    try:
        return copy.deepcopy(value)
    except (TypeError, copy.Error):
        if isinstance(value, BaseModel):
            fields = type(value).model_fields
            return value.model_copy(update={name: _copied(getattr(value, name)) for name in fields})
        return value


def _checked_timeout(timeout: float | None) -> float | None:
    """`wait`'s timeout: a wrong one is a `TypeError` or `ValueError`, as for `list_executions`' filters.

    NaN compares false with everything, so asyncio would wait for ever on it.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if isinstance(timeout, int):
        try:
            timeout = float(timeout)
        except OverflowError:  # past any float: for ever, or not at all
            return None if timeout > 0 else 0.0
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds, not NaN")
    return timeout


def _list_filters(
    status: ExecutionStatus | str | None,
    plan_id: UUID | str | None,
    since: datetime | None,
    limit: int | None,
) -> dict[str, Any]:
    """`list_executions`' filters, checked: a wrong one is a `ValueError` or `TypeError`, as asyncio's are."""
    if status is not None:
        status = ExecutionStatus(status)
    if plan_id is not None:
        plan_id = _coerce_id(plan_id)
    if since is not None:
        if not isinstance(since, datetime):
            raise TypeError(f"since must be a datetime, not {type(since).__name__}")
        if since.tzinfo is None or since.utcoffset() is None:
            raise ValueError("since must be an aware datetime (with a timezone)")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
    return {"status": status, "plan_id": plan_id, "since": since, "limit": limit}

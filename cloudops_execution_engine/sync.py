"""`SyncExecutionEngine`: the engine for hosts without an event loop of their own.

It runs an `ExecutionEngine` on a private event loop in a daemon thread and
offers the same methods, blocking. Handlers run on that thread; plain
functions and `on_event` methods that are not coroutines are fine there.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

from .actors.handlers import STOP
from .config import ExecutionConfig
from .engine import ExecutionEngine
from .errors import EngineClosed
from .events import ExecutionEvent
from .requests import ExecutionPlan, ExecutionRequest
from .results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult

__all__ = ["SyncExecutionEngine"]

_T = TypeVar("_T")


class SyncExecutionEngine:
    def __init__(self, config: ExecutionConfig | None = None) -> None:
        self._engine = ExecutionEngine(config)
        self.config = self._engine.config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cloudops-execution-engine", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        if self._closed:
            coro.close()
            raise EngineClosed()
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def with_event_handler(self, handler: Any) -> SyncExecutionEngine:
        self._call(_run_sync(self._engine.with_event_handler, handler))
        return self

    def __enter__(self) -> SyncExecutionEngine:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def start(self) -> None:
        self._call(self._engine.start())

    def execute(self, request: ExecutionRequest) -> UUID:
        return self._call(self._engine.execute(request))

    def execute_plan(self, plan: ExecutionPlan) -> UUID:
        return self._call(self._engine.execute_plan(plan))

    def get_status(self, execution_id: UUID | str) -> ExecutionStatus:
        return self._call(self._engine.get_status(execution_id))

    def get_result(self, execution_id: UUID | str) -> ExecutionResult:
        return self._call(self._engine.get_result(execution_id))

    def get_plan_result(self, plan_id: UUID | str) -> PlanExecutionResult:
        return self._call(self._engine.get_plan_result(plan_id))

    def wait(
        self, execution_id: UUID | str, timeout: float | None = None
    ) -> ExecutionResult | PlanExecutionResult:
        return self._call(self._engine.wait(execution_id, timeout))

    def list_executions(self) -> list[ExecutionSummary]:
        return self._call(self._engine.list_executions())

    def cancel(self, execution_id: UUID | str) -> None:
        self._call(self._engine.cancel(execution_id))

    def read_logs(self, execution_id: UUID | str) -> str:
        return self._call(self._engine.read_logs(execution_id))

    def get_log_path(self, execution_id: UUID | str) -> Path:
        return self._engine.get_log_path(execution_id)

    def events(self, execution_id: UUID | str) -> Iterator[ExecutionEvent]:
        """Yield one execution's or plan's events as they happen, ending after its last."""
        inbox: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for event in self._engine.events(execution_id):
                    inbox.put(event)
            except BaseException as exc:
                inbox.put(exc)
            finally:
                inbox.put(STOP)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = inbox.get()
                if item is STOP:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def shutdown(self, cancel: bool = True) -> None:
        """Stop the engine and its loop thread; harmless twice."""
        if self._closed:
            return
        try:
            self._call(self._engine.shutdown(cancel))
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            if not self._thread.is_alive():
                self._loop.close()


async def _run_sync(fn: Any, *args: Any) -> Any:
    """Run a plain call on the loop thread (for calls that need the loop to be current)."""
    return fn(*args)

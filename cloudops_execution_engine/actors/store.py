"""Where the supervisor keeps executions and plans: the `Store` interface and the in-memory store.

The supervisor asks a store for everything it answers queries with, and tells
it when an execution or plan has its result, before anyone hears of the end:
that is the point where a durable store (a journal) writes the result down,
so that `wait()` and the terminal event never announce a result that a crash
could still lose. `MemoryStore` keeps everything in the host's memory, and
forgets the oldest finished entries beyond `max_retained_executions`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from uuid import UUID

from ..config import ExecutionConfig
from ..errors import NotFound
from ..requests import ExecutionRequest
from ..results import ExecutionStatus, ExecutionSummary, PlanExecutionResult
from .off_loop import in_thread
from .records import PlanRun, Record
from .retention import Retention, Sweeps, now, run_job

__all__ = ["MemoryStore", "Store", "matches", "select_newest", "store_for"]


class Store(Protocol):
    """What the supervisor needs of a store of executions and plans."""

    async def open(self) -> None:
        """Make ready before the engine starts (a journal: lock, migrate, recover)."""

    async def close(self) -> None:
        """Everything told has been written; let go of what was opened."""

    def abandon(self) -> None:
        """`close` without the event loop, which has closed."""

    def __contains__(self, entry_id: UUID) -> bool: ...

    def add(self, record: Record, request: ExecutionRequest) -> None:
        """Keep a single execution, just submitted as `request`."""

    def add_plan(self, run: PlanRun) -> None:
        """Keep a plan and each of its executions, just submitted."""

    def started(self, record: Record) -> None:
        """`record`'s command has started (its `pid` and `started_at` are set)."""

    def record(self, entry_id: UUID) -> Record:
        """An execution (alone or in a plan); `NotFound` otherwise."""

    def plan(self, entry_id: UUID) -> PlanRun:
        """A plan; `NotFound` otherwise."""

    def entry(self, entry_id: UUID) -> Record | PlanRun:
        """An execution or a plan; `NotFound` otherwise."""

    def status(self, entry_id: UUID) -> ExecutionStatus:
        """An execution's or a plan's status, without building what else is known of it."""

    def records(self) -> list[Record]:
        """Every execution this engine keeps in memory, in submission order."""

    def plans(self) -> list[PlanRun]:
        """Every plan this engine keeps in memory, in submission order."""

    def live_ids(self) -> set[UUID]:
        """The executions and plans not yet ended."""

    def ended(self, entry: Record | PlanRun, then: Callable[[Any], None]) -> None:
        """`entry` has its final result, which nobody has been told of yet.

        `then(entry)` tells them: the store calls it once the result is kept as
        it promises (at once in memory; once committed for a journal), on the
        loop, in the order the ends came.
        """

    def retire(self, entry: Record | PlanRun) -> None:
        """`entry` has ended and everyone has been told: it may be forgotten under retention."""

    def flush(self) -> None:
        """Nothing is running or queued: keep the ends given so far now, not with ends to come."""

    def summaries(
        self,
        status: ExecutionStatus | None = None,
        plan_id: UUID | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ExecutionSummary]:
        """Summaries of what matches every filter given, oldest submission first; the newest `limit`.

        With `plan_id`: that plan's commands (a resumed plan's reused ones among
        them, submitted with the plan they ran in), each summary naming that plan.
        """


class MemoryStore:
    """Executions and plans in dicts, with retention by count (and age) of finished entries."""

    def __init__(
        self, max_retained: int | None = None, retention: Retention | None = None, *, trimmed: bool = False
    ) -> None:
        """`trimmed`: another sweeps by its retention and calls `trim` (a journal's memory)."""
        self._records: dict[UUID, Record] = {}
        self._plans: dict[UUID, PlanRun] = {}
        self._retired: deque[UUID] = deque()
        # The commands of the entries in `_retired` (a plan counts as its commands), kept
        # as they come and go: counted afresh per entry forgotten, a trim was quadratic.
        self._retired_commands = 0
        self._max_retained = max_retained
        self._track_retired = retention is not None or max_retained is not None or trimmed
        self.retention = retention
        self._sweeps = Sweeps()

    async def open(self) -> None:
        retention = self.retention
        if retention is not None:
            await in_thread(run_job, retention.logs_job(set(), now()), name="cloudops-retention")
            self._sweeps.start(self.sweep)

    def sweep(self) -> None:
        """Apply the retention policy to memory now, and to the log directory in a thread."""
        retention = self.retention
        if retention is None:
            return
        moment = now()
        self.trim(retention.cutoff(moment), retention.policy.max_executions)
        self._sweeps.run_in_thread(run_job, retention.logs_job(self.live_ids(), moment))

    async def close(self) -> None:
        await self._sweeps.stop()

    def abandon(self) -> None:
        self._sweeps.abandon()

    def __contains__(self, entry_id: UUID) -> bool:
        return entry_id in self._records or entry_id in self._plans

    def add(self, record: Record, request: ExecutionRequest | None = None) -> None:
        self._records[record.id] = record

    def add_plan(self, run: PlanRun) -> None:
        self._plans[run.id] = run
        for record in run.records:
            self._records[record.id] = record

    def started(self, record: Record) -> None:
        return

    def record(self, entry_id: UUID) -> Record:
        record = self._records.get(entry_id)
        if record is None:
            raise NotFound(entry_id)
        return record

    def plan(self, entry_id: UUID) -> PlanRun:
        run = self._plans.get(entry_id)
        if run is None:
            raise NotFound(entry_id)
        return run

    def entry(self, entry_id: UUID) -> Record | PlanRun:
        found = self._records.get(entry_id) or self._plans.get(entry_id)
        if found is None:
            raise NotFound(entry_id)
        return found

    def status(self, entry_id: UUID) -> ExecutionStatus:
        return self.entry(entry_id).status

    def records(self) -> list[Record]:
        return list(self._records.values())

    def plans(self) -> list[PlanRun]:
        return list(self._plans.values())

    def live_ids(self) -> set[UUID]:
        live = {key for key, record in self._records.items() if not record.settled}
        live.update(key for key, run in self._plans.items() if not run.settled)
        return live

    def ended(self, entry: Record | PlanRun, then: Callable[[Any], None]) -> None:
        # The record itself holds the result.
        then(entry)

    def flush(self) -> None:
        """Every end is kept as it comes."""

    def retire(self, entry: Record | PlanRun) -> None:
        if not self._track_retired:
            return
        self._retired.append(entry.id)
        self._retired_commands += len(entry.records) if isinstance(entry, PlanRun) else 1
        limit = self._max_retained
        if limit is not None:
            # A plan counts as its commands, as `trim` counts it; the entry that has just
            # ended stays, however many commands it has, so its own waiter can still ask.
            while self._retired_commands > limit and len(self._retired) > 1:
                self._forget(self._retired.popleft())

    def _forget(self, old: UUID) -> None:
        """Forget a retired entry, just taken off `_retired`."""
        plan = self._plans.pop(old, None)
        if plan is not None:
            self._retired_commands -= len(plan.records)
            for record in plan.records:
                if self._records.get(record.id) is record:
                    del self._records[record.id]
        else:
            self._retired_commands -= 1
            self._records.pop(old, None)

    def trim(self, ended_before: datetime | None, keep: int | None) -> int:
        """Forget finished entries that ended before `ended_before`, and all but the newest `keep`.

        A plan counts as its commands. Returns how many entries were forgotten.
        """
        forgotten = 0
        retired = self._retired
        if ended_before is not None:
            while retired and _ended_at(
                self._records.get(retired[0]) or self._plans.get(retired[0]), ended_before
            ):
                self._forget(retired.popleft())
                forgotten += 1
        if keep is not None:
            while retired and self._retired_commands > keep:
                self._forget(retired.popleft())
                forgotten += 1
        return forgotten

    def summaries(
        self,
        status: ExecutionStatus | None = None,
        plan_id: UUID | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ExecutionSummary]:
        items: list[Record | PlanRun]
        if plan_id is not None:
            items = list(self.plan_records(plan_id))
        else:
            items = [*self._plans.values(), *self._records.values()]
        items.sort(key=_submitted)
        if status is not None or since is not None:
            items = [item for item in items if matches(item, status, None, since)]
        return [item.summary() for _, item in select_newest([(0, item) for item in items], limit)]

    def plan_records(self, plan_id: UUID) -> list[Record]:
        """A plan's commands, as that plan holds them (none when it is no plan kept here).

        A command a resumed plan reuses is a record of each plan: listed under
        either, it is that plan's command.
        """
        run = self._plans.get(plan_id)
        return run.records if run is not None else []


def _submitted(item: Record | PlanRun) -> datetime:
    return item.submitted_at if isinstance(item, Record) else item.started_at


def _ended_at(item: Record | PlanRun | None, before: datetime) -> bool:
    """Whether `item` (None: already forgotten) ended before `before`."""
    if item is None:
        return True
    result = item.result
    if result is None:
        return False
    if isinstance(result, PlanExecutionResult):
        assert isinstance(item, PlanRun)
        return item.started_at + result.total_duration < before
    return (result.completed_at or result.started_at) < before


def matches(
    item: Record | PlanRun, status: ExecutionStatus | None, plan_id: UUID | None, since: datetime | None
) -> bool:
    """Whether `item` passes the filters of `list_executions`."""
    if status is not None and item.status is not status:
        return False
    if plan_id is not None and (not isinstance(item, Record) or item.plan is None or item.plan.id != plan_id):
        return False
    return since is None or _submitted(item) >= since


_T = TypeVar("_T")


def select_newest(items: list[tuple[int, _T]], limit: int | None) -> list[tuple[int, _T]]:
    """The last `limit` of `items` (all with None); `items` are oldest first."""
    if limit is None:
        return items
    if limit <= 0:
        return []
    return items[-limit:]


def store_for(config: ExecutionConfig, log_dir: Path, engine_id: str | None = None) -> Store:
    """The store `config` asks for: a journal when it names one, else memory; retention sweeps `log_dir`.

    `engine_id` is what the engine's commands carry (`process_tree.ENGINE_ENV`), for recovery.
    """
    retention = Retention(config.retention, log_dir) if config.retention is not None else None
    if config.journal is None:
        return MemoryStore(config.max_retained_executions, retention)
    # Only an engine with a journal loads SQLite's writer, its schema and recovery.
    from .journal import JournalStore
    from .secrets import json_masker

    memory = MemoryStore(config.max_retained_executions, trimmed=retention is not None)
    return JournalStore(
        Path(config.journal),
        memory,
        config.default_timeout_ms,
        retention,
        json_masker(config.secrets),
        engine_id,
    )

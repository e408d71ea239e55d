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
from typing import Protocol
from uuid import UUID

from ..errors import NotFound
from ..results import ExecutionSummary
from .records import PlanRun, Record

__all__ = ["MemoryStore", "Store"]


class Store(Protocol):
    """What the supervisor needs of a store of executions and plans."""

    def __contains__(self, entry_id: UUID) -> bool: ...

    def add(self, record: Record) -> None:
        """Keep a single execution, just submitted."""

    def add_plan(self, run: PlanRun) -> None:
        """Keep a plan and each of its executions, just submitted."""

    def record(self, entry_id: UUID) -> Record:
        """An execution (alone or in a plan); `NotFound` otherwise."""

    def plan(self, entry_id: UUID) -> PlanRun:
        """A plan; `NotFound` otherwise."""

    def entry(self, entry_id: UUID) -> Record | PlanRun:
        """An execution or a plan; `NotFound` otherwise."""

    def records(self) -> list[Record]:
        """Every execution kept, in submission order."""

    def plans(self) -> list[PlanRun]:
        """Every plan kept, in submission order."""

    def ended(self, entry: Record | PlanRun) -> None:
        """`entry` has its final result, which nobody has been told of yet."""

    def retire(self, entry: Record | PlanRun) -> None:
        """`entry` has ended and everyone has been told: it may be forgotten under retention."""

    def summaries(self) -> list[ExecutionSummary]:
        """A summary of every execution and plan kept, oldest submission first."""


class MemoryStore:
    """Executions and plans in dicts, with retention by count of finished entries."""

    def __init__(self, max_retained: int | None = None) -> None:
        self._records: dict[UUID, Record] = {}
        self._plans: dict[UUID, PlanRun] = {}
        self._retired: deque[UUID] = deque()
        self._max_retained = max_retained

    def __contains__(self, entry_id: UUID) -> bool:
        return entry_id in self._records or entry_id in self._plans

    def add(self, record: Record) -> None:
        self._records[record.id] = record

    def add_plan(self, run: PlanRun) -> None:
        self._plans[run.id] = run
        for record in run.records:
            self._records[record.id] = record

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

    def records(self) -> list[Record]:
        return list(self._records.values())

    def plans(self) -> list[PlanRun]:
        return list(self._plans.values())

    def ended(self, entry: Record | PlanRun) -> None:
        # The record itself holds the result.
        return

    def retire(self, entry: Record | PlanRun) -> None:
        limit = self._max_retained
        if limit is None:
            return
        self._retired.append(entry.id)
        while len(self._retired) > limit:
            old = self._retired.popleft()
            plan = self._plans.pop(old, None)
            if plan is not None:
                for record in plan.records:
                    self._records.pop(record.id, None)
            else:
                self._records.pop(old, None)

    def summaries(self) -> list[ExecutionSummary]:
        items: list[Record | PlanRun] = [*self._plans.values(), *self._records.values()]
        items.sort(key=lambda e: e.submitted_at if isinstance(e, Record) else e.started_at)
        return [item.summary() for item in items]

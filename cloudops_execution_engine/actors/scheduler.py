"""The fair queue, dispatch within the engine's concurrency limit, and plan progression.

The queue holds sources: a single record, or a plan with commands ready to
start. Dispatch takes one command from the source at the head, then puts a
plan that still has ready commands at the back. Single requests start in
arrival order; a large plan cannot starve work submitted after it. A command
starts only when a worker has room for it and fewer than
`max_concurrent_executions` run; the rest wait `pending`.

A plan's strategy (its `plans.Schedule`) says which commands are ready at
first and which an ended command releases or drops; this module only queues
what it says.

What `execute()` submits is queued at once and dispatched on the next turn of
the loop (`add_soon`): `execute()` returns without encoding or sending
anything, and every submission of one turn goes to the workers together, one
write per worker. Nothing that can refuse a request happens in dispatch, so
deferring it changes no error `execute()` raises.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator

from .pool import WorkerHandle
from .records import COMPLETED, PENDING, PlanRun, Record

__all__ = ["Scheduler"]

# While more is queued than may run, `execute()` lets the loop turn once per this
# many submissions: often enough that ended commands are replaced at once, rarely
# enough that a batch is not slowed by a turn per command.
_SUBMITS_PER_TURN = 16


class Scheduler:
    def __init__(
        self,
        limit: int,
        pick: Callable[[], WorkerHandle | None],
        start: Callable[[WorkerHandle, Record], bool],
        pick_again: Callable[[Record], WorkerHandle | None] | None = None,
        sent: Callable[[], None] | None = None,
    ) -> None:
        """`pick` names a worker with room, or None; `start` sends it a record, False if it could not.

        `pick_again` names the worker for another attempt of a record (one near its logs), or None.
        `sent` is called after a deferred dispatch (`add_soon`), to write what it sent at once.
        """
        self._limit = limit
        self._pick = pick
        self._start = start
        self._pick_again = pick_again or (lambda _record: pick())
        self._sent = sent
        self._queue: deque[Record | PlanRun] = deque()
        # Executions whose backoff is over, waiting for their next attempt. They
        # go first: each was admitted before anything still in the queue.
        self._retries: deque[Record] = deque()
        self.running = 0
        self._since_yield = 0
        self._dispatch_soon = False  # a deferred dispatch is waiting for its turn

    def add(self, record: Record) -> None:
        self._queue.append(record)
        self.dispatch()

    def add_soon(self, record: Record) -> None:
        """Queue a record now and dispatch on the next loop turn, with whatever else that turn queues.

        The record is queued (and so `pending`, cancellable, drained by a broken
        pool) before this returns: only the sending waits.
        """
        self._queue.append(record)
        if not self._dispatch_soon:
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch_deferred)

    def _dispatch_deferred(self) -> None:
        self._dispatch_soon = False
        self.dispatch()
        if self._sent is not None:
            self._sent()

    def add_plan(self, run: PlanRun) -> None:
        run.ready.extend(run.schedule.initial())
        self.queue_plan(run)
        self.dispatch()

    def queue_plan(self, run: PlanRun) -> None:
        if not run.queued and not run.cancelled and run.can_take():
            run.queued = True
            self._queue.append(run)

    def retry(self, record: Record) -> None:
        """Queue the next attempt of a record that is still running."""
        self._retries.append(record)
        self.dispatch()

    def forget_retry(self, record: Record) -> None:
        """Take back a queued attempt (its execution was cancelled)."""
        if record in self._retries:
            self._retries.remove(record)

    def dispatch(self) -> None:
        while self._retries and self.running < self._limit:
            worker = self._pick_again(self._retries[0])
            if worker is None:
                return
            if self._start(worker, self._retries.popleft()):
                self.running += 1
        while self.running < self._limit and self._queue:
            worker = self._pick()
            if worker is None:
                return
            source = self._queue.popleft()
            record: Record | None
            if isinstance(source, PlanRun):
                source.queued = False
                record = source.take()
                self.queue_plan(source)
            else:
                record = source if source.status is PENDING else None
            if record is not None and self._start(worker, record):
                self.running += 1

    def should_yield(self) -> bool:
        """Whether `execute()` should let the loop turn: every few submissions while the queue is deep."""
        if len(self._queue) < self._limit:
            self._since_yield = 0
            return False
        self._since_yield += 1
        if self._since_yield < _SUBMITS_PER_TURN:
            return False
        self._since_yield = 0
        return True

    @property
    def idle(self) -> bool:
        """Nothing running, and nothing waiting to run."""
        return self.running == 0 and not self._queue and not self._retries

    def ran(self) -> None:
        """A command that was started has ended (its worker reported, or died)."""
        self.running -= 1

    def not_started(self, record: Record) -> None:
        """`start` refused a record that a plan had counted as running."""
        if record.plan is not None:
            record.plan.running -= 1

    def plan_command_ended(self, run: PlanRun, record: Record) -> None:
        run.ended += 1
        if record.worker is not None:
            run.running -= 1

    def release(self, run: PlanRun, record: Record) -> list[Record]:
        """Queue what `record`'s end makes ready; return the pending commands it drops."""
        ready, dropped = run.schedule.ended(record.index, record.status is COMPLETED)
        run.ready.extend(ready)
        return [run.records[index] for index in dropped if run.records[index].status is PENDING]

    def drain_pending(self) -> Iterator[Record]:
        """Take every queued command and later attempt that has not started (the pool cannot run them)."""
        while self._retries:
            yield self._retries.popleft()
        while self._queue:
            source = self._queue.popleft()
            if isinstance(source, PlanRun):
                source.queued = False
                while source.ready:
                    record = source.records[source.ready.popleft()]
                    if record.status is PENDING:
                        yield record
            elif source.status is PENDING:
                yield source

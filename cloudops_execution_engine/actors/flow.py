"""Output credit: how the host holds back a worker's output while its listeners are behind.

A worker sends at most `OUTPUT_WINDOW` of output that the host has not given
back as `Credit`. The host gives it back as it takes output in, in pieces of a
quarter window, except while the event bus is congested (a handler or an
`events()` reader is behind): then it keeps the credit until the bus has room
again. The worker stops reading its commands' pipes, and they block on their
writes: host memory stays bounded and no event is dropped.
"""

from __future__ import annotations

from ..protocol import OUTPUT_WINDOW, Credit
from .handlers import EventBus
from .pool import WorkerHandle

__all__ = ["OutputCredit"]

_BATCH = OUTPUT_WINDOW // 4


class OutputCredit:
    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._due: dict[WorkerHandle, int] = {}
        bus.on_relief = self.release

    def taken(self, worker: WorkerHandle, weight: int) -> None:
        """The host has taken in `weight` of `worker`'s output."""
        due = self._due.get(worker, 0) + weight
        if due >= _BATCH and not self._bus.congested:
            worker.send(Credit(due).to_wire())
            due = 0
        self._due[worker] = due

    def release(self) -> None:
        """Give back everything held: the bus has room again."""
        for worker, due in self._due.items():
            if due:
                worker.send(Credit(due).to_wire())
                self._due[worker] = 0

    def forget(self, worker: WorkerHandle) -> None:
        self._due.pop(worker, None)

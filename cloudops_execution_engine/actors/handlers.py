"""Delivering events to handlers without letting one handler hurt another.

Each handler gets its own queue and its own task on the host loop, so a
handler that blocks only delays itself, a handler that raises is logged and
keeps receiving, and every handler sees every execution's events in the order
they happened. Per-execution subscribers (`ExecutionEngine.events`) are fed
the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any
from uuid import UUID

from ..events import ExecutionEvent

__all__ = ["EventBus"]

logger = logging.getLogger("cloudops_execution_engine.events")

STOP = object()  # ends a channel or a subscriber's stream


class _Channel:
    """One handler's queue and task.

    A deque with one waiting future rather than an `asyncio.Queue`: a channel has
    one reader and no bound, so the queue's getter and putter bookkeeping would be
    cost paid on every event for nothing.
    """

    __slots__ = ("handler", "items", "task", "waiter")

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.items: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    def put(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _run(self) -> None:
        deliver = _deliverer(self.handler)
        items = self.items
        while True:
            if not items:
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
                continue
            item = items.popleft()
            if item is STOP:
                return
            # A batch (a list) is the lines of one read, in order.
            for event in item if isinstance(item, list) else (item,):
                try:
                    outcome = deliver(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception(
                        "event handler %r raised on %s; it keeps receiving events",
                        self.handler,
                        type(event).__name__,
                    )


def _deliverer(handler: Any) -> Callable[[Any], Any]:
    on_event = getattr(handler, "on_event", None)
    if callable(on_event):
        return on_event  # type: ignore[no-any-return]
    if callable(handler):
        return handler  # type: ignore[no-any-return]
    raise TypeError(f"{handler!r} has no on_event method")


class EventBus:
    def __init__(self) -> None:
        self._handlers: list[Any] = []
        self._channels: list[_Channel] = []
        self._subscribers: dict[UUID, list[asyncio.Queue[Any]]] = {}

    def add_handler(self, handler: Any) -> None:
        _deliverer(handler)  # reject a non-handler now, not at the first event
        self._handlers.append(handler)
        if self._channels or _loop_running():
            self._channels.append(_Channel(handler))

    def remove_handler(self, handler: Any) -> None:
        if handler not in self._handlers:
            raise ValueError(f"{handler!r} is not an event handler of this engine")
        self._handlers.remove(handler)
        for channel in [c for c in self._channels if c.handler is handler]:
            self._channels.remove(channel)
            channel.task.cancel()

    def start(self) -> None:
        """Open a channel for each handler added before the loop was known."""
        have = {id(c.handler) for c in self._channels}
        for handler in self._handlers:
            if id(handler) not in have:
                self._channels.append(_Channel(handler))

    @property
    def active(self) -> bool:
        """Whether anyone listens; when nobody does, events are not even built."""
        return bool(self._channels) or bool(self._subscribers)

    def publish(self, event: ExecutionEvent, *keys: UUID) -> None:
        for channel in self._channels:
            channel.put(event)
        if self._subscribers:
            for key in keys:
                for queue in self._subscribers.get(key, ()):
                    queue.put_nowait(event)

    def publish_batch(self, events: list[ExecutionEvent], *keys: UUID) -> None:
        """Publish several events of one execution at once: one queue item per listener."""
        for channel in self._channels:
            channel.put(events)
        if self._subscribers:
            for key in keys:
                for queue in self._subscribers.get(key, ()):
                    for event in events:
                        queue.put_nowait(event)

    def subscribe(self, key: UUID) -> asyncio.Queue[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribers.setdefault(key, []).append(queue)
        return queue

    def unsubscribe(self, key: UUID, queue: asyncio.Queue[Any]) -> None:
        queues = self._subscribers.get(key)
        if queues and queue in queues:
            queues.remove(queue)
            if not queues:
                del self._subscribers[key]

    def end_stream(self, key: UUID) -> None:
        """Tell the subscribers of `key` that its last event has been published."""
        for queue in self._subscribers.pop(key, ()):
            queue.put_nowait(STOP)

    async def drain(self, timeout: float) -> None:
        """Let every handler finish what is queued (bounded), then stop them."""
        for channel in self._channels:
            channel.put(STOP)
        tasks = [c.task for c in self._channels]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                logger.warning("event handler %r still busy at shutdown; cancelled", task)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._channels.clear()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

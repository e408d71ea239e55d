"""Delivering events to handlers and subscribers without letting one hurt another.

Each handler gets its own queue and its own task on the host loop, so a
handler that blocks only delays itself, a handler that raises is logged and
keeps receiving, and every handler sees every execution's events in the order
they happened. A handler added with `on_thread=True` (the plain functions given
to `SyncExecutionEngine`) runs on a thread of its own instead: its task hands
the thread what is queued and waits for it, so the loop never runs the
handler's code. Per-execution subscribers (`ExecutionEngine.events`) get a
queue each (`Subscription`).

Flow control. A batch of output lines is published with the byte size of the
frame it came from, its weight. Each listener (handler channel or subscriber)
that receives the batch counts the weight as undelivered until the batch has
been handed over in full: until its handler returned from the batch's last
event, or its reader took that event. `backlog` is the largest such total.
`congested` turns on when it rises above `HIGH_WATER` and off when it falls
below `LOW_WATER`, and `on_relief` is called each time it turns off, so the
supervisor can hold back workers' output while a listener is far behind and
resume it later: host memory stays bounded and no event is dropped.

A subscriber opened with `counted=False` keeps its weight to itself until
`adopt()`: it is a buffer nobody may ever read (`SyncExecutionEngine` keeps one
per submitted id), and one unread buffer must not hold back every worker's output.
Nor does a handler while it waits on the engine (`handler_waiting`): the output
it waits for would otherwise wait for it. And a shutdown a handler asked for
does not wait for that handler (`spare`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import queue
import threading
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ..events import ExecutionEvent
from .handler_raises import HandlerRaises

if TYPE_CHECKING:
    from .outcomes import LineEvents

__all__ = ["EventBus", "Subscription", "is_coroutine_handler"]

logger = logging.getLogger("cloudops_execution_engine.events")

STOP = object()  # ends a channel or a subscriber's stream

_COROUTINE = types.CoroutineType

# After a drain has given up on a handler, how long its thread gets to return
# from the call it is in before it is left behind (it is a daemon thread).
_THREAD_EXIT_TIMEOUT = 1.0
# How long output may be held back for one listener before the engine says so (once an episode).
CONGESTED_SAID_AFTER_S = 10.0


class _Listener:
    """What the bus counts: undelivered weight, and whether it counts toward `backlog`."""

    __slots__ = ("bus", "counted", "pending")

    def __init__(self, bus: EventBus, counted: bool) -> None:
        self.bus = bus
        self.counted = counted
        self.pending = 0


# The channel whose handler is running in this context: an async handler, and what it awaits.
_RUNNING_HANDLER: contextvars.ContextVar[_Channel | None] = contextvars.ContextVar(
    "cloudops_running_handler", default=None
)
# The event whose delivery this context is part of. A task the handler starts copies both,
# and outlives the delivery: its waits on the engine hold the flow back as anyone's do.
_DELIVERY: contextvars.ContextVar[Any] = contextvars.ContextVar("cloudops_delivery", default=None)

# Loops the engine runs on threads of its own (`SyncExecutionEngine`): no exit of the host's.
_OWN_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def run_as_our_own(loop: asyncio.AbstractEventLoop) -> None:
    """`loop` runs on a thread of the engine's own: a handler's `SystemExit` there is a raise, not an exit."""
    _OWN_LOOPS.add(loop)


def _on_a_loop_of_our_own() -> bool:
    try:
        return asyncio.get_running_loop() in _OWN_LOOPS
    except RuntimeError:
        return False


class _Channel(_Listener):
    """One handler's queue and task.

    A deque with one waiting future rather than an `asyncio.Queue`: a channel has
    one reader and no bound, so the queue's getter and putter bookkeeping would be
    cost paid on every event for nothing.

    Items are single events, `(events, weight)` batches, or STOP.
    """

    __slots__ = ("delivering", "handler", "items", "raises", "task", "thread", "waiter")

    def __init__(self, bus: EventBus, handler: Any, on_thread: bool) -> None:
        super().__init__(bus, counted=True)
        self.handler = handler
        self.delivering: Any = None  # the event an async handler is being awaited on
        self.raises = HandlerRaises(handler)
        self.items: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        deliver = _deliverer(handler)
        loop = asyncio.get_running_loop()
        self.thread = _HandlerThread(self, deliver, loop) if on_thread else None
        if self.thread is not None:
            self.task = loop.create_task(self._run_on_thread(self.thread))
        else:
            self.task = loop.create_task(self._run(deliver))
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The delivery ended; unless the bus ended it, the handler hears no more and holds nothing back.

        A handler that cancelled its own delivery task, say, would otherwise stay
        registered, never served again, and its queue would keep the output
        credit every worker waits for.
        """
        bus = self.bus
        if self not in bus._channels or bus._draining:
            return
        if not task.cancelled():
            why = f"{task.exception()!r}"
        elif _loop_ending(task):
            why = ""  # the host's loop is ending: nothing more to deliver, nor anyone to tell
        else:
            why = "it was cancelled"
        if why:
            logger.error(
                "event handler %r receives no more events: its delivery ended (%s)", self.handler, why
            )
        bus._channels = [c for c in bus._channels if c is not self]
        if self.thread is not None:
            self.thread.stop(abandon=True)
            bus._retired.append(self.thread)
        bus._forget(self)

    def put(self, item: Any) -> None:
        self.items.append(item)
        if self.waiter is not None:
            _wake(self.waiter)
            self.waiter = None

    async def _wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    async def _run(self, deliver: Callable[[Any], Any]) -> None:
        # Seen by whatever the handler calls, and by the tasks it starts (they copy the context).
        _RUNNING_HANDLER.set(self)
        try:
            await self._deliver_all(deliver)
        finally:
            self.raises.flush()

    async def _deliver_all(self, deliver: Callable[[Any], Any]) -> None:
        items = self.items
        bus = self.bus
        while True:
            if not items:
                due = self.raises.quiet_in()
                if due is None:
                    await self._wait()
                else:
                    # Raises only counted are said once the handler has gone quiet a while.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wait(), due)
                    if not items:
                        self.raises.flush()
                continue
            item = items.popleft()
            if item is STOP:
                return
            # A batch is the lines of one read, in order.
            if type(item) is tuple:
                events, weight = item
            else:
                events, weight = (item,), 0
            for event in events:
                try:
                    outcome = deliver(event)
                    # A coroutine (an `async def` handler) or None (a plain one)
                    # without the general test: this runs once per output line.
                    if type(outcome) is _COROUTINE or (outcome is not None and inspect.isawaitable(outcome)):
                        # What the handler runs (and the tasks it starts) sees which delivery
                        # it is part of: a wait on the engine is spared only while that lasts.
                        self.delivering = event
                        _DELIVERY.set(event)
                        try:
                            await outcome
                        finally:
                            self.delivering = None
                except asyncio.CancelledError:
                    if _being_cancelled():
                        raise
                    # The handler's own await was cancelled, not this channel:
                    # ending the channel here would strand every later event.
                    self.raises.record(event)
                except (KeyboardInterrupt, SystemExit):
                    if not _on_a_loop_of_our_own():
                        raise  # the host's own exit, which asyncio raises out of the loop
                    # Out of a `SyncExecutionEngine`'s loop it would end only that thread,
                    # and every blocking call waiting on it would wait for ever.
                    self.raises.record(event)
                except BaseException:
                    # An `Exception`, or a handler's own kind of giving up (a GeneratorExit,
                    # a host's abort type): one event's failure. Letting it end this task
                    # would leave the handler registered and never served again, and its
                    # queue holding the output credit every worker waits for.
                    self.raises.record(event)
            if weight:
                bus._delivered(self, weight)

    async def _run_on_thread(self, thread: _HandlerThread) -> None:
        items = self.items
        try:
            while True:
                if not items:
                    await self._wait()
                    continue
                # Everything queued goes over at once: one wake-up of the thread
                # and one back per turn, not per event.
                taken: list[Any] = []
                stop = False
                while items:
                    item = items.popleft()
                    if item is STOP:
                        stop = True
                        break
                    taken.append(item)
                if taken:
                    await thread.deliver(taken)
                if stop:
                    thread.stop(abandon=False)
                    return
        except BaseException:
            thread.stop(abandon=True)
            raise


class _HandlerThread:
    """A handler's own thread: it calls the handler on what its channel hands over, in order.

    The weight of each batch is given back to the bus (on the loop) as soon as
    the handler has returned from the batch's last event.
    """

    __slots__ = ("_channel", "_deliver", "_jobs", "_loop", "_stopping", "exited", "thread")

    def __init__(
        self, channel: _Channel, deliver: Callable[[Any], Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._channel = channel
        self._deliver = deliver
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[list[Any], asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._stopping = False
        self.exited: asyncio.Future[None] = loop.create_future()
        self.thread = threading.Thread(
            target=self._main, name=f"cloudops-event-handler-{_name_of(channel.handler)}", daemon=True
        )
        self.thread.start()

    def deliver(self, items: list[Any]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = self._loop.create_future()
        self._jobs.put((items, done))
        return done

    def stop(self, abandon: bool) -> None:
        """Let the thread end after what it was given, or with `abandon` after the call it is in."""
        if abandon:
            self._stopping = True
        self._jobs.put(None)

    def _main(self) -> None:
        bus = self._channel.bus
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=self._channel.raises.quiet_in())
                except queue.Empty:
                    self._channel.raises.flush()  # quiet a while after raises only counted
                    continue
                if job is None or self._stopping:
                    return
                items, done = job
                for item in items:
                    if type(item) is tuple:
                        events, weight = item
                    else:
                        events, weight = (item,), 0
                    for event in events:
                        if self._stopping:
                            return
                        self._call(event)
                    if weight:
                        self._post(bus._delivered, self._channel, weight)
                self._post(_resolve, done)
        finally:
            self._channel.raises.flush()
            self._post(_resolve, self.exited)

    def _call(self, event: Any) -> None:
        try:
            outcome = self._deliver(event)
            if inspect.isawaitable(outcome):
                # A plain function that returned an awaitable: it can only be
                # awaited on the loop, and this thread waits so order holds.
                asyncio.run_coroutine_threadsafe(_awaited(outcome), self._loop).result()
        except BaseException:
            # `sys.exit()` (or a KeyboardInterrupt raised) here would end only this
            # thread, in Python: its queue would never drain, and backpressure
            # would hold every command's output back behind it for ever.
            self._channel.raises.record(event)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        # RuntimeError: the loop has closed, and nobody waits for this any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)


class Subscription(_Listener):
    """One reader's queue of one execution's (or plan's) events, in order, ending with STOP.

    Items are single events, `(events, weight)` batches, or STOP. A batch's
    weight is given back when the reader takes its last event. `watcher`, when
    set, is called with what was just queued (a batch's events, or a one-item
    sequence): `SyncExecutionEngine` bounds its early buffers with it.
    """

    __slots__ = ("_head", "_index", "_items", "_waiter", "key", "watcher")

    def __init__(self, bus: EventBus, key: UUID, counted: bool) -> None:
        super().__init__(bus, counted)
        self.key = key
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._head: tuple[Sequence[Any], int] | None = None  # the batch being read
        self._index = 0
        self.watcher: Callable[[Subscription, Sequence[Any]], None] | None = None

    def _put(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None:
            _wake(self._waiter)
            self._waiter = None
        if self.watcher is not None:
            self.watcher(self, (item,))

    def _put_batch(self, events: Sequence[Any], weight: int) -> None:
        self._items.append((events, weight))
        if weight:
            self.pending += weight
            if self.counted and self.pending >= self.bus.LOW_WATER:
                self.bus._loaded(self)
        if self._waiter is not None:
            _wake(self._waiter)
            self._waiter = None
        if self.watcher is not None:
            self.watcher(self, events)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    async def get(self) -> Any:
        """The next event, or STOP after the last one; waits while there is none."""
        while True:
            head = self._head
            if head is not None:
                events, weight = head
                index = self._index
                event = events[index]
                index += 1
                if index == len(events):
                    self._head = None
                    if weight:
                        self.bus._delivered(self, weight)
                else:
                    self._index = index
                return event
            items = self._items
            if not items:
                await self._wait()
                continue
            item = items.popleft()
            if type(item) is not tuple:
                return item
            if item[0]:
                self._head = item
                self._index = 0
            elif item[1]:
                self.bus._delivered(self, item[1])

    async def next_batch(self, limit: int) -> list[Any]:
        """What `take_ready` returns, once there is something; waits while there is nothing."""
        while self._head is None and not self._items:
            await self._wait()
        return self.take_ready(limit)

    def take_ready(self, limit: int) -> list[Any]:
        """Take queued items, whole batches, until about `limit` events (at least one item)."""
        taken: list[Any] = []
        head = self._head
        if head is not None:
            events, weight = head
            taken.extend(events[self._index :])
            self._head = None
            if weight:
                self.bus._delivered(self, weight)
        items = self._items
        while items and len(taken) < limit:
            item = items.popleft()
            if type(item) is tuple:
                taken.extend(item[0])
                if item[1]:
                    self.bus._delivered(self, item[1])
            else:
                taken.append(item)
                if item is STOP:
                    break
        return taken

    def clear(self) -> None:
        """Forget everything queued (its weight too)."""
        self._items.clear()
        self._head = None
        if self.pending:
            self.bus._delivered(self, self.pending)


class EventBus:
    """Handlers, subscribers, and the measure of what they have not yet taken (module docstring)."""

    HIGH_WATER = 8 * 1024 * 1024
    LOW_WATER = 2 * 1024 * 1024

    def __init__(self) -> None:
        self._waiting: list[tuple[Any, bool]] = []  # (handler, on_thread) added before the loop ran
        self._channels: list[_Channel] = []
        self._subscribers: dict[UUID, list[Subscription]] = {}
        self._readers: set[Subscription] = set()  # counted subscribers, ended or not
        self._retired: list[_HandlerThread] = []  # threads of removed handlers, joined at drain
        self._heavy: set[_Listener] = set()  # counted listeners holding at least LOW_WATER
        self._congested = False
        self._congested_since = 0.0
        self._say_congested: asyncio.TimerHandle | None = None
        self._closed = False
        self._draining = False
        # Handlers that called shutdown themselves: its drain cannot wait for them to return.
        self._spared: set[_Channel] = set()
        self._spared_more: asyncio.Future[None] | None = None
        # Handlers waiting for the engine (`handler_waiting`), and how many waits each is in.
        self._handler_waits: dict[_Channel, int] = {}
        self.on_relief: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the engine's, once started

    # -- handlers ---------------------------------------------------------

    def add_handler(self, handler: Any, on_thread: bool = False) -> None:
        """Deliver every event to `handler`; with `on_thread`, call it on a thread of its own.

        From any thread: off the loop of a started bus, the channel is opened on
        the next turn of that loop (not waited for here: that loop's thread may be
        waiting for this one), and the handler gets what is published from then on.
        """
        _deliverer(handler)  # reject a non-handler now, not at the first event
        loop = self._loop
        if loop is not None and not _on_loop(loop):
            loop.call_soon_threadsafe(self._open, handler, on_thread)
        elif _loop_running():
            self._open(handler, on_thread)
        else:
            self._waiting.append((handler, on_thread))

    def _open(self, handler: Any, on_thread: bool) -> None:
        self._channels.append(_Channel(self, handler, on_thread))

    def remove_handler(self, handler: Any) -> None:
        """Stop delivering to `handler` (itself, else one equal to it); what was queued for it is dropped.

        Equal is for bound methods, made anew at each access; two handlers that
        compare equal (dataclasses holding the same events) are told apart by identity.
        """
        at = _find(handler, [c.handler for c in self._channels])
        if at is not None:
            channel = self._channels[at]
            # A new list: a publish running over the old one is not disturbed.
            self._channels = [c for c in self._channels if c is not channel]
            channel.task.cancel()
            if channel.thread is not None:
                channel.thread.stop(abandon=True)
                self._retired.append(channel.thread)
            self._forget(channel)
            return
        at = _find(handler, [waiting for waiting, _on_thread in self._waiting])
        if at is None:
            raise ValueError(f"{handler!r} is not an event handler of this engine")
        del self._waiting[at]

    def start(self) -> None:
        """Open a channel for each handler added before the loop was known."""
        self._loop = asyncio.get_running_loop()
        waiting, self._waiting = self._waiting, []
        for handler, on_thread in waiting:
            self._open(handler, on_thread)

    @property
    def active(self) -> bool:
        """Whether anyone listens; when nobody does, events are not even built."""
        return bool(self._channels) or bool(self._subscribers)

    # -- publishing -------------------------------------------------------

    def publish(self, event: ExecutionEvent, *keys: UUID) -> None:
        """Publish one event (it weighs nothing) to every handler and to the subscribers of `keys`."""
        for channel in self._channels:
            channel.put(event)
        if self._subscribers:
            for key in keys:
                for subscription in self._subscribers.get(key, ()):
                    subscription._put(event)

    def publish_batch(self, events: list[ExecutionEvent], *keys: UUID, weight: int = 0) -> None:
        """Publish the events of one frame at once: one queue item per listener.

        `weight` is the frame's size in bytes; each listener counts it until the
        batch has been handed over in full (module docstring).
        """
        batch = (events, weight)
        for channel in self._channels:
            self._put_weighed(channel, batch, weight)
        if self._subscribers:
            for key in keys:
                for subscription in self._subscribers.get(key, ()):
                    subscription._put_batch(events, weight)

    def publish_lines(self, lines: LineEvents, *keys: UUID, weight: int) -> None:
        """Publish the line events of one frame (as `publish_batch`), made no earlier than needed.

        A handler that is the frame's only listener gets `lines` itself and makes
        each event just before its call (see `LineEvents`). Listeners that share
        a frame get the same event objects, made here once; a frame nobody
        listens to is not made into events at all.
        """
        channels = self._channels
        subscribers = self._subscribers
        shared = bool(subscribers) and any(key in subscribers for key in keys)
        if len(channels) == 1 and not shared:
            self._put_weighed(channels[0], (lines, weight), weight)
        elif channels or shared:
            self.publish_batch(lines.events(), *keys, weight=weight)

    def _put_weighed(self, channel: _Channel, batch: tuple[Iterable[Any], int], weight: int) -> None:
        channel.put(batch)
        if weight:
            channel.pending += weight
            if channel.pending >= self.LOW_WATER:
                self._loaded(channel)

    # -- subscribers ------------------------------------------------------

    def subscribe(self, key: UUID, counted: bool = True) -> Subscription:
        """A queue of the events published for `key` from now on; `counted=False`: see `adopt`."""
        subscription = Subscription(self, key, counted)
        # Lists are replaced, never changed in place, so that a watcher may
        # unsubscribe while a publish is going over them.
        self._subscribers[key] = [*self._subscribers.get(key, ()), subscription]
        if counted:
            self._readers.add(subscription)
        return subscription

    def adopt(self, subscription: Subscription) -> None:
        """Make a `counted=False` subscription count toward `backlog` from now on, with what it holds."""
        if subscription.counted:
            return
        subscription.counted = True
        self._readers.add(subscription)
        if subscription.pending >= self.LOW_WATER:
            self._loaded(subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop feeding `subscription` and stop counting what it still holds."""
        subscriptions = self._subscribers.get(subscription.key)
        if subscriptions and subscription in subscriptions:
            rest = [s for s in subscriptions if s is not subscription]
            if rest:
                self._subscribers[subscription.key] = rest
            else:
                del self._subscribers[subscription.key]
        if subscription.counted:
            self._readers.discard(subscription)
            self._forget(subscription)

    def end_stream(self, key: UUID) -> None:
        """Tell the subscribers of `key` that its last event has been published."""
        for subscription in self._subscribers.pop(key, ()):
            subscription._put(STOP)

    # -- flow control -----------------------------------------------------

    @property
    def backlog(self) -> int:
        """The largest weight any counted listener holds undelivered."""
        largest = 0
        for channel in self._channels:
            largest = max(largest, channel.pending)
        for subscription in self._readers:
            largest = max(largest, subscription.pending)
        return largest

    @property
    def congested(self) -> bool:
        """True from when `backlog` rises above HIGH_WATER until it falls below LOW_WATER."""
        return self._congested

    def _loaded(self, listener: _Listener) -> None:
        """`listener` holds at least LOW_WATER after taking more."""
        if not listener.counted:
            return
        self._heavy.add(listener)
        if listener.pending > self.HIGH_WATER and not self._congested:
            self._congested = True
            if self._loop is not None and not self._closed:
                self._congested_since = self._loop.time()
                self._say_congested = self._loop.call_later(CONGESTED_SAID_AFTER_S, self._still_congested)

    def _still_congested(self) -> None:
        """Say who has held every command's output back for a while: nothing else would."""
        self._say_congested = None
        if not self._congested or self._loop is None:
            return
        holders = sorted((_describe(listener) for listener in self._heavy), key=str)
        logger.warning(
            "the output of every running command has been held back for %.0f s: %s not taken in what "
            "it was given (flow control waits for it; a handler that never returns stalls all output)",
            self._loop.time() - self._congested_since,
            ", ".join(holders) + (" has" if len(holders) == 1 else " have"),
        )

    def _delivered(self, listener: _Listener, weight: int) -> None:
        listener.pending -= weight
        if listener.pending < self.LOW_WATER and listener in self._heavy:
            self._heavy.discard(listener)
            self._relieve()

    def _forget(self, listener: _Listener) -> None:
        """`listener` is gone: what it held no longer counts."""
        if listener in self._heavy:
            self._heavy.discard(listener)
            self._relieve()

    def _relieve(self) -> None:
        if not self._congested or self._heavy:
            return
        self._congested = False
        if self._say_congested is not None:
            self._say_congested.cancel()
            self._say_congested = None
        relief = self.on_relief
        if relief is None or self._closed:
            return
        try:
            relief()
        except Exception:
            # It runs inside whichever listener gave the weight back; a fault
            # there must not end that handler's channel or reader.
            logger.exception("the bus's relief callback %r raised", relief)

    # -- shutdown ---------------------------------------------------------

    def spare(self, thread: threading.Thread) -> None:
        """Shutdown was asked for here, or from `thread`: if by a handler, the drain spares it.

        The handler is in the middle of its call and returns only once shutdown
        has: waiting for it would hold shutdown until the drain timed out, and
        then cancel the handler. It ends on its own after shutdown, with what
        was queued for it.
        """
        channel = self._calling_channel(thread)
        if channel is not None:
            self._spared.add(channel)
            if self._spared_more is not None and not self._spared_more.done():
                self._spared_more.set_result(None)

    @contextlib.contextmanager
    def handler_waiting(self, thread: threading.Thread | None = None) -> Iterator[None]:
        """While a handler (the caller, or the one on `thread`) waits on the engine, nothing waits for it.

        A handler that waits for an execution would otherwise wait for ever
        once that execution's output filled its queue: the flow of output
        stops for it, and the execution never ends. Its events queue in memory
        meanwhile, and count again once it is back.
        """
        channel = self._calling_channel(thread)
        if channel is None:
            yield
            return
        waits = self._handler_waits
        waits[channel] = waits.get(channel, 0) + 1
        if waits[channel] == 1:
            channel.counted = False
            self._forget(channel)
        try:
            yield
        finally:
            waits[channel] -= 1
            if not waits[channel]:
                del waits[channel]
                channel.counted = True
                # Removed meanwhile (or drained): it holds nothing back any more.
                if channel.pending >= self.LOW_WATER and channel in self._channels:
                    self._loaded(channel)

    def _calling_channel(self, thread: threading.Thread | None) -> _Channel | None:
        """The channel whose handler is the caller: by context (async handlers), or by `thread`."""
        caller = _RUNNING_HANDLER.get()
        if caller is None and thread is None:
            return None  # not a handler: every `events()` read of a plain reader asks
        if caller is not None and (caller.delivering is None or caller.delivering is not _DELIVERY.get()):
            caller = None  # started by the handler, in a delivery that has ended: not the handler waiting
        for channel in self._channels:
            if channel is caller or (
                thread is not None and channel.thread is not None and channel.thread.thread is thread
            ):
                return channel
        return None

    async def drain(self, timeout: float) -> None:
        """Let every handler finish what is queued (bounded), then stop them and their threads."""
        self._draining = True
        for channel in self._channels:
            channel.put(STOP)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Looked at again whenever a handler turns out to be waiting for this shutdown.
            pending = [c.task for c in self._channels if c not in self._spared and not c.task.done()]
            left = deadline - loop.time()
            if not pending or left <= 0:
                break
            self._spared_more = loop.create_future()
            await asyncio.wait(
                [*pending, self._spared_more], timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            self._spared_more = None
        for channel in self._channels:
            if channel.task in pending:
                logger.warning("event handler %r still busy at shutdown; cancelled", channel.handler)
                channel.task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        threads = [c.thread for c in self._channels if c.thread is not None and c not in self._spared]
        threads += self._retired
        channels, self._channels, self._retired = self._channels, [], []
        for handler_thread in threads:
            handler_thread.stop(abandon=True)  # a second stop is harmless; one never made is not
        await _join(threads)
        for channel in channels:
            self._forget(channel)
        self._closed = True
        if self._say_congested is not None:
            self._say_congested.cancel()
            self._say_congested = None


async def _join(threads: list[_HandlerThread]) -> None:
    """Wait (bounded) for handler threads to end; a thread stuck in its handler is left, named."""
    exits = [t.exited for t in threads if not t.exited.done()]
    if exits:
        await asyncio.wait(exits, timeout=_THREAD_EXIT_TIMEOUT)
    for handler_thread in threads:
        if handler_thread.exited.done():
            # It has posted its last callback and is returning: this is brief.
            handler_thread.thread.join(_THREAD_EXIT_TIMEOUT)
        else:
            logger.warning(
                "event handler thread %s still in its handler at shutdown; left to finish on its own",
                handler_thread.thread.name,
            )


def _describe(listener: _Listener) -> str:
    if isinstance(listener, _Channel):
        return f"event handler {listener.handler!r} ({listener.pending / 2**20:.0f} MiB waiting)"
    if isinstance(listener, Subscription):
        return f"an events() reader of {listener.key} ({listener.pending / 2**20:.0f} MiB waiting)"
    return repr(listener)


def _find(handler: Any, handlers: list[Any]) -> int | None:
    """Where `handler` itself is in `handlers`, else the first handler equal to it; None if neither."""
    for index, candidate in enumerate(handlers):
        if candidate is handler:
            return index
    for index, candidate in enumerate(handlers):
        if candidate == handler:
            return index
    return None


def _deliverer(handler: Any) -> Callable[[Any], Any]:
    on_event = getattr(handler, "on_event", None)
    if callable(on_event):
        return on_event  # type: ignore[no-any-return]
    if callable(handler):
        return handler  # type: ignore[no-any-return]
    raise TypeError(f"{handler!r} has no on_event method")


def is_coroutine_handler(handler: Any) -> bool:
    """Whether `handler` (an `on_event` object or a callable) is a coroutine; TypeError if neither."""
    deliver = _deliverer(handler)
    # The second test is for an object whose __call__ is a coroutine function.
    return inspect.iscoroutinefunction(deliver) or inspect.iscoroutinefunction(type(deliver).__call__)


def _name_of(handler: Any) -> str:
    name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return str(name)


def _loop_ending(ended: asyncio.Task[None]) -> bool:
    """Whether every task of `ended`'s loop still unfinished is being cancelled too.

    So `asyncio.run()` ends, with a host that did not shut the engine down: it
    cancels every task left. A cancel aimed at one delivery (a handler that
    cancelled its own task) leaves the host's own tasks running.
    """
    for task in asyncio.all_tasks(ended.get_loop()):
        if not task.done() and task.cancelling() == 0:
            return False
    return True


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _HandlerExit(Exception):
    """A handler's `SystemExit` or `KeyboardInterrupt` on the engine's own loop: a raise, not an exit."""


async def _awaited(awaitable: Any) -> Any:
    try:
        return await awaitable
    except (KeyboardInterrupt, SystemExit) as exc:
        if not _on_a_loop_of_our_own():
            raise
        # Raised out of this task it would end the loop, and the engine with it.
        raise _HandlerExit(repr(exc)) from exc


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

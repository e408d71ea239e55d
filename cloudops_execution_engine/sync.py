"""`SyncExecutionEngine`: the engine for hosts without an event loop of their own.

It runs an `ExecutionEngine` on a private event loop in a daemon thread and
offers the same methods, blocking. Each call runs as a task on that loop. A
caller interrupted while it waits (KeyboardInterrupt, or a `timeout` passing)
has that task cancelled; a task cancelled on the loop raises in the caller,
`EngineClosed` when shutdown was the cause.

Handlers. A coroutine handler (`async def on_event`, or an `async def`
function) runs on the loop thread, as with `ExecutionEngine`. Any other
handler runs on a thread of its own, so a slow one delays only its own
deliveries, never the engine or another handler. It receives its events in
order, may call this engine's methods, and its thread ends at shutdown once
what was queued for it has been delivered (waiting a bounded time).

Events of one execution. `execute()` and `execute_plan()` start keeping the
events of the new id before submitting it, and the first `events(id)` takes
them over: `for event in engine.events(eid)` after `eid = engine.execute(...)`
yields everything from `started` on, even when the command ended in between.
Until taken over, these early buffers are bounded (see `events`).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import multiprocessing.util  # noqa: F401  # its exit handler first (see `_shut_down_at_exit`)
import os
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

from .actors import after_fork
from .actors.handlers import STOP, EventBus, Subscription, is_coroutine_handler, run_as_our_own
from .config import ExecutionConfig
from .engine import ExecutionEngine, _coerce_id, _coerce_model
from .errors import EngineClosed, InvalidCommand, InvalidPlan, IoError, NotFound, NotRunning
from .events import ExecutionEvent
from .requests import ExecutionPlan, ExecutionRequest
from .results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult

__all__ = ["SyncExecutionEngine"]

logger = logging.getLogger("cloudops_execution_engine")

_T = TypeVar("_T")

# Early buffers: one id's events before `events()` asks for them.
_EARLY_MAX_EVENTS = 10_000
_EARLY_MAX_CHARS = 16 * 1024 * 1024  # of output line text
# All early buffers together; an event object alone is about half a kilobyte.
_EARLY_TOTAL_EVENTS = 50_000
_EARLY_TOTAL_CHARS = 32 * 1024 * 1024
# Buffers of ids that have ended (or were dropped) are kept for the most recent few.
_EARLY_KEEP_ENDED = 256

# Events handed to a thread reading `events()` per round trip to the loop.
_TAKE_AT_ONCE = 1024

_LOOP_JOIN_TIMEOUT = 30.0
# How often a caller waiting on the loop looks whether its thread is still there.
_LOOK_AT_THE_LOOP_S = 1.0
_LOOP_GONE = "the engine's loop thread has ended (see the error logged), and the engine with it"
_LEFTOVER_TIMEOUT = 5.0  # for tasks still on the loop after the engine shut down


class SyncExecutionEngine:
    """`ExecutionEngine` with blocking methods, for code without an event loop (module docstring)."""

    def __init__(self, config: ExecutionConfig | None = None) -> None:
        self._engine = ExecutionEngine(config)
        # Its loop thread exists in this process only: a forked child's calls are refused (`after_fork`).
        self._pid = os.getpid()
        self.config = self._engine.config
        self._bus: EventBus = self._engine._bus
        self._early = _EarlyBuffers(self._bus)
        # Reentrant: Python runs a signal handler on the thread it interrupts, perhaps inside
        # this lock, and a handler may call the engine.
        self._lock = threading.RLock()
        self._closed = False
        self._closing = False
        # Threads inside shutdown(): a signal handler on one of them must not wait for the call it
        # interrupted, which cannot go on until the handler returns.
        self._in_shutdown: set[int] = set()
        self._stopped = threading.Event()  # set once the first shutdown() has stopped everything
        # Set by the loop thread as it ends. Not `Thread.join`: interrupted (Ctrl-C), a join on
        # Python 3.11 may mark the thread stopped while it still runs.
        self._loop_ended = threading.Event()
        self._loop = asyncio.new_event_loop()
        run_as_our_own(self._loop)
        self._thread = threading.Thread(
            target=_run_loop,
            args=(self._loop, self._engine, self._loop_ended),
            name="cloudops-execution-engine",
            daemon=True,
        )
        self._thread.start()
        # Dropped without shutdown(), it would keep its loop thread, and once
        # started its workers and their commands, for as long as the host lives.
        self._let_go = weakref.finalize(self, _let_go, self._engine, self._loop, self._pid)
        self._let_go.atexit = False
        _open.add(self)

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run `coro` on the loop and wait for it; an interrupted wait cancels it."""
        if os.getpid() != self._pid:
            coro.close()
            raise EngineClosed(after_fork.refusal(self._pid))
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a SyncExecutionEngine method was called on its own loop thread (from a coroutine "
                "handler?); it would wait for itself forever"
            )
        with self._lock:
            # Checked and submitted under the lock, so that nothing is submitted
            # after shutdown has swept the loop of leftover calls.
            if self._closed:
                coro.close()
                raise EngineClosed()
            if not self._thread.is_alive():
                coro.close()
                raise EngineClosed(_LOOP_GONE)
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError:
                # The loop has closed since the check: a signal handler run on this thread, inside
                # the lock, shut the engine down.
                coro.close()
                raise EngineClosed() from None
        try:
            return self._result(future, timeout)
        except concurrent.futures.CancelledError:
            if self._closed:
                raise EngineClosed() from None
            raise
        except BaseException:
            future.cancel()
            raise

    def _result(self, future: concurrent.futures.Future[_T], timeout: float | None) -> _T:
        """`future.result(timeout)`, or `EngineClosed` if the loop thread it waits on has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = _LOOK_AT_THE_LOOP_S
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            try:
                return future.result(step)
            except TimeoutError:
                if future.done() or (deadline is not None and time.monotonic() >= deadline):
                    raise  # the call's own TimeoutError (`wait(timeout=)`), or this wait's
                if not self._thread.is_alive():
                    raise EngineClosed(_LOOP_GONE) from None

    def with_event_handler(self, handler: Any) -> SyncExecutionEngine:
        """Add a handler; one that is not a coroutine function runs on a thread of its own.

        `EngineClosed` once shutdown has begun.
        """
        if self._engine._supervisor.winding_down:
            raise EngineClosed()
        self._call(_run_sync(self._add_handler, handler))
        return self

    def _add_handler(self, handler: Any) -> None:
        # Asked again on the loop: shutdown may have begun since.
        if self._engine._supervisor.winding_down:
            raise EngineClosed()
        self._bus.add_handler(handler, not is_coroutine_handler(handler))

    def remove_event_handler(self, handler: Any) -> None:
        """Stop delivering events to `handler`; events already queued for it are dropped."""
        self._call(_run_sync(self._bus.remove_handler, handler))

    def __enter__(self) -> SyncExecutionEngine:
        try:
            self.start()
        except BaseException:
            # `__exit__` never runs for a `with` whose entry failed: its loop thread ends here.
            self.shutdown()
            raise
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

    def _submit(self, submission: Callable[[], Awaitable[UUID]]) -> UUID:
        """`_call` for a call that starts something: a caller that never gets the id leaves nothing running.

        An interrupt can reach the caller after the engine took the submission
        and before its id is returned; what was submitted is then cancelled, as
        an interrupt before would have prevented it.
        """
        claim = _Claim()
        try:
            return self._call(self._claimed(submission, claim))
        except BaseException:
            with contextlib.suppress(RuntimeError):  # the loop has closed, and the engine with it
                self._loop.call_soon_threadsafe(self._abandon, claim)
            raise

    async def _claimed(self, submission: Callable[[], Awaitable[UUID]], claim: _Claim) -> UUID:
        claim.id = await submission()  # made here: a call refused before it ran leaves no coroutine behind
        if claim.abandoned:
            self._abandon(claim)
        return claim.id

    def _abandon(self, claim: _Claim) -> None:
        """On the loop: cancel what the claim's caller submitted and will never hear of."""
        claim.abandoned = True
        if claim.id is None:
            return  # not submitted yet: `_claimed` comes back here once it is
        self._early.forget(claim.id)
        with contextlib.suppress(EngineClosed, NotRunning, NotFound):
            self._engine._supervisor.cancel(claim.id)

    def execute(self, request: ExecutionRequest) -> UUID:
        """Validate and queue one command; returns its id at once. Its events are kept for `events()`."""
        return self._submit(partial(self._execute, request))

    async def _execute(self, request: ExecutionRequest) -> UUID:
        request = _coerce_model(request, ExecutionRequest, InvalidCommand)
        # Subscribed before submitting, in the same task: no event of the new
        # execution can be published before the buffer is there.
        buffer = self._early.open(request.id)
        try:
            execution_id = await self._engine.execute(request)
        except BaseException:
            self._early.discard(buffer)
            raise
        self._early.keep(buffer)
        return execution_id

    def execute_plan(self, plan: ExecutionPlan) -> UUID:
        """Validate and start a plan; returns its id at once. Its events are kept for `events()`."""
        return self._submit(partial(self._execute_plan, plan))

    async def _execute_plan(self, plan: ExecutionPlan) -> UUID:
        plan = _coerce_model(plan, ExecutionPlan, InvalidPlan)
        buffer = self._early.open(plan.id)
        try:
            plan_id = await self._engine.execute_plan(plan)
        except BaseException:
            self._early.discard(buffer)
            raise
        self._early.keep(buffer)
        return plan_id

    def get_status(self, execution_id: UUID | str) -> ExecutionStatus:
        return self._call(self._engine.get_status(execution_id))

    def get_result(self, execution_id: UUID | str) -> ExecutionResult:
        return self._call(self._engine.get_result(execution_id))

    def get_plan_result(self, plan_id: UUID | str) -> PlanExecutionResult:
        return self._call(self._engine.get_plan_result(plan_id))

    def wait(
        self, execution_id: UUID | str, timeout: float | None = None
    ) -> ExecutionResult | PlanExecutionResult:
        return self._call(
            self._waited_from(threading.current_thread(), partial(self._engine.wait, execution_id, timeout))
        )

    async def _waited_from(self, caller: threading.Thread, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call`, waited for on `caller`: perhaps a handler's thread (`EventBus.handler_waiting`)."""
        with self._bus.handler_waiting(caller):
            return await call()  # made here: a call refused before it ran leaves no coroutine behind

    def list_executions(
        self,
        *,
        status: ExecutionStatus | str | None = None,
        plan_id: UUID | str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ExecutionSummary]:
        """As `ExecutionEngine.list_executions`: oldest first, filters combined, the newest `limit`."""
        listing = self._engine.list_executions(status=status, plan_id=plan_id, since=since, limit=limit)
        return self._call(listing)

    def resume_plan(self, plan_id: UUID | str) -> UUID:
        """As `ExecutionEngine.resume_plan`: a new plan in which what completed counts as done."""
        return self._submit(partial(self._resume_plan, plan_id))

    async def _resume_plan(self, plan_id: UUID | str) -> UUID:
        # Its id is known only once the engine has made it; its commands go to workers
        # on a later turn of the loop, so a buffer opened now still holds all their events.
        new_id = await self._engine.resume_plan(plan_id)
        self._early.keep(self._early.open(new_id))
        return new_id

    def cancel(self, execution_id: UUID | str) -> None:
        self._call(self._engine.cancel(execution_id))

    def read_logs(self, execution_id: UUID | str) -> str:
        return self._call(self._engine.read_logs(execution_id))

    def get_log_path(self, execution_id: UUID | str) -> Path:
        return self._engine.get_log_path(execution_id)

    def events(self, execution_id: UUID | str) -> Iterator[ExecutionEvent]:
        """Yield one execution's or plan's events, ending after its last.

        For an id returned by this engine's `execute()` or `execute_plan()`, the
        first `events(id)` yields every event from the first on, even if the
        execution has already ended, provided it is called while the events are
        still kept: at most 10,000 events or 16 MiB of output text per id (32 MiB
        and 50,000 events for all ids together), and for ended ids only the 256
        that ended most recently. When more arrived before `events()` was called,
        the early events were let go and `events()` raises `IoError` rather than
        yield a stream with a hole in it; an id whose end is older than that is
        treated as any other ended id. Any other call yields the events from now
        on, and nothing for an execution that has ended.

        Events taken by this iterator but not yet yielded are at most about a
        thousand; the rest wait in the engine and count toward its backlog, so a
        slow reader holds back the flow of output rather than let memory grow.
        """
        holder: list[Subscription] = []
        try:
            stream = self._call(self._open_events(execution_id, holder))
            if stream is None:
                return
            while True:
                for item in self._fetch(stream):
                    if item is STOP:
                        return
                    yield item
        finally:
            self._close_events(holder)

    async def _open_events(self, execution_id: UUID | str, holder: list[Subscription]) -> Subscription | None:
        # No await in here: the subscription is in `holder` in the same loop step
        # in which it is made, so `_close_events`, queued after any cancel,
        # always finds it.
        supervisor = self._engine._supervisor
        supervisor.check_usable()
        key = _coerce_id(execution_id)
        stream = self._early.adopt(key)
        if stream is None:
            if supervisor.entry(key).settled:
                return None
            stream = self._bus.subscribe(key)
        holder.append(stream)
        return stream

    def _fetch(self, stream: Subscription) -> list[Any]:
        try:
            return self._call(
                self._waited_from(threading.current_thread(), partial(stream.next_batch, _TAKE_AT_ONCE))
            )
        except EngineClosed:
            # Shutdown ended every stream before stopping the loop; once the loop
            # thread is gone, what is left can be read from here.
            self._thread.join(_LOOP_JOIN_TIMEOUT)
            if self._thread.is_alive():
                raise
            items = stream.take_ready(_TAKE_AT_ONCE)
            if not items:
                raise
            return items

    def _close_events(self, holder: list[Subscription]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._release, holder)
        except RuntimeError:
            self._release(holder)  # the loop has closed: no other thread touches the bus

    def _release(self, holder: list[Subscription]) -> None:
        for stream in holder:
            self._bus.unsubscribe(stream)
        holder.clear()

    def shutdown(self, cancel: bool = True) -> None:
        """Stop the engine, its handlers' threads and its loop thread; harmless twice.

        Interrupted (Ctrl-C, once or more), it finishes its work, then raises the
        interrupt. Called from a signal handler that interrupted a shutdown() on
        the same thread, it returns at once: that call finishes once the handler returns.
        In a process forked from the engine's own it does nothing: all of it is the parent's.
        """
        if os.getpid() != self._pid:
            return
        caller = threading.current_thread()
        me = threading.get_ident()
        self._let_go.detach()
        if me in self._in_shutdown:
            # A signal handler, run on a thread that is inside shutdown() already: it cannot wait
            # for the call it interrupted, which finishes once the handler has returned.
            return
        self._in_shutdown.add(me)
        try:
            with self._lock:
                first = not self._closing
                self._closing = True
            if not first:
                self._await_first_shutdown(caller)
                return
            self._shut_down_first(caller, cancel)
        finally:
            self._in_shutdown.discard(me)

    def _shut_down_first(self, caller: threading.Thread, cancel: bool) -> None:
        try:
            if self._thread.is_alive():  # else the engine was shut down as its thread ended
                self._call(self._shut_down(caller, cancel))
        finally:
            try:
                with self._lock:
                    self._closed = True
                self._stop_loop()
            finally:
                self._stopped.set()  # whatever happened: a second call must not wait for ever

    async def _shut_down(self, caller: threading.Thread, cancel: bool) -> None:
        # Called from a handler's thread, the drain of handlers must not wait for that handler.
        self._bus.spare(caller)
        await self._engine.shutdown(cancel)

    def _await_first_shutdown(self, caller: threading.Thread) -> None:
        """A second call returns once the first has stopped everything, as the async engine's does."""
        if caller is self._thread:
            raise RuntimeError(
                "SyncExecutionEngine.shutdown was called on its own loop thread (from a coroutine "
                "handler?) while it was shutting down; it would wait for itself forever"
            )
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing is left to wait for
            self._loop.call_soon_threadsafe(self._bus.spare, caller)
        self._stopped.wait()

    def _stop_loop(self) -> None:
        """Sweep the loop, stop it, wait for its thread: bounded, and done even if the caller is interrupted.

        An interrupt (a second Ctrl-C) that comes meanwhile is raised once this
        is done. Cut short by one, this closed the loop under the engine's
        wind-down, whose workers were then never told to stop.
        """
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return  # unreachable through `_call`, which refuses the loop thread; or it has ended
        final = asyncio.run_coroutine_threadsafe(self._sweep(), self._loop)
        interrupt = _wait_through_interrupts(
            partial(concurrent.futures.wait, [final]), final.done, _LEFTOVER_TIMEOUT * 2
        )
        try:
            final.result(0)
        except Exception:
            logger.exception("cleaning up the engine's loop at shutdown failed")
        with contextlib.suppress(RuntimeError):  # the thread ended meanwhile, closing it
            self._loop.call_soon_threadsafe(self._loop.stop)
        # The thread closes the loop once it has stopped.
        joined = _wait_through_interrupts(self._loop_ended.wait, self._loop_ended.is_set, _LOOP_JOIN_TIMEOUT)
        if self._engine._supervisor.loop_closed():
            # What the wind-down had not stopped by then is stopped without the loop.
            self._engine._supervisor.abandon()
        interrupt = interrupt or joined
        if interrupt is not None:
            raise interrupt

    async def _sweep(self) -> None:
        """Free the early buffers, and end what is still on the loop: callers waiting get `EngineClosed`."""
        self._early.clear()
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=_LEFTOVER_TIMEOUT)
        await self._loop.shutdown_asyncgens()
        # Its threads (log reads run there) would otherwise outlive the engine.
        await asyncio.wait_for(self._loop.shutdown_default_executor(), _LEFTOVER_TIMEOUT)


def _wait_through_interrupts(
    wait: Callable[[float], object], done: Callable[[], bool], timeout: float
) -> BaseException | None:
    """`wait(left)` until `done()`, `timeout` in all, through interrupts; returns the first, to raise later.

    A signal handler runs on the main thread, within whatever it waits on, and
    what it raises (KeyboardInterrupt) would cut short a wait that must finish.
    """
    deadline = time.monotonic() + timeout
    interrupt: BaseException | None = None
    while True:
        try:
            left = deadline - time.monotonic()
            if done() or left <= 0:
                return interrupt
            wait(left)
        except BaseException as exc:
            interrupt = interrupt or exc


def _run_loop(loop: asyncio.AbstractEventLoop, engine: ExecutionEngine, ended: threading.Event) -> None:
    try:
        try:
            loop.run_forever()
        except BaseException:
            # Nothing of the engine's raises out of its loop; should anything, its workers and
            # commands must not outlive the thread that supervised them.
            logger.exception("the loop thread of a SyncExecutionEngine failed; the engine is shut down")
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.wait_for(engine.shutdown(), _LOOP_JOIN_TIMEOUT))
        # Stopped for good: by shutdown(), or by `_let_go` where nobody is left to close it.
        loop.close()
    finally:
        ended.set()


# Engines of this process, shut down at its exit if their host did not (`_shut_down_at_exit`).
_open: weakref.WeakSet[SyncExecutionEngine] = weakref.WeakSet()


def _shut_down_at_exit() -> None:
    """The interpreter ends with engines still open (a script that never called `shutdown()`).

    multiprocessing's own exit handler, which runs after this one, terminates
    every worker process: under an engine whose loop thread still runs, which
    then started replacements that the exit cut off mid-spawn (an `EOFError`
    traceback on stderr), and raced it for the processes it joins. So each
    open engine is shut down first, as its host would have.
    """
    for engine in list(_open):
        if engine._pid == os.getpid():
            with contextlib.suppress(Exception):
                engine.shutdown()


# Registered after multiprocessing's exit handler, which importing its `util` registers: exit
# handlers run last first.
atexit.register(_shut_down_at_exit)


def _let_go(engine: ExecutionEngine, loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """A `SyncExecutionEngine` was garbage collected without `shutdown()`: stop it, and its loop thread.

    Not in a forked child: its copy of the engine, and of the loop, are the parent's.
    """
    if loop.is_closed() or os.getpid() != pid:
        return
    warnings.warn(
        "a SyncExecutionEngine was garbage collected without shutdown(): its workers, commands and "
        "loop thread are being stopped now",
        ResourceWarning,
        stacklevel=1,
    )

    async def stop() -> None:
        try:
            await engine.shutdown()
        finally:
            loop.stop()

    with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
        asyncio.run_coroutine_threadsafe(stop(), loop)


class _Claim:
    """What a submission's caller is owed, and whether it stopped waiting for it (loop thread only)."""

    __slots__ = ("abandoned", "id")

    def __init__(self) -> None:
        self.id: UUID | None = None
        self.abandoned = False


class _Early:
    __slots__ = ("chars", "dropped", "ended", "events", "kept", "subscription")

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.events = 0
        self.chars = 0
        self.ended = False  # its stream has ended
        self.dropped = False  # let go for its size; `events()` then raises
        self.kept = False  # its id was accepted by the engine


class _EarlyBuffers:
    """Events of ids submitted through the facade that `events()` has not asked for yet.

    Loop thread only. A buffer is a subscription that does not count toward the
    bus's backlog until `adopt()`. Buffers are bounded each and together; ended
    ones are kept for the most recent `_EARLY_KEEP_ENDED` ids (module constants).
    """

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._buffers: dict[UUID, _Early] = {}
        self._ended: OrderedDict[UUID, None] = OrderedDict()  # ended or dropped, oldest first
        self._events = 0
        self._chars = 0

    def open(self, key: UUID) -> _Early:
        early = _Early(self._bus.subscribe(key, counted=False))
        early.subscription.watcher = lambda _subscription, items: self._on_put(early, items)
        return early

    def keep(self, early: _Early) -> None:
        """The engine accepted the id: keep the buffer for `events()`."""
        key = early.subscription.key
        old = self._buffers.pop(key, None)
        if old is not None:  # an id used again after the engine forgot its first execution
            self._ended.pop(key, None)
            self._let_go(old)
        early.kept = True
        self._buffers[key] = early
        if early.ended or early.dropped:
            self._note_ended(key)

    def discard(self, early: _Early) -> None:
        """The engine refused the id (or the submission was interrupted)."""
        self._let_go(early)

    def adopt(self, key: UUID) -> Subscription | None:
        """The buffer of `key`, now counted like any subscriber; None when there is none."""
        early = self._buffers.pop(key, None)
        if early is None:
            return None
        self._ended.pop(key, None)
        if early.dropped:
            raise IoError(
                f"the events of {key} were no longer buffered: more than {_EARLY_MAX_EVENTS} events "
                f"or {_EARLY_MAX_CHARS // (1024 * 1024)} MiB of output arrived before events() was "
                "called; call events() sooner, or add an event handler"
            )
        self._events -= early.events
        self._chars -= early.chars
        subscription = early.subscription
        subscription.watcher = None
        self._bus.adopt(subscription)
        return subscription

    def forget(self, key: UUID) -> None:
        """Let go of `key`'s buffer, if it has one: nobody will ask for its events."""
        early = self._buffers.pop(key, None)
        if early is not None:
            self._ended.pop(key, None)
            self._let_go(early)

    def clear(self) -> None:
        for early in self._buffers.values():
            self._let_go(early)
        self._buffers.clear()
        self._ended.clear()

    def _on_put(self, early: _Early, items: Sequence[Any]) -> None:
        count = chars = 0
        ended = False
        for item in items:
            if item is STOP:
                ended = True
                continue
            count += 1
            line = getattr(item, "line", None)
            if line:
                chars += len(line)
        early.events += count
        early.chars += chars
        self._events += count
        self._chars += chars
        if ended:
            early.ended = True
            if early.kept:
                self._note_ended(early.subscription.key)
        if early.events > _EARLY_MAX_EVENTS or early.chars > _EARLY_MAX_CHARS:
            self._drop(early)
        while self._events > _EARLY_TOTAL_EVENTS or self._chars > _EARLY_TOTAL_CHARS:
            victim = next(
                (e for e in (self._buffers[k] for k in self._ended) if not e.dropped and e is not early),
                early,
            )
            self._drop(victim)
            if victim is early:
                break

    def _drop(self, early: _Early) -> None:
        """Let the buffer's events go, keeping a mark so that `events()` can say so."""
        if early.dropped:
            return
        self._let_go(early)
        early.dropped = True
        if early.kept:
            self._note_ended(early.subscription.key)

    def _let_go(self, early: _Early) -> None:
        subscription = early.subscription
        subscription.watcher = None
        if not early.ended:
            self._bus.unsubscribe(subscription)
        subscription.clear()
        self._events -= early.events
        self._chars -= early.chars
        early.events = early.chars = 0

    def _note_ended(self, key: UUID) -> None:
        self._ended[key] = None
        while len(self._ended) > _EARLY_KEEP_ENDED:
            oldest, _ = self._ended.popitem(last=False)
            early = self._buffers.pop(oldest, None)
            if early is not None:
                self._let_go(early)


async def _run_sync(fn: Any, *args: Any) -> Any:
    """Run a plain call on the loop thread (for calls that need the loop to be current)."""
    return fn(*args)

"""Blocking work the host side does off its loop, on threads of the engine's own.

`asyncio.to_thread` runs on the loop's default executor, which belongs to the
host: six threads on two cores, shared with every blocking call the host makes
that way. A host whose own calls filled it (a slow network, a lock) kept an
engine from starting with a journal, from reading a log, from cleaning up after
a dead worker (whose executions then stayed `running`) and from shutting down,
until one of the host's calls returned.

So each call here gets a thread of its own: these calls are rare (a start, a
shutdown, a dead worker, a sweep) or bounded by their caller (`read_logs`, a few
at a time), and a thread costs about 100 µs to start. (A Ray node's actor runs
its own loop, whose default executor is its own, and keeps `to_thread`.)

The threads are daemons, as the default executor's are not: one still blocked
(a log on a hung filesystem) never keeps the host's interpreter from exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["in_thread", "start_in_thread"]

_T = TypeVar("_T")
_NAME = "cloudops-blocking"


async def in_thread(fn: Callable[..., _T], *args: Any, name: str = _NAME) -> _T:
    """`fn(*args)` on a new daemon thread; its result or exception here.

    A cancelled caller stops waiting; the call itself runs to its end, as with
    `asyncio.to_thread`, and what it returns is dropped.
    """
    return await start_in_thread(fn, *args, name=name)


def start_in_thread(fn: Callable[..., _T], *args: Any, name: str = _NAME) -> asyncio.Future[_T]:
    """`fn(*args)` started on a new daemon thread: the future of its result, as `run_in_executor` gives."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the caller, whatever it is
            _hand_over(loop, _set_exception, future, exc)
        else:
            _hand_over(loop, _set_result, future, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _hand_over(loop: asyncio.AbstractEventLoop, setter: Callable[..., None], *args: Any) -> None:
    # RuntimeError: the loop has closed, and nobody waits for the answer any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(setter, *args)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

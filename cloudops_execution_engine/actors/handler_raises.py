"""How a raising event handler is logged: its first raise in full, then at most one a second.

A handler that raises on every event would otherwise have a traceback logged
per output line: a command printing 200,000 lines took 20 s instead of 0.2 s,
most of it formatting tracebacks on the engine's loop, and wrote 100 MB to the
host's log. The handler still receives every event; what is bounded is how
often its raises are written out. The ones between are counted, and the count
is said with the next one logged, or once the handler has gone a second
without raising while it waits for events, or when it stops receiving them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any

from .telemetry import correlate

__all__ = ["HandlerRaises"]

logger = logging.getLogger("cloudops_execution_engine.events")

# At most one raise of a handler is logged, with its traceback, per this many seconds.
LOG_INTERVAL_S = 1.0


class HandlerRaises:
    """One handler's raises; used from the one thread that calls that handler."""

    __slots__ = ("_handler", "_last", "_logged_at", "_unlogged")

    def __init__(self, handler: Any) -> None:
        self._handler = handler
        self._logged_at: float | None = None
        self._unlogged = 0
        self._last: tuple[str, str, Any] = ("", "", None)  # event type, exception, the event's id

    def record(self, event: Any) -> None:
        """Called in the `except` clause of the handler's raise; never raises itself.

        What says the raise may fail in turn (an exception whose `str()` raises,
        a host's log handler that does): the delivery must go on all the same.
        """
        try:
            self._record(event)
        except Exception:
            with contextlib.suppress(Exception):
                logger.error(
                    "event handler %r raised on %s, and the raise could not be said: %s",
                    self._handler,
                    type(event).__name__,
                    type(sys.exception()).__name__,
                )

    def _record(self, event: Any) -> None:
        now = time.monotonic()
        about = getattr(event, "execution_id", None) or getattr(event, "plan_id", None)
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL_S:
            self._unlogged += 1
            self._last = (type(event).__name__, _exception_now(), about)
            return
        suffix, extra = correlate([about] if about is not None else [])
        since = f" ({self._unlogged} more raised since the last one logged)" if self._unlogged else ""
        logger.exception(
            "event handler %r raised on %s; it keeps receiving events%s%s",
            self._handler,
            type(event).__name__,
            since,
            suffix,
            extra=extra,
        )
        self._logged_at = now
        self._unlogged = 0

    def quiet_in(self) -> float | None:
        """Seconds until a count of raises not logged is due, while the handler waits; None if none is."""
        if not self._unlogged or self._logged_at is None:
            return None
        return max(0.0, self._logged_at + LOG_INTERVAL_S - time.monotonic())

    def flush(self) -> None:
        """The handler receives no more events: say how many of its raises were only counted."""
        if not self._unlogged:
            return
        event_type, exception, about = self._last
        suffix, extra = correlate([about] if about is not None else [])
        logger.error(
            "event handler %r raised %d more times after the last one logged, the last on %s: %s%s",
            self._handler,
            self._unlogged,
            event_type,
            exception,
            suffix,
            extra=extra,
        )
        self._unlogged = 0
        self._logged_at = time.monotonic()


def _exception_now() -> str:
    exc = sys.exception()
    if exc is None:
        return ""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # its str() raised
        return type(exc).__name__

"""Retries under a request's `RetryPolicy`: whether an attempt is run again, and after how long.

The supervisor runs every attempt of an execution under the one execution id.
When an attempt ends it asks `next_delay` whether another follows; if one
does, the execution stays `running` through a backoff (a loop timer, which a
cancel or a shutdown cancels) and then queues for a worker again. It holds no
concurrency slot while it waits, so a backing-off retry never keeps other work
from starting. Only the last attempt's end decides the execution, and so a
plan's dependents, its `stop_on_error` and its progress.

What a retry needs is kept in a `Retrying`, made only for requests that carry
a policy, so records without one stay as small as before.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import TYPE_CHECKING, Literal

from ..results import ExecutionResult, ExecutionStatus

if TYPE_CHECKING:
    from ..requests import RetryPolicy

__all__ = [
    "ATTEMPT_ENV",
    "Retrying",
    "attempt_env",
    "backoff_ms",
    "cause_of",
    "next_delay",
]

ATTEMPT_ENV = "CLOUDOPS_ATTEMPT"

Cause = Literal["completed", "failed", "timeout", "cancelled", "worker_lost"]

_CAUSES: dict[ExecutionStatus, Cause] = {
    ExecutionStatus.COMPLETED: "completed",
    ExecutionStatus.FAILED: "failed",
    ExecutionStatus.TIMEOUT: "timeout",
    ExecutionStatus.CANCELLED: "cancelled",
}


class Retrying:
    """The retry state of one execution that has a policy.

    Between two attempts the execution is in exactly one of two places: its
    backoff `timer` runs, or it is `queued` for a worker. `cancelled` is set
    when a cancel reached an attempt that was running, so that an attempt
    which ended on its own just before the cancel arrived is not run again.
    """

    __slots__ = ("cancelled", "last", "policy", "queued", "timer")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.timer: asyncio.TimerHandle | None = None
        self.queued = False
        self.cancelled = False
        self.last: ExecutionResult | None = None  # the result of the attempt before the wait

    @property
    def between_attempts(self) -> bool:
        return self.timer is not None or self.queued

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def cause_of(status: ExecutionStatus) -> Cause:
    """What an attempt that ended with `status` counts as, for `RetryPolicy.retry_on`."""
    return _CAUSES[status]


def backoff_ms(policy: RetryPolicy, attempt: int) -> float:
    """Milliseconds before attempt `attempt + 1`, without jitter.

    That is `backoff_ms * backoff_multiplier**(attempt-1)`, capped at `max_backoff_ms`.
    """
    cap = float(policy.max_backoff_ms)
    base = float(policy.backoff_ms)
    if base <= 0.0:
        return 0.0
    try:
        delay = base * policy.backoff_multiplier ** (attempt - 1)
    except OverflowError:
        return cap
    return cap if math.isnan(delay) else min(delay, cap)


def next_delay(
    policy: RetryPolicy, attempt: int, cause: Cause, rng: random.Random | None = None
) -> float | None:
    """Seconds to wait before running attempt `attempt + 1`, or None when attempt `attempt` is the last.

    Another attempt follows when `cause` is one the policy retries on and
    attempts remain. A cancel is never retried; `worker_lost` only when listed.
    With jitter, the delay is drawn uniformly from [delay/2, delay].
    """
    if cause == "completed" or cause == "cancelled":
        return None
    if cause not in policy.retry_on or attempt >= policy.max_attempts:
        return None
    delay = backoff_ms(policy, attempt)
    if policy.jitter and delay > 0:
        delay = (rng or random).uniform(delay / 2, delay)
    return delay / 1000


def attempt_env(env: dict[str, str], attempt: int) -> dict[str, str]:
    """The request's variables with `CLOUDOPS_ATTEMPT` set to `attempt`, for a command under a policy."""
    return {**env, ATTEMPT_ENV: str(attempt)}

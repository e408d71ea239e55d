"""A worker's own resource limits, nice value and CPU set, put back before each command starts.

A command may change them in its worker (`prlimit`, `renice` or `taskset`
on `$PPID`): every command started after would inherit the change, and a
lowered fd or file-size limit would fail the worker's own log files for every
later execution. So the worker records them once it is set up (`record`) and
puts them back before each start (`restore`), as its spawner does for itself
(`_child.h`). What cannot be put back (a hard limit lowered, in a worker
without the privilege to raise it: CAP_SYS_RESOURCE, which even root may
lack in a container) is counted: such a worker retires (`Retire`), and a
fresh one, which has the host's settings, takes its place.

In C where the `_spawn` extension was built (a few microseconds a start),
in Python elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import resource

__all__ = ["record", "restore"]

try:
    from ._spawn import record_own as record
    from ._spawn import restore_own as restore
except ImportError:  # not built
    _RESOURCES = tuple(getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_"))
    _recorded: dict[str, object] = {}

    def record() -> None:
        """Remember this process's limits, nice value and CPU set."""
        _recorded["limits"] = {r: resource.getrlimit(r) for r in _RESOURCES}
        _recorded["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
        _recorded["cpus"] = os.sched_getaffinity(0)

    def restore() -> int:
        """Put back what `record` remembered, as far as allowed; how many settings could not be."""
        if not _recorded:
            return 0
        stuck = 0
        limits: dict[int, tuple[int, int]] = _recorded["limits"]  # type: ignore[assignment]
        for r, (soft, hard) in limits.items():
            now = resource.getrlimit(r)
            if now == (soft, hard):
                continue
            try:
                resource.setrlimit(r, (soft, hard))
                continue
            except (OSError, ValueError):
                stuck += 1
            lowered = now[1]
            if lowered != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or lowered < hard):
                cap = soft if soft != resource.RLIM_INFINITY and soft < lowered else lowered
                with contextlib.suppress(OSError, ValueError):
                    resource.setrlimit(r, (cap, lowered))
        nice: int = _recorded["nice"]  # type: ignore[assignment]
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError:
                stuck += 1
        cpus: set[int] = _recorded["cpus"]  # type: ignore[assignment]
        if os.sched_getaffinity(0) != cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                stuck += 1
        return stuck

"""A request's `ResourceLimits` as the worker applies them, and what a command stopped by one ends with.

The host sends the limits as plain numbers (`Run.limits`, named as the
`ResourceLimits` fields); the worker turns them into `setrlimit` calls for the
command's child, between its fork and its exec, on whichever node it runs.
A limit is set as both soft and hard, so the command cannot raise it again;
the CPU limit's hard value is one second more, so the command first gets
SIGXCPU (which ends it, unless it handles it) and SIGKILL a second later.

Limits are checked here, against the worker's own hard limits, so that one
the kernel would refuse fails with an error that names it rather than an
errno from inside the child.
"""

from __future__ import annotations

import functools
import os
import resource
import signal

__all__ = ["LIMIT_NAMES", "LimitRefused", "command_settings", "inherited_limits", "own_cpu", "stopped_by"]

Limits = tuple[tuple[int, int, int], ...]  # (resource, soft, hard); -1 is RLIM_INFINITY

# `ResourceLimits` field -> (resource, what it is called in errors).
_RLIMITS: dict[str, tuple[int, str]] = {
    "memory_bytes": (resource.RLIMIT_AS, "RLIMIT_AS"),
    "cpu_seconds": (resource.RLIMIT_CPU, "RLIMIT_CPU"),
    "open_files": (resource.RLIMIT_NOFILE, "RLIMIT_NOFILE"),
    "processes": (resource.RLIMIT_NPROC, "RLIMIT_NPROC"),
    "file_size_bytes": (resource.RLIMIT_FSIZE, "RLIMIT_FSIZE"),
}
LIMIT_NAMES = (*_RLIMITS, "nice")
_NICE_MAX = 19
_NICE_MIN = -20


class LimitRefused(ValueError):
    """A limit the kernel would refuse for this worker's commands."""


_CAP_SYS_NICE = 23
_CAP_SYS_RESOURCE = 24


@functools.cache
def _capable(capability: int) -> bool:
    """Whether this process may do what `capability` allows: root is not, in a container that drops it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> capability & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


# The largest finite limit setrlimit takes (a signed 64-bit value; larger means "unlimited").
_RLIM_MAX = 2**63 - 1


def _rlimit(resource_id: int, name: str, label: str, value: int, extra: int) -> tuple[int, int, int]:
    if resource_id == resource.RLIMIT_NOFILE:
        ceiling = _nr_open()
        if ceiling and value > ceiling:
            raise LimitRefused(f"limits.{name}={value} is above the kernel's ceiling fs.nr_open={ceiling}")
        extra = 0
    _soft, hard = resource.getrlimit(resource_id)
    # The CPU limit's second of grace is no more than the largest limit there is.
    wanted = min(value + extra, _RLIM_MAX)
    if hard != resource.RLIM_INFINITY and wanted > hard and not _capable(_CAP_SYS_RESOURCE):
        if value > hard:
            raise LimitRefused(
                f"limits.{name}={value} is above the hard limit {hard} ({label}) this worker runs under; "
                "only a worker with CAP_SYS_RESOURCE can raise it"
            )
        wanted = value
    return (resource_id, value, wanted)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def command_settings(
    limits: dict[str, int], cpu_affinity: list[int], base: Limits
) -> tuple[Limits, int, tuple[int, ...]]:
    """The rlimits, nice increment and CPU set of a command; raises `LimitRefused` for one that cannot be.

    `base` is what every command gets anyway (the worker's restored fd limit);
    a limit of the request replaces the same resource there.
    """
    chosen: dict[int, tuple[int, int, int]] = {item[0]: item for item in base}
    for name, value in limits.items():
        if name == "nice":
            continue
        known = _RLIMITS.get(name)
        if known is None:
            raise LimitRefused(f"unknown limit {name!r}")
        resource_id, label = known
        chosen[resource_id] = _rlimit(resource_id, name, label, value, 1 if name == "cpu_seconds" else 0)
    nice = limits.get("nice", 0)
    if nice < 0 and not _capable(_CAP_SYS_NICE):
        target = os.getpriority(os.PRIO_PROCESS, 0) + nice
        allowed = 20 - resource.getrlimit(resource.RLIMIT_NICE)[0]
        if max(target, _NICE_MIN) < allowed:
            raise LimitRefused(
                f"limits.nice={nice} would raise the command's priority, which this worker may not "
                "(it needs CAP_SYS_NICE or a higher RLIMIT_NICE)"
            )
    cpus: tuple[int, ...] = ()
    if cpu_affinity:
        offered = os.sched_getaffinity(0)
        missing = sorted(set(cpu_affinity) - offered)
        if missing:
            raise LimitRefused(
                f"limits.cpu_affinity names CPU(s) {missing} that this worker may not use "
                f"(it may use {sorted(offered)})"
            )
        cpus = tuple(sorted(set(cpu_affinity)))
    return tuple(chosen.values()), max(min(nice, 2 * _NICE_MAX + 1), 2 * _NICE_MIN), cpus


_BY_SIGNAL: dict[int, tuple[str, str]] = {
    int(signal.SIGXCPU): ("cpu_seconds", "CPU time limit exceeded"),
    int(signal.SIGXFSZ): ("file_size_bytes", "File size limit exceeded"),
}
# A shell reports a child that a signal ended as its own exit code 128 + the signal.
_SHELL_SIGNAL = 128


def inherited_limits() -> frozenset[str]:
    """The limits of `_BY_SIGNAL` that every command of this worker has without asking (the host's)."""
    signalled = {name for name, _error in _BY_SIGNAL.values()}
    return frozenset(
        name
        for name, (resource_id, _label) in _RLIMITS.items()
        if name in signalled and resource.getrlimit(resource_id)[0] != resource.RLIM_INFINITY
    )


def own_cpu(pid: int) -> float | None:
    """The CPU time of child `pid` itself (all its threads, not its children), while it waits to be reaped.

    What `RLIMIT_CPU` counts. wait4's usage adds that of every child the
    process waited for (and, a subreaper, of the orphans it adopted); only
    its /proc entry, until it is reaped, tells the two apart. None when that
    cannot be read.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # After the name, which may hold anything, ")" included: state is field 3, utime 14, stime 15.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc rounds utime and stime down to clock ticks, each: a process the hard
# limit killed may show up to two ticks less than it.
_CPU_SLACK = 0.05
# A process killed as it started, before it ran: its own CPU time is that of the fork and the exec.
_AT_START_CPU = 0.1
# An address-space limit under which a program may not even be mapped at exec (a few MiB are
# enough for most): above it, a silent early SIGSEGV is the program's own (`kill -SEGV $$`).
_TOO_SMALL_TO_LOAD = 64 * 1024 * 1024
_LOADER_FAILED = 127
_LOADER_LINE = b"error while loading shared libraries: "
# What the dynamic loader says when it cannot map a library (ENOMEM) or open one (EMFILE).
# Its own strerror is "Error <errno>", at the end of the line.
_LOADER_MEMORY = (b"failed to map segment from shared object", b"cannot map zero-fill pages", b": Error 12\n")
_LOADER_FILES = (b": Error 24\n",)


def stopped_by(
    exit_code: int,
    limits: dict[str, int],
    cpu_used: float | None,
    inherited: frozenset[str] = frozenset(),
    *,
    stderr: bytes = b"",
    wrote: bool = True,
) -> str | None:
    """The error of a command a limit stopped, or None when none did.

    SIGXCPU and SIGXFSZ name their limit when one was in effect (the
    request's, or one the command `inherited`): either signal may also be
    sent by anyone, the command to itself included, and then no limit is to
    blame. So does the exit code a shell gives for a child they ended, when
    the request set that limit. A command that handled SIGXCPU is killed at
    the CPU limit's hard value (SIGKILL): its own CPU time tells
    (`cpu_used`, from `own_cpu`; its children's does not count, as the
    limit is per process, and None blames nothing).

    A command the limits leave no room to start (`stderr`, the head of what
    it wrote there; `wrote`, whether it wrote anything) ends by the kernel's
    SIGSEGV at exec when its memory limit is below what the program maps,
    or exits 127 after the dynamic loader says it cannot map or open a
    library: those are named when the limit they point to was set.
    """
    named = _BY_SIGNAL.get(-exit_code)
    if named is not None:
        return named[1] if named[0] in limits or named[0] in inherited else None
    named = _BY_SIGNAL.get(exit_code - _SHELL_SIGNAL)
    if named is not None and named[0] in limits:
        return named[1]
    cpu = limits.get("cpu_seconds")
    if exit_code == -signal.SIGKILL and cpu is not None and cpu_used is not None:
        return "CPU time limit exceeded" if cpu_used + _CPU_SLACK >= cpu else None
    at_start = cpu_used is not None and cpu_used < _AT_START_CPU and not wrote
    tight = limits.get("memory_bytes", _TOO_SMALL_TO_LOAD) < _TOO_SMALL_TO_LOAD
    if exit_code == -signal.SIGSEGV and tight and at_start:
        return "Memory limit exceeded while loading the program"
    if exit_code == _LOADER_FAILED:
        return _loader_stopped(stderr, limits)
    return None


def _loader_stopped(stderr: bytes, limits: dict[str, int]) -> str | None:
    """The limit the dynamic loader's words point to, if the request set it; an exit 127 alone names none."""
    for line in stderr.splitlines(keepends=True):
        if _LOADER_LINE not in line:
            continue
        if "memory_bytes" in limits and any(words in line for words in _LOADER_MEMORY):
            return "Memory limit exceeded while loading the program"
        if "open_files" in limits and any(words in line for words in _LOADER_FILES):
            return "Open file limit exceeded while loading the program"
    return None

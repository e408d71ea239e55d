"""Finding a command's process tree, and the signals that kill it.

A command runs in its own session, with `CLOUDOPS_EXECUTION_ID` in its
environment, and (on Linux) as the child subreaper of its own descendants. Its
tree is: the main process and its descendants, which while the main process
runs includes every process that double-forked, called `setsid` or cleared its
environment, since the kernel reparents orphans to the nearest subreaper. Once
the main process has ended, its orphans are reparented to the worker (the
subreaper above it): those recognised by the inherited marker or the session
id are the command's, and so is any process that no running command claims,
as it can only have come from a command that has ended.

This module finds trees (`tree_of`, `descendants`, `find_abandoned`) and sends
signals (`signal_processes`, `signal_group`, `stop_and_kill`); when and in
what order a tree gets them is the policy in `killing`, which every path that
stops a tree in a worker goes through. `kill_abandoned`, for a host whose
worker died, runs the same final step, `stop_and_kill`, in a blocking loop of
its own, as it cannot reap what it kills.

`tree_of`, which the kill policy calls at every look, reads /proc itself:
one read of each process's stat file (`Proc`) and, for a process the worker
adopted, one of its environment. The other finders, off the hot path, use
psutil.

Trees are listed deepest first, so that a parent cannot respawn a child it
just lost. What is ignored, and nothing else:
- a process that vanished while we looked at it or signalled it
  (`NoSuchProcess`, which includes `ZombieProcess`, and `ProcessLookupError`):
  exactly what we wanted;
- a process we may not signal (`AccessDenied`, `PermissionError`: a program
  that changed its real user id, such as `sudo`, in the tree). Raising would end
  the worker and every other command it runs; the kill policy signals the rest
  and keeps looking at it until it exits;
- a process whose environment, session, parent or children cannot be read
  (`NoSuchProcess`, `AccessDenied`, or the `OSError` of a /proc read or of
  `getsid`): it carries no marker, is in no session, counts as the top of its
  branch, or has no children.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import psutil

__all__ = [
    "ENGINE_ENV",
    "MARKER_ENV",
    "Proc",
    "Signallable",
    "adopts_orphans",
    "become_subreaper",
    "children_of",
    "descendants",
    "describe_exit",
    "execution_of",
    "find_abandoned",
    "kill_abandoned",
    "live",
    "marker_key",
    "reap_orphaned",
    "signal_group",
    "signal_processes",
    "stop_and_kill",
    "tree_of",
]

MARKER_ENV = "CLOUDOPS_EXECUTION_ID"
# Which engine started the command. Ids are the host's to choose, so two engines
# on one machine may run the same one: what one engine kills across the machine
# (after a worker's death, or in recovery) is found by both.
ENGINE_ENV = "CLOUDOPS_ENGINE_ID"


def marker_key(execution_id: str, engine: str | None) -> str:
    """What `kill_abandoned` looks for: one execution of one engine, or of any engine (`engine` None)."""
    return f"{execution_id}/{engine}" if engine else execution_id


def execution_of(marker: str) -> str:
    """The execution id a `marker_key` names."""
    return marker.partition("/")[0]


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux); return whether the kernel agreed."""
    if not sys.platform.startswith("linux"):
        return False
    # The interpreter links libc: its symbols are the program's, found without
    # `find_library`, which runs `ldconfig -p` in a subprocess.
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


_PR_GET_CHILD_SUBREAPER = 37


@functools.cache
def adopts_orphans() -> bool:
    """Whether this process is given the orphans of its descendants: PID 1, or a child subreaper."""
    if os.getpid() == 1:
        return True
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    return bool(libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value)


def reap_orphaned(name: bytes) -> int:
    """Reap the zombies among this process's children whose command name is `name`; how many.

    A worker that dies leaves its spawner to whoever adopts orphans; when that
    is the host itself, nobody else ever reaps it.
    """
    reaped = 0
    for pid in children_of(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                line = stat.read()
        except OSError:
            continue
        end = line.rfind(b")")
        if line[line.find(b"(") + 1 : end] == name and line[end + 2 : end + 3] == b"Z":
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
    return reaped


def started_at(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None if it is not running.

    With its pid, what names one process for good: a pid alone may be reused.
    Ticks since boot, not a wall-clock time, which a clock set meanwhile would move.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read()
        # After the name, which may hold anything, ")" included: the start time is field 22.
        return int(line[line.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def still_running(pid: int, host: str, since: int) -> bool | None:
    """Whether the process `pid` that started at `since` (`started_at`) runs still; None: another host's."""
    import socket

    if host != socket.gethostname():
        return None
    return started_at(pid) == since


def describe_exit(code: int | None) -> str:
    """`exit code 3`, or `signal SIGKILL(-9)` for a negative multiprocessing exit code."""
    if code is None:
        return "an unknown cause"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"signal {name}({code})"
    return f"exit code {code}"


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _environ_of(proc: psutil.Process) -> dict[str, str] | None:
    """The environment, or None while it reads as empty.

    In the middle of an `exec` a process's environment reads as empty for a
    moment. One that cannot be read at all (another user's, or a process
    that is gone) is `{}`: that does not pass, so waiting would be in vain.
    """
    try:
        return proc.environ() or None
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return {}


def _marker_match(proc: psutil.Process, markers: set[str], ids: set[str]) -> tuple[str | None, bool]:
    """(the process's marker, whether it is among `markers`, which `marker_key` made; `ids`: their ids).

    A process without an engine id (a command that removed it) is taken by
    its marker alone, as before engines were told apart; one with another
    engine's id is not taken.
    """
    env = _environ_of(proc) or {}
    theirs = env.get(MARKER_ENV)
    if theirs is None:
        return None, False
    engine = env.get(ENGINE_ENV)
    if engine is None:
        return theirs, theirs in ids
    return theirs, theirs in markers or f"{theirs}/{engine}" in markers


_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`.

    Linux lists them per thread in /proc; that is one small read, where
    psutil's portable way reads the stat file of every process on the machine.
    """
    if not _PROC_CHILDREN:
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.NoSuchProcess:
            return []
    if pid == _own_pid and threading.active_count() == 1:
        # Our own single-threaded process (a worker), asked on every command's
        # end: one thread, one file kept open, one read.
        return [int(x) for x in _read_own_children(pid).split()]
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            found.extend(int(x) for x in _read_small(f"/proc/{pid}/task/{tid}/children").split())
        except OSError:
            continue
    return found


_own_children: tuple[int, int] | None = None  # (pid, fd of its children file)


_own_pid = os.getpid()  # getpid() is a system call on every use since glibc 2.25


def _after_fork_in_child() -> None:
    # Runs in a forked child at once, before it could close or reuse the fd number.
    global _own_children, _own_pid
    _own_pid = os.getpid()
    if _own_children is not None:
        os.close(_own_children[1])
        _own_children = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _read_own_children(pid: int) -> bytes:
    # The file is generated afresh by every read from offset 0.
    global _own_children
    if _own_children is None or _own_children[0] != pid:
        fd = os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY | os.O_CLOEXEC)
        _own_children = (pid, fd)
    fd = _own_children[1]
    chunks = [os.pread(fd, 65536, 0)]
    while len(chunks[-1]) == 65536:  # one read holds any list of children but a huge one
        chunks.append(os.pread(fd, 65536, 65536 * len(chunks)))
    return b"".join(chunks)


def _read_small(path: str) -> bytes:
    """A whole /proc file with raw calls: `open()` would add a stat, a seek and a tty check."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while len(chunks[-1]) == 65536:  # one read holds any list of children but a huge one
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    finally:
        os.close(fd)


class Signallable(Protocol):
    """What the kill policy needs of a process: `Proc` and `psutil.Process` both have it."""

    def send_signal(self, sig: int, /) -> None: ...


class _Node(Protocol):
    @property
    def pid(self) -> int: ...

    def ppid(self) -> int: ...


_N = TypeVar("_N", bound=_Node)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_boot_time: float | None = None


class Proc:
    """A process as one read of its /proc stat file saw it: a tree's look reads each process once.

    A `psutil.Process` reads that file again for each of its creation time,
    parent, running state and status, and before each signal: a look at a
    100-process tree cost about 14 ms that way. Like `psutil.Process`, it
    compares by pid and start time, and checks the start time again before a
    signal, so a recycled pid is never hit.
    """

    __slots__ = ("_ppid", "group", "pid", "session", "start", "threads", "zombie")

    def __init__(
        self, pid: int, ppid: int, session: int, start: int, threads: int, zombie: bool, group: int = 0
    ) -> None:
        self.pid = pid
        self._ppid = ppid
        self.group = group  # the process group; 0 where it could not be read
        self.session = session
        self.start = start  # clock ticks after boot
        self.threads = threads
        self.zombie = zombie

    @classmethod
    def read(cls, pid: int) -> Proc | None:
        """The process now, or None once it is gone (or was never there)."""
        try:
            data = _read_small(f"/proc/{pid}/stat")
        except PermissionError:
            # Another user's process under hidepid: its state is hidden from
            # us, not its existence. It stays in the tree, alive, until it exits.
            return cls(pid, 0, _session_of(pid) or 0, -1, 0, False)
        except OSError:
            return None
        # The command name is in parentheses and may hold anything, those included.
        fields = data[data.rindex(b")") + 2 :].split(b" ", 20)
        # state ppid pgrp session ... num_threads (18th) ... starttime (20th)
        return cls(
            pid,
            int(fields[1]),
            int(fields[3]),
            int(fields[19]),
            int(fields[17]),
            fields[0] == b"Z",
            int(fields[2]),
        )

    def ppid(self) -> int:
        return self._ppid

    def create_time(self) -> float:
        """Seconds since the epoch, as `psutil.Process.create_time` gives it."""
        global _boot_time
        if _boot_time is None:
            _boot_time = psutil.boot_time()
        return _boot_time + self.start / _CLOCK_TICKS

    def send_signal(self, sig: int, /) -> None:
        """Signal the process unless it is gone; PermissionError when it is not ours to signal."""
        now = Proc.read(self.pid)
        if now is None or now.start != self.start:
            return  # gone, and its pid perhaps someone else's now
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proc) and other.pid == self.pid and other.start == self.start

    def __hash__(self) -> int:
        return hash((self.pid, self.start))

    def __repr__(self) -> str:
        return f"Proc(pid={self.pid}, ppid={self._ppid}, zombie={self.zombie})"


_S = TypeVar("_S", Proc, psutil.Process)


def _children(proc: Proc) -> list[int]:
    if proc.threads == 1 and _PROC_CHILDREN:
        # One thread: its one children file, without listing the task directory.
        try:
            return [int(x) for x in _read_small(f"/proc/{proc.pid}/task/{proc.pid}/children").split()]
        except OSError:
            return []
    return children_of(proc.pid)


def _with_descendants(proc: Proc, into: dict[int, Proc]) -> None:
    pending = [proc]
    while pending:
        current = pending.pop()
        if current.pid in into:
            continue
        into[current.pid] = current
        if current.zombie:
            continue  # its children, if it had any, went to a subreaper when it exited
        for pid in _children(current):
            child = Proc.read(pid)
            if child is not None:
                pending.append(child)


def tree_of(
    main_pid: int,
    session_id: int,
    marker: str,
    adopter_pid: int,
    other_mains: Iterable[int] = (),
    unsure: list[Proc] | None = None,
    claimed: tuple[set[str], set[int]] | None = None,
) -> list[Proc]:
    """Every process of one command's tree, deepest first.

    `main_pid` is 0 once the main process has been reaped (its pid may since
    belong to someone else). `adopter_pid` is the subreaper that orphans of the
    command were reparented to; `other_mains` are the main processes of other
    commands under it, never taken. An adopted process belongs to the command
    if it carries the command's marker, or carries none and is in its session.
    An adopted process whose environment cannot be read right now (it is in
    the middle of an `exec`) and is outside the session is added to `unsure`,
    for the caller to look again. With `claimed` (the markers and sessions of
    the other commands still tracked), which is given once the main process
    has ended, every adopted process that none of those claims is taken too.
    """
    found: dict[int, Proc] = {}
    if main_pid:
        main = Proc.read(main_pid)
        if main is not None:
            _with_descendants(main, found)
    skip = set(other_mains)
    for pid in children_of(adopter_pid):
        if pid in found or pid in skip or pid == main_pid:
            continue
        proc = Proc.read(pid)
        if proc is None:
            continue
        belongs = _belongs(proc, session_id, marker)
        if belongs or (claimed is not None and not _claimed(proc, *claimed)):
            _with_descendants(proc, found)
        elif belongs is None and unsure is not None:
            unsure.append(proc)
    return _deepest_first(found)


_MARKER_ENTRY = os.fsencode(MARKER_ENV) + b"="


def _marker_in(proc: Proc) -> tuple[bool, str | None]:
    """(whether the environment could be told, the marker in it): (False, None) while it reads as empty.

    As `_environ_of`, with one raw read of /proc rather than a parsed dict:
    an environment that cannot be read at all (another user's, a zombie's,
    a process that is gone) is told, and carries no marker.
    """
    if proc.zombie:
        return True, None
    try:
        block = _read_small(f"/proc/{proc.pid}/environ")
    except OSError:
        return True, None
    if not block:
        # In the middle of an `exec`, or it just died: only the first waits.
        now = Proc.read(proc.pid)
        return (now is None or now.zombie or now.start != proc.start), None
    found: bytes | None = None
    # Read as psutil reads it: entries end in NUL, an empty one ends the block,
    # and the last value given for a name is the one that counts.
    for entry in block.split(b"\0")[:-1]:
        if not entry:
            break
        if entry.startswith(_MARKER_ENTRY):
            found = entry[len(_MARKER_ENTRY) :]
    return True, (os.fsdecode(found) if found is not None else None)


def _claimed(proc: Proc, markers: set[str], sessions: set[int]) -> bool:
    """Whether an adopted process carries the marker, or is in the session, of one of the given commands."""
    _, theirs = _marker_in(proc)
    if theirs is not None:
        return theirs in markers
    return proc.session in sessions


def _belongs(proc: Proc, session_id: int, marker: str) -> bool | None:
    """Whether an adopted process is the command's; None when that cannot be told yet."""
    told, theirs = _marker_in(proc)
    if theirs is not None:
        return theirs == marker
    if bool(session_id) and proc.session == session_id:
        return True
    return False if told else None


def descendants(pid: int) -> list[psutil.Process]:
    """Every descendant of `pid`, deepest first: what a worker leaves if it stops at once."""
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return _deepest_first({proc.pid: proc for proc in found})


def find_abandoned(markers: set[str], sessions: set[int]) -> list[psutil.Process]:
    """Every process on the machine of the given commands (`marker_key`s), with descendants.

    For when the worker that adopted them died and they were reparented elsewhere.
    """
    found: dict[int, psutil.Process] = {}
    me = os.getpid()
    ids = {execution_of(marker) for marker in markers}
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid == me:
            continue
        theirs, taken = _marker_match(proc, markers, ids)
        if taken or (theirs is None and _session_of(proc.pid) in sessions):
            pending = [proc]
            while pending:
                current = pending.pop()
                if current.pid not in found:
                    found[current.pid] = current
                    pending.extend(filter(None, map(_process, children_of(current.pid))))
    return _deepest_first(found)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def kill_abandoned(markers: set[str], sessions: set[int], rounds: int = 20, reap: bool = False) -> int:
    """SIGKILL every process of the given commands until none is left (blocking; run in a thread).

    Returns how many processes it killed. With `reap`, those that came to this
    process (a host that adopts orphans: its dead worker's commands) are reaped.
    """
    killed: set[int] = set()
    empty_looks = 0
    for _ in range(rounds):
        procs = live(find_abandoned(markers, sessions))
        if not procs:
            # A process can be unreadable for a moment while it changes state
            # (its marker then reads as absent): trust an empty look only twice.
            empty_looks += 1
            if empty_looks == 2:
                break
            time.sleep(0.02)
            continue
        empty_looks = 0
        stop_and_kill(procs)
        killed.update(p.pid for p in procs)
        _wait_ended(procs, 0.5)
    for pid in killed if reap else ():
        # Only a child of ours can be; nobody else would reap it.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return len(killed)


def _wait_ended(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until each process is dead or a zombie, at most `timeout` seconds.

    Not until it is reaped: an orphan's reaper is init, or whatever subreaper
    the host runs under, and it may take its time. `psutil.wait_procs` waits
    for that, and an engine then took half a second to fail a dead worker's
    executions.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while live(procs):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _deepest_first(found: dict[int, _N]) -> list[_N]:
    depth: dict[int, int] = {}

    def depth_of(pid: int) -> int:
        # Iterative walk up the parent chain within the set.
        chain: list[int] = []
        current: int | None = pid
        while current is not None and current in found and current not in depth:
            chain.append(current)
            try:
                parent = found[current].ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                parent = 0
            current = parent if parent in found and parent not in chain else None
        base = depth.get(current, -1) if current is not None else -1
        for offset, item in enumerate(reversed(chain)):
            depth[item] = base + 1 + offset
        return depth[pid]

    return sorted(found.values(), key=lambda p: -depth_of(p.pid))


def live(procs: Iterable[_S]) -> list[_S]:
    """The processes still running: neither gone nor a zombie awaiting its reaper.

    A `Proc` is as its look just read it; a `psutil.Process` is asked now.
    """
    alive: list[_S] = []
    for proc in procs:
        if isinstance(proc, Proc):
            if not proc.zombie:
                alive.append(proc)
            continue
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            # Its state is hidden from us (hidepid), not its existence.
            alive.append(proc)
    return alive


def signal_processes(procs: Iterable[Signallable], sig: int) -> None:
    """Send `sig` to each process; one that is gone or may not be signalled is passed over."""
    for proc in procs:
        try:
            # Both kinds check the start time first, so a recycled pid is never hit.
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
        except (psutil.AccessDenied, PermissionError):
            # Not ours to stop (see the module's docstring); the others still are.
            continue


def stop_and_kill(procs: Sequence[Signallable]) -> None:
    """SIGSTOP every process, then SIGKILL every one: none can fork while its siblings die."""
    signal_processes(procs, signal.SIGSTOP)
    signal_processes(procs, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> None:
    """Signal a command's process group, reaching children forked since the last look."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)

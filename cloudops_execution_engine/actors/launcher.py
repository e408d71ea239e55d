"""Starting a worker as a `spawn` multiprocessing child that does not re-run `__main__`.

Spawn, never fork: a host with threads (asyncio's executor, the caller's own)
could hand a forked worker a lock held by a thread that does not exist there.

Plain `spawn` makes every child import the host's main module again. For a
library that is wrong twice over: a host script without the
`if __name__ == "__main__":` guard would start the engine again inside each
worker (multiprocessing then refuses to start it at all), and a heavy host
(a web service, say) would be loaded into every worker. A worker needs only
this package, so the launch below is CPython's `popen_spawn_posix` launch with
the main-module entries taken out of the preparation data. It also passes no
resource-tracker fd: workers share no semaphores, so none is started for them.
A launch that fails part way closes what it opened at once and reaps a child
it had started, rather than leaving that to a garbage collection.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing import context, popen_spawn_posix, reduction, spawn, util
from multiprocessing import process as mp_process
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from . import after_fork

__all__ = ["WorkerProcess", "WorkerTarget", "launch_worker"]

# What a worker process runs: `worker_entry.worker_main`, or anything with its
# signature that can be imported by name in a spawned child.
WorkerTarget = Callable[[Connection, Connection, bool], None]


class _WorkerPopen(popen_spawn_posix.Popen):
    # The worker was reaped by another part of the host, its exit status lost (`poll`).
    status_lost = False

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        code = super().poll(flag)
        if code is None and _reaped_elsewhere(self.pid):
            # A host that ignores SIGCHLD, or collects every child itself (as
            # pre-forking servers do), takes the status. The worker has ended:
            # 0 stands for its status, as in `subprocess`. Otherwise it would
            # read as running for ever, every wait for it would run to its
            # timeout, and its descriptors would never be let go of.
            self.status_lost = True
            self.returncode = code = 0
        return code

    def _launch(self, process_obj: Any) -> None:
        prep_data = _preparation_data(process_obj._name)
        prep_data.pop("init_main_from_name", None)
        prep_data.pop("init_main_from_path", None)
        buffer = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buffer)
            reduction.dump(process_obj, buffer)
        finally:
            context.set_spawning_popen(None)

        parent_r = child_w = child_r = parent_w = None
        launched = False
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(pipe_handle=child_r)
            fds: list[int] = self._fds  # type: ignore[attr-defined]  # set by Popen.__init__
            fds.extend([child_r, child_w])
            self.pid = util.spawnv_passfds(os.fsencode(spawn.get_executable()), cmd, fds)
            try:
                with open(parent_w, "wb", closefd=False) as handle:
                    handle.write(buffer.getbuffer())
            except BaseException:
                # A child that cannot be handed its work is of no use, and
                # nothing else would ever reap it.
                os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):  # the host reaps its children itself
                    os.waitpid(self.pid, 0)
                raise
            self.sentinel = parent_r
            launched = True
        finally:
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)
            # The write end stays open as in CPython's launch (the child reads
            # its end as its parent's sentinel). On a failure both go at once:
            # a host short of file descriptors should not wait for a garbage
            # collection to get them back.
            ours = [fd for fd in (parent_r, parent_w) if fd is not None]
            if launched:
                self.finalizer = util.Finalize(self, _close_fds, (ours,))
            else:
                _close_fds(ours)


def _preparation_data(name: str) -> dict[str, Any]:
    """What a spawned child sets up before it runs its target, as `spawn.get_preparation_data` says.

    That asks for the host's working directory, which a long-lived host may
    have lost (a deploy removing an old release directory): no worker could
    start, nor replace one that died. A worker needs no directory of its own
    (every command is given its own), so it then starts in `/`.
    """
    try:
        return dict(spawn.get_preparation_data(name))
    except FileNotFoundError:
        pass
    data: dict[str, Any] = {
        "log_to_stderr": util._log_to_stderr,  # type: ignore[attr-defined]
        "authkey": bytes(mp_process.current_process().authkey),
        "name": name,
        "sys_path": [entry for entry in sys.path if entry],
        "sys_argv": sys.argv,
        "orig_dir": mp_process.ORIGINAL_DIR,  # type: ignore[attr-defined]
        "dir": "/",
        "start_method": "spawn",
    }
    logger = util._logger  # type: ignore[attr-defined]
    if logger is not None:
        data["log_level"] = logger.getEffectiveLevel()
    return data


def _reaped_elsewhere(pid: int) -> bool:
    """Whether our child `pid` has ended and been reaped by someone else (asked without reaping it)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class WorkerProcess(context.SpawnProcess):
    _start_method = "spawn"

    @staticmethod
    def _Popen(process_obj: BaseProcess) -> _WorkerPopen:
        return _WorkerPopen(process_obj)

    @property
    def status_lost(self) -> bool:
        """Whether the worker ended, its exit status taken by another part of the host (0 stands for it)."""
        popen = self._popen  # type: ignore[attr-defined]
        return bool(getattr(popen, "status_lost", False))

    def forked(self) -> None:
        """In a process forked from the host: the worker is the parent's child, not this one's (`after_fork`).

        multiprocessing's record of its children is copied into the child, and
        its exit handler would terminate (SIGTERM) and join each of them; the
        copies of the launch pipe would keep the worker's sentinel open.
        """
        mp_process._children.discard(self)  # type: ignore[attr-defined]
        popen = self._popen  # type: ignore[attr-defined]
        finalizer = getattr(popen, "finalizer", None)
        if finalizer is not None:
            finalizer()  # closes the child's copies; it does not run again at exit


def launch_worker(name: str, target: WorkerTarget, detach: bool = False) -> tuple[BaseProcess, int, int]:
    """Start a worker running `target`; return it, the write end of its input, the read end of its output.

    Raises what the start raised, with nothing left open.
    """
    ours: list[int] = []
    theirs: list[Connection] = []
    try:
        to_worker_r, to_worker_w = os.pipe()
        ours.append(to_worker_w)
        # The worker's ends travel as Connections, which a spawned child knows how to receive.
        theirs.append(Connection(to_worker_r, writable=False))
        from_worker_r, from_worker_w = os.pipe()
        ours.append(from_worker_r)
        theirs.append(Connection(from_worker_w, readable=False))
        process = WorkerProcess(target=target, args=(*theirs, detach), name=name, daemon=True)
        process.start()
        after_fork.track(process)
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        # The child has its own copies by now, or never will.
        for conn in theirs:
            conn.close()
    for fd in ours:
        os.set_blocking(fd, False)
    return process, to_worker_w, from_worker_r

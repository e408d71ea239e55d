"""The worker's end of its spawner, the small helper process that starts its commands.

A command's peak resident size, as the kernel reports it when the command is
reaped, counts the address space it called execve from. Started by vfork from
the worker, that is the worker's tens of megabytes of Python; started from the
spawner (`_spawner.c`), a few hundred kilobytes. The spawner clones each command
as the worker's own child, so reaping, resource usage and the subreaper's tree
are the same either way; only `max_rss_bytes` becomes the command's own.

Where the spawner was not built, or stops working, commands are started as
before (see `spawning`), and their peak then includes the worker's size.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "PROGRAM",
    "STAGE_CHDIR",
    "STAGE_EXEC",
    "STAGE_LIMITS",
    "STAGE_OTHER",
    "Spawner",
    "SpawnerLost",
    "SpawnerStalled",
    "available",
    "start_failure",
]

PROGRAM = Path(__file__).with_name("_spawner")
_HEADER = struct.Struct("=5IiI")
_ANSWER = struct.Struct("=3i")
_LIMIT = struct.Struct("=iqq")
# The spawner answers as soon as the command has called execve: milliseconds.
# One that does not answer in this long is stopped or hung (a command can send
# it SIGSTOP, as it is the worker's child too). Well below the host's limit of
# silence from a worker, so a stalled spawner costs one start, not the worker.
_ANSWER_TIMEOUT = 1.0
# Where a child's start failed, as `_child.h` numbers the stages.
STAGE_CHDIR, STAGE_EXEC, STAGE_OTHER, STAGE_LIMITS = 1, 2, 3, 4


def available() -> bool:
    return os.access(PROGRAM, os.X_OK)


class SpawnerLost(Exception):
    """The spawner could not take the request: nothing was started, start the command some other way."""


class SpawnerStalled(OSError):
    """The spawner stopped answering in the middle of a request; the command may or may not have started."""


class Spawner:
    """One spawner process, started on first use, for the process that made it."""

    def __init__(self) -> None:
        self.pid = 0
        self._sock: socket.socket | None = None

    def start(self, launch: Callable[[int], int]) -> None:
        """Start the spawner with `launch`, which starts `_spawner` with the given fd as its stdout."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.pid = launch(theirs.fileno())
        except (OSError, ValueError) as exc:
            ours.close()
            raise SpawnerLost(f"cannot start {PROGRAM}: {exc}") from exc
        finally:
            theirs.close()
        ours.settimeout(_ANSWER_TIMEOUT)
        self._sock = ours

    def stop(self) -> None:
        """End the spawner; its exit is reaped by whoever reaps this process's children."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = 0

    def start_command(
        self,
        program: bytes,
        argv: list[bytes],
        env: list[bytes],
        cwd: bytes,
        out_w: int,
        err_w: int,
        defaults: tuple[int, ...],
        limits: tuple[tuple[int, int, int], ...],
        stdin_fd: int = -1,
        nice: int = 0,
        affinity: tuple[int, ...] = (),
    ) -> int:
        """Start one command as this process's child; its pid, or the `OSError` of a failed start.

        `stdin_fd` becomes its standard input (-1: the spawner's, /dev/null);
        `nice` raises its nice value; `affinity`, when not empty, is its CPU set.
        `SpawnerLost` means the request never reached the spawner, so nothing
        was started and the caller may start the command itself.
        """
        strings = [program, cwd, *argv, *env]
        for item in strings:
            if b"\0" in item:
                raise ValueError("embedded null byte")
        body = b"\0".join(strings) + b"\0"
        body += struct.pack(f"={len(defaults)}i", *defaults)
        body += b"".join(_LIMIT.pack(*limit) for limit in limits)
        body += struct.pack(f"={len(affinity)}i", *affinity)
        header = _HEADER.pack(len(body), len(argv), len(env), len(defaults), len(limits), nice, len(affinity))
        fds = [out_w, err_w] if stdin_fd < 0 else [out_w, err_w, stdin_fd]
        sock = self._sock
        assert sock is not None, "start() first"
        try:
            # One message where it fits, so the spawner wakes once per command.
            sent = socket.send_fds(sock, [header, body], fds)
        except OSError as exc:
            self.stop()
            raise SpawnerLost(f"the spawner is gone ({exc})") from exc
        try:
            if sent < len(header) + len(body):
                sock.sendall((header + body)[sent:])
            answer = b""
            while len(answer) < _ANSWER.size:
                chunk = sock.recv(_ANSWER.size - len(answer))
                if not chunk:
                    raise ConnectionResetError("the spawner closed its socket")
                answer += chunk
        except OSError as exc:
            # It may or may not have started the command: say so rather than
            # start it a second time. A command it did start carries the
            # execution's marker and is ended as an orphan.
            self.stop()
            raise SpawnerStalled(exc.errno or 0, f"the spawner stopped answering: {exc}") from exc
        pid: int
        stage: int
        errno: int
        pid, stage, errno = _ANSWER.unpack(answer)
        if not stage:
            return pid
        if pid:
            os.waitpid(pid, 0)  # it exited at once; it is ours to reap
        raise start_failure(stage, errno, program, cwd)


def start_failure(stage: int, errno: int, program: bytes, cwd: bytes) -> OSError:
    """The `OSError` of a child that could not start, naming the file as `subprocess` does."""
    if stage == STAGE_LIMITS:
        return OSError(errno, f"cannot apply the command's limits: {os.strerror(errno)}")
    name = {STAGE_CHDIR: cwd, STAGE_EXEC: program}.get(stage)
    if name is None:
        return OSError(errno, os.strerror(errno))
    return OSError(errno, os.strerror(errno), os.fsdecode(name))

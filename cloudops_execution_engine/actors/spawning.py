"""Starting a command's process: its environment, its program's path, and the start itself.

A command starts in a new session, in its working directory, with a pipe each
for its standard output and error and the worker's `/dev/null` as its input
(or the read end of a pipe the caller gives it), with the given resource
limits, nice increment and CPU set, and (on Linux) as the child subreaper of its
own descendants, so that nothing it starts can leave its tree while it runs.
Only fds 0, 1 and 2 cross into it. Where the `_spawn` extension was built it
starts with vfork and execve (see `_spawn.c` for why that is cheaper);
elsewhere with fork and execve from Python. Both give the command the same
process, and the same `OSError` when it cannot start. Where the `_spawner`
helper was built, both give way to it (see `spawner`), so that a command's
peak resident size is its own.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import struct
from collections.abc import Callable

from ..errors import describe_failure
from . import process_tree
from .spawner import (
    PROGRAM,
    STAGE_CHDIR,
    STAGE_EXEC,
    STAGE_LIMITS,
    STAGE_OTHER,
    Spawner,
    SpawnerLost,
    SpawnerStalled,
    available,
    start_failure,
)

__all__ = ["CommandEnv", "spawn"]

Limits = tuple[tuple[int, int, int], ...]  # (resource, soft, hard); -1 is RLIM_INFINITY
NativeSpawn = Callable[
    [bytes, list[bytes], list[bytes], bytes, int, int, tuple[int, ...], Limits, int, int, tuple[int, ...]],
    int,
]

native: NativeSpawn | None  # what `spawn` starts commands with; None: `_fork_exec`
try:
    from ._spawn import spawn as native
except ImportError:  # not built: no compiler at install time, or not a POSIX system
    native = None

# Python ignores SIGPIPE and SIGXFSZ and a worker ignores SIGINT; ignored
# dispositions survive exec, so the command gets the defaults. SIGXCPU too,
# should the host have ignored it: the CPU limit ends a command by it.
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGPIPE", "SIGXFSZ", "SIGXCPU", "SIGQUIT")
    if hasattr(signal, name)
)
_MARKER_KEY = os.fsencode(process_tree.MARKER_ENV)
_ENGINE_KEY = os.fsencode(process_tree.ENGINE_ENV)

# Tests turn it off to hold the other ways to the same behaviour. The spawner is
# started by the C helper, so it needs that too.
use_spawner = available() and native is not None
_spawner = Spawner()
_spawner_path = os.fsencode(PROGRAM)
# A spawner that keeps getting lost (commands can kill or stop it) is given up on.
_SPAWNER_LOSSES = 3
_spawner_losses = 0


def spawner_pid() -> int:
    """The pid of this process's spawner, 0 when it has none: it is no command's."""
    return _spawner.pid


def stop_spawner() -> None:
    _spawner.stop()


def start_spawner() -> None:
    """Start the spawner now, not at the first command: a worker's processes settle from its start."""
    global use_spawner
    if use_spawner and not _spawner.pid:
        try:
            _launch_spawner()
        except SpawnerLost:
            use_spawner = False


def _launch_spawner() -> None:
    assert native is not None
    # Started as a command is, so it has no signal ignored, which its commands
    # would inherit; its stdout is the control socket.
    _spawner.start(
        lambda sock: native(
            _spawner_path, [_spawner_path], [], b"/", sock, 2, _DEFAULT_SIGNALS, (), -1, 0, ()
        )
    )


def _start_with_spawner(
    program: bytes,
    argv: list[bytes],
    env: list[bytes],
    cwd: bytes,
    out_w: int,
    err_w: int,
    defaults: tuple[int, ...],
    limits: Limits,
    stdin_fd: int,
    nice: int,
    affinity: tuple[int, ...],
) -> int | None:
    """Start the command through the spawner; None when it cannot take it and nothing was started."""
    global use_spawner, _spawner_losses
    try:
        if not _spawner.pid:
            _launch_spawner()
        return _spawner.start_command(
            program, argv, env, cwd, out_w, err_w, defaults, limits, stdin_fd, nice, affinity
        )
    except SpawnerLost:
        _spawner_losses += 1
        use_spawner = _spawner_losses < _SPAWNER_LOSSES
        return None
    except SpawnerStalled:
        _spawner_losses += 1
        use_spawner = _spawner_losses < _SPAWNER_LOSSES
        raise


_HOST_OWN = frozenset({_MARKER_KEY, b"CLOUDOPS_ATTEMPT"})
_NOT_THE_REQUESTS = frozenset({_MARKER_KEY, _ENGINE_KEY})


class CommandEnv:
    """The base environment of commands, encoded once per change rather than once per command.

    The base is the host's environment as bytes, so that names and values that
    are not UTF-8 reach commands exactly; a request's own variables are text.
    """

    def __init__(self, base: dict[bytes, bytes]) -> None:
        # A host that itself runs under the engine has a marker, and maybe an
        # attempt number; each command gets its own marker, and its own attempt or none.
        self._encoded = {k: v for k, v in base.items() if k not in _HOST_OWN}
        self._items = [k + b"=" + v for k, v in self._encoded.items()]
        path = self._encoded.get(b"PATH")
        self._path = os.fsdecode(path) if path is not None else os.defpath

    def for_command(self, overlay: dict[str, str], marker: str) -> list[bytes]:
        """`NAME=value` items: the base, then `overlay` over it, then the command's marker."""
        mark = _MARKER_KEY + b"=" + marker.encode()
        if not overlay:
            return [*self._items, mark]
        added = [(os.fsencode(k), os.fsencode(v)) for k, v in overlay.items()]
        base = self._encoded
        if not any(k in base or k in _NOT_THE_REQUESTS for k, _v in added):
            # Only new names (a trace context, say): the base's items as they are,
            # not a copy of the whole environment for each command.
            return [*self._items, *(k + b"=" + v for k, v in added), mark]
        env = base.copy()
        env.update(added)
        env.pop(_MARKER_KEY, None)
        # Not the request's to set: it tells this engine's commands from another's.
        engine = self._encoded.get(_ENGINE_KEY)
        if engine is not None:
            env[_ENGINE_KEY] = engine
        else:
            env.pop(_ENGINE_KEY, None)
        return [*(k + b"=" + v for k, v in env.items()), mark]

    def search_path(self, overlay: dict[str, str]) -> str:
        """Where the command's PATH says to look for its program."""
        return overlay.get("PATH", self._path)


# Programs a plan names that come from an extra, and how to get them.
_INSTALL_HINTS = {"aws": "the AWS CLI is not installed: pip install 'cloudops-execution-engine[aws]'"}


def describe_start_failure(exc: BaseException) -> str:
    """A failed start's reason, with how to install the program when it is one we know."""
    reason = describe_failure(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename in _INSTALL_HINTS:
        reason += f" ({_INSTALL_HINTS[exc.filename]})"
    return reason


def _resolve_program(program: str, search: str, cwd: bytes) -> str:
    """Look `program` up in `search` (the command's own PATH) from `cwd`, as execvpe would there.

    At each start, as execvpe does: what is found may change between two (a
    program put earlier in PATH, a mode changed, a link that now leads
    somewhere), and nothing short of looking again tells. A relative entry
    (an empty one is ".") is the command's working directory's.
    """
    if "/" in program:
        return program
    here = os.fsdecode(cwd)
    directories = os.pathsep.join(os.path.join(here, entry or ".") for entry in search.split(os.pathsep))
    found = shutil.which(program, path=directories)
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", program)
    return found


def spawn(
    argv: list[str],
    env: list[bytes],
    cwd: bytes,
    search: str,
    limits: Limits = (),
    stdin_fd: int = -1,
    nice: int = 0,
    affinity: tuple[int, ...] = (),
) -> tuple[int, int, int]:
    """Start `argv` in a new session; return its pid and the read ends of its stdout and stderr.

    `stdin_fd` (the caller's to close) becomes its standard input; -1 leaves it `/dev/null`.
    """
    extras = (stdin_fd, nice, affinity)
    return _spawn_resolved(_resolve_program(argv[0], search, cwd), argv, env, cwd, limits, *extras)


def _spawn_resolved(
    program: str,
    argv: list[str],
    env: list[bytes],
    cwd: bytes,
    limits: Limits,
    stdin_fd: int,
    nice: int,
    affinity: tuple[int, ...],
) -> tuple[int, int, int]:
    out_r, out_w = os.pipe()
    try:
        err_r, err_w = os.pipe()
    except BaseException:
        # No descriptor left (EMFILE, ENFILE): the first pipe would be lost to the worker for good.
        os.close(out_r)
        os.close(out_w)
        raise
    try:
        args = [os.fsencode(arg) for arg in argv]
        path = os.fsencode(program)
        pid = None
        if use_spawner:
            pid = _start_with_spawner(
                path, args, env, cwd, out_w, err_w, _DEFAULT_SIGNALS, limits, stdin_fd, nice, affinity
            )
        if pid is None:
            start = native if native is not None else _fork_exec
            pid = start(
                path, args, env, cwd, out_w, err_w, _DEFAULT_SIGNALS, limits, stdin_fd, nice, affinity
            )
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    return pid, out_r, err_r


_FAILURE = struct.Struct("=ii")


def _fork_exec(
    program: bytes,
    argv: list[bytes],
    env: list[bytes],
    cwd: bytes,
    out_w: int,
    err_w: int,
    defaults: tuple[int, ...],
    limits: Limits,
    stdin_fd: int = -1,
    nice: int = 0,
    affinity: tuple[int, ...] = (),
) -> int:
    """What `_spawn.spawn` does, in Python: the same child, the same errors, only slower.

    A worker is single-threaded, so a plain fork is safe here. The child reports
    why it could not start through a close-on-exec pipe, which simply closes
    when the exec succeeds.
    """
    for item in (program, cwd, *argv, *env):
        if b"\0" in item:
            raise ValueError("embedded null byte")
    report_r, report_w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child either execs or exits
            _child(
                program, argv, env, cwd, out_w, err_w, defaults, limits, (stdin_fd, nice, affinity), report_w
            )
        os.close(report_w)
        report_w = -1
        failure = b""
        while chunk := os.read(report_r, _FAILURE.size - len(failure)):
            failure += chunk
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
    if len(failure) < _FAILURE.size:
        return pid
    os.waitpid(pid, 0)
    stage, error = _FAILURE.unpack(failure)
    raise start_failure(stage, error, program, cwd)


def _child(
    program: bytes,
    argv: list[bytes],
    env: list[bytes],
    cwd: bytes,
    out_w: int,
    err_w: int,
    defaults: tuple[int, ...],
    limits: Limits,
    extras: tuple[int, int, tuple[int, ...]],
    report_w: int,
) -> None:  # pragma: no cover - runs in the forked child only
    stage = STAGE_OTHER
    stdin_fd, nice, affinity = extras
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, *defaults):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        if stdin_fd >= 0:
            os.dup2(stdin_fd, 0)
        stage = STAGE_CHDIR
        os.chdir(cwd)
        stage = STAGE_LIMITS
        if affinity:
            os.sched_setaffinity(0, affinity)
        if nice:
            os.nice(nice)
        for resource_id, soft, hard in limits:
            resource.setrlimit(resource_id, (soft, hard))
        stage = STAGE_OTHER
        process_tree.become_subreaper()
        os.closerange(3, report_w)
        os.closerange(report_w + 1, os.sysconf("SC_OPEN_MAX"))
        stage = STAGE_EXEC
        os.execve(program, argv, dict(item.split(b"=", 1) for item in env))
    except OSError as exc:
        os.write(report_w, _FAILURE.pack(stage, exc.errno or 0))
    except ValueError as exc:
        # `resource.setrlimit` says EPERM and EINVAL as ValueError.
        refused = errno.EPERM if "not allowed" in str(exc) else errno.EINVAL
        os.write(report_w, _FAILURE.pack(stage, refused))
    finally:
        os._exit(127)

"""Starting a command's process: its environment, its program's path, and the start itself.

A command starts in a new session, in its working directory, with a pipe each
for its standard output and error and the worker's `/dev/null` as its input.
Where the `_spawn` extension was built it starts with vfork and execve (see
`_spawn.c` for why that is cheaper); elsewhere with `os.posix_spawn`. Both give
the command the same process, and the same `OSError` when it cannot start.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable

from . import process_tree

__all__ = ["CommandEnv", "spawn"]

NativeSpawn = Callable[[bytes, list[bytes], list[bytes], bytes, int, int, tuple[int, ...]], int]

native: NativeSpawn | None  # what `spawn` starts commands with; None: os.posix_spawn
try:
    from ._spawn import spawn as native
except ImportError:  # not built: no compiler at install time, or not a POSIX system
    native = None

# Python ignores SIGPIPE and SIGXFSZ and a worker ignores SIGINT; ignored
# dispositions survive exec, so the command gets the defaults.
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGPIPE", "SIGXFSZ", "SIGQUIT") if hasattr(signal, name)
)
_MARKER_KEY = os.fsencode(process_tree.MARKER_ENV)


class CommandEnv:
    """The base environment of commands, encoded once per change rather than once per command."""

    def __init__(self, base: dict[str, str]) -> None:
        self.base = base
        self._encoded = {os.fsencode(k): os.fsencode(v) for k, v in base.items()}
        # A host that itself runs under the engine has a marker; each command gets its own.
        self._encoded.pop(_MARKER_KEY, None)
        self._items = [k + b"=" + v for k, v in self._encoded.items()]

    def for_command(self, overlay: dict[str, str], marker: str) -> list[bytes]:
        """`NAME=value` items: the base, then `overlay` over it, then the command's marker."""
        mark = _MARKER_KEY + b"=" + marker.encode()
        if not overlay:
            return [*self._items, mark]
        env = self._encoded.copy()
        env.update((os.fsencode(k), os.fsencode(v)) for k, v in overlay.items())
        env.pop(_MARKER_KEY, None)
        return [*(k + b"=" + v for k, v in env.items()), mark]

    def search_path(self, overlay: dict[str, str]) -> str:
        """Where the command's PATH says to look for its program."""
        return overlay.get("PATH", self.base.get("PATH", os.defpath))


_resolved: dict[tuple[str, str], str] = {}


def _resolve_program(program: str, search: str) -> str:
    """Look `program` up in `search` (the command's own PATH), as execvpe would, remembering hits."""
    if "/" in program:
        return program
    key = (program, search)
    found = _resolved.get(key)
    if found is None:
        found = shutil.which(program, path=search)
        if found is None:
            raise FileNotFoundError(2, "No such file or directory", program)
        _resolved[key] = found
    return found


def spawn(argv: list[str], env: list[bytes], cwd: str, search: str) -> tuple[int, int, int]:
    """Start `argv` in a new session; return its pid and the read ends of its stdout and stderr."""
    try:
        return _spawn_resolved(_resolve_program(argv[0], search), argv, env, cwd)
    except FileNotFoundError:
        # A remembered program may have moved since; look again once.
        if _resolved.pop((argv[0], search), None) is None:
            raise
        return _spawn_resolved(_resolve_program(argv[0], search), argv, env, cwd)


def _spawn_resolved(program: str, argv: list[str], env: list[bytes], cwd: str) -> tuple[int, int, int]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        if native is not None:
            args = [os.fsencode(arg) for arg in argv]
            pid = native(os.fsencode(program), args, env, os.fsencode(cwd), out_w, err_w, _DEFAULT_SIGNALS)
        else:
            pid = _posix_spawn(program, argv, env, cwd, out_w, err_w)
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


def _posix_spawn(program: str, argv: list[str], env: list[bytes], cwd: str, out_w: int, err_w: int) -> int:
    # posix_spawn has no chdir action. A worker is single-threaded and nothing
    # else in it depends on its directory, so it moves and stays. Always moving
    # (one cheap call) is right even if the directory was deleted and made
    # again since the last command that used it.
    os.chdir(cwd)
    return os.posix_spawn(
        program,
        argv,
        {name: value for name, _, value in (item.partition(b"=") for item in env)},
        # Standard input is inherited: the worker's fd 0 is /dev/null.
        file_actions=[(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)],
        setsid=True,
        setsigdef=_DEFAULT_SIGNALS,
    )

"""A worker started before its engine, so that a short-lived process starts the two at once.

A worker takes over 100 ms to be ready: a fresh interpreter importing the
worker's modules. A one-shot host such as the command line spends longer than
that importing the models before it has an engine to start. Started first, the
worker boots on another core meanwhile, and the first local pool of this
process takes it as its first worker (`local_pool.start_worker_process`).

The spare belongs to the process that started it: a forked child never takes
its parent's, and `discard` ends one that no pool took, so that it never
outlives the command that wanted it. Workers are born blocking SIGINT, for the
reason `cli_journal` gives, and hear only their host.
"""

from __future__ import annotations

import contextlib
import os
import signal
from multiprocessing.process import BaseProcess

from .launcher import launch_worker
from .worker_entry import worker_main

__all__ = ["discard", "start", "take"]

_spare: tuple[BaseProcess, int, int] | None = None
_owner = 0


def start(name: str = "cloudops-execution-worker-spare") -> int | None:
    """Start the spare worker if there is none; its pid, or None when it could not be started.

    A spare that cannot be started costs nothing: the pool starts its workers
    itself, and reports what fails then.
    """
    global _spare, _owner
    if _spare is not None and _owner == os.getpid():
        return _spare[0].pid
    # Blocked, not ignored, while it is launched: the worker is born blocking SIGINT and ignores it
    # before it unblocks it (`worker_main`), and a Ctrl-C meanwhile reaches this process afterwards.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        _spare = launch_worker(name, worker_main)
        _owner = os.getpid()
    except Exception:
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return _spare[0].pid


def take() -> tuple[BaseProcess, int, int] | None:
    """The spare, to be the caller's worker (no one else's afterwards); None if there is none here."""
    global _spare
    spare = _spare
    if spare is None or _owner != os.getpid():
        return None
    if not spare[0].is_alive():
        # Killed while it waited (a signal, the OOM killer): a fresh worker is
        # started instead, rather than an engine failing to start on this one.
        discard()
        return None
    _spare = None
    return spare


def discard() -> None:
    """End a spare no pool took, and reap it.

    It never had work, so nothing is lost by killing it; waiting for it to
    see its input close would wait for it to finish booting first.
    """
    global _spare
    spare = _spare
    if spare is None or _owner != os.getpid():
        return
    _spare = None
    process, to_worker, from_worker = spare
    for fd in (to_worker, from_worker):
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        process.kill()
    process.join()


def _forget_in_child() -> None:
    # In a forked child the spare is the parent's: the child's copies of its
    # pipes would keep it from seeing its host die (see `after_fork`).
    global _spare
    spare, _spare = _spare, None
    if spare is not None:
        for fd in spare[1:]:
            with contextlib.suppress(OSError):
                os.close(fd)


os.register_at_fork(after_in_child=_forget_in_child)

"""What a worker process is started with: a name that loads the worker only in the worker.

A spawned worker imports the module its target is defined in. The host
names this small module, so that it does not load the worker's modules (its
reactor, the spawner, the kill path) just to name the target, and the worker
does not load the host's (the pool, the models) just to find it.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

__all__ = ["worker_main"]


def worker_main(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    """Run `actors.worker.worker_main`, imported here, in the worker itself."""
    from .worker import worker_main as run

    run(read_conn, write_conn, detach)

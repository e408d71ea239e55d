"""A hostile command: changes the resource limits, nice value and CPU set of its worker and spawner.

    taint_parent.py [soft]

Its parent is the worker (a command started by the spawner is cloned as the
worker's child); the spawner is the worker's child named `_spawner`. Each
gets a 16-descriptor limit, a 100,000-byte file size limit, a 4 GB address
space, a 1000-second CPU limit, nice 19 and CPU 0 alone. Prints what it
changed, one pid a line. With `soft`, the limits' hard values are left as
they were: every change can be undone by the process itself.
"""

from __future__ import annotations

import os
import resource
import sys


def spawners_of(worker: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == worker and comm == "_spawner":
            found.append(int(name))
    return found


def main(soft: bool) -> None:
    worker = os.getppid()
    for pid in [worker, *spawners_of(worker)]:
        for limit, value in (
            (resource.RLIMIT_NOFILE, 16),
            (resource.RLIMIT_FSIZE, 100_000),
            (resource.RLIMIT_AS, 4_000_000_000),
            (resource.RLIMIT_CPU, 1000),
        ):
            hard = resource.prlimit(pid, limit)[1] if soft else value
            resource.prlimit(pid, limit, (value, hard))
        os.setpriority(os.PRIO_PROCESS, pid, 19)
        os.sched_setaffinity(pid, {0})
        print(pid)


if __name__ == "__main__":
    main(sys.argv[1:] == ["soft"])

"""A three-level process tree: main -> child -> (double fork) detached grandchild.

Each process prints `pid <n>` once it is in place; the grandchild calls setsid
so it leaves the command's session, and is reparented when its parent exits.
With --ignore-term every level ignores SIGTERM. With --close-stdio the
grandchild lets go of the output pipes, so only its marker finds it.
"""

import os
import signal
import sys
import time

ignore_term = "--ignore-term" in sys.argv
close_stdio = "--close-stdio" in sys.argv
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def announce() -> None:
    print(f"pid {os.getpid()}", flush=True)


def idle() -> None:
    while True:
        time.sleep(3600)


announce()
if os.fork() == 0:
    announce()
    if os.fork() == 0:
        if os.fork() == 0:
            os.setsid()
            announce()
            if close_stdio:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
            idle()
        os._exit(0)
    idle()
idle()

"""A three-level process tree: main -> child -> (double fork) detached grandchild.

Each process prints `pid <n>` once it is in place; the grandchild calls setsid
so it leaves the command's session, and is reparented when its parent exits.
With --ignore-term every level ignores SIGTERM. With --close-stdio the
grandchild lets go of the output pipes, so only its marker finds it. With
--count-term DIR each process counts the SIGTERMs it gets, and 0.3 s after the
first writes the count to DIR/<its pid> and exits.
"""

import os
import signal
import sys
import time

ignore_term = "--ignore-term" in sys.argv
close_stdio = "--close-stdio" in sys.argv
count_dir = sys.argv[sys.argv.index("--count-term") + 1] if "--count-term" in sys.argv else None
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
terms = 0


def count_term(_signum: int, _frame: object) -> None:
    global terms
    terms += 1


if count_dir is not None:
    signal.signal(signal.SIGTERM, count_term)


def announce() -> None:
    print(f"pid {os.getpid()}", flush=True)


def idle() -> None:
    while count_dir is None:
        time.sleep(3600)
    while not terms:
        time.sleep(0.01)
    time.sleep(0.3)  # a second SIGTERM would come meanwhile
    with open(os.path.join(count_dir, str(os.getpid())), "w") as counted:
        counted.write(str(terms))
    os._exit(0)


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

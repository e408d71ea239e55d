"""Starts journal hosts quickly: imports the engine once, then forks one host per line on stdin.

    host ARGS...   fork a child running journal_host.main(ARGS) (it prints its report on stdout)
    quit           wait for the children and exit

A fresh interpreter would spend most of a test's round importing the engine;
a child forked from this process starts with everything imported. This
process runs no thread, so forking it is safe, and it reaps its children.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import journal_host  # type: ignore[import-not-found]


def main() -> None:
    children: set[int] = set()
    for line in sys.stdin:
        words = line.split()
        # Reap what has ended, so nothing of ours lingers as a zombie.
        for pid in list(children):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                children.discard(pid)
        if not words or words[0] == "quit":
            break
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                asyncio.run(journal_host.main(words[1:]))
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.add(pid)
        print(f"forked {pid}", flush=True)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()

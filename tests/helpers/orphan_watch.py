"""Run a command as this process's child and report what it left running.

This process becomes a subreaper first, so anything the command started and
left behind is handed to it when the command exits: listed at once, then
killed. Prints one JSON line: the command's exit code and what it left.

    python orphan_watch.py COMMAND ARGS...
"""

from __future__ import annotations

import json
import subprocess
import sys

import psutil

from cloudops_execution_engine.actors import process_tree


def main() -> None:
    if not process_tree.become_subreaper():
        raise SystemExit("this kernel will not make the watcher a subreaper")
    done = subprocess.run(sys.argv[1:], capture_output=True, check=False)
    left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    report = {
        "code": done.returncode,
        "stdout": done.stdout.decode(errors="replace"),
        "left": [" ".join(p.cmdline()) for p in left],
    }
    for proc in left:
        proc.kill()
    psutil.wait_procs(left, timeout=10)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

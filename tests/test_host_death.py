"""When the host process dies, its workers and their commands die with it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import HELPERS, PYTHON, gone, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("flags", [(), ("--ignore-term", "--close-stdio")], ids=["plain", "stubborn"])
def test_sigkilled_host_leaves_no_worker_and_no_command(tmp_path: Path, flags: tuple[str, ...]) -> None:
    host = subprocess.Popen(
        [PYTHON, str(HELPERS / "host.py"), str(tmp_path / "logs"), *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None
        lines = [host.stdout.readline().strip() for _ in range(4)]
        assert lines[0] == f"host {host.pid}"
        tree = [int(line.split()[1]) for line in lines[1:]]
        worker = psutil.Process(tree[0]).ppid()
        assert psutil.Process(worker).ppid() == host.pid
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        killed_at = time.monotonic()
        wait_until(
            lambda: all(gone(pid) for pid in [worker, *tree]), 5, "the host's worker and commands to end"
        )
        elapsed = time.monotonic() - killed_at
        assert elapsed < 1.0, f"took {elapsed:.2f}s"
    finally:
        host.kill()
        host.wait(10)
        if host.stdout:
            host.stdout.close()

"""When the host process dies, its workers and their commands die with it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import gone, host_running_a_tree, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("flags", [(), ("--ignore-term", "--close-stdio")], ids=["plain", "stubborn"])
def test_sigkilled_host_leaves_no_worker_and_no_command(tmp_path: Path, flags: tuple[str, ...]) -> None:
    with host_running_a_tree(tmp_path, *flags) as (host, worker, tree):
        assert psutil.Process(worker).ppid() == host.pid
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        killed_at = time.monotonic()
        wait_until(
            lambda: all(gone(pid) for pid in [worker, *tree]), 5, "the host's worker and commands to end"
        )
        elapsed = time.monotonic() - killed_at
        assert elapsed < 1.0, f"took {elapsed:.2f}s"

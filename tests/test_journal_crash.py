"""Durability under SIGKILL: a host with a journal killed at random moments, again and again.

Each round starts tests/helpers/journal_host.py on the same journal. Opening
it recovers what the previous host (killed) left; the new host reports what
the journal now says, and this test checks it before letting the host work
and killing it at a random moment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HELPERS, PYTHON, gone, wait_until

MARKER = "CLOUDOPS_EXECUTION_ID"
ROUNDS = 50


def processes_of(ids: set[str]) -> list[int]:
    """Live processes on this machine that run for one of `ids` (by the marker in their environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            marker = proc.environ().get(MARKER)
        except (psutil.Error, OSError):
            continue
        if marker in ids and not gone(proc.pid):
            found.append(proc.pid)
    return found


class Hosts:
    """journal_zygote.py: forks a journal host per round, without importing the engine each time."""

    def __init__(self, tmp_path: Path) -> None:
        self.args = [
            str(tmp_path / "journal.sqlite3"),
            str(tmp_path / "logs"),
            str(tmp_path / "delivered.jsonl"),
            str(tmp_path / "submitted.txt"),
        ]
        self.zygote = subprocess.Popen(
            [PYTHON, str(HELPERS / "journal_zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self, seed: int, mode: str = "work") -> tuple[int, dict[str, Any]]:
        """A new host on the journal: its pid, and its report once it has started (and recovered)."""
        assert self.zygote.stdin is not None
        assert self.zygote.stdout is not None
        self.zygote.stdin.write(" ".join(["host", *self.args, str(seed), mode]) + "\n")
        self.zygote.stdin.flush()
        forked = self.zygote.stdout.readline().split()
        assert forked[:1] == ["forked"], f"the zygote said {forked!r}"
        line = self.zygote.stdout.readline()
        if not line.startswith("{"):
            pytest.fail(f"the host said {line!r} instead of its report")
        return int(forked[1]), json.loads(line)

    def close(self) -> None:
        if self.zygote.poll() is None:
            assert self.zygote.stdin is not None
            self.zygote.stdin.write("quit\n")
            self.zygote.stdin.flush()
            self.zygote.stdin.close()
            self.zygote.wait(30)
        if self.zygote.stdout is not None:
            self.zygote.stdout.close()


def delivered(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "delivered.jsonl"
    if not path.exists():
        return {}
    items = [json.loads(text) for text in path.read_text().splitlines()]
    return {item["id"]: item["result"] for item in items}


def submitted(tmp_path: Path) -> set[str]:
    path = tmp_path / "submitted.txt"
    return set(path.read_text().split()) if path.exists() else set()


def check(report: dict[str, Any], told: dict[str, Any], earlier: set[str], round_: int) -> None:
    assert report["pending"] == 0, f"round {round_}: executions left pending after recovery"
    assert report["running"] == 0, f"round {round_}: executions left running after recovery"
    answers = report["answers"]
    missing = sorted(set(told) - set(answers))
    assert not missing, f"round {round_}: results told to the host are not in the journal: {missing[:5]}"
    for key, result in told.items():
        assert answers[key] == result, f"round {round_}: the journal's result of {key} differs"
    left = processes_of(earlier)
    assert not left, f"round {round_}: processes of an earlier host's executions still run: {left}"


@pytest.mark.timeout(120)
def test_results_told_before_a_sigkill_survive_it_and_nothing_is_left_running(tmp_path: Path) -> None:
    """SIGKILL at random moments: nothing stays pending/running, no process survives, no told result lost."""
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    interrupted_hosts: set[int] = set()
    killed_hosts: set[int] = set()
    hosts = Hosts(tmp_path)
    current = 0
    try:
        for round_ in range(ROUNDS + 1):
            # What the hosts killed so far submitted, and were told of (the new host adds to both).
            earlier, told = submitted(tmp_path), delivered(tmp_path)
            last = round_ == ROUNDS
            pid, report = hosts.start(rng.randrange(1 << 30), "check" if last else "work")
            current = pid
            check(report, told, earlier, round_)
            interrupted_hosts.update(report["interrupted_pids"])
            if last:
                break
            # The moment of the kill is what this test varies: anywhere in the first 0.15 s of work.
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(pid, signal.SIGKILL)
            killed_hosts.add(pid)
            wait_until(functools.partial(gone, pid), 10, f"host {pid} to die")
    finally:
        for pid in {*killed_hosts, current} - {0}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        hosts.close()
    assert len(delivered(tmp_path)) > ROUNDS, "the hosts were killed before telling of enough results"
    assert interrupted_hosts, "no execution was interrupted by a kill"
    assert interrupted_hosts <= killed_hosts, "an Interrupted: error names a host that was not killed"

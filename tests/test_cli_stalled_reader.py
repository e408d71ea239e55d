"""`cloudops-exec` writing to a reader that has stopped reading, or reads slowly.

`cloudops-exec run -- yes | less`, with less waiting at its prompt: the pipe
fills, and our next write to it would wait for ever. Ctrl-C, SIGTERM and a
hangup must still end the run (its commands cancelled, exit 128+N), and a
reader that is only slow must still get every line, in order.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import PYTHON, gone, wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

ROOT = Path(__file__).parent.parent
CLI = [PYTHON, "-m", "cloudops_execution_engine"]
ENDLESS = "echo $$; exec yes"


def _words(how: str, tmp_path: Path) -> list[str]:
    if how == "plan":
        plan = tmp_path / "endless.json"
        command = {"command": {"type": "shell", "command": ENDLESS}}
        plan.write_text(json.dumps({"commands": [command], "strategy": {"type": "serial"}}))
        return ["plan", "--no-journal", str(plan)]
    return [*how.split(), "--no-journal", "--shell", "--", ENDLESS]


@contextmanager
def _cli_into_pipe(words: list[str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The CLI with its stdout on a pipe whose read end the test holds: (process, read end)."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [*CLI, *words],
        stdout=write_end,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
    )
    os.close(write_end)
    try:
        yield proc, read_end
    finally:
        proc.kill()
        proc.wait(10)
        os.close(read_end)


def _command_pid(read_end: int, how: str) -> int:
    """Read up to the line where the command printed its pid; nothing after it."""
    seen = b""
    while True:
        byte = os.read(read_end, 1)
        assert byte, f"{how} ended before its command printed its pid"
        if byte != b"\n":
            seen += byte
            continue
        line = seen.decode()
        seen = b""
        if "ndjson" in how:
            line = json.loads(line).get("line", "")
        elif how == "plan":
            line = line.removeprefix("#0 stdout: ")
        if line.strip().isdigit():
            return int(line)


# write(2)'s number, as /proc/<pid>/task/<tid>/syscall names a call a thread waits in.
_WRITE = {"x86_64": 1, "aarch64": 64}[os.uname().machine]


def _waiting_to_write_stdout(pid: int) -> bool:
    """Whether a thread of `pid` waits in a write to its descriptor 1: its reader has stopped reading."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            words = (task / "syscall").read_text().split()
        except OSError:  # a thread that ended meanwhile
            continue
        if len(words) > 1 and words[0] == str(_WRITE) and int(words[1], 16) == 1:
            return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda sig: sig.name)
@pytest.mark.parametrize("how", ["run", "run --events ndjson", "plan"])
def test_a_stop_signal_ends_the_run_while_our_reader_has_stopped_reading(
    tmp_path: Path, how: str, sig: int
) -> None:
    with _cli_into_pipe(_words(how, tmp_path), tmp_path) as (proc, read_end):
        pid = _command_pid(read_end, how)
        wait_until(
            lambda: _waiting_to_write_stdout(proc.pid), 20, "a write to our stdout to wait for its reader"
        )
        proc.send_signal(sig)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{signal.Signals(sig).name} did not end the run: it waits on a reader that reads no more"
            )
        assert code == 128 + sig
        wait_until(lambda: gone(pid), 10, "the command to be gone")


@pytest.mark.parametrize("how", ["run", "plan"])
def test_a_slow_reader_gets_every_line_in_order(tmp_path: Path, how: str) -> None:
    count = 200_000
    if how == "plan":
        plan = tmp_path / "many.json"
        plan.write_text(
            json.dumps(
                {
                    "commands": [{"command": {"type": "exec", "program": "seq", "args": [str(count)]}}],
                    "strategy": {"type": "serial"},
                }
            )
        )
        words = ["plan", "--no-journal", str(plan)]
    else:
        words = ["run", "--no-journal", "--", "seq", str(count)]
    with _cli_into_pipe(words, tmp_path) as (proc, read_end):
        got = bytearray()
        while chunk := os.read(read_end, 4096):
            got += chunk
            time.sleep(0.0005)  # the workload: a reader slower than the command writes
        assert proc.wait(30) == 0
    lines = got.decode().splitlines()
    if how == "plan":
        lines = [line.removeprefix("#0 stdout: ") for line in lines if line.startswith("#0 stdout: ")]
    assert lines == [str(n) for n in range(1, count + 1)]


def test_output_that_comes_after_a_signal_waits_for_a_stopped_reader_no_longer_than_the_rest(
    tmp_path: Path,
) -> None:
    """The bound after a signal was looked at once, 2 s after it, and found nothing waiting: a line that came
    later (the cancel of a command that ignores SIGTERM, after the kill grace) waited for the reader for ever,
    and so did the plan's report, written past the pump."""
    pad = "x" * (4096 - len("#0 stdout: \n") - 5)  # the pipe is left 5 bytes of room
    plan = tmp_path / "stubborn.json"
    gate = tmp_path / "read-up-to-ready"
    # The pad once the test has read all before it: alone in the pipe's one page, not split around it.
    script = f"echo ready; until [ -e {gate} ]; do sleep 0.01; done; echo {pad}; trap '' TERM; exec sleep 60"
    command = {"command": {"type": "shell", "command": script}}
    plan.write_text(json.dumps({"commands": [command], "strategy": {"type": "serial"}}))
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [*CLI, "plan", "--no-journal", str(plan)],
        stdout=write_end,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    os.close(write_end)
    try:
        seen = b""
        while not seen.endswith(b"#0 stdout: ready\n"):
            byte = os.read(read_end, 1)
            assert byte, "the plan ended before its command said it was ready"
            seen += byte
        # From here the test reads no more: the pad's line fills the pipe but for 5 bytes.
        gate.touch()
        wait_until(lambda: _unread(read_end) == 4091, 20, "the pad's line to fill the pipe")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "SIGTERM did not end the plan: what it wrote after the signal waits for a reader that stopped"
            )
        assert code == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait(10)
        os.close(read_end)


def _unread(read_end: int) -> int:
    held = array.array("i", [0])
    fcntl.ioctl(read_end, termios.FIONREAD, held)
    return held[0]

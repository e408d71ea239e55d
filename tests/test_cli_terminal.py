"""`cloudops-exec plan` on a pseudo-terminal: the screen as a user sees it once the command has ended.

The CLI's output is fed to a terminal emulator (pyte) so the assertions read
the final screen, after every redraw of the live view, not the byte stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyte
import pytest
from conftest import PYTHON

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

ROOT = Path(__file__).parent.parent
COLUMNS, LINES = 120, 60
# SGR parameters that set a colour: 30-38 and 40-48 (foreground, background), 90-97 and 100-107 (bright).
_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_COLOUR_CODES = {*range(30, 39), *range(40, 49), *range(90, 98), *range(100, 108)}


@dataclass
class Screen:
    code: int
    raw: str
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def on_terminal(args: list[str], tmp_path: Path, **extra_env: str) -> Screen:
    """Run the CLI with a pseudo-terminal as stdin, stdout and stderr; its code, bytes and final screen."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env.update(
        TERM="xterm-256color", TMPDIR=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"), **extra_env
    )
    proc = subprocess.Popen(
        [PYTHON, "-m", "cloudops_execution_engine", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=ROOT,
        env=env,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                break
            if not chunk:
                break
            output += chunk
        code = proc.wait(30)
    finally:
        proc.kill()
        proc.wait(10)
        os.close(leader)
    screen = pyte.Screen(COLUMNS, LINES)
    pyte.ByteStream(screen).feed(output)
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return Screen(code, output.decode("utf-8", "replace"), lines)


def write_plan(tmp_path: Path, commands: list[dict[str, Any]], **fields: Any) -> Path:
    plan = tmp_path / "plan.json"
    strategy = fields.pop("strategy", {"type": "parallel"})
    plan.write_text(json.dumps({"strategy": strategy, "commands": commands, **fields}))
    return plan


def shell(command: str, **fields: Any) -> dict[str, Any]:
    return {"command": {"type": "shell", "command": command}, **fields}


def colours(raw: str) -> list[str]:
    """The colour-setting SGR sequences in `raw`."""
    found = []
    for match in _SGR.finditer(raw):
        params = [int(p) for p in match.group(1).split(";") if p.isdigit()]
        if any(p in _COLOUR_CODES for p in params):
            found.append(match.group(0))
    return found


def test_an_invalid_plans_error_stays_on_the_screen(tmp_path: Path) -> None:
    """A cycle or a too-large timeout is said on the terminal (exit 2), not wiped by the live view."""
    cyclic = write_plan(
        tmp_path,
        [shell("true"), shell("true")],
        strategy={"type": "dependency_graph", "dependencies": {"0": [1], "1": [0]}},
    )
    screen = on_terminal(["plan", str(cyclic)], tmp_path)
    assert screen.code == 2
    assert "dependency cycle: 0 -> 1 -> 0" in screen.text
    hour = write_plan(tmp_path, [shell("true", timeout_ms=3_600_000)])
    screen = on_terminal(["plan", str(hour)], tmp_path)
    assert screen.code == 2
    assert "commands.0.timeout_ms" in screen.text
    assert "--max-timeout 3600000" in screen.text


def test_a_failed_commands_stderr_and_log_are_on_the_final_screen(tmp_path: Path) -> None:
    """Each failed command shows how it ended, its last stderr lines and its log path; signals by name."""
    plan = write_plan(
        tmp_path,
        [
            shell("echo writing; echo 'ERROR: disk full' >&2; exit 3"),
            shell("kill -KILL $$"),
            {"command": {"type": "exec", "program": "no-such-program-xyz"}},
            shell("echo fine"),
        ],
    )
    screen = on_terminal(["plan", str(plan)], tmp_path)
    assert screen.code == 1
    text = screen.text
    assert "ERROR: disk full" in text
    assert "#0 failed: Command failed with exit code 3" in text
    assert "#1 failed: killed by SIGKILL" in text
    assert "#2 failed: did not start: " in text
    assert "No such file or directory: no-such-program-xyz" in text
    # A long path wraps at the screen's edge: read the paths from the bytes written.
    logs = re.findall(r"log: (\S+\.log)", screen.raw)
    assert len(logs) == 3
    assert all(Path(log).is_file() for log in logs)
    assert "ERROR: disk full" in Path(logs[0]).read_text()
    row = next(line for line in screen.lines if "kill -KILL" in line)
    assert "SIGKILL" in row
    assert "-9" not in row, "the table names the signal instead of the contract's number"
    assert "not started" in next(line for line in screen.lines if "│ no-such-program-xyz" in line)


def _without_clocks(lines: list[str]) -> list[str]:
    """The screen's words, with durations, ids and box drawing taken out."""
    unwrapped: list[str] = []
    for line in lines:
        if unwrapped and len(unwrapped[-1]) % COLUMNS == 0 and unwrapped[-1]:
            unwrapped[-1] += line  # the terminal wrapped a line that was too long for it
        else:
            unwrapped.append(line)
    words = []
    for line in unwrapped:
        line = re.sub(r"\d+\.\d+s", "Ns", line)
        line = re.sub(r"[0-9a-f-]{36}", "ID", line)
        line = re.sub(r"[━─│┃┏┓┗┛┡┩└┘┌┐├┤┬┴┼╇╈╿╷╵]+", " ", line)
        line = " ".join(line.split())
        if line:
            words.append(line)
    return words


def test_no_color_removes_colour_and_nothing_else(tmp_path: Path) -> None:
    """With NO_COLOR the terminal shows the same view and report, without a colour sequence."""
    plan = write_plan(tmp_path, [shell("echo 'ERROR: disk full' >&2; exit 3"), shell("echo fine")])
    coloured = on_terminal(["plan", str(plan)], tmp_path)
    plain = on_terminal(["plan", str(plan)], tmp_path, NO_COLOR="1")
    assert coloured.code == plain.code == 1
    assert colours(coloured.raw), "the ordinary view has colour"
    assert not colours(plain.raw), f"NO_COLOR still coloured: {colours(plain.raw)[:3]}"
    assert _without_clocks(plain.lines) == _without_clocks(coloured.lines)
    assert "ERROR: disk full" in plain.text
    assert "━" in plain.raw, "NO_COLOR still draws the live bar"


def test_a_running_commands_clock_moves_without_events(tmp_path: Path) -> None:
    """A silent `sleep` shows its time growing in the live table, not 0.0s until it ends."""
    plan = write_plan(tmp_path, [shell("sleep 1.5")])
    screen = on_terminal(["plan", str(plan)], tmp_path)
    assert screen.code == 0
    shown = [float(s) for s in re.findall(r"#0\s+(\d+\.\d)s\s+sleep 1\.5", screen.raw)]
    assert shown, "the running command was never shown"
    assert max(shown) >= 1.0, f"the clock stood still: {sorted(set(shown))}"


def test_the_bar_counts_the_plans_time_not_the_engines(tmp_path: Path) -> None:
    """The bar's elapsed time is the plan's, without the engine's start and shutdown."""
    plan = write_plan(tmp_path, [shell("sleep 0.5"), shell("sleep 0.3")], description="timed")
    screen = on_terminal(["plan", str(plan)], tmp_path)
    assert screen.code == 0
    bar = re.search(r"timed .* 2/2\s+(\d+\.\d)s", screen.text)
    total = re.search(r"plan completed: .* in (\d+\.\d+)s", screen.text)
    assert bar, screen.text
    assert total, screen.text
    assert abs(float(bar.group(1)) - float(total.group(1))) <= 0.25, screen.text


def test_what_a_plan_and_its_commands_write_cannot_draw_on_the_screen(tmp_path: Path) -> None:
    """Rich markup in the plan's description and commands, escape sequences in their output: shown as text.

    Markup in the description used to end `plan` in a MarkupError traceback; an escape
    sequence in stderr rewrote the final report to say "completed" of a failed plan.
    """
    forge = "\\033[2J\\033[H plan completed: 1 completed, 0 failed"
    plan = write_plan(
        tmp_path,
        [shell(f"echo 'x [/y] [blink red]z[/]'; printf '{forge}\\n' >&2; exit 3")],
        description="nightly [/x] [blink red]job[/]",
    )
    screen = on_terminal(["plan", str(plan)], tmp_path)
    assert screen.code == 1
    assert "Traceback" not in screen.text
    assert "nightly [/x] [blink red]job[/]" in screen.text
    assert "plan failed: 0 completed, 1 failed" in screen.text
    assert "\x1b[2J" not in screen.raw
    assert "\x1b[H " not in screen.raw
    assert "\ufffd[2J\ufffd[H plan completed: 1 completed, 0 failed" in screen.text


@pytest.mark.parametrize("columns", ["0", "-3", "wide"])
def test_a_columns_no_terminal_has_is_not_taken_as_the_width(tmp_path: Path, columns: str) -> None:
    """`COLUMNS=0` made every report zero columns wide: the plan's table and summary were not shown."""
    plan = write_plan(tmp_path, [shell("echo fine")])
    screen = on_terminal(["plan", str(plan)], tmp_path, COLUMNS=columns)
    assert screen.code == 0
    assert "plan completed: 1 completed" in screen.text
    assert "echo fine" in screen.text


def test_emoji_codes_in_what_a_plan_and_its_commands_write_stay_text(tmp_path: Path) -> None:
    """`:x:` in a command's stderr is what it wrote, not ❌: the report shows the command's own words."""
    plan = write_plan(
        tmp_path, [shell("echo 'ERR :x: at :warning: step' >&2; exit 3")], description="nightly :smile: job"
    )
    screen = on_terminal(["plan", str(plan)], tmp_path)
    assert screen.code == 1
    assert "ERR :x: at :warning: step" in screen.text
    assert "nightly :smile: job" in screen.text
    assert not {"\u274c", "\u26a0", "\U0001f604"} & set(screen.raw)


def test_a_failed_commands_longest_line_is_cut_in_the_report(tmp_path: Path) -> None:
    """One 4 MB line of stderr is a line of the report, not 4 MB of it: the table and summary stay in view."""
    long_line = "head -c 4000000 /dev/zero | tr '\\0' x >&2"
    plan = write_plan(tmp_path, [shell(f"echo first-words; {long_line}; exit 1")])
    screen = on_terminal(["plan", str(plan)], tmp_path)
    assert screen.code == 1
    assert len(screen.raw) < 256 * 1024
    assert "plan failed: 0 completed, 1 failed" in screen.text
    assert "more characters)" in screen.text


def _plan_on_its_own_terminal(plan: Path, tmp_path: Path) -> tuple[int, int]:
    """`plan` with a pseudo-terminal as its controlling terminal (Ctrl-C there is SIGINT): pid, leader."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env.update(TERM="xterm-256color", TMPDIR=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    argv = [PYTHON, "-m", "cloudops_execution_engine", "plan", "--no-journal", str(plan)]
    pid, leader = pty.fork()
    if pid == 0:  # the child: nothing but the exec
        os.chdir(ROOT)
        os.execve(PYTHON, argv, env)
    fcntl.ioctl(leader, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    return pid, leader


def _read_until(leader: int, text: bytes, within: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + within
    while text not in seen and time.monotonic() < deadline:
        if select.select([leader], [], [], 0.1)[0]:
            seen += os.read(leader, 65536)
    assert text in seen, f"{text!r} never came: {seen[-500:]!r}"
    return seen


def _exit_code(pid: int, within: float) -> int | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def _blocked_writing(pid: int) -> bool:
    """Whether a thread of `pid` waits in a write to its terminal (the kernel's `wait_woken`)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{task}/wchan").read_text() == "wait_woken":
                return True
    return False


_CHATTY = "for i in $(seq 1 20000); do echo line $i; sleep 0.005; done"


@contextlib.contextmanager
def _stalled_plan(tmp_path: Path, *commands: dict[str, Any]) -> Iterator[tuple[int, int]]:
    """A plan of a chatty command and `commands` on a terminal that has stopped reading: the CLI's pid,
    and the terminal's other side. Yielded once a write to the terminal blocks; killed, with its group, after.
    """
    pid, leader = _plan_on_its_own_terminal(write_plan(tmp_path, [shell(_CHATTY), *commands]), tmp_path)
    try:
        _read_until(leader, b"line 1", 30)
        deadline = time.monotonic() + 30
        while not _blocked_writing(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _blocked_writing(pid), "the terminal never stopped taking the plan's output"
        yield pid, leader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(leader)


def test_ctrl_c_ends_a_plan_whose_terminal_stopped_reading(tmp_path: Path) -> None:
    """A frozen terminal (a stalled ssh link): Ctrl-C still cancels the plan and ends it, 130, in seconds.

    The live view wrote to the terminal under Rich's lock, which the event loop
    then waited for: the signal was not handled until the terminal read again.
    """
    marker = f"stalled-{os.getpid()}"
    with _stalled_plan(tmp_path, shell(f"echo started; exec sleep 60 {marker}")) as (pid, leader):
        os.write(leader, b"\x03")
        code = _exit_code(pid, 10)
    assert code == 130
    assert not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def test_a_plan_whose_terminal_hangs_up_exits_129(tmp_path: Path) -> None:
    """The terminal closes (its window, an ssh session): all is cancelled, and the exit is 128 + SIGHUP."""
    plan = write_plan(tmp_path, [shell("echo started; exec sleep 60")])
    pid, leader = _plan_on_its_own_terminal(plan, tmp_path)
    try:
        _read_until(leader, b"started", 30)
    finally:
        os.close(leader)
    try:
        code = _exit_code(pid, 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    assert code == 129


def test_sigterm_ends_a_plan_whose_terminal_stopped_reading_while_the_engine_has_something_to_say(
    tmp_path: Path,
) -> None:
    """A worker dies (its command killed it) while the terminal reads nothing: the engine's warning about
    it waited for the terminal on the event loop, and SIGTERM with it."""
    gate, parent = tmp_path / "gate", tmp_path / "worker-pid"
    killer = f"echo $PPID > {parent}; until [ -e {gate} ]; do sleep 0.05; done; kill -9 $PPID"
    with _stalled_plan(tmp_path, shell(killer)) as (pid, _leader):
        worker = int(parent.read_text())
        gate.touch()
        wait_gone = time.monotonic() + 30
        while psutil.pid_exists(worker) and psutil.Process(worker).status() != "zombie":
            assert time.monotonic() < wait_gone, "the worker did not die"
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        code = _exit_code(pid, 10)
    assert code == 143

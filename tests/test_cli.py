"""The real `cloudops-exec` command, run as a subprocess (and on a pseudo-terminal)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from conftest import HELPERS, PYTHON, gone, wait_until

from cloudops_execution_engine import CommandFailed, ExecutionResult, ExecutionStatus, SpawnFailed
from cloudops_execution_engine.cli import _exit_code_for

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

ROOT = Path(__file__).parent.parent
CLI = [PYTHON, "-m", "cloudops_execution_engine"]


def cli(*args: str, tmp_path: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        **kwargs,
    )


def test_run_streams_output_and_exits_with_the_commands_code(tmp_path: Path) -> None:
    done = cli("run", "--", "bash", "-c", "echo out; echo err >&2; exit 5", tmp_path=tmp_path)
    assert done.returncode == 5
    assert done.stdout == "out\n"
    assert "err\n" in done.stderr
    assert "Command failed with exit code 5" in done.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--timeout", "200", "--", "sleep", "5"], 124),
        (["--", "no-such-program-xyz"], 127),
        (["--", "bash", "-c", "kill -TERM $$"], 143),
        (["--", "bash", "-c", "kill -HUP $$"], 129),
        (["--", "bash", "-c", "kill -KILL $$"], 137),
        (["--", "true"], 0),
    ],
)
def test_run_exit_codes(tmp_path: Path, args: list[str], code: int) -> None:
    """As a shell: timeout 124, cannot start 127, killed by signal N 128+N (SIGHUP too), else the code."""
    assert cli("run", *args, tmp_path=tmp_path).returncode == code


def test_a_command_killed_by_sighup_is_not_reported_as_unstartable(tmp_path: Path) -> None:
    """SIGHUP gives the same -1 as a spawn failure; the CLI tells them apart by the error."""
    hung_up = cli("run", "--", "bash", "-c", "kill -HUP $$", tmp_path=tmp_path)
    assert (hung_up.returncode, hung_up.stderr) == (129, "cloudops-exec: Command failed with exit code -1\n")
    missing = cli("run", "--", "no-such-program-xyz", tmp_path=tmp_path)
    assert missing.returncode == 127
    assert missing.stderr.startswith(f"cloudops-exec: {SpawnFailed('')}")


def _result(status: ExecutionStatus, exit_code: int, error: str | None) -> ExecutionResult:
    now = datetime.now(UTC)
    return ExecutionResult.model_construct(
        id=uuid4(),
        status=status,
        exit_code=exit_code,
        duration=timedelta(0),
        started_at=now,
        completed_at=now,
        log_path=Path("unused.log"),
        error=error,
    )


@pytest.mark.parametrize(
    ("status", "exit_code", "error", "code"),
    [
        (ExecutionStatus.COMPLETED, 0, None, 0),
        (ExecutionStatus.TIMEOUT, -15, "Execution timeout after 200ms", 124),
        (ExecutionStatus.FAILED, -1, str(SpawnFailed("No such file or directory: x")), 127),
        (ExecutionStatus.FAILED, -1, str(CommandFailed(-1)), 129),
        (ExecutionStatus.FAILED, -9, str(CommandFailed(-9)), 137),
        (ExecutionStatus.FAILED, 3, str(CommandFailed(3)), 3),
        (ExecutionStatus.FAILED, -1, "Worker process 12 died (SIGKILL) while running this execution", 1),
        (ExecutionStatus.FAILED, -1, "IO error: cannot open log file: Is a directory: x.log", 1),
    ],
    ids=["completed", "timeout", "spawn", "sighup", "sigkill", "code", "worker-died", "log-unopenable"],
)
def test_exit_code_mapping(status: ExecutionStatus, exit_code: int, error: str | None, code: int) -> None:
    """Every kind of end maps to one code; -1 alone never decides, and a made-up -1 names no signal."""
    assert _exit_code_for(_result(status, exit_code, error)) == code


def test_run_env_cwd_and_shell(tmp_path: Path) -> None:
    done = cli(
        "run",
        "--env",
        "GREETING=hi",
        "--cwd",
        str(tmp_path),
        "--shell",
        "--",
        'echo "$GREETING from $PWD"',
        tmp_path=tmp_path,
    )
    assert done.returncode == 0
    assert done.stdout == f"hi from {tmp_path}\n"


def test_run_events_ndjson_in_the_seed_shape(tmp_path: Path) -> None:
    done = cli("run", "--events", "ndjson", "--", "echo", "hello", tmp_path=tmp_path)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event_type"] for e in events] == ["started", "stdout", "completed"]
    assert events[1]["line"] == "hello"
    assert events[2]["result"]["duration"].keys() == {"secs", "nanos"}


def test_plan_plain_output_table_and_exit_status(tmp_path: Path) -> None:
    done = cli("plan", "examples/with_timeout.json", tmp_path=tmp_path)
    assert done.returncode == 1, "a plan that did not complete exits non-zero"
    assert "#1 stdout: independent work done" in done.stdout
    assert "[3/3] finished" in done.stdout
    assert "#0   timeout" in done.stdout
    assert "#2   cancelled" in done.stdout
    ok = cli("plan", "examples/diamond.json", tmp_path=tmp_path)
    assert ok.returncode == 0
    assert "plan completed: 4 completed" in ok.stdout


def test_plan_events_ndjson_keeps_stdout_pure(tmp_path: Path) -> None:
    done = cli("plan", "--events", "ndjson", "examples/diamond.json", tmp_path=tmp_path)
    assert done.returncode == 0
    kinds = [json.loads(line)["event_type"] for line in done.stdout.splitlines()]
    assert kinds.count("progress") == 4
    assert "plan completed" in done.stderr


def test_plan_from_yaml(tmp_path: Path) -> None:
    plan = tmp_path / "p.yaml"
    plan.write_text(
        "strategy: {type: parallel}\ncommands:\n  - command: {type: exec, program: echo, args: [yaml]}\n"
    )
    done = cli("plan", str(plan), tmp_path=tmp_path)
    assert done.returncode == 0
    assert "#0 stdout: yaml" in done.stdout


def test_validate_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"strategy": {"type": "serial"}, "commands": [{"command": {"type": "exec"}}]}))
    done = cli("validate", str(bad), tmp_path=tmp_path)
    assert done.returncode == 2
    assert "commands.0.command.exec.program: Field required" in done.stderr
    cyclic = tmp_path / "cycle.json"
    cyclic.write_text(
        json.dumps(
            {
                "strategy": {"type": "dependency_graph", "dependencies": {"0": [1], "1": [0]}},
                "commands": [{"command": {"type": "exec", "program": "true"}}] * 2,
            }
        )
    )
    done = cli("validate", str(cyclic), tmp_path=tmp_path)
    assert done.returncode == 2
    assert "dependency cycle: 0 -> 1 -> 0" in done.stderr
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"command": {"type": "exec", "program": "echo", "args": ["a b"]}}))
    done = cli("validate", str(request), tmp_path=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, f"{request}: valid request: echo 'a b'")


@pytest.mark.parametrize("kind", ["request", "plan", "result", "event"])
def test_schema(tmp_path: Path, kind: str) -> None:
    done = cli("schema", kind, tmp_path=tmp_path)
    assert done.returncode == 0
    document = json.loads(done.stdout)
    assert "properties" in document or "oneOf" in document or "anyOf" in document


@contextlib.contextmanager
def cli_process(*args: str, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A running `cloudops-exec` whose stdout the test reads; killed and reaped whatever happens."""
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_cancel_and_kill_every_tree(tmp_path: Path, sig: int, code: int) -> None:
    with cli_process(
        "run", "--", PYTHON, str(HELPERS / "tree.py"), "--ignore-term", tmp_path=tmp_path
    ) as proc:
        assert proc.stdout is not None
        pids = [int(proc.stdout.readline().split()[1]) for _ in range(3)]
        proc.send_signal(sig)
        assert proc.wait(30) == code
        wait_until(lambda: all(gone(p) for p in pids), 10, "the command tree to be gone")


def test_sigint_during_a_plan_cancels_it(tmp_path: Path) -> None:
    plan = tmp_path / "slow.json"
    plan.write_text(
        json.dumps(
            {
                "strategy": {"type": "serial"},
                "commands": [
                    {"command": {"type": "shell", "command": "echo begun; exec sleep 60"}},
                    {"command": {"type": "exec", "program": "true"}},
                ],
            }
        )
    )
    with cli_process("plan", str(plan), tmp_path=tmp_path) as proc:
        assert proc.stdout is not None
        while "begun" not in proc.stdout.readline():
            pass
        proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read()
        assert proc.wait(30) == 130
        assert "#0   cancelled" in rest
        assert "#1   cancelled" in rest


def run_on_terminal(args: list[str], tmp_path: Path, **extra_env: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin, stdout and stderr; return its code and screen output."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="40", TMPDIR=str(tmp_path), **extra_env)
    proc = subprocess.Popen(
        [*CLI, *args], stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, env=env
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
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        code = proc.wait(30)
    finally:
        proc.kill()
        proc.wait(10)
        os.close(leader)
    return code, output.decode("utf-8", "replace")


def test_progress_display_on_a_terminal(tmp_path: Path) -> None:
    """On a pseudo-terminal the plan shows a live bar and a coloured final table."""
    code, text = run_on_terminal(["plan", "examples/parallel_fanout.json"], tmp_path)
    assert code == 0
    assert "8/8" in text
    assert "━" in text, "no progress bar was drawn"
    assert "\x1b[" in text, "no terminal control sequences: not a live display"
    assert "completed" in text


def test_no_color_on_a_terminal_gives_plain_lines(tmp_path: Path) -> None:
    code, text = run_on_terminal(["plan", "examples/parallel_fanout.json"], tmp_path, NO_COLOR="1")
    assert code == 0
    assert "[8/8] finished" in text
    assert "\x1b[" not in text
    assert "━" not in text

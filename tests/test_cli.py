"""The real `cloudops-exec` command, run as a subprocess (and on a pseudo-terminal)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import stat
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
from cloudops_execution_engine.cli_text import exit_code_for

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
        env={**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
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
    assert hung_up.returncode == 129
    assert hung_up.stderr.splitlines()[0] == "cloudops-exec: killed by SIGHUP"
    missing = cli("run", "--", "no-such-program-xyz", tmp_path=tmp_path)
    assert missing.returncode == 127
    expected = "cloudops-exec: did not start: No such file or directory: no-such-program-xyz"
    assert missing.stderr.startswith(expected)
    assert str(SpawnFailed("")) not in missing.stderr, "people read 'did not start', not the error's prefix"


def test_run_names_the_signal_and_the_log_on_failure(tmp_path: Path) -> None:
    """A killed command reads `killed by SIGKILL`, and the log file's path follows (it exists)."""
    done = cli("run", "--", "bash", "-c", "echo partial; kill -KILL $$", tmp_path=tmp_path)
    assert done.returncode == 137
    lines = done.stderr.splitlines()
    assert lines[0] == "cloudops-exec: killed by SIGKILL"
    assert lines[1].startswith("cloudops-exec: log: ")
    log = Path(lines[1].removeprefix("cloudops-exec: log: "))
    assert "partial" in log.read_text()
    ok = cli("run", "--", "true", tmp_path=tmp_path)
    assert (ok.returncode, ok.stderr) == (0, ""), "a run that succeeds says nothing"


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
    assert exit_code_for(_result(status, exit_code, error)) == code


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


@pytest.mark.parametrize(
    ("command", "said"),
    [
        ({"type": "exec", "program": "\udcff"}, "not valid Unicode text"),
        ({"type": "exec", "program": "echo", "args": ["x" * 200_000]}, "more than the 131072"),
        ({"type": "exec", "program": "echo"}, "stdin is 17825792 bytes"),
    ],
    ids=["lone-surrogate", "long-argument", "large-stdin"],
)
def test_validate_finds_what_plan_would_refuse(tmp_path: Path, command: dict[str, Any], said: str) -> None:
    """`validate` says valid only for what `plan` runs: the engine's admission checks run too."""
    request: dict[str, Any] = {"command": command}
    if said.startswith("stdin"):
        request["stdin"] = "x" * (17 * 1024 * 1024)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"strategy": {"type": "serial"}, "commands": [request]}))
    checked = cli("validate", str(path), tmp_path=tmp_path)
    ran = cli("plan", "--no-journal", str(path), tmp_path=tmp_path)
    assert (checked.returncode, ran.returncode) == (2, 2), (checked.stdout, ran.stderr)
    assert "commands.0." in checked.stderr
    assert said in checked.stderr
    assert said in ran.stderr


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
        env={**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
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


@pytest.mark.parametrize(
    "sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name
)
def test_a_signal_to_the_whole_process_group_leaves_no_command_running(tmp_path: Path, sig: int) -> None:
    """What a terminal sends to its foreground group (a hangup, Ctrl-\\, Ctrl-C) reaches the workers too.

    A worker that died of SIGHUP or SIGQUIT at once left its commands running, in sessions of their own;
    and the command, cancelled as the same signal sent to cloudops-exec alone cancels it, was recorded
    as failed (its worker died) rather than cancelled.
    """
    journal = tmp_path / "journal.sqlite3"
    proc = subprocess.Popen(
        [*CLI, "run", "--journal", str(journal), "--", PYTHON, str(HELPERS / "tree.py"), "--ignore-term"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        pids = [int(proc.stdout.readline().split()[1]) for _ in range(3)]
        os.killpg(proc.pid, sig)
        assert proc.wait(30) == 128 + sig
        wait_until(lambda: all(gone(p) for p in pids), 10, "the command tree to be gone")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    listed = cli("history", "--json", "--journal", str(journal), tmp_path=tmp_path)
    assert [json.loads(line)["status"] for line in listed.stdout.splitlines()] == ["cancelled"]


@pytest.mark.parametrize("how", ["run", "run --events ndjson", "plan"])
def test_a_reader_that_closes_our_stdout_ends_the_run_as_sigpipe_ends_a_pipeline(
    tmp_path: Path, how: str
) -> None:
    """`cloudops-exec run -- yes | head -2`: the command is killed and we exit 141, at once, quietly."""
    endless = "echo $$; exec yes"
    if how == "plan":
        plan = tmp_path / "endless.json"
        command = {"command": {"type": "shell", "command": endless}}
        plan.write_text(json.dumps({"commands": [command], "strategy": {"type": "serial"}}))
        words = ["plan", str(plan)]
    else:
        words = [*how.split(), "--shell", "--", endless]
    with cli_process(*words, tmp_path=tmp_path) as proc:
        assert proc.stdout is not None
        pid = None
        while pid is None:
            line = proc.stdout.readline()
            assert line, f"{how} ended before its command printed its pid"
            if "ndjson" in how:
                line = json.loads(line).get("line", "")
            elif how == "plan":
                line = line.removeprefix("#0 stdout: ")
            if line.strip().isdigit():
                pid = int(line)
        proc.stdout.readline()
        proc.stdout.close()
        assert proc.wait(30) == 128 + signal.SIGPIPE
        wait_until(lambda: gone(pid), 10, "the command to be gone")


@pytest.mark.parametrize(
    "words",
    [
        ["run", "--no-journal", "--", "seq", "3"],
        ["run", "--no-journal", "--events", "ndjson", "--", "seq", "3"],
        ["run", "--no-journal", "--shell", "--", "exec yes"],
        ["plan", "--no-journal", "examples/diamond.json"],
        ["schema", "request"],
        ["history"],
    ],
    ids=["run", "run-ndjson", "run-endless", "plan", "schema", "history"],
)
@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_output_that_cannot_be_written_is_said_and_fails_the_run(
    tmp_path: Path, words: list[str], stdout: str
) -> None:
    """As coreutils do: `cloudops-exec run -- seq 3 > /dev/full` says so and exits 1, never 0 in silence."""
    if words == ["history"]:
        assert cli("run", "--", "true", tmp_path=tmp_path).returncode == 0  # something to list
    env = {**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    with open("/dev/full", "w") if stdout == "full" else contextlib.nullcontext() as full:
        done = subprocess.run(
            [*CLI, *words],
            stdout=full if full is not None else None,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
            # A closed descriptor 1: the shell's `>&-`.
            preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None,
        )
    why = "No space left on device" if stdout == "full" else "Bad file descriptor"
    assert done.returncode == 1, done.stderr
    assert f"cloudops-exec: cannot write to stdout: {why}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("latin1.json", b'{"commands": [], "caf\xe9": 1}', "is not UTF-8 text"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
        ("deep.yaml", b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    ],
)
def test_a_file_that_cannot_be_read_as_a_document_is_a_usage_error(
    tmp_path: Path, command: str, name: str, content: bytes, said: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    done = cli(command, str(path), tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"cloudops-exec: {path} {said}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize("endless", ["/dev/zero", "/dev/urandom"])
def test_an_endless_file_is_refused_once_past_any_plan_not_read_for_ever(
    tmp_path: Path, command: str, endless: str
) -> None:
    """It used to be read whole: 4 GB of memory in ten seconds, or a MemoryError traceback."""
    done = cli(command, endless, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"cloudops-exec: {endless} is larger than 64 MiB, more than a request or plan" in done.stderr


def test_history_takes_a_limit_beyond_any_count(tmp_path: Path) -> None:
    assert cli("run", "--", "true", tmp_path=tmp_path).returncode == 0
    done = cli("history", "--json", "--limit", str(2**70), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1


def test_run_passes_the_commands_utf8_through_whatever_our_stdout_encoding(tmp_path: Path) -> None:
    """A command's bytes are its own: an ASCII-only locale neither drops nor transcodes them."""
    done = subprocess.run(
        [*CLI, "run", "--", "printf", "caf\\303\\251 \\342\\234\\223\\n"],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={
            **os.environ,
            "TMPDIR": str(tmp_path),
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "PYTHONIOENCODING": "ascii",
        },
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "café ✓\n".encode()


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


def test_plan_piped_says_each_failure_as_a_terminal_does(tmp_path: Path) -> None:
    """In a pipe failures read `killed by SIGKILL`, `did not start`; the report has their stderr and logs."""
    plan = tmp_path / "failing.json"
    plan.write_text(
        json.dumps(
            {
                "strategy": {"type": "parallel"},
                "commands": [
                    {"command": {"type": "shell", "command": "echo 'ERROR: disk full' >&2; kill -KILL $$"}},
                    {"command": {"type": "exec", "program": "no-such-program-xyz"}},
                ],
            }
        )
    )
    done = cli("plan", str(plan), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "#0 failed: killed by SIGKILL" in done.stdout
    assert "#1 failed: did not start: No such file or directory: no-such-program-xyz" in done.stdout
    report = done.stdout.split("plan failed:", 1)[1]
    assert "ERROR: disk full" in report
    logs = [line.split("log: ", 1)[1] for line in report.splitlines() if line.strip().startswith("log: ")]
    assert len(logs) == 2
    assert all(Path(log).is_file() for log in logs)
    assert "SIGKILL" in next(line for line in done.stdout.splitlines() if line.startswith("#0   failed"))


def test_a_journal_option_that_names_no_file_is_a_usage_error(tmp_path: Path) -> None:
    done = cli("run", "--journal", "", "--", "true", tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "cloudops-exec: invalid settings (1 problem):\n"
        "  journal: Value error, journal must name a file, not '.'\n"
    )


def test_an_empty_log_dir_option_is_the_working_directory_left_as_it_is(tmp_path: Path) -> None:
    """Not the worker's directory, nor a chmod of the user's."""
    here = tmp_path / "here"
    here.mkdir(mode=0o755)
    done = subprocess.run(
        [*CLI, "run", "--no-journal", "--log-dir", "", "--", "bash", "-c", "exit 3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=here,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 3
    logs = list(here.glob("*.log"))
    assert len(logs) == 1
    assert f"cloudops-exec: log: {logs[0]}\n" in done.stderr
    assert stat.S_IMODE(here.stat().st_mode) == 0o755


@pytest.mark.parametrize("command", ["plan", "history"])
def test_reports_in_a_locale_that_cannot_say_every_character_are_written_not_a_traceback(
    tmp_path: Path, command: str
) -> None:
    """An ASCII stdout and a report with an ellipsis (a shortened command): the report is written whole."""
    plan = tmp_path / "long.json"
    words = "echo " + "word " * 30
    step = {"command": {"type": "shell", "command": words}}
    plan.write_text(json.dumps({"commands": [step], "strategy": {"type": "serial"}}))
    assert cli("plan", str(plan), tmp_path=tmp_path).returncode == 0
    done = subprocess.run(
        [*CLI, command, *([str(plan)] if command == "plan" else [])],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        env={
            **os.environ,
            "TMPDIR": str(tmp_path),
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "PYTHONIOENCODING": "ascii",
        },
    )
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr
    assert b"completed" in done.stdout
    assert b"word word" in done.stdout


def test_ctrl_c_at_any_moment_of_the_start_ends_the_run_with_130(tmp_path: Path) -> None:
    """SIGINT at moments spread over start-up (imports, parsing, the engine's start, the command's).

    A Ctrl-C while the engine started its workers was ignored, and the command ran to its end,
    exit 0; one before the run took SIGINT over was click's "Aborted!", exit 1, or a traceback
    when it came while the models were imported. One that comes while the interpreter itself
    starts, before the program's first line, is Python's: it dies of SIGINT (-2), which a shell
    reports as 130 too, or, within its `site` import, ends with "Fatal Python error", 1.
    """
    codes = []
    for step in range(12):
        proc = subprocess.Popen(
            [*CLI, "run", "--", "sleep", "30"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
        )
        try:
            time.sleep(step * 0.05)  # the moment of this Ctrl-C, not a wait for anything
            proc.send_signal(signal.SIGINT)
            code = proc.wait(20)
            assert proc.stderr is not None
            said = proc.stderr.read()
            pythons = code == -signal.SIGINT or (
                code == 1 and b"Fatal Python error: init_import_site" in said
            )
            codes.append(130 if pythons else code)
            assert pythons or b"Traceback" not in said, said
        finally:
            proc.kill()
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()
    assert codes == [130] * 12


def test_run_started_without_stdin_and_stderr_gives_the_command_both(tmp_path: Path) -> None:
    """From cron or a daemon (`<&- 2>&-`): the command's stderr was lost, and it had no stdin at all."""
    line = (
        "echo to-stdout; echo to-stderr >&2; cat; echo cat-exit=$?; "
        "[ -e /proc/self/fd/0 ] && echo has-fd0; [ -e /proc/self/fd/2 ] && echo has-fd2"
    )
    command = shlex.join([*CLI, "run", "--no-journal", "--events", "ndjson", "--shell", "--", line])
    done = subprocess.run(
        ["bash", "-c", f"exec {command} <&- 2>&-"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
    )
    assert done.returncode == 0, done.stdout
    events = [json.loads(line) for line in done.stdout.splitlines()]
    # Two pipes: the order between them is not the command's to keep.
    said = {kind: [e["line"] for e in events if e["event_type"] == kind] for kind in ("stdout", "stderr")}
    assert said == {"stdout": ["to-stdout", "cat-exit=0", "has-fd0", "has-fd2"], "stderr": ["to-stderr"]}
    (log,) = (tmp_path / "cloudops-execution-engine").glob("*.log")
    assert "stderr to-stderr" in log.read_text()


_ESCAPES = "\x1b]0;PWNED\x07\x1b[2J"
_TRUE = {"type": "exec", "program": "true"}


@pytest.mark.parametrize(
    ("command", "document"),
    [
        ("validate", {"commands": [{"command": {"type": _ESCAPES}}], "strategy": {"type": "serial"}}),
        ("validate", {"commands": [{"command": {"type": "exec", "program": "true"}, "env": {_ESCAPES: 5}}]}),
        (
            "validate",
            {"command": _TRUE, "working_dir": f"/nonexistent/{_ESCAPES}"},
        ),
        ("validate", {"command": {"type": "exec", "program": "true", "args": [_ESCAPES]}}),
        ("plan", {"commands": [{"command": {"type": "exec", "program": f"nope{_ESCAPES}"}}]}),
    ],
    ids=["type tag", "env key", "working_dir", "argument", "program that cannot start"],
)
def test_what_a_file_holds_reaches_the_terminal_without_its_escape_sequences(
    tmp_path: Path, command: str, document: dict[str, Any]
) -> None:
    """A plan or request from elsewhere could retitle the terminal or clear it through our messages."""
    if "commands" in document:
        document.setdefault("strategy", {"type": "serial"})
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(document))
    done = cli(command, *(["--no-journal"] if command == "plan" else []), str(path), tmp_path=tmp_path)
    said = done.stdout + done.stderr
    assert "PWNED" in said, said  # the text is shown, made harmless
    assert "\x1b" not in said
    assert "\x07" not in said


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_number_too_long_to_read_is_a_malformed_file_not_a_traceback(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"plan{suffix}"
    path.write_text('{"commands": [], "strategy": {"type": "serial"}, "x": ' + "9" * 5000 + "}")
    done = cli("validate", str(path), tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "is not valid" in done.stderr


def test_a_yaml_file_is_known_by_its_suffix_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "plan.YAML"
    path.write_text("commands:\n  - command: {type: exec, program: 'true'}\nstrategy: {type: serial}\n")
    done = cli("validate", str(path), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "valid plan of 1 commands" in done.stdout


def test_history_of_a_journal_with_a_damaged_row_says_so(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    assert cli("run", "--journal", str(journal), "--", "true", tmp_path=tmp_path).returncode == 0
    conn = sqlite3.connect(journal)
    conn.execute("UPDATE entries SET status = 'weird'")
    conn.commit()
    conn.close()
    done = cli("history", "--journal", str(journal), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"cannot read journal {journal}" in done.stderr


def test_run_called_from_python_writes_to_its_callers_streams_and_leaves_no_thread(tmp_path: Path) -> None:
    """Under click's test runner (or `main(args=...)`), output went to descriptor 1 past the captured
    stream, and each run left a thread behind."""
    import threading

    from click.testing import CliRunner

    from cloudops_execution_engine.cli_commands import main

    before = threading.active_count()
    runner = CliRunner()
    outputs = [
        runner.invoke(
            main,
            ["run", "--no-journal", "--log-dir", str(tmp_path), "--", "echo", f"hello {n}"],
            catch_exceptions=False,
        ).output
        for n in range(3)
    ]
    assert outputs == [f"hello {n}\n" for n in range(3)]
    assert threading.active_count() == before


def test_a_secret_env_value_is_masked_in_what_plan_and_validate_say_of_a_command(tmp_path: Path) -> None:
    """The engine masks it in every event and log; the command line's own table and lines did not."""
    secret = "TOPSECRETVALUE"
    request = {
        "command": {"type": "exec", "program": "echo", "args": ["token", secret]},
        "secret_env": {"T": secret},
    }
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"description": f"uses {secret}", "strategy": {"type": "serial"}, "commands": [request]})
    )
    ran = cli("plan", "--no-journal", str(plan), tmp_path=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "echo token ***" in ran.stdout
    alone = tmp_path / "request.json"
    alone.write_text(json.dumps(request))
    checked = cli("validate", str(alone), tmp_path=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "valid request: echo token ***" in checked.stdout
    for said in (ran, checked):
        assert secret not in said.stdout + said.stderr

"""`cloudops-exec history`, `show` and `logs`, over what `run` and `plan` recorded in the journal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import psutil
import pytest
from conftest import PYTHON, shell, wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

ROOT = Path(__file__).parent.parent


def environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "cloudops_execution_engine", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=environment(tmp_path),
    )


def history(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    done = cli("history", "--json", *args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def recorded(tmp_path: Path) -> dict[str, str]:
    """A journal with a run that completed, a run killed by SIGKILL and a plan, by their ids."""
    ok = cli("run", "--events", "ndjson", "--", "echo", "hello journal", tmp_path=tmp_path)
    killed = cli(
        "run", "--events", "ndjson", "--", "bash", "-c", "echo dying >&2; kill -KILL $$", tmp_path=tmp_path
    )
    plan = cli("plan", "--events", "ndjson", "examples/diamond.json", tmp_path=tmp_path)
    assert (ok.returncode, killed.returncode, plan.returncode) == (0, 137, 0)
    first = json.loads(ok.stdout.splitlines()[0])
    dead = json.loads(killed.stdout.splitlines()[0])
    progress = [json.loads(line) for line in plan.stdout.splitlines() if '"progress"' in line]
    assert f"details: cloudops-exec show {progress[0]['plan_id']}" in plan.stderr
    return {"ok": first["execution_id"], "killed": dead["execution_id"], "plan": progress[0]["plan_id"]}


def test_run_and_plan_record_into_the_default_journal(tmp_path: Path, recorded: dict[str, str]) -> None:
    """`history --json` lists every run, the plan and its commands, oldest first; filters apply."""
    assert (tmp_path / "state" / "cloudops-execution-engine" / "journal.sqlite3").is_file()
    summaries = history(tmp_path)
    ids = [s["id"] for s in summaries]
    assert ids[:2] == [recorded["ok"], recorded["killed"]]
    assert recorded["plan"] in ids
    assert len(summaries) == 2 + 1 + 4, "two runs, the plan and its four commands"
    assert [s["id"] for s in history(tmp_path, "--status", "failed")] == [recorded["killed"]]
    assert len(history(tmp_path, "--limit", "2")) == 2
    table = cli("history", tmp_path=tmp_path).stdout
    assert "echo 'hello journal'" in table
    assert "echo released" in table
    assert table.splitlines()[0].split() == ["id", "status", "started", "duration", "plan", "command"]


def test_show_and_logs_tell_how_a_recorded_run_ended(tmp_path: Path, recorded: dict[str, str]) -> None:
    """`show` says how it ended (signal named) and where its log is; `logs` prints that log."""
    shown = cli("show", recorded["killed"], tmp_path=tmp_path)
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert fields["status:"] == "failed"
    assert fields["exit:"] == "SIGKILL"
    assert fields["ended:"] == "killed by SIGKILL"
    assert "dying" in Path(fields["log:"]).read_text()
    as_json = json.loads(cli("show", "--json", recorded["killed"], tmp_path=tmp_path).stdout)
    assert as_json["exit_code"] == -9, "JSON keeps the contract's number"
    plan = cli("show", recorded["plan"], tmp_path=tmp_path)
    assert "plan completed: 4 completed" in plan.stdout
    assert "echo released" in plan.stdout
    log = cli("logs", recorded["ok"], tmp_path=tmp_path)
    assert log.returncode == 0
    assert "stdout hello journal" in log.stdout
    assert "# finished:" in log.stdout
    missing = cli("show", "not-an-id", tmp_path=tmp_path)
    assert missing.returncode == 2
    assert "is not an id" in missing.stderr


def test_no_journal_and_journal_path(tmp_path: Path) -> None:
    """`--no-journal` records nothing; `--journal PATH` records there, and `history --journal` reads it."""
    assert cli("run", "--no-journal", "--", "true", tmp_path=tmp_path).returncode == 0
    assert not (tmp_path / "state").exists()
    mine = tmp_path / "mine.sqlite3"
    assert cli("run", "--journal", str(mine), "--", "true", tmp_path=tmp_path).returncode == 0
    assert len(history(tmp_path, "--journal", str(mine))) == 1
    nowhere = cli("history", tmp_path=tmp_path)
    assert nowhere.returncode == 1
    assert "no journal at" in nowhere.stderr


def test_a_run_beside_a_running_plan_and_logs_follow(tmp_path: Path) -> None:
    """While a plan holds the journal, a `run` still runs (unrecorded, and says so); `logs -f` follows."""
    flag = tmp_path / "go-on"
    step = f"echo begun; while [ ! -e {flag} ]; do sleep 0.05; done; echo ended-here"
    plan = tmp_path / "held.json"
    plan.write_text(
        json.dumps(
            {"strategy": {"type": "serial"}, "commands": [{"command": {"type": "shell", "command": step}}]}
        )
    )
    with cli_processes(tmp_path) as start:
        running = start("plan", "--events", "ndjson", str(plan))
        assert running.stdout is not None
        started = json.loads(running.stdout.readline())
        assert started["event_type"] == "started"
        beside = cli("run", "--", "echo", "beside", tmp_path=tmp_path)
        assert beside.returncode == 0
        assert beside.stdout == "beside\n"
        assert "not recorded: " in beside.stderr
        assert "in use by another engine" in beside.stderr
        follower = start("logs", "--follow", started["execution_id"])
        assert follower.stdout is not None
        while "stdout begun" not in follower.stdout.readline():
            pass
        flag.touch()
        rest = follower.stdout.read()
        assert follower.wait(30) == 0
        assert "stdout ended-here" in rest
        assert "# finished: " in rest
        assert running.wait(30) == 0


@contextlib.contextmanager
def cli_processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `cloudops-exec` processes; each is killed and reaped at the end, whatever the test did."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [PYTHON, "-m", "cloudops_execution_engine", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=environment(tmp_path),
        )
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate(timeout=10)


def plan_file(tmp_path: Path, *commands: dict[str, Any]) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"strategy": {"type": "serial"}, "commands": list(commands)}))
    return str(path)


@pytest.mark.parametrize("journal", ["recorded", "no journal"])
def test_logs_follow_follows_a_retried_command_to_its_last_attempt(tmp_path: Path, journal: str) -> None:
    """An attempt's footer is not the end: `logs -f` goes on while a retry is due.

    The journal says so; without one, the line the engine adds to the log when
    it sets a retry does. Backoffs longer than the follower takes to find a
    footered log that no one holds.
    """
    step = 'echo "try $CLOUDOPS_ATTEMPT"; [ "$CLOUDOPS_ATTEMPT" = 3 ]'
    retried = {
        "command": {"type": "shell", "command": step},
        "retry": {"max_attempts": 3, "backoff_ms": 1500, "jitter": False},
    }
    extra = ["--no-journal"] if journal == "no journal" else []
    with cli_processes(tmp_path) as start:
        running = start("plan", *extra, "--events", "ndjson", plan_file(tmp_path, retried))
        assert running.stdout is not None
        started = json.loads(running.stdout.readline())
        assert started["event_type"] == "started"
        follower = start("logs", "--follow", started["execution_id"])
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert [line.split()[-1] for line in out.splitlines() if " stdout try " in line] == ["1", "2", "3"]
        footers = [line for line in out.splitlines() if line.startswith("# finished: ")]
        statuses = [footer.split("status=")[1].split()[0] for footer in footers]
        assert statuses == ["failed", "failed", "completed"]
        assert out.endswith(footers[-1] + "\n")
        assert running.wait(30) == 0


def test_logs_follow_without_a_journal_ends_when_the_engine_dies_during_a_backoff(tmp_path: Path) -> None:
    """The retry the log announces will never come: the follower says so, and exits 1, not 0."""
    failing = {
        "command": {"type": "shell", "command": "echo begun; exit 1"},
        "retry": {"max_attempts": 3, "backoff_ms": 60_000, "jitter": False},
    }
    with cli_processes(tmp_path) as start:
        running, follower, started = following(start, plan_file(tmp_path, failing), "--no-journal")
        assert follower.stdout is not None
        while not follower.stdout.readline().startswith("# retrying: "):
            pass
        running.kill()
        running.wait(10)
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 1, err
        assert "# --- attempt 2 ---" not in out
        assert f"{started['execution_id']} did not end: the engine that was to run its next attempt" in err


@pytest.mark.parametrize("fate", ["runs", "cancelled while queued"])
def test_logs_follow_of_a_queued_command_waits_for_it_to_start(tmp_path: Path, fate: str) -> None:
    """A plan's later command has no log until it starts: `logs -f` waits for it, not fails."""
    gate = tmp_path / "go-on"
    holds = f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done"
    queued = str(uuid4())
    first = {"command": {"type": "shell", "command": holds}}
    second = {"id": queued, "command": {"type": "shell", "command": "echo second-ran"}}
    with cli_processes(tmp_path) as start:
        running = start("plan", "--events", "ndjson", plan_file(tmp_path, first, second))
        assert running.stdout is not None
        assert json.loads(running.stdout.readline())["event_type"] == "started"
        follower = start("logs", "--follow", queued)
        journal = tmp_path / "state" / "cloudops-execution-engine" / "journal.sqlite3"
        wait_until(lambda: watching(follower, journal), 20, "the follower to watch the journal")
        if fate == "runs":
            gate.touch()
            out, err = follower.communicate(timeout=30)
            assert follower.returncode == 0, err
            assert "stdout second-ran" in out
            assert out.rstrip("\n").splitlines()[-1].startswith("# finished: ")
        else:
            running.send_signal(signal.SIGINT)  # cancels the plan: the queued command never starts
            out, err = follower.communicate(timeout=30)
            assert follower.returncode == 1
            assert out == ""
            assert f"{queued} ended cancelled before it started: it has no log" in err
        running.wait(30)


def watching(proc: subprocess.Popen[str], journal: Path) -> bool:
    """Whether `proc` has `journal` open: a follow waiting for its command to start."""
    assert proc.poll() is None, "the follower ended instead of waiting"
    try:
        return any(Path(f.path) == journal for f in psutil.Process(proc.pid).open_files())
    except psutil.Error:
        return False


def following(
    start: Callable[..., subprocess.Popen[str]], plan: str, *options: str
) -> tuple[subprocess.Popen[str], subprocess.Popen[str], dict[str, Any]]:
    """A `plan` whose command prints "begun", and `logs --follow` of that command once it has printed it."""
    running = start("plan", *options, "--events", "ndjson", plan)
    assert running.stdout is not None
    started = json.loads(running.stdout.readline())
    follower = start("logs", "--follow", started["execution_id"])
    assert follower.stdout is not None
    while "stdout begun" not in follower.stdout.readline():
        pass
    return running, follower, started


# A command's own line that, cut at its carriage return, reads as the log's footer.
_FORGED_FOOTER = "printf 'begun\\r# finished: 2026-01-01T00:00:00Z status=completed exit_code=0\\n'"


@pytest.mark.parametrize(
    ("journal", "says"),
    [("recorded", "echo begun"), ("no journal", "echo begun"), ("no journal", _FORGED_FOOTER)],
    ids=["recorded", "no journal", "a forged footer"],
)
def test_logs_follow_ends_when_the_engine_running_the_command_dies(
    tmp_path: Path, journal: str, says: str
) -> None:
    """A log its engine will never finish (the engine was SIGKILLed) is not followed for ever.

    Nor taken for finished because the command printed what a footer looks like
    after a lone carriage return: only a newline ends a line of the log.
    """
    extra = ["--no-journal"] if journal == "no journal" else []
    step = {"command": {"type": "shell", "command": f"{says}; exec sleep 60"}}
    with cli_processes(tmp_path) as start:
        running, follower, started = following(start, plan_file(tmp_path, step), *extra)
        running.kill()
        running.wait(10)
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 1
        if says != _FORGED_FOOTER:
            assert "# finished: " not in out
        assert f"{started['execution_id']} did not end: the engine running it stopped" in err
        if journal == "recorded":
            assert "recorded as running" in err


async def test_history_show_and_logs_read_a_journal_another_engine_holds(tmp_path: Path) -> None:
    """While an engine (a service, a long plan) owns the journal, the commands read what it committed."""
    from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionStatus

    journal = tmp_path / "held.sqlite3"
    config = ExecutionConfig(journal=journal, log_dir=tmp_path / "logs", workers=1)

    async def cli_async(*args: str) -> tuple[int, str, str]:
        import asyncio

        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "cloudops_execution_engine",
            *args,
            "--journal",
            str(journal),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=environment(tmp_path),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async with ExecutionEngine(config) as engine:
        done = await engine.execute(shell("echo committed before"))
        result = await engine.wait(done, timeout=20)
        assert result.status is ExecutionStatus.COMPLETED
        running = await engine.execute(shell("sleep 30"))
        code, out, err = await cli_async("history", "--json")
        assert code == 0, err
        listed = {line["id"]: line["status"] for line in map(json.loads, out.splitlines())}
        assert listed[str(done)] == "completed"
        assert listed.get(str(running)) in ("pending", "running")
        code, out, err = await cli_async("show", str(done), "--json")
        assert code == 0, err
        assert json.loads(out) == json.loads(result.model_dump_json())
        code, out, err = await cli_async("logs", str(done))
        assert code == 0, err
        assert "committed before" in out
        await engine.cancel(running)


def test_a_journal_removed_while_a_run_records_into_it_is_said_on_stderr(tmp_path: Path) -> None:
    """The engine logs it; the command line shows what the engine logs, one line each, no traceback."""
    journal = tmp_path / "removed.sqlite3"
    remove = f"rm -f '{journal}' '{journal}-wal' '{journal}-shm'; sleep 1.5"
    done = cli("run", "--journal", str(journal), "--shell", "--", remove, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"cloudops-exec: journal {journal} was removed while this engine ran" in done.stderr
    assert "Traceback" not in done.stderr


def test_history_and_logs_into_a_reader_that_leaves_end_as_sigpipe_ends_a_pipeline(tmp_path: Path) -> None:
    """`cloudops-exec logs ID | head -1`: 141, quietly, as `run` and coreutils end; click's way was 1."""
    assert cli("run", "--", "seq", "300000", tmp_path=tmp_path).returncode == 0
    listed = cli("history", "--json", tmp_path=tmp_path)
    execution = json.loads(listed.stdout.splitlines()[0])["id"]
    reader = subprocess.Popen(
        [PYTHON, "-m", "cloudops_execution_engine", "logs", execution],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=environment(tmp_path),
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline()
        reader.stdout.close()
        assert reader.wait(30) == 128 + signal.SIGPIPE
        assert reader.stderr is not None
        assert reader.stderr.read() == b""
    finally:
        reader.kill()
        reader.wait(10)
        if reader.stderr:
            reader.stderr.close()


def test_history_show_and_logs_read_the_journal_without_taking_it(tmp_path: Path) -> None:
    """They opened an engine on it, which held it while they read: a `run` started then was not recorded.

    Read beside it instead, they leave no trace: no engine's run in the journal, whose lock stays free.
    """
    assert cli("run", "--", "echo", "recorded", tmp_path=tmp_path).returncode == 0
    journal = tmp_path / "state" / "cloudops-execution-engine" / "journal.sqlite3"

    def runs() -> int:
        with contextlib.closing(sqlite3.connect(journal)) as conn:
            return int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])

    before = runs()
    execution = json.loads(cli("history", "--json", tmp_path=tmp_path).stdout.splitlines()[0])["id"]
    for words in (["history"], ["show", execution], ["logs", execution]):
        done = cli(*words, tmp_path=tmp_path)
        assert done.returncode == 0, done.stderr
    assert runs() == before, "a reader opened an engine on the journal"


def test_history_does_not_say_a_command_whose_log_was_removed_never_ran(tmp_path: Path) -> None:
    """A cleaner or retention removed the log of a command that completed: it did run."""
    journal = tmp_path / "journal.sqlite3"
    assert cli("run", "--journal", str(journal), "--", "true", tmp_path=tmp_path).returncode == 0
    for log in (tmp_path / "cloudops-execution-engine").glob("*.log"):
        log.unlink()
    listed = cli("history", "--journal", str(journal), tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "(no log: it did not run, or its log was removed)" in listed.stdout


def test_logs_follow_finds_a_log_its_run_put_in_another_directory(tmp_path: Path) -> None:
    """`plan --log-dir X`: the journal says where the log is; following looked only in the default place."""
    gate = tmp_path / "go-on"
    step = {
        "command": {"type": "shell", "command": f"echo begun; while [ ! -e {gate} ]; do sleep 0.02; done"}
    }
    with cli_processes(tmp_path) as start:
        elsewhere = str(tmp_path / "elsewhere")
        running, follower, _started = following(start, plan_file(tmp_path, step), "--log-dir", elsewhere)
        gate.touch()
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert out.rstrip("\n").splitlines()[-1].startswith("# finished: ")
        assert running.wait(30) == 0


_PEAK = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE)\n"
    "print(len(done.stdout), done.stdout.count(sys.argv[1].encode()), done.returncode, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def _printed_and_peak(tmp_path: Path, counted: str, *words: str) -> tuple[int, int, int]:
    """`cloudops-exec <words>` with its stdout read whole: (bytes printed, times `counted` came, peak KiB)."""
    measured = subprocess.run(
        [PYTHON, "-c", _PEAK, counted, PYTHON, "-m", "cloudops_execution_engine", *words],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=environment(tmp_path),
    )
    printed, seen, code, peak_kib = map(int, measured.stdout.split())
    assert code == 0, measured.stderr
    return printed, seen, peak_kib


def _recorded(tmp_path: Path, journal: Path, command: str) -> str:
    """Run `command` (a shell line) recorded in `journal`; its id."""
    run = cli("run", "--journal", str(journal), "--shell", "--", command, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    return str(
        json.loads(cli("history", "--json", "--journal", str(journal), tmp_path=tmp_path).stdout)["id"]
    )


def test_logs_follow_of_a_long_line_holds_little_of_it_in_memory(tmp_path: Path) -> None:
    """It read the whole log at once, and kept a line without its end as a whole: gigabytes for a long one."""
    journal = tmp_path / "journal.sqlite3"
    size = 48_000_000
    key = _recorded(tmp_path, journal, f"head -c {size} /dev/zero | tr '\\0' x")
    printed, _, peak_kib = _printed_and_peak(
        tmp_path, "\n", "logs", "--follow", "--journal", str(journal), key
    )
    assert printed > size
    assert peak_kib < 100 * 1024, f"the follower peaked at {peak_kib // 1024} MiB"


def test_logs_of_a_long_log_prints_it_whole_in_little_memory(tmp_path: Path) -> None:
    """It read the log into memory, decoded it and encoded it again: about three times its size."""
    journal = tmp_path / "journal.sqlite3"
    lines = 600_000
    key = _recorded(tmp_path, journal, f"yes {'x' * 79} | head -n {lines}")
    shown = cli("show", "--json", "--journal", str(journal), key, tmp_path=tmp_path)
    log = Path(json.loads(shown.stdout)["log_path"])
    line = "x" * 79 + "\n"
    printed, counted, peak_kib = _printed_and_peak(tmp_path, line, "logs", "--journal", str(journal), key)
    assert (printed, counted) == (log.stat().st_size, lines)
    assert peak_kib < 100 * 1024, f"logs peaked at {peak_kib // 1024} MiB for a {printed // 2**20} MiB log"


async def test_history_shows_an_entry_deleted_between_its_listing_and_its_log_lookup(tmp_path: Path) -> None:
    """The holder's retention may delete a row `history` has just listed: the lookup of its log raised
    NotFound, and `history` failed whole ("Execution not found")."""
    from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionRequest, ShellCommand
    from cloudops_execution_engine.actors.journal_view import JournalView
    from cloudops_execution_engine.cli_journal import _shown

    journal = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(ExecutionConfig(journal=journal, log_dir=tmp_path / "logs")) as engine:
        await engine.wait(await engine.execute(ExecutionRequest(command=ShellCommand(command="true"))))
    async with JournalView(journal) as view:
        [listed] = await view.list_executions()
        with sqlite3.connect(journal) as conn:
            conn.execute("DELETE FROM entries WHERE id = ?", (listed.id.bytes,))
        conn.close()
        assert _shown(view, listed) == "(removed since it was listed)"


_DIES_WITHOUT_CLOSING = """
import asyncio, os, signal, sys
from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionRequest, ShellCommand


async def main():
    engine = ExecutionEngine(ExecutionConfig(journal=sys.argv[1], log_dir=sys.argv[2]))
    await engine.wait(await engine.execute(ExecutionRequest(command=ShellCommand(command="echo hi"))))
    os.kill(os.getpid(), signal.SIGKILL)  # its commits left in the -wal


asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a filesystem")
@pytest.mark.parametrize("left_by", ["a clean close", "a killed host"])
def test_history_show_and_logs_read_a_journal_on_a_read_only_filesystem(tmp_path: Path, left_by: str) -> None:
    """A backup, a read-only mount of a server's state: SQLite reads a WAL journal only through an -shm
    file it cannot make there, and the commands fell back to an engine, which cannot lock it."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        journal = mount / "journal.sqlite3"
        if left_by == "a clean close":
            words = ["run", "--journal", str(journal), "--log-dir", str(mount / "logs"), "--", "echo", "hi"]
            ran = cli(*words, tmp_path=tmp_path)
            assert ran.returncode == 0, ran.stderr
        else:
            host = [PYTHON, "-c", _DIES_WITHOUT_CLOSING, str(journal), str(mount / "logs")]
            assert subprocess.run(host, timeout=60, check=False).returncode == -signal.SIGKILL
            assert (mount / "journal.sqlite3-wal").stat().st_size > 0
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, timeout=30)
        listed = cli("history", "--json", "--journal", str(journal), tmp_path=tmp_path)
        assert listed.returncode == 0, listed.stderr
        [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
        shown = cli("show", "--journal", str(journal), entry["id"], tmp_path=tmp_path)
        logged = cli("logs", "--journal", str(journal), entry["id"], tmp_path=tmp_path)
        assert (shown.returncode, logged.returncode) == (0, 0), shown.stderr + logged.stderr
        assert "completed" in shown.stdout
        assert " stdout hi\n" in logged.stdout
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)

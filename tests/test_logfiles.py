"""Log files and their directory, against real files: nothing already at a log's name is written through."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from conftest import HELPERS, config, result_of, shell

from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionStatus, IoError
from cloudops_execution_engine.logfiles import open_log, prepare_log_dir, reopen_log, unlink_unless_in_use

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

VICTIM_TEXT = b"precious\n"
VICTIM_MODE = 0o644
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a file to another user")


@contextlib.contextmanager
def opened_log(path: str | bytes) -> Iterator[int]:
    fd = open_log(path)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    prepare_log_dir(directory)
    return directory


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM_TEXT)
    path.chmod(VICTIM_MODE)
    return path


def assert_untouched(victim: Path) -> None:
    """Same content, same mode, and no name but its own."""
    assert victim.read_bytes() == VICTIM_TEXT
    info = victim.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_nlink) == (VICTIM_MODE, 1)


def assert_owner_only_log(path: Path) -> None:
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_nlink) == (0o600, 1)


def assert_fresh_log(path: Path, fd: int) -> None:
    """`path` is now a regular file of its own, the one `fd` writes, and nothing else names it."""
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode)
    assert (info.st_dev, info.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    assert info.st_nlink == 1
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_a_new_log_is_owner_only_write_only_append_and_close_on_exec(log_dir: Path) -> None:
    """The descriptor a command's output is logged through: 0600, O_WRONLY|O_APPEND, not inherited."""
    path = log_dir / "new.log"
    with opened_log(str(path)) as fd:
        assert_fresh_log(path, fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_WRONLY
        assert flags & os.O_APPEND
        assert not os.get_inheritable(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_a_bytes_path_is_accepted(log_dir: Path) -> None:
    path = log_dir / "bytes.log"
    with opened_log(os.fsencode(path)) as fd:
        os.write(fd, b"line\n")
    assert path.read_bytes() == b"line\n"


def test_a_planted_hard_link_leaves_its_victim_untouched(log_dir: Path, victim: Path) -> None:
    """A hard link at the log's name is neither truncated, nor chmodded, nor written."""
    path = log_dir / "linked.log"
    os.link(victim, path)
    with opened_log(str(path)) as fd:
        os.write(fd, b"log line\n")
        assert_fresh_log(path, fd)
    assert_untouched(victim)
    assert path.read_bytes() == b"log line\n"


def test_a_planted_symlink_is_not_followed(log_dir: Path, victim: Path) -> None:
    """A symlink at the log's name is replaced; the file it pointed at is not opened."""
    path = log_dir / "symlinked.log"
    path.symlink_to(victim)
    with opened_log(str(path)) as fd:
        os.write(fd, b"log line\n")
        assert_fresh_log(path, fd)
    assert_untouched(victim)


def test_a_planted_dangling_symlink_creates_nothing_at_its_target(log_dir: Path, tmp_path: Path) -> None:
    """A symlink to a name that does not exist yet is not a way to create that name."""
    target = tmp_path / "elsewhere"
    path = log_dir / "dangling.log"
    path.symlink_to(target)
    with opened_log(str(path)) as fd:
        assert_fresh_log(path, fd)
    assert not target.exists()


def test_a_planted_fifo_does_not_block(log_dir: Path) -> None:
    """Opening a FIFO for writing would wait for a reader forever; the FIFO is replaced instead."""
    path = log_dir / "fifo.log"
    os.mkfifo(path)
    with opened_log(str(path)) as fd:
        assert_fresh_log(path, fd)


def test_a_rerun_of_the_same_id_starts_a_fresh_log(log_dir: Path) -> None:
    """The earlier log's inode is left as it was: a reader holding it still sees the earlier run."""
    path = log_dir / "rerun.log"
    with opened_log(str(path)) as fd:
        os.write(fd, b"first run\n")
    with path.open("rb") as earlier, opened_log(str(path)) as fd:
        os.write(fd, b"second run\n")
        assert_fresh_log(path, fd)
        assert earlier.read() == b"first run\n"
    assert path.read_bytes() == b"second run\n"


def test_a_directory_at_the_name_is_an_error_and_survives(log_dir: Path) -> None:
    path = log_dir / "dir.log"
    path.mkdir()
    (path / "inside").write_bytes(b"kept")
    with pytest.raises(OSError, match=r"directory|not permitted"):
        open_log(str(path))
    assert (path / "inside").read_bytes() == b"kept"


def test_a_name_taken_again_every_time_gives_up_with_the_error(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who recreates the name as fast as it is freed gets an error, not a loop or their file."""
    path = log_dir / "contested.log"
    path.write_bytes(b"theirs")
    real_unlink = os.unlink
    freed: list[str | bytes] = []

    def unlink_and_retake(name: str | bytes, *args: object, **kwargs: object) -> None:
        real_unlink(name)
        freed.append(name)
        Path(os.fsdecode(name)).write_bytes(b"theirs")

    monkeypatch.setattr(os, "unlink", unlink_and_retake)
    with pytest.raises(FileExistsError):
        open_log(str(path))
    monkeypatch.undo()
    assert len(freed) > 1
    assert path.read_bytes() == b"theirs"


def test_a_name_taken_once_more_is_freed_again(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = log_dir / "raced.log"
    path.write_bytes(b"old")
    real_unlink = os.unlink
    raced: list[str | bytes] = []

    def unlink_and_retake_once(name: str | bytes, *args: object, **kwargs: object) -> None:
        real_unlink(name)
        if not raced:
            raced.append(name)
            Path(os.fsdecode(name)).write_bytes(b"racer")

    monkeypatch.setattr(os, "unlink", unlink_and_retake_once)
    with opened_log(str(path)) as fd:
        monkeypatch.undo()
        assert_fresh_log(path, fd)
    assert raced
    assert path.read_bytes() == b""


def test_a_log_open_for_writing_is_not_deleted_by_a_sweep_until_it_is_closed(log_dir: Path) -> None:
    path = log_dir / f"{uuid4()}.log"
    with opened_log(str(path)) as fd:
        os.write(fd, b"being written\n")
        assert not unlink_unless_in_use(path)
        assert path.read_bytes() == b"being written\n"
    reopened = reopen_log(str(path))  # a retry's attempt holds it as well
    try:
        assert not unlink_unless_in_use(path)
    finally:
        os.close(reopened)
    assert unlink_unless_in_use(path)
    assert not path.exists()
    assert unlink_unless_in_use(path), "a log already gone is gone"


def test_a_log_a_sweep_deletes_as_it_is_created_is_made_again(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the creation and the lock a sweep may take the name: the log written is then a new one."""
    path = log_dir / f"{uuid4()}.log"
    real_open = os.open
    swept: list[bool] = []

    def open_then_sweep(name: str | bytes, flags: int, *args: int, **kwargs: int) -> int:
        fd = real_open(name, flags, *args, **kwargs)
        if flags & os.O_CREAT and not swept:
            swept.append(unlink_unless_in_use(Path(os.fsdecode(name))))
        return fd

    monkeypatch.setattr(os, "open", open_then_sweep)
    with opened_log(str(path)) as fd:
        monkeypatch.undo()
        assert swept == [True]
        assert_fresh_log(path, fd)
        assert not unlink_unless_in_use(path)


def test_the_log_of_a_process_killed_while_writing_it_is_free_to_delete(log_dir: Path) -> None:
    path = log_dir / f"{uuid4()}.log"
    code = (
        "import sys\nfrom cloudops_execution_engine.logfiles import open_log\n"
        "open_log(sys.argv[1])\nprint('open', flush=True)\nsys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as writer:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"open\n"
        assert not unlink_unless_in_use(path)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    assert unlink_unless_in_use(path)
    assert not path.exists()


def test_a_symlink_to_our_directory_is_a_log_directory(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    prepare_log_dir(link)
    assert link.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # it existed: used as it is


def test_a_symlink_to_a_missing_directory_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing", target_is_directory=True)
    with pytest.raises(IoError, match="cannot prepare log directory"):
        prepare_log_dir(link)
    assert not (tmp_path / "missing").exists()


def test_a_symlink_to_a_file_is_refused(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(IoError, match="cannot prepare log directory"):
        prepare_log_dir(link)
    assert_untouched(victim)


@needs_root
def test_a_symlink_to_another_users_directory_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    foreign.chmod(0o777)
    os.chown(foreign, NOBODY, NOBODY)
    link = tmp_path / "link"
    link.symlink_to(foreign, target_is_directory=True)
    with pytest.raises(IoError, match="belongs to another user"):
        prepare_log_dir(link)
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o777


@needs_root
def test_another_users_symlink_to_our_directory_is_refused(tmp_path: Path) -> None:
    """Whoever owns the link could point it at a directory of theirs after the check."""
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(ours, target_is_directory=True)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(IoError, match="symlink that belongs to another user"):
        prepare_log_dir(link)
    assert stat.S_IMODE(ours.stat().st_mode) == 0o755


async def test_an_engine_logs_through_a_symlinked_log_dir(tmp_path: Path) -> None:
    """A `log_dir` that is a symlink to our directory works end to end: run, log in the target, read_logs."""
    target = tmp_path / "real-logs"
    target.mkdir(mode=0o700)
    link = tmp_path / "logs-link"
    link.symlink_to(target, target_is_directory=True)
    marker = uuid4().hex
    async with ExecutionEngine(config(tmp_path, log_dir=link)) as engine:
        eid = await engine.execute(shell(f"echo {marker}"))
        result = await result_of(engine, eid, timeout=20)
        assert result.status is ExecutionStatus.COMPLETED
        assert f" stdout {marker}\n" in await engine.read_logs(eid)
    assert engine.get_log_path(eid) == link / f"{eid}.log"
    assert_owner_only_log(target / f"{eid}.log")


async def test_a_symlinked_log_dir_pointed_elsewhere_while_running_logs_where_it_points(
    tmp_path: Path,
) -> None:
    """A `current` link moved to a new directory of ours (a daily rotation): new logs follow it."""
    old, new = tmp_path / "old-logs", tmp_path / "new-logs"
    for directory in (old, new):
        directory.mkdir(mode=0o700)
    link = tmp_path / "current"
    link.symlink_to(old, target_is_directory=True)
    async with ExecutionEngine(config(tmp_path, log_dir=link, workers=1)) as engine:
        before = await result_of(engine, await engine.execute(shell("echo before")), timeout=20)
        moved = tmp_path / "current.new"
        moved.symlink_to(new, target_is_directory=True)
        moved.replace(link)  # atomically, as rotation tools do
        after = await result_of(engine, await engine.execute(shell("echo after")), timeout=20)
        assert (before.status, after.status) == (ExecutionStatus.COMPLETED, ExecutionStatus.COMPLETED)
        assert " stdout after\n" in await engine.read_logs(after.id)
    assert (old / f"{before.id}.log").exists()
    assert (new / f"{after.id}.log").exists()
    assert not (old / f"{after.id}.log").exists()


async def test_an_engine_never_writes_through_a_hard_link_at_a_logs_name(
    tmp_path: Path, victim: Path
) -> None:
    """A hard link planted at `<log_dir>/<id>.log` before the command starts: the victim is untouched."""
    async with ExecutionEngine(config(tmp_path)) as engine:
        request = shell("echo logged")
        planted = engine.get_log_path(request.id)
        os.link(victim, planted)
        result = await result_of(engine, await engine.execute(request), timeout=20)
        assert result.status is ExecutionStatus.COMPLETED
        assert " stdout logged\n" in await engine.read_logs(request.id)
    assert_untouched(victim)
    assert_owner_only_log(planted)


@pytest.mark.parametrize(("opener", "afterwards"), [(open_log, b""), (reopen_log, b"first run\n")])
def test_a_log_being_written_is_neither_taken_over_nor_appended_to_by_another_run_of_its_id(
    log_dir: Path, opener: Callable[[str], int], afterwards: bytes
) -> None:
    """A rerun (`open_log`) or a retry (`reopen_log`) of an id another run still logs is refused."""
    path = log_dir / f"{uuid4()}.log"
    with opened_log(str(path)) as fd:
        os.write(fd, b"first run\n")
        with pytest.raises(OSError, match="being written by a running execution of the same id"):
            opener(str(path))
        assert_fresh_log(path, fd)
        assert path.read_bytes() == b"first run\n"
    # Once that run has ended: a rerun starts a fresh log, a retry appends to it, as before.
    fd = opener(str(path))
    try:
        assert path.read_bytes() == afterwards
    finally:
        os.close(fd)


async def test_an_id_running_in_another_engine_on_the_same_directory_fails_here_and_not_there(
    tmp_path: Path,
) -> None:
    """Two engines, one log directory, one id: the second run fails clearly; the first keeps its log."""
    gate = tmp_path / "gate"
    first = shell(f"echo first; until [ -e {gate} ]; do sleep 0.01; done; echo end")
    async with ExecutionEngine(config(tmp_path)) as one, ExecutionEngine(config(tmp_path)) as two:
        await one.execute(first)
        log = one.get_log_path(first.id)
        deadline = time.monotonic() + 10
        while b"stdout first" not in (log.read_bytes() if log.exists() else b""):
            assert time.monotonic() < deadline, "the first run never wrote its first line"
            await asyncio.sleep(0.01)
        again = first.model_copy(update={"command": shell("echo second").command})
        second = await result_of(two, await two.execute(again), timeout=20)
        assert second.status is ExecutionStatus.FAILED
        assert second.error is not None
        assert "being written by a running execution of the same id" in second.error
        gate.touch()
        result = await result_of(one, first.id, timeout=20)
        assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "first\nend\n")
        logs = await one.read_logs(first.id)
        assert "stdout first" in logs
        assert "stdout end" in logs
        assert "second" not in logs


async def test_a_log_directory_removed_while_the_engine_runs_is_made_again(tmp_path: Path) -> None:
    """A temp cleaner (or a person) removes the log directory: the next commands log as before."""
    outer = tmp_path / "outer"
    async with ExecutionEngine(config(tmp_path, log_dir=outer / "logs", workers=1)) as engine:
        first = await result_of(engine, await engine.execute(shell("echo one")), timeout=20)
        shutil.rmtree(outer)  # the directory and the one holding it
        results = [await result_of(engine, await engine.execute(shell(f"echo {n}")), 20) for n in (2, 3)]
        assert [(r.status, r.error) for r in results] == [(ExecutionStatus.COMPLETED, None)] * 2
        assert "stdout 3" in await engine.read_logs(results[1].id)
        assert stat.S_IMODE(os.lstat(first.log_path.parent).st_mode) == 0o700


@needs_root
async def test_a_log_directory_another_user_put_in_place_of_ours_is_refused(tmp_path: Path) -> None:
    """Removed, then made again by someone else before our next command: nothing is written into it."""
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        first = await result_of(engine, await engine.execute(shell("echo one")), timeout=20)
        log_dir = first.log_path.parent
        shutil.rmtree(log_dir)
        log_dir.mkdir(mode=0o777)
        os.chown(log_dir, NOBODY, NOBODY)
        result = await result_of(engine, await engine.execute(shell("echo two")), timeout=20)
        assert result.status is ExecutionStatus.FAILED
        assert result.error is not None
        assert "cannot open log file" in result.error
        assert "belongs to another user" in result.error
        assert list(log_dir.iterdir()) == []


def test_a_log_the_disk_cannot_hold_is_said_to_be_incomplete_and_the_command_completes(
    tmp_path: Path,
) -> None:
    """A log write that fails (a full disk; here a file-size limit) costs the log's tail, and is said."""
    done = subprocess.run(
        [sys.executable, str(HELPERS / "small_files_host.py"), str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["status"], report["error"], report["stdout_lines"]) == ("completed", None, 20000)
    assert report["log_size"] <= 8192
    assert report["small_status"] == "completed"
    incomplete = [w for w in report["warnings"] if "incomplete" in w["message"]]
    assert len(incomplete) == 1, report["warnings"]
    assert report["id"] in incomplete[0]["message"]
    assert incomplete[0]["execution_id"] == report["id"]
    assert "File too large" in incomplete[0]["message"]


def test_the_parents_the_engine_makes_are_not_writable_by_others_whatever_the_umask(tmp_path: Path) -> None:
    """`mkdir -p` would make them 0777 under a umask of 000: anyone could swap the log directory out."""
    made = tmp_path / "a" / "b" / "logs"
    previous = os.umask(0)
    try:
        prepare_log_dir(made)
    finally:
        os.umask(previous)
    assert [stat.S_IMODE(d.stat().st_mode) for d in (made.parent.parent, made.parent, made)] == [
        0o755,
        0o755,
        0o700,
    ]


async def test_logs_and_directories_are_the_owners_to_use_under_a_umask_that_takes_the_owners_bits(
    tmp_path: Path,
) -> None:
    """A umask of 0777 made logs 0000 and parents 0000: unreadable by `read_logs`, nothing made inside."""
    log_dir = tmp_path / "a" / "b" / "logs"
    previous = os.umask(0o777)
    try:
        async with ExecutionEngine(config(tmp_path, log_dir=log_dir, workers=1)) as engine:
            execution_id = await engine.execute(shell("echo readable"))
            await result_of(engine, execution_id, 20)
            log = engine.get_log_path(execution_id)
            modes = [
                stat.S_IMODE(p.stat().st_mode) for p in (log, log_dir, log_dir.parent, log_dir.parent.parent)
            ]
            assert "stdout readable" in await engine.read_logs(execution_id)
    finally:
        os.umask(previous)
    assert [oct(mode) for mode in modes] == [oct(0o600), oct(0o700), oct(0o700), oct(0o700)]


def test_a_directory_the_engine_makes_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    made = tmp_path / "made" / "logs"
    previous = os.umask(0o277)
    try:
        prepare_log_dir(made)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o1777, 0o750, 0o775, 0o770])
def test_an_existing_directory_is_used_as_it_is(tmp_path: Path, mode: int) -> None:
    """A `log_dir` the host named may be shared (its home, its project, /tmp): its mode is not ours."""
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(mode)
    prepare_log_dir(existing)
    assert stat.S_IMODE(existing.stat().st_mode) == mode


@pytest.mark.parametrize("mode", [0o777, 0o703, 0o722])
def test_an_existing_directory_any_user_may_replace_files_in_is_refused(tmp_path: Path, mode: int) -> None:
    """Without the sticky bit, whoever may write the directory may replace a log with one of theirs."""
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(mode)
    with pytest.raises(IoError, match=f"log directory {existing} may be written by any user"):
        prepare_log_dir(existing)
    assert stat.S_IMODE(existing.stat().st_mode) == mode


async def test_a_relative_log_dir_is_the_hosts_and_is_left_as_it_is(tmp_path: Path) -> None:
    """`log_dir="."` or `"logs"`: relative to the host's directory when the engine was made, as a path is."""
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    (project / "logs").mkdir(mode=0o755)
    before = os.getcwd()
    os.chdir(project)
    try:
        for relative in (".", "logs"):
            async with ExecutionEngine(config(tmp_path, log_dir=Path(relative), workers=1)) as engine:
                os.chdir(tmp_path)  # where the host is later does not matter
                result = await result_of(engine, await engine.execute(shell("echo here")), timeout=20)
                assert result.log_path == project / relative / f"{result.id}.log"
                assert engine.get_log_path(result.id) == result.log_path
                assert " stdout here\n" in await engine.read_logs(result.id)
                os.chdir(project)
    finally:
        os.chdir(before)
    assert stat.S_IMODE(project.stat().st_mode) == 0o755
    assert stat.S_IMODE((project / "logs").stat().st_mode) == 0o755


async def test_a_log_dir_under_the_home_directory_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for the journal: `~/logs` is the home directory's, not a directory named `~` where the host is."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    async with ExecutionEngine(config(tmp_path, log_dir=Path("~/logs"), workers=1)) as engine:
        result = await result_of(engine, await engine.execute(shell("echo home")), timeout=20)
    assert result.log_path == tmp_path / "home" / "logs" / f"{result.id}.log"
    assert result.log_path.is_file()
    assert not (tmp_path / "~").exists()


async def test_a_log_directory_whose_name_is_not_utf8_is_refused_at_start(tmp_path: Path) -> None:
    """A Latin-1 name: no result's JSON, journal row or event could hold its logs' paths; said at once."""
    log_dir = tmp_path / os.fsdecode(b"caf\xe9")
    engine = ExecutionEngine(ExecutionConfig(log_dir=log_dir, journal=tmp_path / "journal.sqlite3"))
    with pytest.raises(IoError, match=r"log directory .*caf\\xe9 is not valid UTF-8"):
        await engine.start()
    assert os.listdir(tmp_path) == [], "made something though it refused to start"

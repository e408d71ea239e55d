"""Fault suite: nothing a command, a worker or a caller does can crash, hang or leak into the host.

Injected faults are real: signals to real processes, bytes written into the
real pipe from a worker to the supervisor, commands that flood or abuse their
output. Each test says what a user would check afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import signal
import struct
import threading
from pathlib import Path
from uuid import UUID, uuid4

import psutil
import pytest
from conftest import HELPERS, PYTHON, Recorder, config, gone, host_children, open_fds, result_of, run, shell

from cloudops_execution_engine import (
    ExecutionEngine,
    ExecutionResult,
    ExecutionStatus,
    InvalidCommand,
    IoError,
    NotFound,
)
from cloudops_execution_engine.protocol import Kind, encode_frame

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_leaks")]

MIB = 1024 * 1024


async def worker_pid(engine: ExecutionEngine) -> int:
    result = await engine.wait(await engine.execute(shell("echo $PPID")), timeout=30)
    assert isinstance(result, ExecutionResult)
    return int(result.stdout)


def worker_to_supervisor_pipe(worker: int) -> str:
    """The /proc path of the worker's write end of the pipe the supervisor reads from."""
    mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() if open_fds()[fd].startswith("pipe:")}
    for name in os.listdir(f"/proc/{worker}/fd"):
        path = f"/proc/{worker}/fd/{name}"
        target = os.readlink(path)
        with open(f"/proc/{worker}/fdinfo/{name}") as info:
            flags = int(info.read().split("flags:")[1].split()[0], 8)
        if target in mine and flags & os.O_ACCMODE == os.O_WRONLY:
            return path
    raise AssertionError("no pipe from the worker to this process")


def inject(worker: int, data: bytes) -> None:
    """Write `data` into the pipe as if the worker had sent it."""
    with open(worker_to_supervisor_pipe(worker), "wb", buffering=0) as pipe:
        pipe.write(data)


INJECTORS: dict[str, bytes] = {
    "garbage bytes": struct.pack(">I", 3) + b"\xc1\xc1\xc1",
    "oversized frame": struct.pack(">I", 2**31),
    "type-confused message": encode_frame([Kind.STARTED, "not-an-id", "pid", None]),
    "unknown message kind": encode_frame([77, 1, 2]),
    "not an array": encode_frame({"kind": "finished"}),
}


@pytest.mark.parametrize("injector", list(INJECTORS))
async def test_bad_frames_from_a_worker_never_crash_the_supervisor(
    tmp_path: Path, recorder: Recorder, injector: str
) -> None:
    """A malformed frame marks its sender dead; its executions fail clearly; the engine serves on."""
    async with ExecutionEngine(config(tmp_path, workers=1)).with_event_handler(recorder) as engine:
        worker = await worker_pid(engine)
        victim = await engine.execute(shell("echo up; exec sleep 60"))
        await recorder.until(lambda _: "stdout" in recorder.types_of(victim))
        inject(worker, INJECTORS[injector])
        result = await result_of(engine, victim, timeout=30)
        assert result.status is ExecutionStatus.FAILED
        assert result.error is not None
        assert result.error.startswith(f"Worker process {worker} died (sent a malformed message")
        assert gone(worker)
        after = await engine.execute(run("echo", "served"))
        assert (await engine.wait(after, timeout=30)).stdout == "served\n"  # type: ignore[union-attr]


async def test_a_finished_frame_for_an_unknown_id_is_ignored(tmp_path: Path) -> None:
    """A well-formed message about an execution the supervisor does not know changes nothing."""
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        worker = await worker_pid(engine)
        stray = [
            Kind.FINISHED,
            uuid4().bytes,
            "completed",
            0,
            "",
            "",
            False,
            False,
            1.0,
            2.0,
            None,
            None,
            None,
        ]
        inject(worker, encode_frame(stray))
        assert (
            await engine.wait(await engine.execute(run("true")), timeout=30)
        ).status is ExecutionStatus.COMPLETED
        assert not gone(worker)


@pytest.mark.slow
async def test_worker_killed_with_many_executions_in_flight_many_times(
    tmp_path: Path, recorder: Recorder
) -> None:
    """Ten SIGKILLs in a row: each held execution fails naming the death, trees go, the registry keeps all."""
    submitted: list[UUID] = []
    async with ExecutionEngine(config(tmp_path, workers=2, max_concurrent_executions=8)).with_event_handler(
        recorder
    ) as engine:
        for _ in range(10):
            batch = [await engine.execute(shell("echo up; sleep 60 & wait")) for _ in range(6)]
            submitted += batch
            await recorder.until(lambda _: all("stdout" in recorder.types_of(e) for e in batch))  # noqa: B023
            victim = await worker_pid(engine)
            children = [p for p in psutil.Process(victim).children(recursive=True)]
            os.kill(victim, signal.SIGKILL)
            for eid in batch:
                if await engine.get_status(eid) is ExecutionStatus.RUNNING:
                    try:
                        await engine.wait(eid, timeout=0.5)
                    except TimeoutError:
                        await engine.cancel(eid)
            results = [await result_of(engine, eid, timeout=30) for eid in batch]
            died = [r for r in results if r.status is ExecutionStatus.FAILED]
            assert died, "the killed worker held none of the batch"
            expected = f"Worker process {victim} died (killed by signal SIGKILL(-9))"
            for r in died:
                assert r.error == f"{expected} while running this execution"
            assert all(gone(p.pid) for p in children), "a dead worker's commands survived it"
        listed = {s.id for s in await engine.list_executions()}
        assert set(submitted) <= listed
        final = await engine.execute(run("echo", "alive"))
        assert (await engine.wait(final, timeout=30)).stdout == "alive\n"  # type: ignore[union-attr]


async def test_no_zombies_remain_under_the_worker(engine: ExecutionEngine, recorder: Recorder) -> None:
    """After a cancelled tree, the worker has reaped every process it adopted."""
    eid = await engine.execute(run(PYTHON, str(HELPERS / "tree.py")))
    await recorder.until(lambda _: sum(e.event_type == "stdout" for e in recorder.of(eid)) == 3)
    worker = psutil.Process(psutil.Process(int(recorder.of(eid)[1].line.split()[1])).ppid()).pid
    await engine.cancel(eid)
    await engine.wait(eid, timeout=30)
    zombies = [
        p for p in psutil.Process(worker).children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE
    ]
    assert zombies == []


# -- output abuse ------------------------------------------------------------


@pytest.mark.slow
async def test_one_gib_of_stdout_keeps_host_memory_bounded(tmp_path: Path) -> None:
    """1 GiB of 80-byte lines: the result is truncated, the log complete, host RSS barely moves."""
    me = psutil.Process()
    async with ExecutionEngine(config(tmp_path, stream_output=False, max_output_bytes=4 * MIB)) as engine:
        await engine.wait(await engine.execute(run("true")), timeout=30)
        before = me.memory_info().rss
        line = "x" * 79
        eid = await engine.execute(shell(f"yes {line} | head -c {1024 * MIB}"))
        result = await engine.wait(eid, timeout=150)
        growth = me.memory_info().rss - before
    assert isinstance(result, ExecutionResult)
    assert result.status is ExecutionStatus.COMPLETED
    assert len(result.stdout) == 4 * MIB
    assert result.stdout_truncated
    assert growth < 64 * MIB, f"host grew by {growth / MIB:.0f} MiB"
    with engine.get_log_path(eid).open("rb") as log:
        lines = sum(1 for text in log if text.endswith(b" " + line.encode() + b"\n"))
    assert lines == 1024 * MIB // 80


async def test_fifty_mib_line_without_newline(tmp_path: Path, recorder: Recorder) -> None:
    """A 50 MiB line arrives in 1 MiB pieces; nothing grows without bound; the log has every byte."""
    me = psutil.Process()
    async with ExecutionEngine(config(tmp_path, max_output_bytes=MIB)).with_event_handler(recorder) as engine:
        before = me.memory_info().rss
        eid = await engine.execute(shell(f"head -c {50 * MIB} /dev/zero | tr '\\0' 'y'"))
        result = await engine.wait(eid, timeout=120)
        await recorder.until_final(eid)
        growth = me.memory_info().rss - before
    pieces = [e.line for e in recorder.of(eid) if e.event_type == "stdout"]
    assert sum(len(p) for p in pieces) == 50 * MIB
    assert max(len(p) for p in pieces) <= MIB
    assert isinstance(result, ExecutionResult)
    assert result.stdout_truncated
    assert len(result.stdout) == MIB
    logged = [
        line.split(b" stdout ", 1)[1]
        for line in engine.get_log_path(eid).read_bytes().splitlines()
        if b" stdout " in line
    ]
    assert b"".join(logged) == b"y" * (50 * MIB)
    assert growth < 200 * MIB


async def test_binary_output_is_decoded_with_replacement(engine: ExecutionEngine) -> None:
    eid = await engine.execute(shell("head -c 200000 /dev/urandom; printf '\\xff\\xfe end\\n'"))
    result = await engine.wait(eid, timeout=30)
    assert isinstance(result, ExecutionResult)
    assert result.status is ExecutionStatus.COMPLETED
    assert result.stdout.endswith("\ufffd\ufffd end\n")
    assert engine.get_log_path(eid).stat().st_size > 200000


@pytest.mark.parametrize("carriage_returns", [False, True], ids=["lf", "crlf-and-lone-cr"])
async def test_lines_cut_anywhere_by_reads_arrive_whole_in_events_and_log(
    engine: ExecutionEngine, recorder: Recorder, carriage_returns: bool
) -> None:
    """Lines written in random pieces come out the same in events and log, CRLF endings as LF.

    The pieces are separate writes, so the worker's reads end at arbitrary points: inside a
    line, between a CR and its LF, right after a newline.
    """
    rng = random.Random(3)
    alphabet = "abcxyz \t" + ("\r" if carriage_returns else "")
    lines = []
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120))).rstrip("\r")
        lines.append(text)
    endings = [rng.choice(["\n", "\r\n"] if carriage_returns else ["\n"]) for _ in lines]
    payload = "".join(text + end for text, end in zip(lines, endings, strict=True)).encode()
    source = engine.config.log_dir / "payload.bin"  # type: ignore[operator]
    source.write_bytes(payload)
    script = (
        "import os, random, sys\n"
        f"data = open({str(source)!r}, 'rb').read()\n"
        "rng, at = random.Random(5), 0\n"
        "while at < len(data):\n"
        "    step = rng.choice([1, 2, 7, 100, 4096, 65535, 65536, 70000])\n"
        "    at += os.write(1, data[at:at + step])\n"
    )
    eid = await engine.execute(run(PYTHON, "-c", script))
    result = await engine.wait(eid, timeout=60)
    await recorder.until_final(eid, timeout=60)
    assert isinstance(result, ExecutionResult)
    assert result.status is ExecutionStatus.COMPLETED, result.error
    assert [e.line for e in recorder.of(eid) if e.event_type == "stdout"] == lines
    entries = engine.get_log_path(eid).read_bytes().decode().split("\n")
    assert entries.pop() == ""  # the log ends with a newline
    tagged = [entry for entry in entries if not entry.startswith("# ")]
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z stdout ")
    assert all(stamp.match(entry) for entry in tagged)
    assert [stamp.sub("", entry, count=1) for entry in tagged] == lines


async def test_interleaved_floods_keep_each_streams_order(
    engine: ExecutionEngine, recorder: Recorder
) -> None:
    n = 20000
    eid = await engine.execute(
        run(
            PYTHON,
            "-c",
            f"import sys\nfor i in range({n}):\n print(f'o{{i}}'); print(f'e{{i}}', file=sys.stderr)",
        )
    )
    await engine.wait(eid, timeout=60)
    await recorder.until_final(eid, timeout=60)
    events = recorder.of(eid)
    assert [e.line for e in events if e.event_type == "stdout"] == [f"o{i}" for i in range(n)]
    assert [e.line for e in events if e.event_type == "stderr"] == [f"e{i}" for i in range(n)]


# -- soak ------------------------------------------------------------------------


@pytest.mark.slow
async def test_soak_ten_thousand_mixed_executions_return_to_baseline(tmp_path: Path) -> None:
    """10,000 executions (success, failure, timeout, cancel): fds, threads, children and memory settle."""
    me = psutil.Process()
    rng = random.Random(7)
    cfg = config(tmp_path, max_concurrent_executions=10, max_retained_executions=500, kill_grace_ms=200)
    async with ExecutionEngine(cfg) as engine:
        await engine.wait(await engine.execute(run("true")), timeout=30)
        gc.collect()
        fds, threads, rss = len(open_fds()), threading.active_count(), me.memory_info().rss
        children = host_children()
        counts: dict[str, int] = {}
        pending: list[UUID] = []
        for _ in range(10_000):
            roll = rng.random()
            if roll < 0.80:
                request = run("true")
            elif roll < 0.92:
                request = run("false")
            elif roll < 0.96:
                request = run("sleep", "5", timeout_ms=30)
            else:
                request = run("sleep", "5")
            eid = await engine.execute(request)
            if roll >= 0.96:
                await engine.cancel(eid)
            pending.append(eid)
            if len(pending) >= 50:
                for item in pending:
                    status = (await engine.wait(item, timeout=60)).status
                    counts[status.value] = counts.get(status.value, 0) + 1
                pending.clear()
        for item in pending:
            status = (await engine.wait(item, timeout=60)).status
            counts[status.value] = counts.get(status.value, 0) + 1
        gc.collect()
        assert sum(counts.values()) == 10_000
        assert set(counts) == {"completed", "failed", "timeout", "cancelled"}
        assert len(open_fds()) <= fds
        assert threading.active_count() <= threads
        assert host_children() == children
        growth = me.memory_info().rss - rss
        assert growth < 32 * MIB, f"host grew by {growth / MIB:.1f} MiB over 10,000 executions"
        assert len(await engine.list_executions()) == 500


# -- handlers and subscribers -------------------------------------------------------


async def test_handlers_added_and_removed_while_running(engine: ExecutionEngine) -> None:
    late, leaving = Recorder(), Recorder()
    engine.with_event_handler(leaving)
    first = await engine.execute(shell("echo a"))
    await leaving.until_final(first)
    engine.remove_event_handler(leaving)
    engine.with_event_handler(late)
    second = await engine.execute(shell("echo b"))
    await late.until_final(second)
    assert late.types_of(second) == ["started", "stdout", "completed"]
    assert leaving.types_of(second) == []
    with pytest.raises(ValueError, match="not an event handler"):
        engine.remove_event_handler(leaving)


async def test_event_iterators_that_stop_early_do_not_disturb_others(engine: ExecutionEngine) -> None:
    eid = await engine.execute(shell("for i in 1 2 3 4 5; do echo $i; sleep 0.05; done"))

    async def first_line() -> str:
        async for event in engine.events(eid):
            if event.event_type == "stdout":
                return event.line
        return ""

    async def everything() -> list[str]:
        return [e.event_type async for e in engine.events(eid)]

    early, full = await asyncio.gather(first_line(), everything())
    assert early == "1"
    assert full == ["started", *["stdout"] * 5, "completed"]


# -- bad requests -------------------------------------------------------------------


async def test_bad_request_shapes_are_contract_errors(engine: ExecutionEngine, tmp_path: Path) -> None:
    with pytest.raises(InvalidCommand, match="env"):
        await engine.execute({"command": {"type": "exec", "program": "true"}, "env": {"A": 1}})  # type: ignore[arg-type]
    with pytest.raises(InvalidCommand, match="timeout_ms"):
        await engine.execute({"command": {"type": "exec", "program": "true"}, "timeout_ms": "soon"})  # type: ignore[arg-type]
    with pytest.raises(InvalidCommand, match="command"):
        await engine.execute({"command": {"type": "teleport"}})  # type: ignore[arg-type]


async def test_non_executable_program_fails_clearly(engine: ExecutionEngine, tmp_path: Path) -> None:
    target = tmp_path / "plain.txt"
    target.write_text("echo hi\n")
    result = await result_of(engine, await engine.execute(run(str(target))), timeout=30)
    assert result.status is ExecutionStatus.FAILED
    assert result.error == f"Process spawn failed: Permission denied: {target}"


# -- security -------------------------------------------------------------------------


async def test_environment_values_never_reach_logs_or_events(
    engine: ExecutionEngine, recorder: Recorder
) -> None:
    secret = "tok-" + uuid4().hex
    eid = await engine.execute(run("true", env={"API_TOKEN": secret}))
    await engine.wait(eid, timeout=30)
    await recorder.until_final(eid)
    assert secret not in await engine.read_logs(eid)
    assert all(secret not in event.model_dump_json() for event in recorder.of(eid))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "..", "x/../../y"])
async def test_an_id_cannot_make_a_log_path_escape(engine: ExecutionEngine, bad: str) -> None:
    with pytest.raises(NotFound):
        engine.get_log_path(bad)
    with pytest.raises(NotFound):
        await engine.read_logs(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
async def test_a_log_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, 65534, 65534)
    engine = ExecutionEngine(config(tmp_path, log_dir=foreign))
    with pytest.raises(IoError, match="belongs to another user"):
        await engine.execute(run("true"))
    await engine.shutdown()


async def test_a_burst_of_exits_prints_nothing_to_the_hosts_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Hundreds of commands ending at once: all reaped, and no signal-pipe warnings on stderr."""
    async with ExecutionEngine(config(tmp_path, workers=1, max_concurrent_executions=2000)) as engine:
        ids = [await engine.execute(run("true")) for _ in range(2000)]
        results = [await engine.wait(eid, timeout=60) for eid in ids]
    assert {r.status for r in results} == {ExecutionStatus.COMPLETED}
    _, err = capfd.readouterr()
    assert "wakeup fd" not in err


_START_WITH_FEW_DESCRIPTORS = """
import asyncio, os, resource, sys
from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionError

leave, journal, log_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def main():
    config = ExecutionConfig(workers=1, log_dir=log_dir, journal=journal)
    first = ExecutionEngine(config)
    taken = []
    try:
        while True:
            taken.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for _ in range(leave):
        os.close(taken.pop())
    try:
        await first.start()
        said = "started"
    except ExecutionError as exc:
        said = "refused"
    except BaseException as exc:
        said = f"raised {type(exc).__name__}: {exc}"
    for fd in taken:
        os.close(fd)
    await first.shutdown()
    second = ExecutionEngine(config)
    try:
        await second.start()
        print(said, "then free")
    except ExecutionError as exc:
        print(said, "then held:", exc)
    finally:
        await second.shutdown()


asyncio.run(main())
"""


@pytest.mark.timeout(240)
def test_a_start_with_few_descriptors_left_fails_with_our_errors_and_leaves_the_journal_free(
    tmp_path: Path,
) -> None:
    """With a handful of descriptors left, the lazy import of OpenTelemetry raised a bare OSError (EMFILE).

    And whatever failed between opening the journal and starting the workers
    kept the journal's lock: every later engine of the process was refused.
    """
    import subprocess

    said = []
    for leave in range(12):
        journal = tmp_path / f"journal-{leave}.sqlite3"
        done = subprocess.run(
            [PYTHON, "-c", _START_WITH_FEW_DESCRIPTORS, str(leave), str(journal), str(tmp_path / "logs")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        said.append(f"{leave} left: {done.stdout.strip() or done.stderr.strip()[-300:]}")
    assert all(line.split(": ", 1)[1] in ("started then free", "refused then free") for line in said), said

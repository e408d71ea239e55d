"""`ResourceLimits`: set before the command runs, on every way a command starts, named when they stop it.

The first tests start commands directly, the spawner's way, the C helper's way
and the fork fallback's, and expect the same limits, nice value, CPU set and
errors from each. The rest run through the engine and check what a user sees:
the command stopped, its execution `failed`, the error naming the limit.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
from pathlib import Path

import pytest
from conftest import PYTHON, config, result_of, run, shell, spawn_and_read

from cloudops_execution_engine import (
    ExecutionEngine,
    ExecutionStatus,
    InvalidCommand,
    ResourceLimits,
)
from cloudops_execution_engine.actors.limits import LimitRefused, command_settings, stopped_by
from cloudops_execution_engine.actors.spawning import spawn

pytestmark = pytest.mark.timeout(30)

SH = shutil.which("sh") or "/bin/sh"
NR_OPEN = int(Path("/proc/sys/fs/nr_open").read_text())
RESOURCES = {
    "memory_bytes": resource.RLIMIT_AS,
    "cpu_seconds": resource.RLIMIT_CPU,
    "open_files": resource.RLIMIT_NOFILE,
    "processes": resource.RLIMIT_NPROC,
    "file_size_bytes": resource.RLIMIT_FSIZE,
}
SETPRIV = shutil.which("setpriv")
NOBODY = 65534


def _limits_of(text: str) -> dict[str, tuple[str, str]]:
    """/proc/<pid>/limits as {name: (soft, hard)}."""
    found = {}
    for line in text.splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        found[name] = (soft, hard)
    return found


def test_every_setting_reaches_the_command(way: str) -> None:
    """The rlimits `command_settings` builds, the nice increment and the CPU set are the command's own."""
    wanted = {
        "memory_bytes": 1 << 30,
        "cpu_seconds": 50,
        "open_files": 99,
        "processes": 77,
        "file_size_bytes": 123456,
        "nice": 3,
    }
    limits, nice, cpus = command_settings(wanted, [0], ())
    base_nice = os.getpriority(os.PRIO_PROCESS, 0)
    script = (
        "cat /proc/self/limits; echo; cut -d' ' -f19 /proc/self/stat;"
        " grep Cpus_allowed_list /proc/self/status"
    )
    code, out, err = spawn_and_read([SH, "-c", script], limits=limits, nice=nice, affinity=cpus)
    assert code == 0, err
    table, stat = out.split("\n\n")
    got = _limits_of(table)
    assert got["Max address space"] == (str(1 << 30), str(1 << 30))
    # One second of hard limit past the soft one: SIGXCPU first, SIGKILL only if it is ignored.
    assert got["Max cpu time"] == ("50", "51")
    assert got["Max open files"] == ("99", "99")
    assert got["Max processes"] == ("77", "77")
    assert got["Max file size"] == ("123456", "123456")
    nice_line, cpus_line = stat.split("\n")[:2]
    assert int(nice_line) == base_nice + 3
    assert cpus_line.split()[-1] == "0"


def test_the_stdin_pipe_is_the_commands_input(way: str) -> None:
    """Given a pipe's read end, the command reads it as fd 0 (the caller keeps and closes its own copy)."""
    stdin_r, stdin_w = os.pipe()
    try:
        pid, out_fd, err_fd = spawn([SH, "-c", "cat; echo done"], [], b"/", os.defpath, (), stdin_r)
    finally:
        os.close(stdin_r)
    os.write(stdin_w, b"fed through the pipe\n")
    os.close(stdin_w)
    os.set_blocking(out_fd, True)
    chunks = []
    while chunk := os.read(out_fd, 65536):
        chunks.append(chunk)
    os.close(out_fd)
    os.close(err_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"".join(chunks) == b"fed through the pipe\ndone\n"


def test_a_limit_the_kernel_refuses_is_a_clear_start_failure(way: str) -> None:
    """A limit that fails in the child is an OSError that says a limit was refused, on every way."""
    ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
    with pytest.raises(OSError, match="cannot apply the command's limits") as info:
        spawn_and_read([SH, "-c", "true"], limits=((resource.RLIMIT_NOFILE, ceiling + 1, ceiling + 1),))
    assert info.value.errno is not None


def test_the_worker_names_a_limit_it_cannot_apply() -> None:
    """CPUs the worker may not use and an fd limit above the kernel's ceiling are refused by name."""
    with pytest.raises(LimitRefused, match=r"cpu_affinity names CPU\(s\) \[1000\]"):
        command_settings({}, [1000], ())
    with pytest.raises(LimitRefused, match=r"open_files=.* fs\.nr_open"):
        command_settings({"open_files": 2**40}, [], ())


# -- through the engine ---------------------------------------------------------


async def test_cpu_seconds_stops_a_busy_command(engine: ExecutionEngine) -> None:
    """A command that burns CPU past cpu_seconds=1 ends failed with "CPU time limit exceeded"."""
    request = run(PYTHON, "-c", "while True: pass", limits=ResourceLimits(cpu_seconds=1), timeout_ms=20_000)
    result = await result_of(engine, await engine.execute(request), 25)
    assert result.status is ExecutionStatus.FAILED
    assert result.error == "CPU time limit exceeded"
    assert result.resource_usage is not None
    # About the second it was allowed (the kernel's accounting and rusage's sampling differ a little).
    assert result.resource_usage.user_cpu_s + result.resource_usage.system_cpu_s >= 0.5


async def test_cpu_seconds_is_named_when_a_shell_reports_its_child(engine: ExecutionEngine) -> None:
    """A shell's 128+SIGXCPU for a child the limit stopped names the limit too."""
    script = f"{PYTHON} -c 'while True: pass'; exit $?"
    request = shell(script, limits=ResourceLimits(cpu_seconds=1), timeout_ms=20_000)
    result = await result_of(engine, await engine.execute(request), 25)
    assert (result.status, result.error) == (ExecutionStatus.FAILED, "CPU time limit exceeded")


async def test_memory_bytes_stops_an_allocation(engine: ExecutionEngine) -> None:
    """Past memory_bytes (RLIMIT_AS) an allocation fails: Python raises MemoryError and exits 1."""
    code = "x = bytearray(512 * 1024 * 1024); print('allocated')"
    request = run(PYTHON, "-c", code, limits=ResourceLimits(memory_bytes=256 * 1024 * 1024))
    result = await result_of(engine, await engine.execute(request), 20)
    assert result.status is ExecutionStatus.FAILED
    assert "MemoryError" in result.stderr
    assert "allocated" not in result.stdout
    assert result.error == "Command failed with exit code 1"
    unlimited = await result_of(engine, await engine.execute(run(PYTHON, "-c", code)), 20)
    assert unlimited.stdout == "allocated\n", "the same command runs without the limit"


async def test_file_size_bytes_stops_a_writer(engine: ExecutionEngine, tmp_path: Path) -> None:
    """Writing past file_size_bytes ends the command by SIGXFSZ: "File size limit exceeded"."""
    target = tmp_path / "big"
    # dd, not Python: Python ignores SIGXFSZ and sees EFBIG from write() instead.
    request = run(
        "dd", "if=/dev/zero", f"of={target}", "bs=1000", "count=100",
        limits=ResourceLimits(file_size_bytes=10_000),
    )  # fmt: skip
    result = await result_of(engine, await engine.execute(request), 20)
    assert (result.status, result.error) == (ExecutionStatus.FAILED, "File size limit exceeded")
    assert result.exit_code == -25
    assert target.stat().st_size == 10_000


async def test_open_files_limits_descriptors(engine: ExecutionEngine) -> None:
    """With open_files=20 the command cannot hold 50 files open."""
    code = "import sys\nfs = [open('/dev/null') for _ in range(50)]\nprint(len(fs))"
    result = await result_of(
        engine, await engine.execute(run(PYTHON, "-c", code, limits=ResourceLimits(open_files=20))), 20
    )
    assert result.status is ExecutionStatus.FAILED
    assert "Too many open files" in result.stderr


@pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is needed to leave root")
async def test_processes_stops_a_fork_loop(engine: ExecutionEngine) -> None:
    """processes=N (RLIMIT_NPROC) stops a command forking past N processes of its user.

    The kernel does not hold root to RLIMIT_NPROC, so as root the command
    first gives up root with setpriv, keeping the limit the engine set; the
    fork loop then runs as an unprivileged user, as it would for a host that
    is not root.
    """
    loop = (
        "import os, sys, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 200:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    print(n, exc.errno, file=sys.stderr); sys.exit(7)\n"
        "print(n)\n"
    )
    argv = [PYTHON, "-c", loop]
    if os.geteuid() == 0:
        assert SETPRIV is not None
        argv = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    request = run(*argv, limits=ResourceLimits(processes=10), timeout_ms=20_000)
    result = await result_of(engine, await engine.execute(request), 25)
    assert result.status is ExecutionStatus.FAILED, result.stdout
    assert result.exit_code == 7
    forked, errno_value = result.stderr.split()[-2:]
    assert int(forked) < 10
    assert int(errno_value) == 11  # EAGAIN: the limit, not anything else


async def test_nice_and_cpu_affinity_reach_the_command(engine: ExecutionEngine) -> None:
    """nice=7 lowers the command's priority by 7; cpu_affinity=[0] pins it to CPU 0."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    request = run(
        PYTHON,
        "-c",
        "import os; print(os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)))",
        limits=ResourceLimits(nice=7, cpu_affinity=[0]),
    )
    result = await result_of(engine, await engine.execute(request), 20)
    assert result.status is ExecutionStatus.COMPLETED, result.error
    assert result.stdout == f"{min(base + 7, 19)} [0]\n"


async def test_a_limit_the_node_cannot_grant_fails_by_name(engine: ExecutionEngine) -> None:
    """A CPU the worker may not use fails the execution with an error that names the setting."""
    cpus = len(os.sched_getaffinity(0))
    request = run("true", limits=ResourceLimits(cpu_affinity=[cpus + 5]))
    result = await result_of(engine, await engine.execute(request), 20)
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert f"cpu_affinity names CPU(s) [{cpus + 5}]" in result.error


def test_a_limit_above_the_workers_hard_one_is_refused_by_name_without_the_capability_to_raise_it() -> None:
    """Root in a container without CAP_SYS_RESOURCE may not raise a hard limit: the refusal names it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    capable = int(Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0], 16) >> 24 & 1
    if capable or hard == resource.RLIM_INFINITY:
        with contextlib.suppress(LimitRefused):  # above the kernel's ceiling is still refused
            command_settings({"open_files": hard + 1}, [], ())
        pytest.skip("this process may raise its hard limits")
    with pytest.raises(LimitRefused, match=rf"open_files={hard + 1} is above the hard limit {hard}"):
        command_settings({"open_files": hard + 1}, [], ())


async def test_limits_out_of_range_are_refused_at_execute(engine: ExecutionEngine) -> None:
    """An empty CPU list, a CPU beyond any mask, or a limit past what setrlimit takes: InvalidCommand."""
    for limits in (
        ResourceLimits(cpu_affinity=[]),
        ResourceLimits(cpu_affinity=[4096]),
        ResourceLimits(memory_bytes=2**63),
    ):
        with pytest.raises(InvalidCommand, match="limits"):
            await engine.execute(run("true", limits=limits))


async def test_the_largest_limits_allowed_run_and_leave_the_worker_to_others(tmp_path: Path) -> None:
    """Each limit at the largest value validation lets through runs, on the one worker another command shares.

    The CPU limit's hard value is one second more than asked: past what
    setrlimit takes, it is the largest there is, not a worker's crash.
    """
    largest = 2**63 - 1
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        other = await engine.execute(shell("read line; echo $line", stdin="still here\n"))
        for name in RESOURCES:
            # Bounded by the worker's own hard limit (raising it takes CAP_SYS_RESOURCE), and
            # descriptors by the kernel's ceiling.
            hard = resource.getrlimit(RESOURCES[name])[1]
            value = largest if hard == resource.RLIM_INFINITY else hard
            if name == "open_files":
                value = min(value, NR_OPEN)
            limited = shell("ulimit -t", limits=ResourceLimits(**{name: value}))
            result = await result_of(engine, await engine.execute(limited), 20)
            assert (name, result.status, result.error) == (name, ExecutionStatus.COMPLETED, None)
        assert (await result_of(engine, other, 20)).stdout == "still here\n"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux limits")
async def test_limits_apply_to_what_the_command_starts(engine: ExecutionEngine) -> None:
    """A child of the command inherits the limits: they are set before exec, not on the one process."""
    result = await result_of(
        engine, await engine.execute(shell("sh -c 'ulimit -n'", limits=ResourceLimits(open_files=42))), 20
    )
    assert result.stdout == "42\n"


async def test_a_command_that_sends_itself_sigxcpu_under_no_cpu_limit_is_not_said_to_hit_one(
    engine: ExecutionEngine,
) -> None:
    """SIGXCPU from `kill`, no `cpu_seconds` and none inherited: the signal is reported, not a limit."""
    result = await result_of(engine, await engine.execute(shell("kill -XCPU $$")), 20)
    assert (result.status, result.error) == (ExecutionStatus.FAILED, "Command failed with exit code -24")


_BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.7: pass"


async def test_a_sigkill_from_elsewhere_is_not_blamed_on_the_cpu_limit_its_children_used_up(
    engine: ExecutionEngine,
) -> None:
    """Children that used more CPU together than cpu_seconds, each within it, then a SIGKILL: not the limit.

    The limit is per process: the shell's own CPU time is next to nothing,
    though its usage from wait4 counts the children it waited for.
    """
    script = f'{PYTHON} -c "{_BUSY}"; {PYTHON} -c "{_BUSY}"; kill -KILL $$'
    result = await result_of(
        engine, await engine.execute(shell(script, limits=ResourceLimits(cpu_seconds=1))), 25
    )
    assert result.resource_usage is not None
    assert result.resource_usage.user_cpu_s + result.resource_usage.system_cpu_s >= 1, "the children's time"
    assert (result.status, result.exit_code, result.error) == (
        ExecutionStatus.FAILED,
        -9,
        "Command failed with exit code -9",
    )


async def test_a_command_that_handles_sigxcpu_is_named_when_the_hard_cpu_limit_kills_it(
    engine: ExecutionEngine,
) -> None:
    """Ignoring SIGXCPU, the command is killed (SIGKILL) a second later, at the hard limit: still named."""
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    request = run(PYTHON, "-c", code, limits=ResourceLimits(cpu_seconds=1), timeout_ms=20_000)
    result = await result_of(engine, await engine.execute(request), 25)
    assert (result.status, result.exit_code, result.error) == (
        ExecutionStatus.FAILED,
        -9,
        "CPU time limit exceeded",
    )


async def test_memory_bytes_too_small_to_load_the_program_is_named(engine: ExecutionEngine) -> None:
    """Too little address space to start at all: the kernel's SIGSEGV at exec, or the loader's exit 127.

    Either way the command never ran, and the error names the limit.
    """
    ids = [
        await engine.execute(run("true", limits=ResourceLimits(memory_bytes=size)))
        for size in (100_000, 1_000_000, 2_000_000)
    ]
    results = [await result_of(engine, execution_id, 20) for execution_id in ids]
    assert {(r.status, r.error) for r in results} == {
        (ExecutionStatus.FAILED, "Memory limit exceeded while loading the program")
    }
    assert {r.exit_code for r in results} == {-11, 127}, [(r.exit_code, r.stderr) for r in results]


async def test_open_files_too_few_to_load_the_program_is_named(engine: ExecutionEngine) -> None:
    """With no descriptor free for a shared library, the loader exits 127 ("Error 24"): the limit is named."""
    for files in (1, 3):
        result = await result_of(
            engine, await engine.execute(run("true", limits=ResourceLimits(open_files=files))), 20
        )
        assert "Error 24" in result.stderr
        assert (result.status, result.exit_code, result.error) == (
            ExecutionStatus.FAILED,
            127,
            "Open file limit exceeded while loading the program",
        )


async def test_a_crash_or_a_loader_error_is_not_blamed_on_a_limit_that_did_not_cause_it(
    engine: ExecutionEngine,
) -> None:
    """SIGSEGV with no memory limit, or after the program ran; the loader's words with no limit to blame."""
    loader = "echo 'x: error while loading shared libraries: {}' >&2; exit 127"
    memory = ResourceLimits(memory_bytes=1 << 30)
    cases = [
        (shell("kill -SEGV $$"), "Command failed with exit code -11"),
        (shell("echo ran; kill -SEGV $$", limits=memory), "Command failed with exit code -11"),
        # Silent and at once, but under a limit that any program loads in: its own.
        (shell("kill -SEGV $$", limits=memory), "Command failed with exit code -11"),
        (
            shell(loader.format("libc.so.6: failed to map segment from shared object")),
            "Command failed with exit code 127",
        ),
        (
            shell(loader.format("libc.so.6: cannot open shared object file: Error 24"), limits=memory),
            "Command failed with exit code 127",
        ),
    ]
    ids = [await engine.execute(request) for request, _error in cases]
    for execution_id, (_request, error) in zip(ids, cases, strict=True):
        result = await result_of(engine, execution_id, 20)
        assert (result.status, result.error) == (ExecutionStatus.FAILED, error)


_LOADER = b"true: error while loading shared libraries: libc.so.6: "


@pytest.mark.parametrize(
    ("exit_code", "limits", "own_cpu", "stderr", "wrote", "error"),
    [
        (-9, {"cpu_seconds": 1}, 2.0, b"", True, "CPU time limit exceeded"),
        (-9, {"cpu_seconds": 1}, 0.98, b"", True, "CPU time limit exceeded"),  # /proc rounds down
        (-9, {"cpu_seconds": 1}, 0.01, b"", False, None),  # its children's time is not its own
        (-9, {"cpu_seconds": 1}, None, b"", False, None),  # nothing to tell by
        (-11, {"memory_bytes": 100_000}, 0.0, b"", False, "Memory limit exceeded while loading the program"),
        (-11, {"memory_bytes": 100_000}, 0.0, b"", True, None),  # it ran: it wrote
        (-11, {"memory_bytes": 100_000}, 5.0, b"", False, None),  # it ran: it computed
        (-11, {}, 0.0, b"", False, None),
        (127, {"memory_bytes": 10**6}, 0.0, _LOADER + b"failed to map segment from shared object\n", True,
         "Memory limit exceeded while loading the program"),
        (127, {"open_files": 3}, 0.0, _LOADER + b"cannot open shared object file: Error 24\n", True,
         "Open file limit exceeded while loading the program"),
        (127, {"open_files": 3}, 0.0, _LOADER + b"cannot open shared object file: Error 240\n", True, None),
        (127, {"memory_bytes": 10**6}, 0.0, _LOADER + b"cannot open shared object file: Error 24\n", True,
         None),
        (127, {"open_files": 3}, 0.0, b"sh: 1: nosuch: not found\n", True, None),
    ],
)  # fmt: skip
def test_stopped_by_names_a_limit_only_on_the_evidence(
    exit_code: int,
    limits: dict[str, int],
    own_cpu: float | None,
    stderr: bytes,
    wrote: bool,
    error: str | None,
) -> None:
    """The hard CPU limit's SIGKILL by the process's own CPU time; a kill at start, or the loader's words."""
    assert stopped_by(exit_code, limits, own_cpu, stderr=stderr, wrote=wrote) == error

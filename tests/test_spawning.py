"""Starting a command, every way: the spawner, the C helper (vfork + execve), fork + execve from Python.

Each test runs against both and expects the same process and the same errors,
so the fallback used where the helper was not built is held to what the helper does.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
from conftest import spawn_and_read

from cloudops_execution_engine.actors import process_tree
from cloudops_execution_engine.actors.spawning import CommandEnv, spawn

pytestmark = pytest.mark.timeout(20)

SH = shutil.which("sh") or "/bin/sh"


def test_the_command_gets_its_pipes_directory_environment_and_exit_code(way: str, tmp_path: Path) -> None:
    env = CommandEnv({b"KEEP": b"base", b"OVER": b"base"}).for_command({"OVER": "mine"}, "the-marker")
    script = 'pwd; echo "$KEEP $OVER"; env | sort >&2; exit 3'
    code, out, err = spawn_and_read([SH, "-c", script], env, str(tmp_path))
    assert (code, out) == (3, f"{tmp_path}\nbase mine\n")
    names = {line.split("=", 1)[0] for line in err.splitlines()}
    assert {"KEEP", "OVER", process_tree.MARKER_ENV} <= names
    assert f"{process_tree.MARKER_ENV}=the-marker" in err.splitlines()


def test_an_overlay_of_new_names_adds_them_to_the_whole_base(way: str) -> None:
    env = CommandEnv({b"KEEP": b"base", b"PATH": os.defpath.encode()}).for_command({"NEW": "mine"}, "m")
    _code, _out, err = spawn_and_read([SH, "-c", "env >&2"], env, "/")
    lines = err.splitlines()
    assert {"KEEP=base", "NEW=mine", f"{process_tree.MARKER_ENV}=m"} <= set(lines)
    assert len(lines) == len(set(line.split("=", 1)[0] for line in lines)), "a name twice"


@pytest.mark.parametrize("base_engine", [b"this-engine", None])
def test_a_request_cannot_set_the_marker_or_the_engine_a_command_carries(
    way: str, base_engine: bytes | None
) -> None:
    """Both tell this engine's processes from others across the machine: they are not the request's."""
    base = {os.fsencode(process_tree.ENGINE_ENV): base_engine} if base_engine else {}
    for overlay in (
        {process_tree.MARKER_ENV: "another-id", process_tree.ENGINE_ENV: "another-engine"},
        {process_tree.ENGINE_ENV: "another-engine", "NEW": "x"},
        {process_tree.MARKER_ENV: "another-id"},
    ):
        env = CommandEnv(base).for_command(overlay, "the-marker")
        _code, _out, err = spawn_and_read([SH, "-c", "env >&2"], env, "/")
        lines = err.splitlines()
        assert f"{process_tree.MARKER_ENV}=the-marker" in lines
        engines = [line for line in lines if line.startswith(f"{process_tree.ENGINE_ENV}=")]
        assert engines == ([f"{process_tree.ENGINE_ENV}=this-engine"] if base_engine else [])
        assert f"{process_tree.MARKER_ENV}=another-id" not in lines


def test_the_worker_stays_in_its_own_directory_with_the_helper(way: str, tmp_path: Path) -> None:
    before = os.getcwd()
    spawn_and_read([SH, "-c", "true"], [], str(tmp_path))
    assert os.getcwd() == before, "the child changes directory, not the worker"


def test_the_command_starts_with_no_signal_ignored_or_blocked(way: str) -> None:
    # This process ignores SIGPIPE (Python does) and SIGINT (as a worker does): the command must not.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, out, _ = spawn_and_read([SH, "-c", "grep -E '^(SigIgn|SigBlk)' /proc/self/status"], [], "/")
    finally:
        signal.signal(signal.SIGINT, previous)
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert code == 0
    assert int(fields["SigBlk"], 16) == 0
    # glibc's own two signals (32 and 33) stay as the host had them: glibc lets no
    # program set them, and a host started by posix_spawn has them ignored.
    assert int(fields["SigIgn"], 16) & ~(0b11 << 31) == 0


def test_the_command_is_its_own_session_leader(way: str) -> None:
    pid, out_fd, err_fd = spawn([SH, "-c", "read x"], [], b"/", os.defpath)
    try:
        assert os.getsid(pid) == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(out_fd)
        os.close(err_fd)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("argv", "cwd", "error", "filename"),
    [
        (["/no/such/program"], "/", FileNotFoundError, "/no/such/program"),
        (["no-such-program-on-path"], "/", FileNotFoundError, "no-such-program-on-path"),
        (["{tmp}/not-executable"], "/", PermissionError, "{tmp}/not-executable"),
        ([SH, "-c", "true"], "/no/such/directory", FileNotFoundError, "/no/such/directory"),
    ],
)
def test_a_command_that_cannot_start_raises_the_same_error_and_leaves_nothing(
    way: str, tmp_path: Path, argv: list[str], cwd: str, error: type[OSError], filename: str
) -> None:
    (tmp_path / "not-executable").write_text("echo no\n")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    filename = filename.format(tmp=tmp_path)
    children = set(process_tree.children_of(os.getpid()))  # may open the file it reads, once
    fds = _open_fds()
    with pytest.raises(error) as raised:
        spawn(argv, [], os.fsencode(cwd), os.defpath)
    assert raised.value.filename == filename
    assert _open_fds() == fds, "the pipes were closed"
    assert set(process_tree.children_of(os.getpid())) <= children, "no zombie of a failed start is left"


def test_a_start_with_no_descriptor_left_for_its_second_pipe_leaves_the_first_closed(way: str) -> None:
    """EMFILE at the stderr pipe kept the stdout pipe open: two descriptors a worker lost for good.

    Enough such failures (a full file table, ENFILE, is anyone's to cause) and
    a worker failed every start with nothing running.
    """
    fds = _open_fds()
    top = max(int(fd) for fd in fds) + 1
    filler: list[int] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        while (fd := os.open(os.devnull, os.O_RDONLY)) < top:  # fill the gaps below `top`
            filler.append(fd)
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 2, hard))  # room for one pipe
        try:
            with pytest.raises(OSError, match="Too many open files") as raised:
                spawn([SH, "-c", "true"], [], b"/", os.defpath)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        for fd in filler:
            os.close(fd)
    assert raised.value.errno == errno.EMFILE
    assert _open_fds() == fds, "the pipe made before the failure was closed"


def test_a_nul_byte_is_refused_before_anything_starts(way: str) -> None:
    fds = _open_fds()
    with pytest.raises(ValueError, match="null byte"):
        spawn([SH, "-c", "true"], [b"A=\0b"], b"/", os.defpath)
    assert _open_fds() == fds


def test_the_command_sees_only_fds_0_1_and_2(way: str) -> None:
    # An fd this process holds without close-on-exec must not cross into the command.
    leaky_r, leaky_w = os.pipe()
    os.set_inheritable(leaky_w, True)
    try:
        code, out, _ = spawn_and_read([SH, "-c", "ls /proc/self/fd"], [], "/")
    finally:
        os.close(leaky_r)
        os.close(leaky_w)
    assert code == 0
    # `ls` itself opens its directory as one more fd while it lists it.
    assert sorted(int(fd) for fd in out.split())[:3] == [0, 1, 2]
    assert len(out.split()) == 4


def test_the_command_adopts_its_own_orphans(way: str) -> None:
    # The subshell of `$( )` has exited when it returns, orphaning its `sleep`: the
    # command itself, not whoever started the command, must be its new parent.
    script = (
        "pid=$( (sleep 5 >/dev/null 2>&1 & echo $!) ); "
        "ppid=$(awk '/^PPid/ {print $2}' /proc/$pid/status); kill $pid; echo $ppid $$"
    )
    code, out, _ = spawn_and_read([SH, "-c", script], [], "/")
    adopter, command = out.split()
    assert (code, adopter) == (0, command)


def test_resource_limits_are_set_in_the_command(way: str) -> None:
    import resource

    limits = ((resource.RLIMIT_NOFILE, 64, 128),)
    code, out, _ = spawn_and_read([SH, "-c", "ulimit -Sn; ulimit -Hn"], limits=limits)
    assert (code, out.split()) == (0, ["64", "128"])


@pytest.mark.parametrize(
    ("program", "low", "high"),
    [
        (["true"], 0, 4 << 20),
        (["python3", "-c", "x = bytearray(300 << 20); print(len(x))"], 300 << 20, 340 << 20),
    ],
)
def test_the_peak_resident_size_is_the_commands_own(
    way: str, program: list[str], low: int, high: int
) -> None:
    pid, out_fd, err_fd = spawn(program, [b"PATH=/usr/bin:/bin"], b"/", "/usr/bin:/bin")
    os.close(err_fd)
    os.set_blocking(out_fd, True)
    while os.read(out_fd, 65536):
        pass
    os.close(out_fd)
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    peak = usage.ru_maxrss * 1024
    if way == "spawner":
        # `/usr/bin/time true` says about 1 MiB here; from the worker it would be the worker's size.
        assert low <= peak <= high, f"{peak >> 10} KiB"
    else:
        assert peak >= low

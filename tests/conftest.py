"""Shared fixtures: an engine per test, an event recorder, leak checks and a local AWS emulator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ShellCommand,
)
from cloudops_execution_engine.actors import handler_raises

HELPERS = Path(__file__).parent / "helpers"
PYTHON = sys.executable

# The test environment's tools (the AWS CLI among them) live beside its interpreter.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


class Recorder:
    """An event handler that keeps every event and lets a test await a condition on them."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    async def on_event(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, execution_id: UUID) -> list[Any]:
        return [e for e in self.events if getattr(e, "execution_id", None) == execution_id]

    def types_of(self, execution_id: UUID) -> list[str]:
        return [e.event_type for e in self.of(execution_id)]

    async def until(self, predicate: Callable[[list[Any]], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.events):
                self._changed.clear()
                await self._changed.wait()

    async def until_final(self, execution_id: UUID, timeout: float = 20) -> None:
        final = {"completed", "failed", "cancelled"}
        await self.until(lambda _: any(t in final for t in self.types_of(execution_id)), timeout)


def config(tmp_path: Path, **overrides: Any) -> ExecutionConfig:
    values: dict[str, Any] = {"log_dir": tmp_path / "logs", "kill_grace_ms": 500, "workers": 2}
    values.update(overrides)
    return ExecutionConfig(**values)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def engine(tmp_path: Path, recorder: Recorder) -> AsyncIterator[ExecutionEngine]:
    eng = ExecutionEngine(config(tmp_path)).with_event_handler(recorder)
    async with eng:
        yield eng


def shell(command: str, **kwargs: Any) -> ExecutionRequest:
    return ExecutionRequest(command=ShellCommand(command=command), **kwargs)


def run(program: str, *args: str, **kwargs: Any) -> ExecutionRequest:
    return ExecutionRequest(command=ExecCommand(program=program, args=list(args)), **kwargs)


async def result_of(engine: ExecutionEngine, execution_id: UUID, timeout: float) -> ExecutionResult:
    """Wait for a single execution (not a plan) and return its result."""
    result = await engine.wait(execution_id, timeout=timeout)
    assert isinstance(result, ExecutionResult)
    return result


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe(pids: list[int]) -> str:
    """Who is still running, for an assertion's message."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            parent = proc.parent()
            found.append(
                f"{pid} ({proc.status()}, parent {proc.ppid()}: {parent.name() if parent else None})"
            )
        except psutil.NoSuchProcess:
            continue
    return ", ".join(found)


def handler_raises_said(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(log records about a handler's raises, the raises they account for)."""
    records = [r for r in caplog.records if r.getMessage().startswith("event handler")]
    accounted = 0
    for record in records:
        message = record.getMessage()
        if " more times after the last one logged" in message:
            accounted += int(message.split(" raised ")[1].split()[0])
        else:
            accounted += 1
            if "more raised since the last one logged" in message:
                accounted += int(message.split("; it keeps receiving events (")[1].split()[0])
    return len(records), accounted


def assert_raises_logged_sparingly(
    caplog: pytest.LogCaptureFixture, raises: int, elapsed: float, execution_id: UUID
) -> None:
    """A handler's raises: the first logged in full, at most one a second after, and all accounted for."""
    records, accounted = handler_raises_said(caplog)
    assert accounted == raises, "every raise is logged, or counted in a record"
    assert records <= 2 + elapsed / handler_raises.LOG_INTERVAL_S
    first = next(r for r in caplog.records if r.getMessage().startswith("event handler"))
    assert first.exc_info is not None
    assert "handler bug" in caplog.text
    assert str(execution_id) in first.getMessage()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a real condition with a deadline; fail naming it if it never holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def host_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if not gone(p.pid)}


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test leaves no process of its own behind and no file descriptor open.

    Session-scoped fixtures (the moto server) are set up before this one, by
    pytest's ordering of scopes, so what they hold is in the "before" picture.
    Ray's tests are exempt: the session's driver keeps threads, sockets and
    processes of its own for as long as the cluster is up. So is the one file
    `process_tree.children_of` keeps open, on purpose, in a process that asks
    for its own children from a single thread (a worker, or a test here).
    """
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    children_before = host_children()
    fds_before = open_fds()
    yield
    wait_until(lambda: host_children() <= children_before, 10, "the test's processes to end")
    kept = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    leaked = {
        fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target and target != kept
    }
    assert not leaked, f"file descriptors left open: {leaked}"


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return fds


@contextmanager
def host_running_a_tree(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int, list[int]]]:
    """helpers/host.py running tree.py through an engine: the host, the tree's worker and its pids."""
    host = subprocess.Popen(
        [PYTHON, str(HELPERS / "host.py"), str(tmp_path / "logs"), *flags],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert host.stdout is not None
        lines = [host.stdout.readline().strip() for _ in range(4)]
        assert lines[0] == f"host {host.pid}"
        tree = [int(line.split()[1]) for line in lines[1:]]
        yield host, psutil.Process(tree[0]).ppid(), tree
    finally:
        host.kill()
        host.wait(10)
        if host.stdout:
            host.stdout.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def aws_endpoint() -> Iterator[str]:
    """A moto server on loopback, standing in for AWS."""
    port = free_port()
    server = subprocess.Popen(
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def accepting() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"moto server exited with {server.returncode}")
            return False

    try:
        wait_until(accepting, 30, "the moto server to accept connections")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_PAGER": "",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Ray's tests go last: the driver's threads and sockets then never meet another test's leak check."""
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)


def stop_ray_cluster(temp: str) -> None:
    """Kill the processes of the Ray cluster whose session lives under `temp`, and their children.

    Not `ray stop`: that ends every Ray cluster on the machine, other test runs' included.
    """
    own = []
    for proc in psutil.process_iter():
        try:
            if any(temp in arg for arg in proc.cmdline()):
                own.append(proc)
        except psutil.Error:
            continue
    doomed = {proc.pid: proc for proc in own}
    for proc in own:
        try:
            doomed.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:
            continue
    for proc in doomed.values():
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(list(doomed.values()), timeout=10)


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A Ray head for the session, on loopback, with token authentication; this process connected to it.

    Started and stopped with Ray's own CLI. Ray replaces a loopback node address
    with the machine's outward one unless it is told this is not a cluster
    meant for other machines (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which Ray
    reads once, when it is imported.
    """
    port = free_port()
    # Ray puts unix sockets under its temp dir, whose paths must stay short.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    settings = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    import ray

    ray_cli = str(Path(sys.executable).parent / "ray")
    address = f"127.0.0.1:{port}"
    try:
        started = subprocess.run(
            [
                ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                "--num-cpus=2", "--object-store-memory=100000000", "--include-dashboard=false",
                "--disable-usage-stats", f"--temp-dir={temp}",
            ],
            timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if started.returncode != 0:
            pytest.fail(f"ray start failed ({started.returncode}):\n{started.stderr[-3000:]}")
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        stop_ray_cluster(temp)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(params=["spawner", "native", "fork"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each of the three ways a worker starts a command: its spawner, the C helper, fork + execve."""
    from cloudops_execution_engine.actors import spawning

    sh = shutil.which("sh") or "/bin/sh"
    if request.param != "spawner":
        monkeypatch.setattr(spawning, "use_spawner", False)
    elif not spawning.use_spawner:
        pytest.fail("the spawner was not built; `pip install -e .` builds it with the system's compiler")
    else:
        # Started now, so that the socket to it is there before a test counts fds.
        spawn_and_read([sh, "-c", "true"])
    if request.param == "fork":
        monkeypatch.setattr(spawning, "native", None)
    elif spawning.native is None:
        pytest.fail("the C helper was not built; `pip install -e .` builds it with the system's compiler")
    yield str(request.param)
    helper = spawning.spawner_pid()
    spawning.stop_spawner()
    if helper:
        # The spawner is this process's child: reap it, as a worker's loop would.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(helper, 0)


def spawn_and_read(
    argv: list[str],
    env: list[bytes] | None = None,
    cwd: str = "/",
    limits: Any = (),
    nice: int = 0,
    affinity: tuple[int, ...] = (),
) -> tuple[int, str, str]:
    """Start `argv` the way the current `way` does, read both pipes to their end, reap it."""
    from cloudops_execution_engine.actors.spawning import spawn

    pid, out_fd, err_fd = spawn(argv, env or [], os.fsencode(cwd), os.defpath, limits, -1, nice, affinity)
    outputs = []
    for fd in (out_fd, err_fd):
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)
        outputs.append(b"".join(chunks).decode())
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), outputs[0], outputs[1]


def run_loop(loop: Any, until: Callable[[], bool]) -> None:
    """Run a worker's `Reactor` until `until()` holds, checking each millisecond."""

    def check() -> None:
        if until():
            loop.stop()
        else:
            loop.call_later(0.001, check)

    loop.call_soon(check)
    loop.run()

"""The Ray backend on a real cluster: the session's head on loopback, worker actors on its node."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest
from conftest import (
    HELPERS,
    PYTHON,
    Recorder,
    config,
    describe,
    gone,
    host_running_a_tree,
    run,
    shell,
    wait_until,
)

from cloudops_execution_engine import (
    ExecutionEngine,
    ExecutionPlan,
    ExecutionResult,
    ExecutionStatus,
    ParallelStrategy,
    PlanExecutionResult,
    RayConfig,
)
from cloudops_execution_engine.engine import LogNode

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def ray_engine(tmp_path: Path, address: str, recorder: Recorder, **ray: Any) -> ExecutionEngine:
    options: dict[str, Any] = {"address": address, "workers": 2}
    options.update(ray)
    return ExecutionEngine(config(tmp_path, ray=RayConfig(**options))).with_event_handler(recorder)


def is_worker_actor(pid: int) -> bool:
    try:
        return "NodeWorker" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def pipes_of(pid: int) -> set[str]:
    found: set[str] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("pipe:"):
                found.add(target)
    return found


def actor_of(worker: int) -> int:
    """The worker actor at the other end of a (detached) worker process's pipes."""
    pipes = pipes_of(worker)
    actors = [
        proc.pid
        for proc in psutil.process_iter()
        if proc.pid != worker and is_worker_actor(proc.pid) and pipes & pipes_of(proc.pid)
    ]
    assert len(actors) == 1, f"worker {worker} talks to actors {actors}"
    return actors[0]


def lines(recorder: Recorder, eid: UUID) -> list[str]:
    return [e.line for e in recorder.of(eid) if e.event_type == "stdout"]


async def started_tree(engine: ExecutionEngine, recorder: Recorder, *flags: str) -> tuple[UUID, list[int]]:
    eid = await engine.execute(run(PYTHON, str(HELPERS / "tree.py"), *flags))
    await recorder.until(lambda _: len(lines(recorder, eid)) == 3)
    return eid, [int(line.split()[1]) for line in lines(recorder, eid)]


async def test_plan_fans_out_over_two_worker_actors(tmp_path: Path, ray_address: str) -> None:
    recorder = Recorder()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each command waits until all four run at once, so they must be spread
    # over both actors, and prints the pid of the worker process that ran it.
    step = (
        f"touch {barrier}/$RANDOM$RANDOM; "
        f'while [ "$(ls {barrier} | wc -l)" -lt 4 ]; do sleep 0.01; done; '
        "echo worker $PPID; echo second line"
    )
    plan = ExecutionPlan(
        commands=[shell(step) for _ in range(4)], strategy=ParallelStrategy(max_concurrency=4)
    )
    async with ray_engine(tmp_path, ray_address, recorder) as engine:
        await engine.execute_plan(plan)
        result = await engine.wait(plan.id, timeout=60)
        assert isinstance(result, PlanExecutionResult)
        assert result.status is ExecutionStatus.COMPLETED
        assert result.stats.completed == 4

        def progress() -> list[int]:
            return [e.completed for e in recorder.events if getattr(e, "plan_id", None) == plan.id]

        # Handlers run on their own queues: the last event may trail the result.
        await recorder.until(lambda _: len(progress()) == 4)
        assert progress() == [1, 2, 3, 4]
        import ray

        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
        alive_nodes = {node["NodeID"] for node in nodes if node.get("Alive")}
        workers = set()
        for command in plan.commands:
            types = recorder.types_of(command.id)
            assert types == ["started", "stdout", "stdout", "completed"]
            first, second = lines(recorder, command.id)
            assert second == "second line"
            workers.add(int(first.split()[1]))
            assert engine.get_log_node(command.id) == "127.0.0.1"
            node = engine.get_log_node(command.id)
            assert isinstance(node, LogNode)
            assert node.node_id in alive_nodes, "the log's node is not one of the cluster's"
        assert len(workers) == 2, "the plan ran on one worker only"
        for pid in workers:
            assert is_worker_actor(actor_of(pid))

        logs = await engine.read_logs(plan.id)
        assert logs.count("stdout second line") == 4
        assert all(f"# execution {c.id}" in logs for c in plan.commands)


async def test_results_and_exit_codes_match_the_local_backend(tmp_path: Path, ray_address: str) -> None:
    recorder = Recorder()
    async with ray_engine(tmp_path, ray_address, recorder, workers=1) as engine:
        failing = await engine.execute(shell("echo out; echo err >&2; exit 3"))
        missing = await engine.execute(run("/nonexistent/program"))
        secret = await engine.execute(shell('echo "token=${RAY_AUTH_TOKEN:-none}"'))
        failed = await engine.wait(failing, timeout=30)
        assert isinstance(failed, ExecutionResult)
        assert (failed.status, failed.exit_code, failed.stdout, failed.stderr) == (
            ExecutionStatus.FAILED,
            3,
            "out\n",
            "err\n",
        )
        assert failed.error == "Command failed with exit code 3"
        assert failed.resource_usage is not None
        spawn = await engine.wait(missing, timeout=30)
        assert isinstance(spawn, ExecutionResult)
        assert spawn.status is ExecutionStatus.FAILED
        assert spawn.exit_code == -1
        assert spawn.error is not None
        assert spawn.error.startswith("Process spawn failed")
        leaked = await engine.wait(secret, timeout=30)
        assert isinstance(leaked, ExecutionResult)
        assert leaked.stdout == "token=none\n", "the cluster's token reached a command"
        log = await engine.read_logs(failing)
        assert "stderr err" in log
        assert "status=failed exit_code=3" in log


async def test_output_lines_arrive_in_order_and_whole(tmp_path: Path, ray_address: str) -> None:
    recorder = Recorder()
    async with ray_engine(tmp_path, ray_address, recorder) as engine:
        eid = await engine.execute(shell("seq 1 20000; echo tail >&2"))
        result = await engine.wait(eid, timeout=60)
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.COMPLETED
        await recorder.until_final(eid)
        assert lines(recorder, eid) == [str(i) for i in range(1, 20001)]
        assert [e.line for e in recorder.of(eid) if e.event_type == "stderr"] == ["tail"]
        assert result.stdout.splitlines()[-1] == "20000"


async def test_shutdown_cancels_remote_work_and_kills_its_trees(tmp_path: Path, ray_address: str) -> None:
    recorder = Recorder()
    engine = ray_engine(tmp_path, ray_address, recorder)
    async with engine:
        eid, pids = await started_tree(engine, recorder, "--ignore-term", "--close-stdio")
        queued = [await engine.execute(shell("sleep 60")) for _ in range(12)]
    # Shutdown returns after the trees are gone and every event was delivered.
    survivors = [pid for pid in pids if not gone(pid)]
    assert survivors == [], describe(survivors)
    assert recorder.types_of(eid)[-1] == "cancelled"
    assert all(recorder.types_of(q)[-1] == "cancelled" for q in queued)


async def test_cancel_kills_the_remote_tree(tmp_path: Path, ray_address: str) -> None:
    recorder = Recorder()
    async with ray_engine(tmp_path, ray_address, recorder) as engine:
        eid, pids = await started_tree(engine, recorder, "--ignore-term", "--close-stdio")
        assert not any(gone(pid) for pid in pids)
        await engine.cancel(eid)
        result = await engine.wait(eid, timeout=30)
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.CANCELLED
        await recorder.until_final(eid)
        assert recorder.types_of(eid)[-1] == "cancelled"
        assert [pid for pid in pids if not gone(pid)] == []


async def test_timeout_kills_the_remote_tree(tmp_path: Path, ray_address: str) -> None:
    recorder = Recorder()
    async with ray_engine(tmp_path, ray_address, recorder) as engine:
        eid = await engine.execute(run(PYTHON, str(HELPERS / "tree.py"), "--close-stdio", timeout_ms=2000))
        result = await engine.wait(eid, timeout=30)
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.TIMEOUT
        assert result.error == "Execution timeout after 2000ms"
        pids = [int(line.split()[1]) for line in lines(recorder, eid)]
        assert len(pids) == 3
        assert [pid for pid in pids if not gone(pid)] == []


async def failed_on_the_node_and_serving_on(
    engine: ExecutionEngine, recorder: Recorder, eid: UUID, pids: list[int]
) -> None:
    """A dead worker's execution failed once, naming the node; its tree is gone; the engine serves on."""
    result = await engine.wait(eid, timeout=60)
    assert isinstance(result, ExecutionResult)
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert "Worker actor" in result.error
    assert "on node 127.0.0.1" in result.error
    assert result.error.endswith("while running this execution")
    survivors = [pid for pid in pids if not gone(pid)]
    assert survivors == [], f"the dead worker's tree outlived the cleanup: {describe(survivors)}"
    await recorder.until_final(eid)
    assert recorder.types_of(eid).count("started") == 1, "the execution was retried"
    after = await engine.execute(shell("echo still serving"))
    assert (await engine.wait(after, timeout=60)).status is ExecutionStatus.COMPLETED


async def test_killed_worker_actor_fails_its_execution_naming_the_node(
    tmp_path: Path, ray_address: str
) -> None:
    recorder = Recorder()
    async with ray_engine(tmp_path, ray_address, recorder) as engine:
        eid, pids = await started_tree(engine, recorder, "--close-stdio")
        actor = actor_of(psutil.Process(pids[0]).ppid())
        os.kill(actor, signal.SIGKILL)
        await failed_on_the_node_and_serving_on(engine, recorder, eid, pids)


async def test_the_log_of_a_dead_actors_execution_is_read_while_its_successor_starts(
    tmp_path: Path, ray_address: str
) -> None:
    """Its node lives, and its log: read at once, with no other worker on the node yet, it was IoError."""
    recorder = Recorder()
    async with ray_engine(tmp_path, ray_address, recorder, workers=1) as engine:
        eid, pids = await started_tree(engine, recorder, "--close-stdio")
        os.kill(actor_of(psutil.Process(pids[0]).ppid()), signal.SIGKILL)
        result = await engine.wait(eid, timeout=60)
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.FAILED
        log = await engine.read_logs(eid)
        assert f"pid {pids[0]}" in log


async def test_successor_on_the_node_kills_trees_a_dead_worker_left(
    tmp_path: Path, ray_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker process and actor both SIGKILLed: nothing is left to kill the setsid trees but the successor."""
    recorder = Recorder()
    caplog.set_level(logging.WARNING, "cloudops_execution_engine")
    async with ray_engine(tmp_path, ray_address, recorder, workers=1) as engine:
        eid, pids = await started_tree(engine, recorder, "--close-stdio", "--ignore-term")
        worker = psutil.Process(pids[0]).parent()
        assert worker is not None
        actor = actor_of(worker.pid)
        worker.kill()
        os.kill(actor, signal.SIGKILL)
        await failed_on_the_node_and_serving_on(engine, recorder, eid, pids)
        assert any("left on node 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_cli_runs_on_the_cluster_with_its_own_connection(tmp_path: Path, ray_address: str) -> None:
    cli = [PYTHON, "-m", "cloudops_execution_engine", "run", "--ray", ray_address, "--log-dir", str(tmp_path)]
    done = subprocess.run(
        [*cli, "--", "bash", "-c", "echo from the cluster; exit 4"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.stdout == "from the cluster\n"
    assert done.returncode == 4, done.stderr


def test_the_local_backend_never_imports_ray(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionRequest\n"
        "async def main():\n"
        f"    async with ExecutionEngine(ExecutionConfig(log_dir={str(tmp_path)!r})) as engine:\n"
        "        eid = await engine.execute(ExecutionRequest.model_validate("
        "{'command': {'type': 'exec', 'program': 'true'}}))\n"
        "        print((await engine.wait(eid)).status.value)\n"
        "asyncio.run(main())\n"
        "print('ray' in sys.modules)\n"
    )
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["completed", "False"], done.stderr


def test_without_ray_installed_the_backend_says_what_to_install(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "sys.modules['ray'] = None  # as if the [ray] extra were not installed\n"
        "from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, RayConfig, SpawnFailed\n"
        "async def main():\n"
        f"    engine = ExecutionEngine(ExecutionConfig(log_dir={str(tmp_path)!r}, ray=RayConfig()))\n"
        "    try:\n"
        "        await engine.start()\n"
        "    except SpawnFailed as exc:\n"
        "        print(exc)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    assert "pip install 'cloudops-execution-engine[ray]'" in done.stdout, done.stderr


def test_address_local_starts_a_cluster_of_its_own(tmp_path: Path, ray_address: str) -> None:
    """`--ray local` starts a cluster inside the process rather than joining the one running here."""
    script = (
        "import asyncio, ray\n"
        "from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, ExecutionRequest\n"
        "from cloudops_execution_engine import RayConfig\n"
        "async def main():\n"
        f"    config = ExecutionConfig(log_dir={str(tmp_path)!r}, ray=RayConfig(address='local'))\n"
        "    async with ExecutionEngine(config) as engine:\n"
        "        eid = await engine.execute(ExecutionRequest.model_validate("
        "{'command': {'type': 'exec', 'program': 'true'}}))\n"
        "        print((await engine.wait(eid)).status.value, engine.get_log_node(eid))\n"
        "        print(ray.get_runtime_context().gcs_address)\n"
        "    print(ray.is_initialized())\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    status, gcs, still_connected = done.stdout.splitlines()
    assert status == "completed 127.0.0.1", done.stderr
    assert gcs != ray_address, "joined the session's cluster instead of starting one"
    assert still_connected == "False", "the engine left the connection it opened"


def test_sigkilled_host_takes_its_actors_and_their_trees_along(tmp_path: Path, ray_address: str) -> None:
    """Ray ends a dead driver's actors; each actor's worker process then kills its trees."""
    flags = ("--ignore-term", "--close-stdio")
    with host_running_a_tree(tmp_path, *flags, env={"HOST_RAY_ADDRESS": ray_address}) as (host, worker, tree):
        actor = actor_of(worker)
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        wait_until(
            lambda: all(gone(pid) for pid in [actor, worker, *tree]),
            30,
            "the dead host's actor, worker and commands to end",
        )


@pytest.mark.parametrize("given", ["host:port", "auto"])
def test_a_cluster_address_where_nothing_listens_fails_the_start_at_once(tmp_path: Path, given: str) -> None:
    """ray.init retries a dead address for minutes, in a thread nobody can stop: the start is refused
    first, with SpawnFailed naming the address, and the host's process can exit.

    `auto` too, which Ray takes from RAY_ADDRESS (or the file a crashed head left behind).
    """
    with socket.socket() as probe:  # a port that was free a moment ago, where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}" if given == "host:port" else "auto"
    script = (
        "import asyncio, sys\n"
        "from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, RayConfig, SpawnFailed\n"
        f"ray = RayConfig(address={address!r})\n"
        f"config = ExecutionConfig(log_dir={str(tmp_path / 'logs')!r}, ray=ray)\n"
        "async def main():\n"
        "    try:\n"
        "        await ExecutionEngine(config).start()\n"
        "    except SpawnFailed as exc:\n"
        "        print(exc)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    done = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"127.0.0.1:{port}" in done.stdout
    assert "nothing answers" in done.stdout

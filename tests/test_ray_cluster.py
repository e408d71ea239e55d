"""The Ray backend on a multi-node cluster on this machine: a head and three nodes on loopback addresses.

Ray's own `ray.cluster_utils.Cluster` starts each node's raylet and object
store, each on its own address in 127.0.0.0/8; two nodes share 127.0.0.2, so
only the node id tells them apart. One cluster serves the whole module; its
last test kills a node, so it runs last.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest
from conftest import HELPERS, PYTHON, Recorder, config, gone, run, shell, wait_until
from test_ray import actor_of, lines

from cloudops_execution_engine import (
    ExecutionEngine,
    ExecutionPlan,
    ExecutionResult,
    ExecutionStatus,
    IoError,
    ParallelStrategy,
    PlanExecutionResult,
    RayConfig,
)
from cloudops_execution_engine.actors import ray_link
from cloudops_execution_engine.engine import LogNode

pytestmark = [pytest.mark.ray, pytest.mark.timeout(90)]

_NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}


@dataclass
class Node:
    name: str
    address: str
    node_id: str
    raylet: int  # pid; a worker actor is a child of its node's raylet
    handle: Any  # ray._private.node.Node


@dataclass
class LocalCluster:
    address: str
    nodes: dict[str, Node]
    cluster: Any  # ray.cluster_utils.Cluster

    def node_of_raylet(self, pid: int) -> Node:
        found = [node for node in self.nodes.values() if node.raylet == pid]
        assert len(found) == 1, f"process {pid} is no raylet of this cluster"
        return found[0]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A head on 127.0.0.1 and nodes on 127.0.0.2 (two of them) and 127.0.0.3; this process its driver.

    If the session's cluster is connected, the driver leaves it for this one
    and comes back to it at the end.
    """
    # Read by Ray when it is imported: keep the nodes on the loopback addresses given.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray._private import ray_constants
    from ray._private.utils import get_ray_address_file  # type: ignore[attr-defined]  # not re-exported
    from ray.cluster_utils import Cluster

    previous = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if previous is not None:
        ray.shutdown()
    # Starting a head records its address for `ray.init()` on this machine; put back what was there.
    address_file = Path(get_ray_address_file(None))
    recorded = address_file.read_text() if address_file.exists() else None
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    local = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "temp_dir": temp,
            **_NODE_ARGS,
        },
    )
    try:
        added: dict[str, Any] = {"head": local.head_node}
        for name, address in (("second", "127.0.0.2"), ("third", "127.0.0.3"), ("doomed", "127.0.0.2")):
            added[name] = local.add_node(node_ip_address=address, **_NODE_ARGS)
        ray.init(address=local.address, logging_level=logging.WARNING, log_to_driver=False)
        raylet = ray_constants.PROCESS_TYPE_RAYLET
        nodes = {}
        for name, handle in added.items():
            pid = handle.all_processes[raylet][0].process.pid
            nodes[name] = Node(name, handle.node_ip_address, handle.node_id, pid, handle)
        yield LocalCluster(local.address, nodes, local)
    finally:
        ray.shutdown()
        for handle in list(local.worker_nodes):
            local.remove_node(handle, allow_graceful=False)
        if local.head_node is not None:
            local.remove_node(local.head_node, allow_graceful=False)
        shutil.rmtree(temp, ignore_errors=True)
        if recorded is not None:
            address_file.write_text(recorded)
        if previous is not None:
            ray.init(address=previous, logging_level=logging.WARNING, log_to_driver=False)


def cluster_engine(tmp_path: Path, cluster: LocalCluster, recorder: Recorder) -> ExecutionEngine:
    """One worker actor on each of the four nodes."""
    ray_config = RayConfig(address=cluster.address)
    return ExecutionEngine(config(tmp_path, ray=ray_config)).with_event_handler(recorder)


def node_that_ran(cluster: LocalCluster, worker: int) -> Node:
    """Found from the processes, not from the engine: worker -> its actor -> the actor's raylet."""
    return cluster.node_of_raylet(psutil.Process(actor_of(worker)).ppid())


def barrier_step(barrier: Path, count: int) -> str:
    """A command that waits until `count` of its kind run at once, then names its worker process."""
    return (
        f"touch {barrier}/$RANDOM$RANDOM; "
        f'while [ "$(ls {barrier} | wc -l)" -lt {count} ]; do sleep 0.01; done; '
        "echo worker $PPID"
    )


async def trees_on_every_node(
    engine: ExecutionEngine, recorder: Recorder, cluster: LocalCluster, **options: Any
) -> dict[str, tuple[UUID, list[int]]]:
    """One process tree running on each node: its execution and its three pids, by node name."""
    flags = ("--ignore-term", "--close-stdio")
    eids = [
        await engine.execute(run(PYTHON, str(HELPERS / "tree.py"), *flags, **options)) for _ in cluster.nodes
    ]
    await recorder.until(lambda _: all(len(lines(recorder, eid)) == 3 for eid in eids), timeout=30)
    by_node: dict[str, tuple[UUID, list[int]]] = {}
    for eid in eids:
        pids = [int(line.split()[1]) for line in lines(recorder, eid)]
        node = node_that_ran(cluster, psutil.Process(pids[0]).ppid())
        assert node.name not in by_node, "two trees ran on one node while another had none"
        by_node[node.name] = (eid, pids)
    return by_node


async def test_the_frame_link_admits_only_the_holder_of_its_key() -> None:
    """A connection to an actor's frame port without the actor's key is refused; the host's passes bytes."""
    listener = ray_link.listen("127.0.0.1")
    port = listener.getsockname()[1]
    key = secrets.token_bytes(32)
    accepting = asyncio.create_task(ray_link.accept(listener, key))
    fds: list[int] = []
    try:
        with pytest.raises(multiprocessing.AuthenticationError):
            await asyncio.to_thread(ray_link.connect, "127.0.0.1", port, secrets.token_bytes(32))
        assert not accepting.done(), "a stranger's connection was taken for the host's"
        fds.append(await asyncio.to_thread(ray_link.connect, "127.0.0.1", port, key))
        fds.append(await asyncio.wait_for(accepting, 10))
        host, actor = fds
        os.write(host, b"frames")
        os.set_blocking(actor, True)
        assert os.read(actor, 6) == b"frames"
    finally:
        accepting.cancel()
        listener.close()
        for fd in fds:
            os.close(fd)


async def test_executions_and_plans_spread_over_every_node(tmp_path: Path, cluster: LocalCluster) -> None:
    """Work lands on all four nodes, `get_log_node` names each by address and id, and logs come back."""
    recorder = Recorder()
    singles = tmp_path / "singles"
    planned = tmp_path / "planned"
    singles.mkdir()
    planned.mkdir()
    nodes = cluster.nodes.values()
    plan = ExecutionPlan(
        commands=[shell(barrier_step(planned, 4)) for _ in nodes],
        strategy=ParallelStrategy(max_concurrency=4),
    )
    async with cluster_engine(tmp_path, cluster, recorder) as engine:
        eids = [await engine.execute(shell(barrier_step(singles, 4))) for _ in nodes]
        await engine.execute_plan(plan)
        plan_result = await engine.wait(plan.id, timeout=60)
        assert isinstance(plan_result, PlanExecutionResult)
        assert plan_result.status is ExecutionStatus.COMPLETED
        for group in (eids, [command.id for command in plan.commands]):
            ran_on: set[str] = set()
            for eid in group:
                result = await engine.wait(eid, timeout=60)
                assert isinstance(result, ExecutionResult)
                assert result.status is ExecutionStatus.COMPLETED
                node = node_that_ran(cluster, int(result.stdout.split()[1]))
                ran_on.add(node.name)
                log_node = engine.get_log_node(eid)
                assert isinstance(log_node, LogNode)
                assert (log_node, log_node.node_id) == (node.address, node.node_id)
                log = await engine.read_logs(eid)
                assert f"# execution {eid}" in log
                assert f"stdout {result.stdout.strip()}" in log
            assert ran_on == set(cluster.nodes), "the work did not reach every node"
        second, doomed = cluster.nodes["second"], cluster.nodes["doomed"]
        assert second.address == doomed.address
        assert second.node_id != doomed.node_id
        logs = await engine.read_logs(plan.id)
        assert all(f"# execution {command.id}" in logs for command in plan.commands)


async def test_cancel_and_timeout_kill_trees_on_remote_nodes(tmp_path: Path, cluster: LocalCluster) -> None:
    """Cancel ends a remote node's tree at once; a timeout ends another's; each result says which."""
    recorder = Recorder()
    async with cluster_engine(tmp_path, cluster, recorder) as engine:
        trees = await trees_on_every_node(engine, recorder, cluster, timeout_ms=4000)
        cancelled = [trees["third"], trees["second"]]
        timed_out = [trees["doomed"], trees["head"]]
        for eid, _ in cancelled:
            await engine.cancel(eid)
        for eid, pids in cancelled:
            result = await engine.wait(eid, timeout=30)
            assert isinstance(result, ExecutionResult)
            assert result.status is ExecutionStatus.CANCELLED
            assert [pid for pid in pids if not gone(pid)] == []
            assert not any(gone(pid) for _, tree in timed_out for pid in tree), "cancel reached other trees"
        for eid, pids in timed_out:
            result = await engine.wait(eid, timeout=30)
            assert isinstance(result, ExecutionResult)
            assert result.status is ExecutionStatus.TIMEOUT
            assert result.error == "Execution timeout after 4000ms"
            assert [pid for pid in pids if not gone(pid)] == []


async def test_a_stalled_raylet_is_not_taken_for_a_dead_node(tmp_path: Path, cluster: LocalCluster) -> None:
    """A node whose raylet answers nothing for longer than a dead one takes to notice keeps its work."""
    recorder = Recorder()
    go = tmp_path / "go"
    stalled = cluster.nodes["third"]
    async with cluster_engine(tmp_path, cluster, recorder) as engine:
        gate = tmp_path / "gate"
        gate.mkdir()
        step = f"{barrier_step(gate, 4)}; while [ ! -e {go} ]; do sleep 0.01; done; echo finished"
        eids = [await engine.execute(shell(step)) for _ in cluster.nodes]
        await recorder.until(lambda _: all(lines(recorder, eid) for eid in eids), timeout=30)
        os.kill(stalled.raylet, signal.SIGSTOP)
        try:
            # The stall under test, as long as a dead node may take to be
            # failed at most; nothing may end while it lasts.
            until = time.monotonic() + 5.0
            while time.monotonic() < until:
                ended = [eid for eid in eids if {"completed", "failed"} & set(recorder.types_of(eid))]
                assert ended == [], "work ended while the raylet was stalled"
                await asyncio.sleep(0.1)
        finally:
            os.kill(stalled.raylet, signal.SIGCONT)
        go.touch()
        ran_on = set()
        for eid in eids:
            result = await engine.wait(eid, timeout=30)
            assert isinstance(result, ExecutionResult)
            assert (result.status, result.error) == (ExecutionStatus.COMPLETED, None)
            assert result.stdout.splitlines()[-1] == "finished"
            ran_on.add(node_that_ran(cluster, int(result.stdout.split()[1])).name)
        assert stalled.name in ran_on


async def test_a_killed_node_fails_its_executions_quickly_and_the_engine_serves_on(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    """SIGKILL a node: its execution fails within 5 s saying the node died, its tree is gone, the rest run on.

    The killed node shares its address with a live one, so only its id tells
    which of the two died. The engine's shutdown then leaves no worker, actor
    or command behind on any node.
    """
    recorder = Recorder()
    doomed = cluster.nodes["doomed"]
    engine = cluster_engine(tmp_path, cluster, recorder)
    async with engine:
        trees = await trees_on_every_node(engine, recorder, cluster)
        workers = {name: psutil.Process(pids[0]).ppid() for name, (_, pids) in trees.items()}
        actors = {name: actor_of(worker) for name, worker in workers.items()}
        eid, pids = trees.pop("doomed")
        killed = time.monotonic()
        cluster.cluster.remove_node(doomed.handle, allow_graceful=False)
        result = await engine.wait(eid, timeout=30)
        noticed = time.monotonic() - killed
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.FAILED
        assert noticed < 5.0, f"the dead node was noticed after {noticed:.1f}s"
        assert result.error is not None
        assert f"on node {doomed.address} ({doomed.node_id[:8]})" in result.error
        assert "its node died" in result.error
        assert "may or may not" not in result.error
        assert result.error.endswith("while running this execution")
        wait_until(lambda: all(gone(pid) for pid in pids), 15, "the dead node's tree to end")
        await recorder.until_final(eid)
        assert recorder.types_of(eid).count("started") == 1, "the execution was retried"
        with pytest.raises(IoError, match=doomed.address):
            await engine.read_logs(eid)
        log_node = engine.get_log_node(eid)
        assert isinstance(log_node, LogNode)
        assert log_node.node_id == doomed.node_id

        for other, tree in trees.values():
            assert not any(gone(pid) for pid in tree), "a tree on a live node died with the other node"
            assert await engine.get_status(other) is ExecutionStatus.RUNNING
        after = [await engine.execute(shell("echo still serving")) for _ in range(6)]
        for eid in after:
            done = await engine.wait(eid, timeout=60)
            assert isinstance(done, ExecutionResult)
            assert (done.status, done.stdout) == (ExecutionStatus.COMPLETED, "still serving\n")
            log_node = engine.get_log_node(eid)
            assert isinstance(log_node, LogNode)
            assert log_node.node_id != doomed.node_id
    everything = [*workers.values(), *actors.values(), *(pid for _, tree in trees.values() for pid in tree)]
    wait_until(lambda: all(gone(pid) for pid in everything), 15, "the engine's processes to end")
    for other, _ in trees.values():
        assert recorder.types_of(other)[-1] == "cancelled"

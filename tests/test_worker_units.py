"""Helpers of the worker, at their edges."""

from __future__ import annotations

import fcntl
import os
import subprocess

import pytest

from cloudops_execution_engine.actors import process_tree
from cloudops_execution_engine.actors.output import utf8_boundary as _utf8_boundary
from cloudops_execution_engine.actors.reactor import Reactor
from cloudops_execution_engine.actors.worker import _PipeBudget, _StreamState
from cloudops_execution_engine.protocol import Stream
from cloudops_execution_engine.protocol.pipe import READ_SIZE

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("data", "limit", "cut"),
    [
        (b"abcd", 4, 4),  # exactly the limit: the whole buffer
        (b"abc", 4, 3),
        (b"abcdef", 4, 4),
        ("aé".encode() + b"zz", 2, 1),  # é is two bytes; never cut between them
        ("€".encode() * 3, 4, 3),  # three-byte sequences
        (b"\x80\x80\x80\x80\x80\x80", 4, 4),  # invalid input still makes progress
    ],
)
def test_utf8_boundary(data: bytes, limit: int, cut: int) -> None:
    assert _utf8_boundary(data, limit) == cut
    assert 0 < _utf8_boundary(data, limit) <= limit


def test_own_children_list_follows_spawns_reaps_and_forks() -> None:
    """The list a worker reads on every command's end comes from one open file, read afresh each time."""
    before = set(process_tree.children_of(os.getpid()))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert set(process_tree.children_of(os.getpid())) == before | {child.pid}
    finally:
        child.kill()
        child.wait()
    assert set(process_tree.children_of(os.getpid())) == before

    # A forked process must list its own children, not the parent's it inherited the file of.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        grandchild = subprocess.Popen(["sleep", "30"])
        children = process_tree.children_of(os.getpid())
        os.write(write_end, f"{grandchild.pid} {children}".encode())
        grandchild.kill()
        grandchild.wait()
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reply:
        grandchild_pid, listed = reply.read().split(" ", 1)
    os.waitpid(pid, 0)
    assert listed == f"[{grandchild_pid}]"


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ"), reason="pipe sizes are Linux's")
def test_chatty_pipes_grow_only_within_the_workers_budget() -> None:
    """Of two chatty pipes with room for one, only one grows; closing it gives its room back."""
    budget = _PipeBudget(1)
    loop = Reactor()
    pipes = [os.pipe() for _ in range(3)]
    try:
        streams = [_StreamState(r, Stream.STDOUT, budget) for r, _ in pipes]
        for (_, w), st in zip(pipes, streams, strict=True):
            os.write(w, b"x" * READ_SIZE)
            assert st.read() == b"x" * READ_SIZE  # a full read: the pipe is written faster than read
        sizes = [fcntl.fcntl(st.fd, fcntl.F_GETPIPE_SZ) for st in streams]
        assert sizes[0] > READ_SIZE
        assert sizes[1:] == [READ_SIZE, READ_SIZE]
        assert budget.left == 0
        streams[0].close(loop)
        assert budget.left == 1
        streams[1].close(loop)  # never grown: gives nothing back
        assert budget.left == 1
    finally:
        for st in streams:
            st.close(loop)
        for _, w in pipes:
            os.close(w)
        loop.close()

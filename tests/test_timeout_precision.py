"""Timeouts end on time: timers wake when due, and ending work goes before starting new work.

The speed itself is measured by `python -m benchmarks cancel`; these tests
guard the behaviour it rests on, with bounds no loaded machine should miss.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import config, run

from cloudops_execution_engine import ExecutionEngine, ExecutionResult, ExecutionStatus
from cloudops_execution_engine.actors import reactor as reactor_module
from cloudops_execution_engine.actors.local_pool import start_worker_process
from cloudops_execution_engine.actors.reactor import LOW_HOLD_MAX, Reactor
from cloudops_execution_engine.protocol import (
    Cancel,
    FrameDecoder,
    Hello,
    Run,
    SetEnv,
    Shutdown,
    decode_message,
    encode_frame,
)
from cloudops_execution_engine.protocol.messages import Finished, Output, Started

pytestmark = pytest.mark.timeout(60)

SLEEP = shutil.which("sleep") or "/bin/sleep"


# -- the reactor ---------------------------------------------------------------


def test_a_timer_due_in_a_fraction_of_a_millisecond_is_not_rounded_up_to_one() -> None:
    """epoll counts whole milliseconds and rounds up; a timer must not wake that late every time."""
    reactor = Reactor(epoll=True)
    lateness: list[float] = []

    def fired(due: float) -> None:
        lateness.append(time.monotonic() - due)
        reactor.stop()

    try:
        for _ in range(20):
            reactor.call_later(0.0002, fired, time.monotonic() + 0.0002)
            reactor.run()
    finally:
        reactor.close()
    assert min(lateness) >= 0, "a timer fired before it was due"
    # Rounded up to 1 ms, every one of them would be at least 0.8 ms late.
    on_time = [late for late in lateness if late < 0.0007]
    assert len(on_time) >= len(lateness) // 2, f"lateness in ms: {[round(x * 1e3, 2) for x in lateness]}"


class _SlackKernel:
    """A clock, and waits that end as late as Linux lets them on a virtual machine.

    epoll rounds its timeout up to whole milliseconds, and the kernel adds its
    slack, a thousandth of the wait (at most 0.1 s); a virtual machine's host
    adds about as much again. select counts microseconds, its slack 50 µs.
    """

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[tuple[str, float]] = []

    def monotonic(self) -> float:
        return self.now

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        assert timeout is not None
        self.waits.append(("epoll", timeout))
        self.now += math.ceil(timeout * 1000) / 1000 + min(timeout * 0.002, 0.2)
        return []

    def select(self, _r: Any, _w: Any, _x: Any, timeout: float) -> tuple[list[int], list[int], list[int]]:
        self.waits.append(("select", timeout))
        self.now += timeout + 0.00005
        return [], [], []


@pytest.mark.parametrize("delay", [0.2, 3.0, 60.0, 3000.0])
def test_a_timer_far_off_is_not_late_by_the_kernels_slack_on_the_wait(
    delay: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wait of t seconds may end t/1000 late and more: a 60 s timeout must not end 60 ms late for it."""
    kernel = _SlackKernel()
    reactor = Reactor(epoll=True)
    monkeypatch.setattr(reactor_module, "time", kernel)
    monkeypatch.setattr(reactor_module, "select", kernel)
    monkeypatch.setattr(reactor, "_poller", kernel)
    fired: list[float] = []

    def fire() -> None:
        fired.append(kernel.now)
        reactor.stop()

    due = kernel.now + delay
    try:
        reactor.call_later(delay, fire)
        reactor.run()
    finally:
        monkeypatch.undo()
        reactor.close()
    assert fired, "the timer never fired"
    lateness = fired[0] - due
    assert 0 <= lateness < 0.0002, f"{lateness * 1e3:.2f} ms late after waits {kernel.waits}"
    # A few waits, not a busy approach.
    assert len(kernel.waits) <= 6, kernel.waits


def test_low_priority_calls_run_one_a_turn_after_what_became_ready() -> None:
    """A low-priority call waits for its turn's ready fds, signals and due timers; one call a turn."""
    reactor = Reactor()
    seen: list[str] = []
    read_end, write_end = os.pipe()
    try:

        def readable() -> None:
            seen.append(f"read {os.read(read_end, 100).decode()}")

        def low(name: str) -> None:
            seen.append(f"low {name}")
            # What a start does: it takes a while, and meanwhile a pipe fills and a timer falls due.
            os.write(write_end, name.encode())
            reactor.call_later(0, seen.append, f"timer after {name}")

        reactor.add_reader(read_end, readable)
        for name in "abc":
            reactor.call_low_priority(low, name)
        reactor.call_later(0.05, reactor.stop)
        reactor.run()
    finally:
        reactor.remove_reader(read_end)
        reactor.close()
        os.close(read_end)
        os.close(write_end)
    assert seen == [
        *("low a", "read a", "timer after a"),
        *("low b", "read b", "timer after b"),
        *("low c", "read c", "timer after c"),
    ]


def test_a_low_priority_call_waits_for_a_timer_about_to_fall_due() -> None:
    """A start (a millisecond or so) asked for just before a timeout falls due goes after the timeout."""
    reactor = Reactor()
    seen: list[str] = []
    reactor.call_later(0.0003, seen.append, "timer")
    reactor.call_low_priority(seen.append, "low")
    reactor.call_later(0.05, reactor.stop)
    try:
        reactor.run()
    finally:
        reactor.close()
    assert seen == ["timer", "low"]


def test_a_held_low_priority_call_runs_once_released_or_at_the_limit() -> None:
    """`hold_low_priority` holds calls back until it lets go, and never past `LOW_HOLD_MAX`."""
    reactor = Reactor()
    seen: list[tuple[str, float]] = []
    holding = [True]
    reactor.hold_low_priority = lambda: holding[0]

    def release() -> None:
        holding[0] = False
        seen.append(("released", time.monotonic()))

    def note(what: str) -> None:
        seen.append((what, time.monotonic()))

    began = time.monotonic()
    reactor.call_later(0.001, release)
    reactor.call_low_priority(note, "first")
    reactor.call_later(0.01, lambda: holding.__setitem__(0, True))
    reactor.call_later(0.011, reactor.call_low_priority, note, "second")
    reactor.call_later(0.2, reactor.stop)
    try:
        reactor.run()
    finally:
        reactor.close()
    assert [what for what, _ in seen] == ["released", "first", "second"]
    held_for = seen[2][1] - (began + 0.011)
    assert LOW_HOLD_MAX <= held_for < 0.15, f"held for {held_for * 1e3:.2f} ms while something held it"


# -- a worker, frame by frame --------------------------------------------------------


class WorkerLink:
    """A real worker process, spoken to in frames as the host speaks to it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.process, self._wfd, self._rfd = start_worker_process("timeout-precision-test")
        self._decoder = FrameDecoder()
        self.received: list[Any] = []
        self.expect(lambda: any(isinstance(m, Hello) for m in self.received))

    def run(self, argv: list[str], timeout_ms: int = 60_000) -> tuple[bytes, Run]:
        key = uuid.uuid4().bytes
        log = os.fsencode(self.tmp_path / f"{key.hex()}.log")
        display = " ".join(argv)
        run_message = Run(
            *(key, argv, {}, os.fsencode(self.tmp_path), timeout_ms, log, True, 65536, 500, display, 1),
            *(b"", [0], {}, [], []),
        )
        return key, run_message

    def send(self, *messages: Any) -> None:
        """All the messages in one write, so that the worker reads them together."""
        data = b"".join(encode_frame(m.to_wire()) for m in messages)
        os.set_blocking(self._wfd, True)
        try:
            os.write(self._wfd, data)
        finally:
            os.set_blocking(self._wfd, False)

    def expect(self, done: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"the worker did not get there; it sent {self.received}"
            if select.select([self._rfd], [], [], left)[0]:
                data = os.read(self._rfd, 1 << 20)
                assert data, f"the worker closed its pipe; it sent {self.received}"
                self.received += [decode_message(frame) for frame in self._decoder.feed(data)]

    def of(self, key: bytes, kind: type) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind) and getattr(m, "execution_id", None) == key]

    def finished(self, key: bytes) -> Finished | None:
        found = self.of(key, Finished)
        return found[0] if found else None

    def close(self) -> None:
        if self.process.is_alive():
            self.send(Shutdown())
            self.process.join(30)
        self.process.close()  # lets go of its sentinel pipe now, not at a garbage collection
        os.close(self._wfd)
        os.close(self._rfd)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerLink]:
    link = WorkerLink(tmp_path)
    try:
        yield link
    finally:
        link.close()


def test_a_timeout_is_not_held_up_by_a_burst_of_starts(worker: WorkerLink) -> None:
    """A command that times out while its worker starts 40 others is stopped before they have all started."""
    key, first = worker.run([SLEEP, "5"], timeout_ms=1)
    burst = [worker.run([SLEEP, "5"]) for _ in range(40)]
    worker.send(first, *(message for _, message in burst))
    worker.expect(lambda: worker.finished(key) is not None)
    done = worker.finished(key)
    assert done is not None
    assert done.status == "timeout"
    started_before = [k for k, _ in burst if worker.of(k, Started)]
    assert len(started_before) < len(burst), "the timeout waited for every start of the burst"
    worker.send(*(Cancel(k) for k, _ in burst))
    worker.expect(lambda: all(worker.finished(k) is not None for k, _ in burst))
    assert {worker.finished(k).status for k, _ in burst} == {"cancelled"}  # type: ignore[union-attr]


def test_a_timeout_signals_nothing_before_its_deadline(worker: WorkerLink) -> None:
    """The worker wakes ahead of a timeout to get ready; the command hears of it only when it is due."""
    script = (
        "import signal, sys, time\n"
        "def term(*_):\n"
        "    print(repr(time.time()), flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    keys = []
    for timeout_ms in (300, 600):
        key, message = worker.run([sys.executable, "-c", script], timeout_ms=timeout_ms)
        worker.send(message)
        keys.append((key, timeout_ms))
    worker.expect(lambda: all(worker.finished(k) is not None for k, _ in keys))
    for key, timeout_ms in keys:
        done = worker.finished(key)
        assert done is not None
        assert done.status == "timeout"
        started = worker.of(key, Started)[0].timestamp
        lines = [line for m in worker.of(key, Output) for line in m.lines]
        assert lines[0] == "ready", lines
        termed = float(lines[1])
        assert termed - started >= timeout_ms / 1000, f"SIGTERM came {termed - started:.4f} s after the start"


def test_a_cancel_read_with_its_run_still_reports_the_start_then_the_cancel(worker: WorkerLink) -> None:
    """Run and Cancel in one read: the command is started and cancelled, as when they come apart."""
    key, message = worker.run([SLEEP, "5"])
    worker.send(message, Cancel(key))
    worker.expect(lambda: worker.finished(key) is not None)
    kinds = [type(m) for m in worker.received if getattr(m, "execution_id", None) == key]
    assert kinds == [Started, Finished]
    assert worker.finished(key).status == "cancelled"  # type: ignore[union-attr]


def test_a_run_is_started_with_the_environment_it_was_sent_under(worker: WorkerLink) -> None:
    """A new environment read after a run applies to later runs only, however late the run starts."""
    before = {**{os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}, b"PROBE": b"before"}
    after = {**before, b"PROBE": b"after"}
    first, run_first = worker.run(["sh", "-c", "echo $PROBE"])
    second, run_second = worker.run(["sh", "-c", "echo $PROBE"])
    worker.send(SetEnv(before), run_first, SetEnv(after), run_second)
    worker.expect(lambda: all(worker.finished(k) is not None for k in (first, second)))
    assert [line for m in worker.of(first, Output) for line in m.lines] == ["before"]
    assert [line for m in worker.of(second, Output) for line in m.lines] == ["after"]


def test_a_shutdown_read_with_runs_still_reports_each_of_them(worker: WorkerLink) -> None:
    """Runs and Shutdown in one read: each run is started and cancelled, and the worker exits."""
    runs = [worker.run([SLEEP, "5"]) for _ in range(3)]
    worker.send(*(message for _, message in runs), Shutdown())
    worker.expect(lambda: all(worker.finished(k) is not None for k, _ in runs))
    assert {worker.finished(k).status for k, _ in runs} == {"cancelled"}  # type: ignore[union-attr]
    worker.process.join(30)
    assert not worker.process.is_alive()


# -- the engine ------------------------------------------------------------------------


async def test_many_simultaneous_timeouts_all_end_soon_after_their_deadline(tmp_path: Path) -> None:
    """40 commands time out together while the queued ones start: each ends within a bound of its timeout."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=20)) as engine:
        ids = [await engine.execute(run("sleep", "5", timeout_ms=300)) for _ in range(40)]
        results = [await engine.wait(eid, timeout=30) for eid in ids]
    durations = []
    for result in results:
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.TIMEOUT
        durations.append(result.duration.total_seconds())
    assert min(durations) >= 0.3, "stopped before its timeout"
    assert max(durations) < 0.3 + 0.5, f"durations: {sorted(durations)}"

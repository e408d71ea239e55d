"""Decoding cost per message: `python -m benchmarks.decode_bench [--number N] [--rounds R]`.

Times `decode_message` on frames as a worker's pipe delivers them (through
msgpack, so the kind is a plain int), and `to_wire` on the same messages,
which the sending side pays. Each figure is the best of several rounds of
this thread's CPU time, which holds steady while other processes keep the
machine busy.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack

from cloudops_execution_engine.protocol import Finished, Kind, Message, Output, Run, Started, decode_message

ID = bytes(range(16))
MESSAGES: dict[str, Message] = {
    "Started": Started(ID, 12345, 1_700_000_000.25),
    "Output, 1 line": Output(ID, 1, 1_700_000_000.5, ["hello world line of output"]),
    "Output, 50 lines": Output(ID, 2, 1_700_000_000.5, [f"line {i} of some output text" for i in range(50)]),
    "Finished": Finished(
        ID,
        "completed",
        0,
        "out\n",
        "",
        False,
        False,
        1_700_000_000.25,
        1_700_000_001.5,
        None,
        [0.01, 0.002, 4096000],
        None,
    ),
    "Finished, failed": Finished(
        ID,
        "failed",
        1,
        "",
        "boom\n",
        False,
        False,
        1_700_000_000.25,
        1_700_000_001.5,
        "Command failed with exit code 1",
        [0.01, 0.002, 4096000],
        None,
    ),
    "Run": Run(
        ID,
        ["bash", "-c", "echo hi"],
        {"A": "1", "B": "2"},
        b"/tmp",
        120_000,
        b"/tmp/logs/x.log",
        True,
        16 * 1024 * 1024,
        2000,
        "bash -c 'echo hi'",
        1,
        b"",
        [0],
        {},
        [],
        [],
    ),
}
# A frame the exact-type checks pass on to the field-by-field ones.
SLOW_FRAME = ("Started, int timestamp (field checks)", [Kind.STARTED, ID, 12345, 1_700_000_000])


def _frame(wire: list[Any]) -> Any:
    return msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False, strict_map_key=False)


def _best_ns(call: Callable[[], object], number: int, rounds: int) -> float:
    timer = timeit.Timer(call, timer=time.thread_time)
    return min(timer.repeat(repeat=rounds, number=number)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_bench")
    parser.add_argument("--number", type=int, default=200_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'message':40} {'decode ns':>10} {'to_wire ns':>11}")
    for name, message in MESSAGES.items():
        frame = _frame(message.to_wire())
        assert decode_message(frame) == message
        decode = _best_ns(partial(decode_message, frame), args.number, args.rounds)
        encode = _best_ns(message.to_wire, args.number, args.rounds)
        print(f"{name:40} {decode:10.0f} {encode:11.0f}")
    name, wire = SLOW_FRAME
    frame = _frame(wire)
    decode = _best_ns(partial(decode_message, frame), args.number, args.rounds)
    print(f"{name:40} {decode:10.0f} {'':>11}")


if __name__ == "__main__":
    main()

"""The messages between the supervisor and a worker.

Each is a small slotted class that travels as a msgpack array whose first item
is its `Kind`. `decode_message` checks the shape and type of every field, so a
frame that decodes as msgpack but does not match a message is a `ProtocolError`
rather than an `IndexError` or `TypeError` deep in the supervisor.

    supervisor -> worker:  SetEnv, Run, Cancel, Shutdown, Ping, Credit
    worker -> supervisor:  Hello, Started, Output, Finished, Pong

Paths and the host's environment travel as bytes: a host may hold names and
values that are not UTF-8 (PEP 383 surrogates in Python), and commands get
them byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .framing import ProtocolError

__all__ = [
    "Cancel",
    "Credit",
    "Finished",
    "Hello",
    "Kind",
    "Message",
    "Output",
    "Ping",
    "Pong",
    "Run",
    "SetEnv",
    "Shutdown",
    "Started",
    "Stream",
    "decode_message",
    "output_weight",
]


class Kind(IntEnum):
    SET_ENV = 1
    RUN = 2
    CANCEL = 3
    SHUTDOWN = 4
    PING = 5
    CREDIT = 6
    HELLO = 10
    STARTED = 11
    OUTPUT = 12
    FINISHED = 13
    PONG = 14


class Stream(IntEnum):
    STDOUT = 1
    STDERR = 2


@dataclass(slots=True)
class SetEnv:
    """The host's environment; each later `Run` overlays its own variables on it."""

    env: dict[bytes, bytes]

    def to_wire(self) -> list[Any]:
        return [Kind.SET_ENV, self.env]


@dataclass(slots=True)
class Run:
    execution_id: bytes
    argv: list[str]
    env: dict[str, str]
    cwd: bytes
    timeout_ms: int
    log_path: bytes
    stream_output: bool
    max_output_bytes: int
    kill_grace_ms: int
    display: str

    def to_wire(self) -> list[Any]:
        return [
            Kind.RUN,
            self.execution_id,
            self.argv,
            self.env,
            self.cwd,
            self.timeout_ms,
            self.log_path,
            self.stream_output,
            self.max_output_bytes,
            self.kill_grace_ms,
            self.display,
        ]


@dataclass(slots=True)
class Cancel:
    execution_id: bytes

    def to_wire(self) -> list[Any]:
        return [Kind.CANCEL, self.execution_id]


@dataclass(slots=True)
class Shutdown:
    def to_wire(self) -> list[Any]:
        return [Kind.SHUTDOWN]


@dataclass(slots=True)
class Ping:
    """Asks for a `Pong`: a worker that stops answering is stopped or hung."""

    seq: int

    def to_wire(self) -> list[Any]:
        return [Kind.PING, self.seq]


@dataclass(slots=True)
class Credit:
    """Lets the worker send `nbytes` more of output frames: the host has room for them again."""

    nbytes: int

    def to_wire(self) -> list[Any]:
        return [Kind.CREDIT, self.nbytes]


@dataclass(slots=True)
class Hello:
    pid: int
    capacity: int  # executions the worker can hold at once within its file descriptor limit

    def to_wire(self) -> list[Any]:
        return [Kind.HELLO, self.pid, self.capacity]


@dataclass(slots=True)
class Pong:
    seq: int

    def to_wire(self) -> list[Any]:
        return [Kind.PONG, self.seq]


@dataclass(slots=True)
class Started:
    execution_id: bytes
    pid: int  # 0 when the program could not be started
    timestamp: float

    def to_wire(self) -> list[Any]:
        return [Kind.STARTED, self.execution_id, self.pid, self.timestamp]


@dataclass(slots=True)
class Output:
    """Whole lines of one stream, read together at `timestamp`."""

    execution_id: bytes
    stream: int
    timestamp: float
    lines: list[str]

    def to_wire(self) -> list[Any]:
        return [Kind.OUTPUT, self.execution_id, self.stream, self.timestamp, self.lines]


@dataclass(slots=True)
class Finished:
    execution_id: bytes
    status: str
    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    started_at: float
    completed_at: float
    error: str | None
    rusage: list[float] | None  # user seconds, system seconds, max RSS bytes

    def to_wire(self) -> list[Any]:
        return [
            Kind.FINISHED,
            self.execution_id,
            self.status,
            self.exit_code,
            self.stdout,
            self.stderr,
            self.stdout_truncated,
            self.stderr_truncated,
            self.started_at,
            self.completed_at,
            self.error,
            self.rusage,
        ]


def output_weight(lines: list[str]) -> int:
    """What an `Output` frame counts against the worker's output credit.

    Both ends compute it from the same lines, so it needs no field of its own;
    the per-line term stands for the event object each line becomes in the host.
    """
    return sum(map(len, lines)) + 64 * len(lines)


Message = SetEnv | Run | Cancel | Shutdown | Ping | Credit | Hello | Started | Output | Finished | Pong

_ID = bytes
_NUMBER = (int, float)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _is_bytes_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, bytes) and isinstance(v, bytes) for k, v in value.items()
    )


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return isinstance(value, _ID) and len(value) == 16


# Per kind: the number of fields after the kind and a check for each.
_SHAPES: dict[int, tuple[Any, ...]] = {
    Kind.SET_ENV: (_is_bytes_map,),
    Kind.RUN: (
        _is_id,
        _is_str_list,
        _is_str_map,
        lambda v: isinstance(v, bytes),
        _is_int,
        lambda v: isinstance(v, bytes),
        lambda v: isinstance(v, bool),
        _is_int,
        _is_int,
        lambda v: isinstance(v, str),
    ),
    Kind.CANCEL: (_is_id,),
    Kind.SHUTDOWN: (),
    Kind.PING: (_is_int,),
    Kind.CREDIT: (_is_int,),
    Kind.HELLO: (_is_int, _is_int),
    Kind.PONG: (_is_int,),
    Kind.STARTED: (_is_id, _is_int, _is_number),
    Kind.OUTPUT: (_is_id, lambda v: v in (Stream.STDOUT, Stream.STDERR), _is_number, _is_str_list),
    Kind.FINISHED: (
        _is_id,
        lambda v: isinstance(v, str),
        _is_int,
        lambda v: isinstance(v, str),
        lambda v: isinstance(v, str),
        lambda v: isinstance(v, bool),
        lambda v: isinstance(v, bool),
        _is_number,
        _is_number,
        lambda v: v is None or isinstance(v, str),
        lambda v: v is None or (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)),
    ),
}

_BUILDERS: dict[int, Any] = {
    Kind.SET_ENV: SetEnv,
    Kind.RUN: Run,
    Kind.CANCEL: Cancel,
    Kind.SHUTDOWN: Shutdown,
    Kind.PING: Ping,
    Kind.CREDIT: Credit,
    Kind.HELLO: Hello,
    Kind.PONG: Pong,
    Kind.STARTED: Started,
    Kind.OUTPUT: Output,
    Kind.FINISHED: Finished,
}


_STR_ONLY = frozenset({str})
_EXACT_NUMBERS = frozenset({int, float})


# The exact types of a run of plain fields, compared in one go: a tuple of types
# built in C is cheaper than a test per field.
_RUN_PLAIN = (bytes, int, bytes, bool, int, int, str)  # fields 4 to 10
_FINISHED_PLAIN = (str, int, str, str, bool, bool, float, float)  # fields 2 to 9


def _run_ok(f: list[Any]) -> bool:
    argv, env = f[2], f[3]
    return (
        type(argv) is list
        and type(env) is dict
        and set(map(type, argv)) <= _STR_ONLY
        and set(map(type, env)) <= _STR_ONLY
        and set(map(type, env.values())) <= _STR_ONLY
        and tuple(map(type, f[4:])) == _RUN_PLAIN
    )


def _started_ok(f: list[Any]) -> bool:
    return type(f[2]) is int and type(f[3]) is float


def _output_ok(f: list[Any]) -> bool:
    lines = f[4]
    return (
        type(f[2]) is int
        and f[2] in (Stream.STDOUT, Stream.STDERR)
        and type(f[3]) is float
        and type(lines) is list
        and set(map(type, lines)) <= _STR_ONLY
    )


def _finished_ok(f: list[Any]) -> bool:
    error, usage = f[10], f[11]
    return (
        tuple(map(type, f[2:10])) == _FINISHED_PLAIN
        and (error is None or type(error) is str)
        and (
            usage is None
            or (type(usage) is list and len(usage) == 3 and set(map(type, usage)) <= _EXACT_NUMBERS)
        )
    )


# The messages sent for every command, checked with exact types in one expression
# each; anything these do not pass goes through the field-by-field checks, which
# accept the same and more (an int where a float is expected) and name what is
# wrong. Every one of them starts with an execution id.
_FAST: dict[int, tuple[int, Any]] = {
    Kind.RUN: (11, _run_ok),
    Kind.STARTED: (4, _started_ok),
    Kind.OUTPUT: (5, _output_ok),
    Kind.FINISHED: (12, _finished_ok),
}


def decode_message(frame: Any) -> Message:
    """Turn one decoded frame into its message, or raise `ProtocolError` naming what is wrong."""
    if type(frame) is list and frame and type(frame[0]) is int:
        fast = _FAST.get(frame[0])
        if fast is not None and len(frame) == fast[0]:
            first = frame[1]
            if type(first) is bytes and len(first) == 16 and fast[1](frame):
                message: Message = _BUILDERS[frame[0]](*frame[1:])
                return message
    return _decode_checked(frame)


def _decode_checked(frame: Any) -> Message:
    if not isinstance(frame, list) or not frame or not _is_int(frame[0]):
        raise ProtocolError(f"a message is an array starting with its kind, got {type(frame).__name__}")
    kind = frame[0]
    shape = _SHAPES.get(kind)
    if shape is None:
        raise ProtocolError(f"unknown message kind {kind}")
    fields = frame[1:]
    if len(fields) != len(shape):
        raise ProtocolError(f"{Kind(kind).name} message has {len(fields)} fields, expected {len(shape)}")
    for index, (check, value) in enumerate(zip(shape, fields, strict=True)):
        if not check(value):
            raise ProtocolError(
                f"{Kind(kind).name} message field {index + 1} has a bad value of type {type(value).__name__}"
            )
    message: Message = _BUILDERS[kind](*fields)
    return message

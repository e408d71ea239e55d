"""The messages between the supervisor and a worker.

Each is a small slotted class that travels as a msgpack array whose first item
is its `Kind`, followed by its fields in the order the class declares them.
`decode_message` checks the shape and type of every field, so a frame that
decodes as msgpack but does not match a message is a `ProtocolError` rather
than an `IndexError` or `TypeError` deep in the supervisor.

    supervisor -> worker:  SetEnv, Run, Cancel, Shutdown, Ping, Credit
    worker -> supervisor:  Hello, Started, Output, Finished, Pong, Retire

A message is defined once, by its class: each field's annotation is its wire
type, either a plain type (`str`, `int`, `float` for an int or a float,
`str | None`, `list[str]`, `dict[bytes, bytes]`, ...) or one of the aliases
`_Id` (16 bytes), `_StreamNo` and `_Rusage`. From that definition `_message`
derives the class's `to_wire`, the number of fields its frames carry, the
field-by-field checks that name the field at fault, and the exact-type check
compiled into one function per kind, which every frame tries first.

Paths and the host's environment travel as bytes: a host may hold names and
values that are not UTF-8 (PEP 383 surrogates in Python), and commands get
them byte for byte.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

from .framing import ProtocolError

__all__ = [
    "OUTPUT_WINDOW",
    "Cancel",
    "Credit",
    "Finished",
    "Hello",
    "Kind",
    "Message",
    "Output",
    "Ping",
    "Pong",
    "Retire",
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
    RETIRE = 15


class Stream(IntEnum):
    STDOUT = 1
    STDERR = 2


_NUMBER = (int, float)
# A stream is compared by value, as `IntEnum` members compare.
_STREAMS = tuple(Stream)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _is_list_of(item: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(isinstance(v, item) for v in value)


def _is_map_of(item: type) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, dict) and all(isinstance(k, item) and isinstance(v, item) for k, v in value.items())
    )


@dataclass(frozen=True, slots=True)
class _WireType:
    """How a field of one wire type is checked on the way in.

    `check` is the field-by-field test: it takes anything msgpack may give for
    the field that means the right thing, such as an int where a float is
    expected. `fast` is an expression of `{v}` that holds for the exact types a
    peer sends; it becomes part of one compiled test per kind (with the names
    in `_FAST_NAMES`), so it must hold for nothing `check` refuses.
    """

    name: str
    check: Callable[[Any], bool]
    fast: str


_FAST_NAMES: dict[str, Any] = {
    "_STREAMS": _STREAMS,
    "_NUMBERS": frozenset(_NUMBER),
    "_STR_ONLY": frozenset({str}),
    "_BYTES_ONLY": frozenset({bytes}),
    "_INT_ONLY": frozenset({int}),
}
_ID = _WireType(
    "id", lambda v: isinstance(v, bytes) and len(v) == 16, "type({v}) is bytes and len({v}) == 16"
)
_STREAM = _WireType("stream", lambda v: v in _STREAMS, "type({v}) is int and {v} in _STREAMS")
_RUSAGE = _WireType(
    "rusage",
    lambda v: v is None or (isinstance(v, list) and len(v) == 3 and all(map(_is_number, v))),
    "{v} is None or (type({v}) is list and len({v}) == 3 and set(map(type, {v})) <= _NUMBERS)",
)
# The wire type of each plain annotation; the aliases below name the others.
_PLAIN: dict[Any, _WireType] = {
    bytes: _WireType("bytes", lambda v: isinstance(v, bytes), "type({v}) is bytes"),
    str: _WireType("str", lambda v: isinstance(v, str), "type({v}) is str"),
    int: _WireType("int", _is_int, "type({v}) is int"),
    float: _WireType("float", _is_number, "type({v}) is float"),
    bool: _WireType("bool", lambda v: isinstance(v, bool), "type({v}) is bool"),
    str | None: _WireType(
        "str | None", lambda v: v is None or isinstance(v, str), "{v} is None or type({v}) is str"
    ),
    list[str]: _WireType(
        "list[str]", _is_list_of(str), "type({v}) is list and set(map(type, {v})) <= _STR_ONLY"
    ),
    list[int]: _WireType(
        "list[int]",
        lambda v: isinstance(v, list) and all(map(_is_int, v)),
        "type({v}) is list and set(map(type, {v})) <= _INT_ONLY",
    ),
    dict[str, int]: _WireType(
        "dict[str, int]",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(x) for k, x in v.items()),
        "type({v}) is dict and set(map(type, {v})) <= _STR_ONLY"
        " and set(map(type, {v}.values())) <= _INT_ONLY",
    ),
    dict[str, str]: _WireType(
        "dict[str, str]",
        _is_map_of(str),
        "type({v}) is dict and set(map(type, {v})) <= _STR_ONLY"
        " and set(map(type, {v}.values())) <= _STR_ONLY",
    ),
    dict[bytes, bytes]: _WireType(
        "dict[bytes, bytes]",
        _is_map_of(bytes),
        "type({v}) is dict and set(map(type, {v})) <= _BYTES_ONLY"
        " and set(map(type, {v}.values())) <= _BYTES_ONLY",
    ),
}
_Id = Annotated[bytes, _ID]
_StreamNo = Annotated[int, _STREAM]
_Rusage = Annotated[list[float] | None, _RUSAGE]  # user seconds, system seconds, max RSS bytes


class _Message:
    """What `_message` gives every message class, declared here for type checkers."""

    __slots__ = ()

    def to_wire(self) -> list[Any]:
        """The msgpack array this message travels as: its kind, then its fields in order."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _Shape:
    """A message kind as `_decode_checked` sees it."""

    kind: Kind
    cls: Callable[..., Any]
    fields: tuple[tuple[str, _WireType], ...]


_SHAPES: dict[int, _Shape] = {}
# Per kind, the exact-type test and the construction in one compiled function
# that returns None for whatever the test refuses. One expression of
# `type(x) is T` tests costs a fraction of calling a check per field or
# comparing a tuple of types, and every frame goes through one of these.
_FAST: dict[int, Callable[[list[Any]], Any]] = {}

_M = TypeVar("_M", bound=_Message)


def _message(kind: Kind) -> Callable[[type[_M]], type[_M]]:
    """Register a dataclass as the message of `kind`, with encoding and checks derived from its fields."""

    def define(cls: type[_M]) -> type[_M]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass before it is a message")
        hints = get_type_hints(cls, include_extras=True)
        fields = tuple((f.name, _wire_type(hints[f.name])) for f in dataclasses.fields(cls))
        _SHAPES[kind] = _Shape(kind, cls, fields)
        attributes = ", ".join(f"self.{name}" for name, _ in fields)
        cls.to_wire = _compile(
            f"{cls.__name__}.to_wire",
            f"def to_wire(self):\n    return [kind, {attributes}]\n",
            {"kind": kind},
        )
        cls.to_wire.__doc__ = _Message.to_wire.__doc__
        args = [f"v{i}" for i in range(1, len(fields) + 1)]
        test = " and ".join(f"({wire.fast.format(v=v)})" for v, (_, wire) in zip(args, fields, strict=True))
        _FAST[kind] = _compile(
            f"decode_{kind.name.lower()}",
            f"def decode(frame):\n"
            f"    if len(frame) == {len(args) + 1}:\n"
            f"        {', '.join(['_', *args])}, = frame\n"
            f"        if {test or 'True'}:\n"
            f"            return cls({', '.join(args)})\n"
            f"    return None\n",
            {"cls": cls, **_FAST_NAMES},
        )
        return cls

    return define


def _wire_type(annotation: Any) -> _WireType:
    if get_origin(annotation) is Annotated:
        wire = get_args(annotation)[1]
        if isinstance(wire, _WireType):
            return wire
    elif annotation in _PLAIN:
        return _PLAIN[annotation]
    raise TypeError(f"no wire type for the annotation {annotation!r}")


def _compile(qualname: str, source: str, names: dict[str, Any]) -> Any:
    """The one function that `source` defines, with `names` as its globals."""
    code = compile(source, f"<{qualname}>", "exec")
    exec(code, names)
    function = names[code.co_names[0]]
    function.__qualname__ = qualname
    function.__module__ = __name__
    return function


@_message(Kind.SET_ENV)
@dataclass(slots=True)
class SetEnv(_Message):
    """The host's environment; each later `Run` overlays its own variables on it."""

    env: dict[bytes, bytes]


@_message(Kind.RUN)
@dataclass(slots=True)
class Run(_Message):
    execution_id: _Id
    argv: list[str]
    env: dict[str, str]
    cwd: bytes
    timeout_ms: int
    log_path: bytes
    stream_output: bool
    max_output_bytes: int
    kill_grace_ms: int
    display: str
    attempt: int  # from 1; a later attempt appends to the log the earlier ones wrote
    stdin: bytes  # written to the command's stdin; empty: it reads /dev/null
    success_exit_codes: list[int]
    limits: dict[str, int]  # `ResourceLimits` fields that are set, but cpu_affinity
    cpu_affinity: list[int]  # empty: the CPUs the worker has
    secrets: list[str]  # masked as *** in everything the worker writes or sends


@_message(Kind.CANCEL)
@dataclass(slots=True)
class Cancel(_Message):
    execution_id: _Id


@_message(Kind.SHUTDOWN)
@dataclass(slots=True)
class Shutdown(_Message):
    pass


@_message(Kind.PING)
@dataclass(slots=True)
class Ping(_Message):
    """Asks for a `Pong`: a worker that stops answering is stopped or hung."""

    seq: int


# Output (as `output_weight` counts it) a worker may have sent that the host
# has not yet given back as `Credit`: both ends must agree on it.
OUTPUT_WINDOW = 4 * 1024 * 1024


@_message(Kind.CREDIT)
@dataclass(slots=True)
class Credit(_Message):
    """Lets the worker send `nbytes` more of output frames: the host has room for them again."""

    nbytes: int


@_message(Kind.HELLO)
@dataclass(slots=True)
class Hello(_Message):
    pid: int
    capacity: int  # executions the worker can hold at once within its file descriptor limit


@_message(Kind.PONG)
@dataclass(slots=True)
class Pong(_Message):
    seq: int


@_message(Kind.RETIRE)
@dataclass(slots=True)
class Retire(_Message):
    """The worker can no longer start commands as it should (`reason`): send it nothing more, replace it.

    What it holds runs on to its end; the supervisor then stops it.
    """

    reason: str


@_message(Kind.STARTED)
@dataclass(slots=True)
class Started(_Message):
    execution_id: _Id
    pid: int  # 0 when the program could not be started
    timestamp: float


@_message(Kind.OUTPUT)
@dataclass(slots=True)
class Output(_Message):
    """Whole lines of one stream, read together at `timestamp`."""

    execution_id: _Id
    stream: _StreamNo
    timestamp: float
    lines: list[str]


@_message(Kind.FINISHED)
@dataclass(slots=True)
class Finished(_Message):
    execution_id: _Id
    status: str
    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    started_at: float
    completed_at: float
    error: str | None
    rusage: _Rusage
    # Why the log file stopped short (a full disk), when it did; the command's result is not affected.
    log_error: str | None


def output_weight(lines: list[str]) -> int:
    """What an `Output` frame counts against the worker's output credit.

    Both ends compute it from the same lines, so it needs no field of its own;
    the per-line term stands for the event object each line becomes in the host.
    """
    return sum(map(len, lines)) + 64 * len(lines)


Message = (
    SetEnv | Run | Cancel | Shutdown | Ping | Credit | Hello | Started | Output | Finished | Pong | Retire
)


def decode_message(frame: Any) -> Message:
    """Turn one decoded frame into its message, or raise `ProtocolError` naming what is wrong."""
    if type(frame) is list and frame and type(frame[0]) is int:
        fast = _FAST.get(frame[0])
        if fast is not None:
            message: Message | None = fast(frame)
            if message is not None:
                return message
    # Whatever the exact types refuse: the field checks accept the same and more
    # (an int where a float is expected), and name what is wrong.
    return _decode_checked(frame)


def _decode_checked(frame: Any) -> Message:
    if not isinstance(frame, list) or not frame or not _is_int(frame[0]):
        raise ProtocolError(f"a message is an array starting with its kind, got {type(frame).__name__}")
    shape = _SHAPES.get(frame[0])
    if shape is None:
        raise ProtocolError(f"unknown message kind {frame[0]}")
    fields = frame[1:]
    if len(fields) != len(shape.fields):
        raise ProtocolError(
            f"{shape.kind.name} message has {len(fields)} fields, expected {len(shape.fields)}"
        )
    for index, (name, wire) in enumerate(shape.fields):
        value = fields[index]
        if not wire.check(value):
            raise ProtocolError(
                f"{shape.kind.name} message field {index + 1} ({name}) has a bad value"
                f" of type {type(value).__name__}"
            )
    message: Message = shape.cls(*fields)
    return message

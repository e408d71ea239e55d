"""The frame codec and message parsing: exact on good input, a clear error on anything else."""

from __future__ import annotations

import contextlib
import struct
from typing import Any, get_args

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudops_execution_engine.protocol import (
    Credit,
    Finished,
    FrameDecoder,
    Hello,
    Kind,
    Message,
    Output,
    Ping,
    Pong,
    ProtocolError,
    Run,
    SetEnv,
    Started,
    decode_message,
    encode_frame,
)
from cloudops_execution_engine.protocol.messages import _FAST, _SHAPES, _decode_checked

pytestmark = pytest.mark.timeout(60)

ID = bytes(range(16))
MESSAGES: list[Message] = [
    Run(
        *(ID, ["echo", "hi"], {"A": "1"}, b"/tmp", 1000, b"/tmp/x.log", True, 100, 50, "echo hi", 1),
        *(b"in", [0, 3], {"cpu_seconds": 2}, [0], ["s3cret"]),
    ),
    SetEnv({b"PATH": b"/bin", b"ODD\xff": b"\xfe"}),
    Ping(7),
    Pong(7),
    Credit(65536),
    Hello(42, 1000),
    Started(ID, 1234, 1.5),
    Output(ID, 1, 2.5, ["a", "b" * 1000, ""]),
    Finished(ID, "completed", 0, "out", "", False, True, 1.0, 2.0, None, [0.1, 0.2, 1024], None),
    Finished(ID, "completed", 0, "", "", False, False, 1.0, 2.0, None, [0.1, 0.2, 1024], "No space left"),
]


def test_every_message_round_trips_through_a_frame() -> None:
    """Encode, decode, parse: the same message comes back."""
    decoder = FrameDecoder()
    for message in MESSAGES:
        [frame] = decoder.feed(encode_frame(message.to_wire()))
        assert decode_message(frame) == message


def test_split_input_one_byte_at_a_time() -> None:
    """Frames fed byte by byte come out whole and in order."""
    stream = b"".join(encode_frame(m.to_wire()) for m in MESSAGES)
    decoder = FrameDecoder()
    frames: list[Any] = []
    for i in range(len(stream)):
        frames += decoder.feed(stream[i : i + 1])
    assert [decode_message(f) for f in frames] == MESSAGES
    assert decoder.buffered == 0


def test_merged_input_in_one_read() -> None:
    """Several frames in one read all come out."""
    stream = b"".join(encode_frame(m.to_wire()) for m in MESSAGES) * 3
    assert len(FrameDecoder().feed(stream)) == len(MESSAGES) * 3


def test_truncated_frame_waits_for_the_rest() -> None:
    """Half a frame yields nothing and keeps the bytes until the rest arrives."""
    frame = encode_frame(MESSAGES[0].to_wire())
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-3]) == []
    assert decoder.buffered == len(frame) - 3
    assert len(decoder.feed(frame[-3:])) == 1


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    """A length over the limit is an error at once, without waiting for the body."""
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(struct.pack(">I", 1025))


def test_garbage_body_is_a_protocol_error_and_the_decoder_stays_broken() -> None:
    """A body that is not msgpack is refused, and the decoder never resumes after it."""
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="malformed"):
        decoder.feed(struct.pack(">I", 1) + b"\xc1")
    with pytest.raises(ProtocolError, match="unusable"):
        decoder.feed(encode_frame([Kind.SHUTDOWN]))


@pytest.mark.parametrize(
    "frame",
    [
        {},
        [],
        ["run"],
        [99],
        [Kind.STARTED, ID, "pid", 1.0],
        [Kind.STARTED, ID, 1],
        [Kind.STARTED, b"short", 1, 1.0],
        [Kind.OUTPUT, ID, 3, 1.0, ["x"]],
        [Kind.OUTPUT, ID, 1, 1.0, [b"bytes"]],
        [Kind.FINISHED, ID, "completed", True, "", "", False, False, 1.0, 2.0, None, None, None],
        [Kind.FINISHED, ID, "completed", 0, "", "", False, False, 1.0, 2.0, None, [1, 2], None],
        [Kind.FINISHED, ID, "completed", 0, "", "", False, False, 1.0, 2.0, None, None, 7],
    ],
)
def test_type_confused_messages_are_protocol_errors(frame: Any) -> None:
    """A frame that is valid msgpack but not a valid message names what is wrong."""
    with pytest.raises(ProtocolError):
        decode_message(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    """Random bytes give frames or a ProtocolError, nothing else."""
    decoder = FrameDecoder(max_frame=4096)
    try:
        for frame in decoder.feed(data):
            with contextlib.suppress(ProtocolError):
                decode_message(frame)
    except ProtocolError:
        pass


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_values = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 20), st.lists(_values, max_size=12))
def test_fuzz_structured_frames_are_parsed_or_refused(kind: int, fields: list[Any]) -> None:
    """Any msgpack array, however confused its types, parses or raises ProtocolError."""
    body = msgpack.packb([kind, *fields], use_bin_type=True)
    decoder = FrameDecoder()
    [frame] = decoder.feed(struct.pack(">I", len(body)) + body)
    with contextlib.suppress(ProtocolError):
        decode_message(frame)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(MESSAGES), min_size=1, max_size=8), st.data())
def test_fuzz_arbitrary_split_points(messages: list[Any], data: st.DataObject) -> None:
    """However a stream is cut into reads, the same messages come out."""
    stream = b"".join(encode_frame(m.to_wire()) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    out: list[Any] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert [decode_message(f) for f in out] == messages


def _outcome(parse: Any, frame: Any) -> Any:
    try:
        return parse(frame)
    except ProtocolError:
        return ProtocolError


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_the_fast_checks_accept_nothing_the_field_checks_refuse(
    message: Message, data: st.DataObject
) -> None:
    """Per-command messages pass exact-type checks first; they must agree with the field-by-field ones."""
    wire = message.to_wire()
    for index in data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=3)):
        wire[index] = data.draw(_values)
    # Through msgpack, as frames arrive: the kind is a plain int then.
    frame = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)
    assert _outcome(decode_message, frame) == _outcome(_decode_checked, frame)


# Every test below is generated from the message definitions, so a new field is
# covered as soon as it is declared. A value of each shape msgpack gives, by name:
POOL: dict[str, Any] = {
    "none": None,
    "false": False,
    "small int": 2,  # a stream number too
    "large int": 2**40,
    "float": 2.5,
    "str": "s\u00e9",
    "bytes": b"\xff",
    "id": ID,
    "str list": ["a", ""],
    "int list": [1],
    "number triple": [0.5, 0.25, 4096],
    "str map": {"K": "v"},
    "bytes map": {b"K\xff": b"v\xfe"},
    "int map": {"K": 1},
}
# The pool values each wire type accepts; the first is what a peer sends.
ACCEPTED: dict[str, list[str]] = {
    "id": ["id"],
    "bytes": ["bytes", "id"],
    "str": ["str"],
    "int": ["large int", "small int"],
    "float": ["float", "small int", "large int"],
    "bool": ["false"],
    "str | None": ["str", "none"],
    "list[str]": ["str list"],
    "list[int]": ["int list"],
    "dict[str, str]": ["str map"],
    "dict[str, int]": ["int map"],
    "dict[bytes, bytes]": ["bytes map"],
    "stream": ["small int"],
    "rusage": ["number triple", "none"],
}
FIELDS = [
    (shape.kind, index, name, wire.name)
    for shape in _SHAPES.values()
    for index, (name, wire) in enumerate(shape.fields, 1)
]


def _typical(kind: Kind) -> list[Any]:
    return [POOL[ACCEPTED[wire.name][0]] for _, wire in _SHAPES[kind].fields]


def _through_msgpack(wire: list[Any]) -> Any:
    [frame] = FrameDecoder().feed(encode_frame(wire))
    return frame


def test_every_kind_is_defined_once() -> None:
    """Each kind has one message class, `Message` is their union, and every wire type is described here."""
    assert sorted(_SHAPES) == sorted(Kind)
    assert {shape.cls for shape in _SHAPES.values()} == set(get_args(Message))
    assert {wire for _, _, _, wire in FIELDS} <= set(ACCEPTED)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
def test_every_kind_round_trips_on_the_fast_path(kind: Kind) -> None:
    """Every kind travels as its kind then its fields, and comes back equal through the exact-type check."""
    values = _typical(kind)
    message = _SHAPES[kind].cls(*values)
    wire = message.to_wire()
    assert wire == [kind, *values]
    assert type(wire[0]) is Kind
    frame = _through_msgpack(wire)
    assert _FAST[kind](frame) == message
    assert decode_message(frame) == message
    assert _decode_checked(frame) == message


@pytest.mark.parametrize(
    ("kind", "index", "name", "wire"), [pytest.param(*f, id=f"{f[0].name}-{f[2]}") for f in FIELDS]
)
def test_each_field_accepts_its_wire_type_and_refuses_others(
    kind: Kind, index: int, name: str, wire: str
) -> None:
    """A value of the field's wire type decodes; any other is a ProtocolError naming the kind and field."""
    cls = _SHAPES[kind].cls
    for key, value in POOL.items():
        values = _typical(kind)
        values[index - 1] = value
        frame = _through_msgpack([kind, *values])
        if key in ACCEPTED[wire]:
            assert decode_message(frame) == cls(*values), key
        else:
            field = rf"^{kind.name} message field {index} \({name}\)"
            bad = rf"{field} has a bad value of type {type(value).__name__}$"
            for parse in (decode_message, _decode_checked):
                with pytest.raises(ProtocolError, match=bad):
                    parse(frame)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
def test_a_field_too_many_or_too_few_is_refused(kind: Kind) -> None:
    """A frame of the wrong length names its kind and the number of fields it should have."""
    values = _typical(kind)
    frames = [[kind, *values, None]] + ([[kind, *values[:-1]]] if values else [])
    for frame in frames:
        expected = f"^{kind.name} message has {len(frame) - 1} fields, expected {len(values)}$"
        with pytest.raises(ProtocolError, match=expected):
            decode_message(_through_msgpack(frame))


TYPICAL: list[Message] = [_SHAPES[kind].cls(*_typical(kind)) for kind in Kind]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(TYPICAL), st.data())
def test_fuzz_the_fast_checks_of_every_kind_agree_with_the_field_checks(
    message: Message, data: st.DataObject
) -> None:
    """For every kind, however its fields are swapped for other values, both paths give the same verdict."""
    wire = message.to_wire()
    indexes = st.lists(st.integers(1, len(wire) - 1), max_size=3) if len(wire) > 1 else st.just([])
    for index in data.draw(indexes):
        wire[index] = data.draw(_values | st.sampled_from(list(POOL.values())))
    frame = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False, strict_map_key=False)
    assert _outcome(decode_message, frame) == _outcome(_decode_checked, frame)


_SIGPIPE_HOST = """
import asyncio, os, signal, subprocess, sys
from cloudops_execution_engine.protocol.pipe import PipeWriter

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as command-line tools, and hosts that embed Python, have it
# A reader that is gone, as a SIGKILLed worker's end of its pipe is.
reader = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
reader.wait()

async def main():
    loop = asyncio.get_running_loop()
    broken = loop.create_future()
    fd = reader.stdin.fileno()
    os.set_blocking(fd, False)
    writer = PipeWriter(loop, fd, broken.set_result)
    writer.write(b"a frame for a dead worker")
    print(type(await asyncio.wait_for(broken, 10)).__name__, flush=True)

asyncio.run(main())
blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
print("blocked" if signal.SIGPIPE in blocked else "unblocked", sorted(signal.sigpending()), flush=True)
"""


@pytest.mark.timeout(30)
def test_a_host_that_restored_sigpipes_default_action_survives_a_write_to_a_dead_reader() -> None:
    """The write fails with EPIPE, as under Python's own SIG_IGN, rather than killing the host."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SIGPIPE_HOST], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split("\n")[:2] == ["BrokenPipeError", "unblocked []"]

"""The frame codec and message parsing: exact on good input, a clear error on anything else."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

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
from cloudops_execution_engine.protocol.messages import _decode_checked

pytestmark = pytest.mark.timeout(60)

ID = bytes(range(16))
MESSAGES: list[Message] = [
    Run(ID, ["echo", "hi"], {"A": "1"}, b"/tmp", 1000, b"/tmp/x.log", True, 100, 50, "echo hi"),
    SetEnv({b"PATH": b"/bin", b"ODD\xff": b"\xfe"}),
    Ping(7),
    Pong(7),
    Credit(65536),
    Hello(42, 1000),
    Started(ID, 1234, 1.5),
    Output(ID, 1, 2.5, ["a", "b" * 1000, ""]),
    Finished(ID, "completed", 0, "out", "", False, True, 1.0, 2.0, None, [0.1, 0.2, 1024]),
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
        [Kind.FINISHED, ID, "completed", True, "", "", False, False, 1.0, 2.0, None, None],
        [Kind.FINISHED, ID, "completed", 0, "", "", False, False, 1.0, 2.0, None, [1, 2]],
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

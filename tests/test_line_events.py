"""Output line events: what handlers and readers get is what the validating constructors make.

The host makes one event per output line without validation. These tests hold
every such event, as each kind of listener receives it, against the event the
public constructor makes of the same values: same type, same fields, same
JSON, for lines with non-ASCII text, invalid UTF-8, `\\r\\n`, empty lines and
lines longer than `LINE_PIECE`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from conftest import PYTHON, Recorder, config, result_of, run

from cloudops_execution_engine import ExecutionEngine, SyncExecutionEngine
from cloudops_execution_engine.actors.outcomes import LineEvents
from cloudops_execution_engine.actors.output import LINE_PIECE
from cloudops_execution_engine.events import StderrEvent, StdoutEvent
from cloudops_execution_engine.protocol import Stream

pytestmark = pytest.mark.timeout(30)


UNIT = "a\u00e9\u4e2d\U0001d11e"  # 1, 2, 3 and 4 UTF-8 bytes
LONG = UNIT * (LINE_PIECE // 3)  # about 3.3 pieces long

# What the command writes to stdout before and after LONG (made by the command:
# too long for an argument), and the lines its events must carry.
STDOUT_HEAD = b"".join(
    [
        b"plain ascii\n",
        "unicode: h\u00e9llo w\u00f6rld \u2713 \U0001d11e \u4e2d\u6587\n".encode(),
        b"invalid: \xff\xfe \xc3( end\n",
        b"crlf line\r\n",
        b"\n",
        b"\r\n",
        b"lone \r carriage\n",
    ]
)
STDOUT_TAIL = b"\nlast, without a newline"
STDOUT_LINES_BEFORE_LONG = [
    "plain ascii",
    "unicode: h\u00e9llo w\u00f6rld \u2713 \U0001d11e \u4e2d\u6587",
    "invalid: \ufffd\ufffd \ufffd( end",
    "crlf line",
    "",
    "",
    "lone \r carriage",
]
STDERR = "\u00fcber \u2603\r\n".encode() + b"\x80 stray continuation\n" + b"\n" * 3 + b"err end\n"
STDERR_LINES = ["\u00fcber \u2603", "\ufffd stray continuation", "", "", "", "err end"]

WRITER = (
    "import sys\n"
    "head, tail, err = (bytes.fromhex(a) for a in sys.argv[1:4])\n"
    f"long = ({UNIT!r} * {LINE_PIECE // 3}).encode()\n"
    "sys.stdout.buffer.write(head + long + tail); sys.stdout.buffer.flush()\n"
    "sys.stderr.buffer.write(err); sys.stderr.buffer.flush()\n"
)


def _writer() -> Any:
    args = (STDOUT_HEAD.hex(), STDOUT_TAIL.hex(), STDERR.hex())
    return run(PYTHON, "-c", WRITER, *args, timeout_ms=20_000)


def validated(event: StdoutEvent | StderrEvent) -> StdoutEvent | StderrEvent:
    """The event the public, validating constructor makes of `event`'s values."""
    kind = type(event)
    return kind(
        event_type=event.event_type,
        execution_id=event.execution_id,
        line=event.line,
        timestamp=event.timestamp,
    )


def assert_as_validated(event: Any) -> None:
    """`event` is a real public event, equal in every respect to the validated one."""
    assert type(event) in (StdoutEvent, StderrEvent)
    expected = validated(event)
    for name in type(event).model_fields:
        assert getattr(event, name) == getattr(expected, name), name
        assert type(getattr(event, name)) is type(getattr(expected, name)), name
    assert event == expected
    assert event.model_fields_set == expected.model_fields_set
    assert event.model_extra == expected.model_extra
    assert event.model_dump() == expected.model_dump()
    assert event.model_dump_json() == expected.model_dump_json()
    assert repr(event) == repr(expected)
    assert type(event).model_validate_json(event.model_dump_json()) == event


def check_stdout_lines(lines: list[str]) -> None:
    """The stdout lines in order: an overlong line comes in pieces that join up to it."""
    head = len(STDOUT_LINES_BEFORE_LONG)
    assert lines[:head] == STDOUT_LINES_BEFORE_LONG
    assert lines[-1] == "last, without a newline"
    pieces = lines[head:-1]
    assert len(pieces) >= 4
    assert "".join(pieces) == LONG
    assert all(len(piece.encode()) <= LINE_PIECE for piece in pieces)


def check_events(events: list[Any], execution_id: UUID) -> None:
    """Every line event of `execution_id` in `events` is as validated, with the expected lines."""
    out = [e for e in events if e.event_type == "stdout" and e.execution_id == execution_id]
    err = [e for e in events if e.event_type == "stderr" and e.execution_id == execution_id]
    for event in out + err:
        assert_as_validated(event)
    check_stdout_lines([e.line for e in out])
    assert [e.line for e in err] == STDERR_LINES


def test_line_events_equal_the_validated_events_made_of_the_same_values() -> None:
    """`LineEvents` makes, one per line, what the validating constructor makes; iterated or all at once."""
    lines = [
        "",
        "plain",
        "h\u00e9llo \U0001d11e \u4e2d",
        "invalid \ufffd\ufffd",
        "lone \r",
        "\x00 nul and \x1b escape",
        "\ud800 lone surrogate from a host string",
        LONG,
    ]
    record_id = uuid4()
    now = time.time()
    for stream, kind in ((Stream.STDOUT, StdoutEvent), (Stream.STDERR, StderrEvent)):
        batch = LineEvents(record_id, stream, now, lines)
        assert len(batch) == len(lines)
        made = list(batch)
        assert [e.line for e in made] == lines
        for event in made:
            assert type(event) is kind
            assert event.execution_id == record_id
            assert event.timestamp.timestamp() == pytest.approx(now, abs=1e-6)
            if "\ud800" in event.line:
                # Not valid text for JSON: compared as values only, as the constructor makes it.
                assert event == validated(event)
            else:
                assert_as_validated(event)
        assert batch.events() == made


async def test_a_sole_handler_gets_events_as_validated(tmp_path: Path) -> None:
    """A handler that is the only listener (its events made as it takes them) gets them as validated."""
    recorder = Recorder()
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(_writer())
        result = await result_of(engine, eid, 20)
        await recorder.until_final(eid)
    assert result.status == "completed", result.error
    check_events(recorder.events, eid)


def _line_events_of(events: list[Any], execution_id: UUID) -> list[Any]:
    return [e for e in events if e.event_type in ("stdout", "stderr") and e.execution_id == execution_id]


async def test_two_handlers_get_the_same_events(tmp_path: Path) -> None:
    """Two handlers of one engine get the very same event objects, each as validated."""
    first, second = Recorder(), Recorder()
    engine = ExecutionEngine(config(tmp_path)).with_event_handler(first).with_event_handler(second)
    async with engine:
        eid = await engine.execute(_writer())
        await first.until_final(eid)
        await second.until_final(eid)
    check_events(first.events, eid)
    got, also = _line_events_of(first.events, eid), _line_events_of(second.events, eid)
    assert len(got) == len(also)
    assert all(a is b for a, b in zip(got, also, strict=True))


async def test_a_handler_and_a_reader_get_the_same_events(tmp_path: Path) -> None:
    """A handler and a reader of `events()` get the very same event objects, each as validated."""
    recorder = Recorder()
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        eid = await engine.execute(_writer())
        read = [event async for event in engine.events(eid)]
        await recorder.until_final(eid)
    check_events(read, eid)
    lines, got = _line_events_of(read, eid), _line_events_of(recorder.events, eid)
    assert len(got) == len(lines)
    assert all(a is b for a, b in zip(got, lines, strict=True))


def test_a_handler_on_its_own_thread_gets_events_as_validated(tmp_path: Path) -> None:
    """A plain-function handler, called on a thread of its own, gets the line events as validated."""
    seen: list[Any] = []
    with SyncExecutionEngine(config(tmp_path)).with_event_handler(seen.append) as engine:
        eid = engine.execute(_writer())
        result = engine.wait(eid, timeout=20)
    assert result.status == "completed", getattr(result, "error", None)
    check_events(seen, eid)


async def test_a_chatty_commands_lines_all_arrive_in_order(tmp_path: Path) -> None:
    """Output written faster than it is read (read in larger pieces) arrives whole, in order, as validated."""
    recorder = Recorder()
    count = 100_000
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        # One write of it all: the pipe is full at every read.
        write = f"import sys; sys.stdout.write(''.join(f'{{n}}\\n' for n in range(1, {count + 1})))"
        eid = await engine.execute(run(PYTHON, "-c", write, timeout_ms=20_000))
        result = await result_of(engine, eid, 20)
        await recorder.until_final(eid)
    assert result.status == "completed", result.error
    lines = _line_events_of(recorder.events, eid)
    assert [e.line for e in lines] == [str(n) for n in range(1, count + 1)]
    for event in lines[:: count // 100]:
        assert_as_validated(event)
    logged = engine.get_log_path(eid).read_bytes().split(b"\n")
    assert [line.rsplit(b" ", 1)[1] for line in logged if b" stdout " in line] == [
        str(n).encode() for n in range(1, count + 1)
    ]

"""What a command's output becomes (log lines, event lines, kept text), with no process involved."""

from __future__ import annotations

import pytest

from cloudops_execution_engine.actors.output import (
    LINE_PIECE,
    block_lines,
    escape_header,
    keep,
    kept_text,
    log_footer,
    log_header,
    log_prefix,
    mark_lines,
    mark_read,
    read_lines,
    split_lines,
    stamp,
    utf8_boundary,
    whole_lines_cut,
)

pytestmark = pytest.mark.timeout(10)

P = b"T stdout "  # a stand-in prefix: what matters is where it goes


class Stream:
    """Reads fed in turn, as the worker does: the usual path where it applies, else the general one."""

    def __init__(self, fast: bool = True) -> None:
        self.fast = fast
        self.partial = b""
        self.log = b""
        self.lines: list[str] = []

    def feed(self, data: bytes) -> None:
        head = self.partial
        cut = whole_lines_cut(head, data) if self.fast else 0
        if cut:
            self.partial = data[cut:]
            self.log += b"".join(mark_read(P, head, data, cut))
            self.lines += read_lines(head, data, cut)
            return
        block, pieces, self.partial = split_lines(head, data)
        self.log += mark_lines(P, block, pieces)
        self.lines += block_lines(block, pieces)

    def close(self) -> None:
        if self.partial:
            self.log += mark_lines(P, b"", [self.partial])
            self.lines += block_lines(b"", [self.partial])
            self.partial = b""


def test_stamp_is_rfc3339_utc_with_microseconds() -> None:
    """Log stamps: second from strftime (cached per second), microseconds appended."""
    assert stamp(0.0) == "1970-01-01T00:00:00.000000Z"
    assert stamp(1714564800.25) == "2024-05-01T12:00:00.250000Z"
    assert stamp(1714564800.000001).startswith("2024-05-01T12:00:00.0000")
    # The cache of the last second must not leak into another second.
    assert stamp(1714564801.5) == "2024-05-01T12:00:01.500000Z"
    assert stamp(1714564800.5) == "2024-05-01T12:00:00.500000Z"


def test_log_prefix_names_the_stream() -> None:
    """Each log line of a read starts with its time and stream, then one space."""
    assert log_prefix(0.0, "stderr") == b"1970-01-01T00:00:00.000000Z stderr "


@pytest.mark.parametrize(
    ("data", "limit", "cut"),
    [
        (b"abcd", 4, 4),
        (b"abcdef", 4, 4),
        ("aé".encode() + b"zz", 2, 1),
        ("€".encode() * 3, 4, 3),
        (b"\x80\x80\x80\x80\x80\x80", 4, 4),
    ],
)
def test_utf8_boundary_never_splits_a_sequence(data: bytes, limit: int, cut: int) -> None:
    """A cut goes back at most three bytes to the start of a sequence; invalid input still progresses."""
    assert utf8_boundary(data, limit) == cut


@pytest.mark.parametrize(
    ("head", "data", "cut"),
    [
        (b"", b"a\nb\n", 4),
        (b"x", b"a\nrest", 2),
        (b"", b"no newline", 0),  # nothing whole: the general path keeps it as the partial line
        (b"", b"a\r\nb\n", 0),  # carriage returns go the general way
        (b"x\r", b"\nb\n", 0),  # a \r\n split across reads needs the joined buffer
        (b"", b"a\n" + b"z" * LINE_PIECE, 0),  # an overlong rest must be cut into pieces
    ],
)
def test_whole_lines_cut_takes_only_the_usual_read(head: bytes, data: bytes, cut: int) -> None:
    """The usual path is taken only where it gives what the general path gives."""
    assert whole_lines_cut(head, data) == cut


def test_mark_read_stamps_every_line_and_leaves_the_partial_line_out() -> None:
    """One replace marks every line; the prefix after the last newline is cut off by a view."""
    parts = mark_read(P, b"he", b"ad\nsecond\npart", 10)
    assert b"".join(parts) == P + b"head\n" + P + b"second\n"
    assert isinstance(parts[2], memoryview)
    assert read_lines(b"he", b"ad\nsecond\npart", 10) == ["head", "second"]


def test_split_lines_cuts_an_endless_line_into_pieces_between_utf8_sequences() -> None:
    """A line without a newline becomes pieces of at most LINE_PIECE bytes, each valid UTF-8."""
    data = b"x" + "€".encode() * LINE_PIECE  # 1 + 3 MiB, the first cut inside a sequence
    block, pieces, rest = split_lines(b"", data)
    assert block == b""
    assert all(len(piece) <= LINE_PIECE for piece in pieces)
    assert [len(piece) for piece in pieces] == [LINE_PIECE, LINE_PIECE - 1, LINE_PIECE - 1]
    assert b"".join(pieces) + rest == data
    for piece in [*pieces, rest]:
        piece.decode()  # never cut inside a sequence
    assert len(rest) < LINE_PIECE


def test_split_lines_joins_the_partial_line_and_makes_crlf_lf() -> None:
    """A partial line is joined to the next read; \\r\\n ends a line as \\n does; a lone \\r stays."""
    block, pieces, rest = split_lines(b"one\r", b"\ntwo\r\nthree\rx\nfour")
    assert (block, pieces, rest) == (b"one\ntwo\nthree\rx\n", [], b"four")
    assert block_lines(block, pieces) == ["one", "two", "three\rx"]
    assert mark_lines(P, block, pieces) == P + b"one\n" + P + b"two\n" + P + b"three\rx\n"


def test_pieces_are_lines_of_their_own() -> None:
    """Each piece of an overlong line is logged and sent as a line."""
    assert mark_lines(P, b"a\n", [b"p1", b"p2"]) == P + b"a\n" + P + b"p1\n" + P + b"p2\n"
    assert block_lines(b"a\n", [b"p1", b"p2"]) == ["a", "p1", "p2"]
    assert mark_lines(P, b"", []) == b""


def test_invalid_utf8_is_replaced_in_events_and_kept_as_bytes_in_the_log() -> None:
    """Events carry text; the log keeps the command's bytes as they were."""
    block, pieces, _ = split_lines(b"", b"bad \xff\n")
    assert block_lines(block, pieces) == ["bad \ufffd"]
    assert mark_lines(P, block, pieces) == P + b"bad \xff\n"


@pytest.mark.parametrize(
    "reads",
    [
        [b"a\nb\n", b"c\n"],
        [b"par", b"tial\nnext", b" line\n", b"tail"],
        [b"crlf\r", b"\nsplit\r\n", b"x\n"],
        [b"\n\n\n", b"empty lines\n"],
        ["é".encode()[:1], "é".encode()[1:] + b"\n"],
        [b"a" * (LINE_PIECE - 1), b"bc\n", b"d\n"],
        [b"a\n" + b"z" * (LINE_PIECE + 10), b"\n"],
    ],
    ids=["whole", "partial", "crlf", "empty", "split-utf8", "near-piece", "overlong"],
)
def test_the_usual_path_gives_what_the_general_path_gives(reads: list[bytes]) -> None:
    """The fast path is an optimisation only: the same log and the same lines, read by read."""
    fast, general = Stream(fast=True), Stream(fast=False)
    for data in reads:
        fast.feed(data)
        general.feed(data)
    fast.close()
    general.close()
    assert fast.log == general.log
    assert fast.lines == general.lines


def test_a_line_longer_than_a_read_is_split_only_at_line_piece() -> None:
    """Reads of a line without a newline accumulate until LINE_PIECE, then one piece goes out."""
    stream = Stream()
    chunk = b"y" * (64 * 1024)
    for _ in range(LINE_PIECE // len(chunk) - 1):
        stream.feed(chunk)
    assert stream.lines == []
    stream.feed(chunk)
    assert [len(line) for line in stream.lines] == [LINE_PIECE]
    stream.feed(b"tail\n")
    assert stream.lines[1:] == ["tail"]


def test_keep_stops_at_the_limit_and_says_so() -> None:
    """Kept bytes never pass the limit; anything left out is reported."""
    kept = bytearray()
    assert keep(kept, b"abc", 5) is False
    assert keep(kept, b"def", 5) is True
    assert kept == b"abcde"
    assert keep(kept, b"g", 5) is True
    assert kept == b"abcde"
    assert keep(bytearray(), b"", 0) is True  # no room at all


def test_kept_text_is_cut_again_after_replacement_grows_it() -> None:
    """Each invalid byte becomes three bytes of U+FFFD: the text is cut back to the limit, at a boundary."""
    assert kept_text(bytearray(b"plain"), False, 5) == ("plain", False)
    assert kept_text(bytearray(b"cut"), True, 5) == ("cut", True)
    assert kept_text(bytearray(b"\xff"), False, 5) == ("\ufffd", False)  # 3 bytes: still fits
    text, truncated = kept_text(bytearray(b"\xff\xff"), False, 5)
    assert (text, truncated) == ("\ufffd", True)
    assert len(text.encode()) <= 5


def test_header_values_stay_on_comment_lines() -> None:
    """A multi-line command cannot forge lines of output in the log."""
    assert escape_header("a\nb") == "a\n#   b"
    header = log_header("id-1", "bash -c 'x\ny'", "/tmp", 0.0)
    assert header == (
        "# execution id-1\n# command: bash -c 'x\n#   y'\n# cwd: /tmp\n"
        "# started: 1970-01-01T00:00:00.000000Z\n"
    )
    assert all(line.startswith("#") for line in header.splitlines())


def test_footer_gives_status_exit_code_duration_and_error() -> None:
    """The closing lines: the error line only when there is an error."""
    assert log_footer(0.0, 1.5, "completed", 0, None) == (
        "# finished: 1970-01-01T00:00:01.500000Z status=completed exit_code=0 duration_ms=1500.0\n"
    )
    assert log_footer(0.0, 0.0, "failed", 3, "Command failed with exit code 3").endswith(
        "exit_code=3 duration_ms=0.0\n# error: Command failed with exit code 3\n"
    )

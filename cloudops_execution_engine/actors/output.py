"""A command's output as text: pure functions, with no file descriptor or process in sight.

The worker reads a command's stdout and stderr as bytes, one read at a time;
this module says what becomes of a read:

    read -> split into lines (a line longer than `LINE_PIECE` goes in pieces,
            never cut inside a UTF-8 sequence)
         -> the log's bytes: each line stamped `<time> <stream> ` (`log_prefix`)
         -> the event's lines: decoded as UTF-8 with replacement
         -> the kept bytes for the result: at most `max_output_bytes` (`keep`),
            and at the end their text, cut again to that size (`kept_text`)

The usual read (whole lines, no carriage return, no overlong line) has a path
of its own, `whole_lines_cut` / `mark_read` / `read_lines`, that marks up the
log in one C-level replace and copies nothing else; `split_lines` /
`mark_lines` / `block_lines` handle everything else. The log's header and
footer lines are here too.

With secrets to mask (a `Masker`), a read that holds one takes the second
path, which masks whole lines and pieces before anything is logged, sent or
decoded; pieces of an endless line are then cut only where no secret spans
the cut, once `hold` more bytes have been read (see `secrets`). The kept
bytes are masked when the result is made (`masked_kept`).
"""

from __future__ import annotations

import re
import time

from .secrets import Masker

__all__ = [
    "LINE_PIECE",
    "block_lines",
    "escape_header",
    "keep",
    "kept_text",
    "log_footer",
    "log_header",
    "log_prefix",
    "mark_lines",
    "mark_read",
    "masked_kept",
    "read_lines",
    "split_lines",
    "stamp",
    "takes_masking",
    "utf8_boundary",
    "whole_lines_cut",
]

# A line without a newline is cut into pieces of this size, so one endless line
# cannot grow a buffer without bound here or in the host.
LINE_PIECE = 1024 * 1024

_second_text: tuple[int, str] = (-1, "")


def stamp(ts: float) -> str:
    """`ts` (seconds since the epoch) as RFC 3339 UTC with microseconds: `2024-05-01T12:00:00.000001Z`."""
    global _second_text
    whole = int(ts)
    second, text = _second_text
    if second != whole:
        # strftime is the costly part, and most stamps share their second.
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second_text = (whole, text)
    return f"{text}.{int((ts - whole) * 1e6):06d}Z"


def log_prefix(ts: float, stream_name: str) -> bytes:
    """What starts every log line of a read: its time and its stream."""
    return f"{stamp(ts)} {stream_name} ".encode()


def utf8_boundary(data: bytes, limit: int) -> int:
    """The largest cut at or below `limit` that does not split a UTF-8 sequence.

    A cut lands before a continuation byte only inside a sequence; sequences are
    at most four bytes, so at most three steps back. Invalid input gets `limit`.
    """
    if len(data) <= limit:
        return len(data)
    cut = limit
    while cut > limit - 4 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > limit - 4 else limit


# -- the usual read ------------------------------------------------------------


def whole_lines_cut(head: bytes, data: bytes) -> int:
    """Where the whole lines of `head + data` end in `data`, if the usual path can take them; else 0.

    `head` is the partial line left by the previous read. The usual path takes
    reads with a newline, no carriage return (a `\\r\\n` split across reads
    needs the joined buffer) and a rest shorter than `LINE_PIECE`.
    """
    cut = data.rfind(b"\n") + 1
    if cut and len(data) - cut < LINE_PIECE and b"\r" not in data and not head.endswith(b"\r"):
        return cut
    return 0


def mark_read(prefix: bytes, head: bytes, data: bytes, cut: int) -> list[bytes | memoryview]:
    """The log's bytes for the lines `head + data[:cut]`, as parts for one `writev`.

    Every newline in `data` gets the next line's prefix after it, in one C-level
    replace. What follows the last newline (the prefix and the next partial
    line) is left out by a view, not a copy.
    """
    marked = data.replace(b"\n", b"\n" + prefix)
    end = len(marked) - (len(data) - cut) - len(prefix)
    return [prefix, head, memoryview(marked)[:end]]


def read_lines(head: bytes, data: bytes, cut: int) -> list[str]:
    """The lines `head + data[:cut]` as text, without their newlines."""
    lines = (head + memoryview(data)[:cut]).decode("utf-8", "replace").split("\n")
    lines.pop()  # the empty string after the last newline
    return lines


# -- every other read ------------------------------------------------------------


def takes_masking(head: bytes, data: bytes, cut: int, masker: Masker | None) -> bool:
    """Whether a read must take the masking path (`split_lines` with the masker) rather than the usual one.

    It must when it holds a secret, or when it has no whole line (`cut` is 0,
    as `whole_lines_cut` says): a piece of an endless line may then be cut,
    and only the masking path keeps a secret whole across a cut.
    """
    return masker is not None and (not cut or masker.hit(head + data if head else data))


def split_lines(
    partial: bytes, data: bytes, masker: Masker | None = None
) -> tuple[bytes, list[bytes], bytes]:
    """`partial + data` as (whole lines, pieces of an overlong line, the partial line left).

    The whole lines are one block that ends in a newline (or is empty), with
    `\\r\\n` made `\\n`; the pieces have no newline and are `LINE_PIECE` bytes
    or a little less, cut between UTF-8 sequences. With a `masker`, the block
    and the pieces come masked, and the partial line left stays raw.
    """
    buffer = partial + data if partial else data
    cut = buffer.rfind(b"\n") + 1
    rest = buffer[cut:]
    pieces: list[bytes] = []
    hold = masker.hold if masker is not None else 0
    while len(rest) >= LINE_PIECE + hold:
        piece = utf8_boundary(rest, LINE_PIECE)
        if masker is not None:
            piece = masker.piece_cut(rest, piece)
            pieces.append(masker.mask(rest[:piece]))
        else:
            pieces.append(rest[:piece])
        rest = rest[piece:]
    block = buffer[:cut]
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n")
    if masker is not None and block:
        block = masker.mask(block)
    return block, pieces, rest


def mark_lines(prefix: bytes, block: bytes, pieces: list[bytes]) -> bytes:
    """The log's bytes for a block of whole lines and for pieces, each line stamped with `prefix`."""
    log = prefix + block[:-1].replace(b"\n", b"\n" + prefix) + b"\n" if block else b""
    for piece in pieces:
        log += prefix + piece + b"\n"
    return log


def block_lines(block: bytes, pieces: list[bytes]) -> list[str]:
    """A block of whole lines and pieces as text, one item a line; decoded only for events."""
    lines = block.decode("utf-8", "replace").split("\n")
    lines.pop()  # the empty string after the last newline
    lines += [piece.decode("utf-8", "replace") for piece in pieces]
    return lines


# -- what a result keeps ------------------------------------------------------------


def keep(kept: bytearray, data: bytes, limit: int) -> bool:
    """Add to `kept` what fits of `data` within `limit` bytes; say whether anything was left out."""
    room = limit - len(kept)
    if room <= 0:
        return True
    kept += data[:room]
    return len(data) > room


def masked_kept(kept: bytes | bytearray, truncated: bool, limit: int, masker: Masker) -> tuple[bytes, bool]:
    """Kept output with its secrets masked, at most `limit` bytes, and whether it was cut.

    `kept` holds up to `masker.hold` bytes past the limit, so that a secret
    that starts before the limit is masked whole rather than cut to a prefix.
    """
    if not truncated:
        masked = masker.mask(bytes(kept))
        if len(masked) <= limit:
            return masked, False
    else:
        masked = masker.mask_upto(kept, limit)
    return masked[: utf8_boundary(masked, limit)], True


def kept_text(kept: bytes | bytearray, truncated: bool, limit: int) -> tuple[str, bool]:
    """Kept output as text of at most `limit` UTF-8 bytes, and whether it was cut.

    Decoding replaces each invalid byte with U+FFFD, three bytes in UTF-8, so
    the text can be up to three times the bytes kept: it is cut again to the
    limit, which is what bounds a `Finished` frame (see `frame_limit_for`).
    """
    if not kept:
        return "", truncated
    text = kept.decode("utf-8", "replace")
    if "\ufffd" not in text:
        return text, truncated
    encoded = text.encode()
    if len(encoded) <= limit:
        return text, truncated
    return encoded[: utf8_boundary(encoded, limit)].decode(), True


# -- the log's own lines ------------------------------------------------------------


def escape_header(value: str) -> str:
    """A header value on `#` lines only: a multi-line script must not read as command output."""
    return value.replace("\n", "\n#   ")


def log_header(marker: str, display: str, cwd: str, started_at: float) -> str:
    """The lines that open an execution's log."""
    if "\n" in display or "\n" in cwd:
        display, cwd = escape_header(display), escape_header(cwd)
    return f"# execution {marker}\n# command: {display}\n# cwd: {cwd}\n# started: {stamp(started_at)}\n"


# The line the host adds to a log when it sets a retry: the footer before it ends an
# attempt, not the execution. It names the engine that will run the next attempt, so
# that a reader of the log alone (`logs --follow` without a journal) can tell a backoff
# from an engine that died during one: a pid, and the process's start time against its reuse.
RETRY_NOTE = "# retrying: "
_RETRY_NOTE_ENGINE = re.compile(r"; engine pid=(\d+) host=(\S+) since=(\d+)$")


def log_retry_note(attempt: int, of: int, delay_s: float, pid: int, host: str, since: int) -> str:
    """The line that says attempt `attempt` of `of` follows in `delay_s`, run by the engine `pid`.

    `since`: when that engine's process started (`process_tree.started_at`).
    """
    return (
        f"{RETRY_NOTE}attempt {attempt} of {of} in {delay_s:.3f} s; engine pid={pid} host={host} "
        f"since={since}\n"
    )


def engine_of_retry_note(line: str) -> tuple[int, str, int] | None:
    """(pid, host, start time) of the engine a retry note names; None for a line that is not one."""
    if not line.startswith(RETRY_NOTE):
        return None
    found = _RETRY_NOTE_ENGINE.search(line.rstrip("\n"))
    if found is None:
        return None
    return int(found[1]), found[2], int(found[3])


def log_footer(started_at: float, completed_at: float, status: str, exit_code: int, error: str | None) -> str:
    """The lines that close an execution's log."""
    return (
        f"# finished: {stamp(completed_at)} status={status} exit_code={exit_code} "
        f"duration_ms={(completed_at - started_at) * 1000:.1f}\n" + (f"# error: {error}\n" if error else "")
    )

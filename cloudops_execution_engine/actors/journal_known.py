"""`KnownIds`: which ids the journal may hold, answered without asking SQLite; and how it is filled.

Every `execute()` asks whether its id is already taken. A query costs tens of
microseconds, the filter well under one. Filling the filter means reading
every id in the journal: most of a second for a million rows, which an engine
must not spend in `start()` (the command line opens the journal on every
run). So the filter of an opened journal is filled by `IdFiller`, on a thread
and a read connection of its own, while the engine already serves; until it
is whole, every id is looked up in SQLite as before. Not on the writer's
thread: the ids are read in the order of their index, which on a cold
spinning disk is a random read per few hundred ids, and commits must not
wait behind that.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator

__all__ = ["IdFiller", "KnownIds", "fill_job"]

logger = logging.getLogger("cloudops_execution_engine.journal")

# Ids read per step of the filling job: a few milliseconds, between which it can be stopped.
_CHUNK = 10_000
# Served from the unique index on `id` alone (a covering index: it holds the id and the rowid).
_NEXT_IDS = "SELECT id FROM entries WHERE id > ? ORDER BY id LIMIT ?"


class KnownIds:
    """A Bloom filter of the ids in the journal: "not there" for a new id without asking SQLite.

    Told of every id added since the journal was opened, and of the ones
    before by `fill_job`; until then (`ready` False) it answers "maybe" for
    every id. Whole, it answers "maybe" for every id the journal holds, and for
    about one new id in a hundred with a million rows, which is then looked
    up. Positions come from Python's hash of the id's bytes, so ids that are
    not random (a counter, a time-based UUID) spread as well as random ones.
    """

    __slots__ = ("_bits", "_mask", "ready")

    def __init__(self, rows: int = 0, ready: bool = True) -> None:
        size = 1 << 20  # bits; 16 per row, a power of two
        while size < 16 * rows:
            size <<= 1
        self._mask = size - 1
        self._bits = bytearray(size >> 3)
        self.ready = ready

    def add(self, key: bytes) -> None:
        h = hash(key)
        mask = self._mask
        first, second = h & mask, (h >> 32) & mask
        bits = self._bits
        bits[first >> 3] |= 1 << (first & 7)
        bits[second >> 3] |= 1 << (second & 7)

    def may_hold(self, key: bytes) -> bool:
        if not self.ready:
            return True
        h = hash(key)
        mask = self._mask
        first, second = h & mask, (h >> 32) & mask
        bits = self._bits
        return bool(bits[first >> 3] & (1 << (first & 7))) and bool(bits[second >> 3] & (1 << (second & 7)))

    def absorb(self, filled: KnownIds) -> None:
        """Take in the ids of `filled` (made for as many rows), and answer from now on."""
        if filled._mask != self._mask:
            raise ValueError("filters of different sizes")
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(filled._bits, "little")
        self._bits = bytearray(merged.to_bytes(len(self._bits), "little"))
        self.ready = True


def fill_job(conn: sqlite3.Connection, rows: int, done: Callable[[KnownIds], None]) -> Iterator[None]:
    """A filter of every id in the journal, read a chunk per step (`IdFiller` runs it).

    The ids are read in id order from their own index, which holds nothing
    else: about 30 MB for a million rows, against the table's gigabyte of
    request and result JSON, which a walk in `seq` order would read from disk
    on a cold start. Rows written while it runs may be read too: the filter
    says "may hold" for them, which is true. The filter is built apart and
    handed to `done` whole: the loop's thread alone changes the filter in use,
    as a bit set from two threads at once could be lost.
    """
    filled = KnownIds(rows)
    add = filled.add
    last = b""
    while True:
        chunk = conn.execute(_NEXT_IDS, (last, _CHUNK)).fetchall()
        for (key,) in chunk:
            add(key)
        if len(chunk) < _CHUNK:
            break
        last = chunk[-1][0]
        yield
    done(filled)


class IdFiller:
    """Runs `fill_job` to its end on a thread of its own, over a connection `connect` opens there."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], rows: int, done: Callable[[KnownIds], None]
    ) -> None:
        self._connect = connect
        self._rows = rows
        self._done = done
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudops-journal-ids", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn = self._connect()
            try:
                for _ in fill_job(conn, self._rows, self._done):
                    if self._stopping.is_set():
                        return
            finally:
                conn.close()
        except Exception:
            # The engine serves on, looking every id up in SQLite as before the filter.
            logger.warning("reading the journal's ids failed; they are looked up one by one", exc_info=True)

    def stop(self, timeout: float) -> None:
        """Stop between two chunks and close the connection (the engine is closing)."""
        self._stopping.set()
        self._thread.join(timeout)

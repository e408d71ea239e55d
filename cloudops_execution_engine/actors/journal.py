"""`JournalStore`: the store that records every execution and plan in a SQLite journal.

What this engine runs lives in a `MemoryStore` as without a journal, and each
change is queued for the journal's writer thread (`journal_writer`): a
submission, a start (with the command's pid, which recovery needs), an end.
An end is announced (terminal event, waiters woken) only once the writer has
committed it, so nobody learns of a result that a crash of the host could
still lose. Queries for what the memory store does not hold, executions and
plans of earlier engines or ones it has let go of, read the journal through a
connection of their own; WAL mode lets them read while the writer writes.

Opening (at `start()`): the lock (`journal_lock`), the schema
(`journal_schema`), a row for this engine in `runs`, and recovery of what a
dead owner left unfinished (`journal_recovery`). Anything unreadable or
corrupt is an `IoError` naming the file, and the engine does not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from ..errors import IoError, NotFound, map_errors
from ..logfiles import make_private_dir
from ..requests import ExecutionRequest
from ..results import ExecutionStatus, ExecutionSummary
from .journal_known import IdFiller, KnownIds
from .journal_lock import JournalLock, letting_go
from .journal_recovery import recover
from .journal_rows import (
    ENTRY_COLUMNS,
    SQLITE_MAX_INT,
    SUMMARY_COLUMNS,
    DropOldest,
    apply_batch,
    describe_op,
    now_us,
    op_added,
    op_closed,
    op_ended,
    op_plan_added,
    op_started,
    plan_from_row,
    record_from_row,
    summary_from_row,
    us_of,
)
from .journal_schema import check_is_a_journal, migrate
from .journal_writer import JournalWriter
from .off_loop import in_thread, start_in_thread
from .records import PlanRun, Record
from .retention import Retention, Sweeps, now, run_job
from .store import MemoryStore, matches, select_newest

__all__ = ["JournalStore", "open_connection"]


_WRITER_JOIN_TIMEOUT = 30.0
# How long a commit waits for another process's write lock on the file (a
# person's sqlite3 shell) before it counts as failed; ends are then announced
# without waiting longer, and written later (`journal_writer`).
WRITER_BUSY_TIMEOUT_S = 2.0
_EXISTS = "SELECT 1 FROM entries WHERE id = ?"
# Ids looked up per query when listing a plan's commands: under SQLite's bound on parameters.
_IDS_PER_QUERY = 500


def open_connection(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit (transactions are begun explicitly); a writer's in WAL mode.

    A writer's file is checked to be a journal (or empty) first: switching to
    WAL mode rewrites the file's header, and another application's database
    named by mistake is left exactly as it was. A reader changes nothing: WAL
    mode, once set, is the file's own.
    """
    if readonly and on_read_only_filesystem(path):
        return _read_only_filesystem_connection(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        if readonly:
            conn.execute("PRAGMA query_only = ON")
            return conn
        check_is_a_journal(conn, path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL mode (the journal is in {mode} mode)")
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _read_only_filesystem_connection(path: Path) -> sqlite3.Connection:
    """A reader of a journal on a read-only filesystem (a backup, a read-only mount).

    SQLite reads a WAL database through its -shm file, which it cannot make
    there. One a host left (killed, its commits still in the -wal) is read
    through the files as they are; a journal closed cleanly has neither, and is
    read as immutable, which nothing there can make it not be. A -wal holding
    commits without its -shm cannot be read without losing them: refused.
    """
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        conn.execute("PRAGMA query_only = ON")
        return conn
    except sqlite3.Error:
        conn.close()
    wal = path.with_name(path.name + "-wal")
    with contextlib.suppress(FileNotFoundError):
        if wal.stat().st_size > 0:
            raise sqlite3.OperationalError(
                f"its write-ahead log {wal.name} holds commits that cannot be read on a read-only "
                f"filesystem without its {path.name}-shm file"
            )
    conn = sqlite3.connect(
        f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA query_only = ON")
    return conn


def on_read_only_filesystem(path: Path) -> bool:
    """Whether `path`'s filesystem is mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# Free space below which a journal is not opened before retention has swept the logs.
_ROOM_TO_OPEN = 1 << 20


def _room_to_open(directory: Path) -> bool:
    try:
        info = os.statvfs(directory)
    except OSError:
        return True  # said by the open itself
    return info.f_bavail * info.f_frsize >= _ROOM_TO_OPEN


def _make_owner_only(path: Path) -> None:
    """Make the journal's file owner-only before SQLite opens it, when it is missing.

    SQLite makes a database file 0644 (less the umask), and its -wal and -shm
    files with the database's mode at the moment it makes them: a journal
    chmodded once open left those readable by every user for as long as the
    engine ran. A file that exists (the host's, an earlier engine's) keeps its
    mode, which they then follow.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        if not os.path.islink(path) or os.path.exists(path):
            return
        # A symlink to nothing yet: SQLite makes the file where it leads, and so, first, do we.
        try:
            fd = os.open(os.path.realpath(path), flags, 0o600)
        except FileExistsError:
            return
    try:
        os.fchmod(fd, 0o600)  # the umask took nothing from what is ours to set
    finally:
        os.close(fd)


class JournalStore:
    """Executions and plans in memory and in a journal file (module docstring)."""

    def __init__(
        self,
        path: Path,
        memory: MemoryStore,
        timeout_ms: int,
        retention: Retention | None = None,
        mask: Callable[[str], str] | None = None,
        engine_id: str | None = None,
    ) -> None:
        self.path = Path(os.path.expanduser(path))
        self._engine_id = engine_id
        # The config's secrets, masked in every document written (typed into a command line, say).
        self._apply = apply_batch if mask is None else functools.partial(apply_batch, mask=mask)
        self.retention = retention
        self._sweeps = Sweeps()
        self._sweeping = False
        self._writer_conn: sqlite3.Connection | None = None
        self._memory = memory
        self._timeout_ms = timeout_ms
        self._lock = JournalLock(self.path)
        # A thread opening the journal (`open`). Under `_claims`: whether the start that
        # asked for it was cancelled and nobody took it up since, and what it opened
        # once it has, until an open() takes it.
        self._opening: asyncio.Future[sqlite3.Connection | None] | None = None
        self._claims = threading.Lock()
        self._abandoned = False
        self._open_failed = False
        self._opened: sqlite3.Connection | None = None
        self._writer: JournalWriter | None = None
        self._reader: sqlite3.Connection | None = None
        self._reads = threading.RLock()  # `get_log_path` may read from another thread
        self._run = 0
        self._next_seq = 1
        # Entries submitted here whose end is not yet durable: their journal
        # rows may be behind, so queries take them from memory. Value: seq.
        # Keyed by the id's bytes, whose hash is cached (a UUID's is computed in Python each time).
        self._live: dict[bytes, tuple[int, Record | PlanRun]] = {}
        self._known = KnownIds()
        self._filler: IdFiller | None = None
        self.recovered = 0

    # -- opening and closing ------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        loop = asyncio.get_running_loop()
        while True:
            opening = self._opening
            if opening is not None and opening.done() and (opening.cancelled() or opening.exception()):
                opening = None  # an abandoned open that failed: this start tries afresh
            if opening is None:
                with self._claims:
                    self._open_failed = False
                opening = self._opening = start_in_thread(self._open_claimed, name="cloudops-journal-open")
            with self._claims:
                self._abandoned = False  # taken up: the thread keeps what it opens
            try:
                writer_conn = await asyncio.shield(opening)
            except asyncio.CancelledError:
                self._abandon_open()
                raise
            except BaseException:
                self._opening = None
                raise
            self._opening = None
            with self._claims:
                self._opened = None
            if writer_conn is not None:
                break
            # An earlier open, abandoned by a cancelled start, let go of the journal just now.
        letting_go(self.path, False)
        self._writer_conn = writer_conn
        self._writer = JournalWriter(
            writer_conn,
            self._apply,
            loop,
            "cloudops-journal-writer",
            on_recovered=self._recovered,
            drop=DropOldest(),
            path=self.path,
            describe=describe_op,
        )
        if not self._known.ready:
            connect = functools.partial(open_connection, self.path, readonly=True)
            self._filler = IdFiller(connect, self._next_seq - 1, self._known_filled_on(loop))
        if self.retention is not None:
            self._sweeps.start(self.sweep)

    def _open_claimed(self) -> sqlite3.Connection | None:
        """Open the journal (on a thread); None when the start that asked was cancelled meanwhile.

        Such an open is let go of here, on its own thread, and not by the loop,
        which may be gone by then (a host that gave up on starting, then left
        `asyncio.run`): otherwise nothing would ever let go of the journal.
        """
        try:
            conn = self._open_blocking()
        except BaseException:
            with self._claims:
                self._open_failed = True  # it holds nothing to let go of
                letting_go(self.path, False)
            raise
        with self._claims:
            abandoned = self._abandoned
            self._abandoned = False
            self._opened = None if abandoned else conn
        if abandoned:
            self._let_go(conn)
            return None
        return conn

    def _abandon_open(self) -> None:
        """A start cancelled while the journal opens: what it opens is let go of, unless taken up again."""
        with self._claims:
            conn, self._opened = self._opened, None
            if conn is None and not self._open_failed:
                self._abandoned = True  # still opening: its thread lets it go when it ends
                letting_go(self.path, True)
        if conn is not None:
            self._opening = None
            self._let_go(conn)

    def _let_go(self, conn: sqlite3.Connection) -> None:
        """Undo an open nobody took up: its run is closed, its connections and lock let go of."""
        with contextlib.suppress(sqlite3.Error):
            conn.execute("UPDATE runs SET closed_us = ? WHERE run = ?", (now_us(), self._run))
        conn.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        self._lock.release()
        letting_go(self.path, False)

    def _known_filled_on(self, loop: asyncio.AbstractEventLoop) -> Callable[[KnownIds], None]:
        def filled(known: KnownIds) -> None:
            # RuntimeError: the loop has closed, and nobody asks any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._known.absorb, known)

        return filled

    def sweep(self) -> None:
        """Apply the retention policy: to memory now, to the journal and logs on the writer thread."""
        retention = self.retention
        if retention is None or self._writer is None or self._writer_conn is None:
            return
        moment = now()
        # Memory is kept within bounds even while the journal's part waits (a journal that
        # cannot be written): an end not yet durable is still answered from `_live`.
        self._memory.trim(retention.cutoff(moment), retention.policy.max_executions)
        if self._writer.failing:
            # Jobs wait for the journal to be written again, which a full disk, filled by
            # logs, never lets it be: the log files are swept on their own meanwhile.
            self._sweeps.run_in_thread(run_job, retention.logs_job(self.live_ids(), moment))
            return
        if self._sweeping:
            return
        self._sweeping = True
        self._writer.put_job(self._tracked(retention.journal_job(self._writer_conn, self.live_ids(), moment)))

    def _add_run(self, conn: sqlite3.Connection) -> int:
        return int(
            conn.execute(
                "INSERT INTO runs (pid, hostname, opened_us, engine_id) VALUES (?, ?, ?, ?) RETURNING run",
                (os.getpid(), socket.gethostname(), now_us(), self._engine_id),
            ).fetchone()[0]
        )

    def _tracked(self, job: Iterator[None]) -> Iterator[None]:
        try:
            yield from job
        finally:
            self._sweeping = False

    def _open_blocking(self) -> sqlite3.Connection:
        if self.path.exists() and not self.path.is_file():
            # A device or a FIFO (`/dev/null`): nothing of ours, not even a lock file, goes beside it.
            raise IoError(f"journal {self.path} is not a regular file")
        with (
            map_errors({OSError: IoError}, f"cannot create the directory of journal {self.path}"),
            contextlib.suppress(FileExistsError),
        ):
            make_private_dir(self.path.parent)
        self._lock.acquire()
        conn: sqlite3.Connection | None = None
        try:
            if self.retention is not None and not _room_to_open(self.path.parent):
                # A disk full of logs as often as not: those past the policy go before the journal,
                # which could not be opened, nor so let the sweep that makes room begin.
                run_job(self.retention.logs_job(set(), now()))
            with map_errors({sqlite3.Error: IoError, OSError: IoError}, f"cannot open journal {self.path}"):
                _make_owner_only(self.path)
                conn = open_connection(self.path)
                migrate(conn, self.path)
                self._run = self._add_run(conn)
                self.recovered = recover(conn)
                if self.retention is not None:
                    run_job(self.retention.journal_job(conn, set(), now()))
                self._next_seq = int(
                    conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM entries").fetchone()[0]
                )
                # Filled once the engine serves (`journal_known`); an empty journal's is whole already.
                self._known = KnownIds(self._next_seq - 1, ready=self._next_seq == 1)
                self._reader = open_connection(self.path, readonly=True)
                conn.execute(f"PRAGMA busy_timeout = {int(WRITER_BUSY_TIMEOUT_S * 1000)}")
            return conn
        except BaseException:
            if conn is not None:
                conn.close()
            self._lock.release(discard=True)  # a journal refused leaves no lock file of ours beside it
            raise

    async def close(self) -> None:
        await self._sweeps.stop()
        writer = self._writer
        if writer is None:
            return
        await in_thread(self._stop_filler)
        writer.put((op_closed(self._run), None, None))
        writer.stop()
        await in_thread(writer.join, _WRITER_JOIN_TIMEOUT)
        self._finish()

    def abandon(self) -> None:
        self._sweeps.abandon()
        writer = self._writer
        if writer is None:
            return
        writer.stop()
        writer.join(_WRITER_JOIN_TIMEOUT)
        self._finish()

    def _stop_filler(self) -> None:
        filler, self._filler = self._filler, None
        if filler is not None:
            filler.stop(_WRITER_JOIN_TIMEOUT)

    def _finish(self) -> None:
        self._stop_filler()
        self._writer = None
        self._writer_conn = None
        if self._reader is not None:
            with self._reads:
                self._reader.close()
                self._reader = None
        self._lock.release()

    def add_job(self, job: Iterator[None]) -> bool:
        """Run a maintenance job on the writer thread; False when the journal is not open."""
        if self._writer is None:
            return False
        self._writer.put_job(job)
        return True

    # -- what the supervisor tells ------------------------------------------------

    def __contains__(self, entry_id: UUID) -> bool:
        if entry_id in self._memory:
            return True
        # Asked on every execute(): a query costs tens of microseconds, the filter well under one.
        if not self._known.may_hold(entry_id.bytes):
            return False
        reader = self._reader
        if reader is None:
            return False
        try:
            with self._reads:
                return reader.execute(_EXISTS, (entry_id.bytes,)).fetchone() is not None
        except sqlite3.Error as exc:
            raise IoError(f"cannot read journal {self.path}: {exc}") from exc

    def add(self, record: Record, request: ExecutionRequest) -> None:
        self._memory.add(record, request)
        self._known.add(record.key)
        seq = self._next_seq
        self._next_seq = seq + 1
        self._live[record.key] = (seq, record)
        self._put(op_added(seq, self._run, record, request))

    def add_plan(self, run: PlanRun) -> None:
        self._memory.add_plan(run)
        self._known.add(run.id.bytes)
        seqs: list[int] = []
        for record in run.records:
            if not record.settled:
                self._known.add(record.key)
                seq = self._next_seq
                self._next_seq = seq + 1
                self._live[record.key] = (seq, record)
                seqs.append(seq)
        plan_seq = self._next_seq
        self._next_seq = plan_seq + 1
        self._live[run.id.bytes] = (plan_seq, run)
        self._put(op_plan_added(self._run, run, seqs, plan_seq))

    def started(self, record: Record) -> None:
        live = self._live.get(record.key)
        if live is not None:
            started = record.started_at
            self._put(
                op_started(live[0], record.pid, us_of(started) if started else now_us(), record.attempt)
            )

    def ended(self, entry: Record | PlanRun, then: Callable[[Any], None]) -> None:
        writer = self._writer
        live = self._live.get(entry.key if isinstance(entry, Record) else entry.id.bytes)
        if writer is None or live is None:
            then(entry)
            return
        writer.put((op_ended(live[0], entry), self._settle, (entry, then)))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.hurry()

    def _settle(self, item: tuple[Record | PlanRun, Callable[[Any], None]]) -> None:
        entry, then = item
        writer = self._writer
        if writer is None or not writer.failing:
            self._live.pop(entry.key if isinstance(entry, Record) else entry.id.bytes, None)
        # else announced before it is durable: queries keep taking it from memory until then
        then(entry)

    def _recovered(self) -> None:
        """The writer wrote what it kept while failing: what has ended is in the journal now.

        Or was dropped, past the writer's bound: either way it is let go of, as
        the end of an entry that is durable is. One ending meanwhile, not yet
        committed, reads from its row (still running) for one batch's time.
        """
        for key, (_seq, entry) in list(self._live.items()):
            if entry.result is not None:
                del self._live[key]

    def retire(self, entry: Record | PlanRun) -> None:
        self._memory.retire(entry)

    def _put(self, write: tuple[Any, ...]) -> None:
        if self._writer is not None:
            self._writer.put((write, None, None))

    # -- queries -------------------------------------------------------------

    def records(self) -> list[Record]:
        return self._memory.records()

    def plans(self) -> list[PlanRun]:
        return self._memory.plans()

    def live_ids(self) -> set[UUID]:
        return self._memory.live_ids()

    def record(self, entry_id: UUID) -> Record:
        try:
            return self._memory.record(entry_id)
        except NotFound:
            found = self._kept(entry_id)
        if not isinstance(found, Record):
            raise NotFound(entry_id)
        return found

    def plan(self, entry_id: UUID) -> PlanRun:
        try:
            return self._memory.plan(entry_id)
        except NotFound:
            found = self._kept(entry_id)
        if not isinstance(found, PlanRun):
            raise NotFound(entry_id)
        return found

    def entry(self, entry_id: UUID) -> Record | PlanRun:
        try:
            return self._memory.entry(entry_id)
        except NotFound:
            return self._kept(entry_id)

    def status(self, entry_id: UUID) -> ExecutionStatus:
        try:
            return self._memory.status(entry_id)
        except NotFound:
            pass
        live = self._live.get(entry_id.bytes)
        if live is not None:
            return live[1].status
        # From its row alone: an earlier engine's plan of 20,000 commands took 1.5 s of the
        # loop to rebuild, for each poll of its status.
        row = self._row(entry_id, "status")
        if row is None:
            raise NotFound(entry_id)
        with self._reading():
            return ExecutionStatus(row[0])

    def _kept(self, entry_id: UUID) -> Record | PlanRun:
        """Not in memory (retention let it go): its end if not yet durable, else the journal's row."""
        live = self._live.get(entry_id.bytes)
        if live is not None:
            return live[1]
        return self._from_journal(entry_id)

    def _from_journal(self, entry_id: UUID) -> Record | PlanRun:
        row = self._row(entry_id, ENTRY_COLUMNS)
        if row is None:
            raise NotFound(entry_id)
        with self._reading():
            if row[0] == "plan":
                # Not among ENTRY_COLUMNS: a reader of an older journal (`JournalView`) has no such column.
                masked = self._row(entry_id, "masked")
                return plan_from_row(row, self._timeout_ms, bool(masked and masked[0]))
            plan_json = None
            if row[7] is None and row[2] is not None:
                plan_row = self._row(UUID(bytes=row[2]), "request")
                plan_json = plan_row[0] if plan_row is not None else None
            return record_from_row(entry_id, row, plan_json, self._timeout_ms)

    def _row(self, entry_id: UUID, columns: str) -> tuple[Any, ...] | None:
        with self._reading() as reader:
            row = reader.execute(f"SELECT {columns} FROM entries WHERE id = ?", (entry_id.bytes,)).fetchone()
        return tuple(row) if row is not None else None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with (
            self._reads,
            map_errors({sqlite3.Error: IoError, ValueError: IoError}, f"cannot read journal {self.path}"),
        ):
            if self._reader is not None:
                yield self._reader
                return
            if not self.path.is_file():
                raise IoError(f"journal {self.path} is not open")
            # Not open (yet, or any more): a read beside whoever holds it, as `journal_view` reads.
            reader = open_connection(self.path, readonly=True)
            try:
                yield reader
            finally:
                reader.close()

    def summaries(
        self,
        status: ExecutionStatus | None = None,
        plan_id: UUID | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ExecutionSummary]:
        if plan_id is not None:
            return self._plan_summaries(plan_id, status, since, limit)
        live = [(seq, entry) for seq, entry in self._live.values() if matches(entry, status, None, since)]
        skip = set(self._live)
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if since is not None:
            where.append("submitted_us >= ?")
            params.append(us_of(since))
        sql = f"SELECT {SUMMARY_COLUMNS} FROM entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            # A limit past SQLite's integers is one past every row.
            params.append(min(limit + len(skip), SQLITE_MAX_INT))
        with self._reading() as reader:
            rows = reader.execute(sql, params).fetchall()
        journalled = [(row[0], row) for row in rows if row[1] not in skip]
        merged: list[tuple[int, Any]] = [*journalled, *live]
        merged.sort(key=lambda item: item[0])
        chosen = select_newest(merged, limit)
        return [
            item.summary() if isinstance(item, Record | PlanRun) else summary_from_row(item)
            for _, item in chosen
        ]

    def _plan_summaries(
        self, plan_id: UUID, status: ExecutionStatus | None, since: datetime | None, limit: int | None
    ) -> list[ExecutionSummary]:
        """A plan's commands, found by the ids in the plan: a resumed plan's reused ones among them.

        Their rows name one plan (the newest to reuse them); listed under
        another plan, the summary names that one.
        """
        in_memory = self._memory.plan_records(plan_id)
        if in_memory:
            ids = [record.key for record in in_memory]
        else:
            row = self._row(plan_id, "kind, request")
            if row is None or row[0] != "plan":
                return []
            with self._reading():
                ids = [UUID(command["id"]).bytes for command in json.loads(row[1])["commands"]]
        rows: dict[bytes, tuple[Any, ...]] = {}
        with self._reading() as reader:
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start : start + _IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT {SUMMARY_COLUMNS} FROM entries WHERE id IN ({marks})"
                rows.update((row[1], tuple(row)) for row in reader.execute(query, chunk))
        summaries: list[tuple[int, ExecutionSummary]] = []
        for key in ids:
            live = self._live.get(key)
            if live is not None:
                if not matches(live[1], status, None, since):
                    continue
                summaries.append((live[0], live[1].summary()))  # a command of this plan, running it
                continue
            found = rows.get(key)
            if found is None:
                continue  # deleted by retention
            if status is not None and found[4] != status.value:
                continue
            if since is not None and found[5] < us_of(since):
                continue
            summaries.append((found[0], summary_from_row((*found[:3], plan_id.bytes, *found[4:]))))
        # Submission order: a reused command was submitted with the plan it ran in.
        summaries.sort(key=lambda item: item[0])
        return [summary for _, summary in select_newest(summaries, limit)]

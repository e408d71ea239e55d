"""Retention: deleting, oldest first, what a `RetentionPolicy` says is too old or beyond its limits.

What is deleted:
- journal rows: an execution submitted alone, or a plan with all its commands,
  once it ended more than `max_age_s` ago, or when more than `max_executions`
  finished executions are recorded (a plan counts as its commands and goes
  whole); with each, its log files;
- in `log_dir`, only files named `<uuid>.log`: older than `max_age_s` (by
  modification time: a log is written until its execution ends), beyond the
  newest `max_executions`, or the oldest while all of them together exceed
  `max_log_bytes`;
- in memory, the finished entries the store keeps, by the same age and count.

Never the log of an execution that is pending or running: the ids of those
are taken on the loop before a sweep, and a file modified after that moment
belongs to something that may have started since, so it is left alone.

Sweeps run at start (before `start()` returns) and every `SWEEP_INTERVAL`
seconds, off the host loop: as a job on the journal's writer thread, one
chunk between two batches of its commits, or in a thread without a journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from ..config import RetentionPolicy
from ..logfiles import unlink_unless_in_use
from .journal_rows import us_of
from .off_loop import in_thread

__all__ = ["SWEEP_INTERVAL", "Retention", "Sweeps", "now", "run_job"]

logger = logging.getLogger("cloudops_execution_engine.retention")

SWEEP_INTERVAL = 30.0
_CHUNK = 500  # rows or files per step: a step holds the writer for milliseconds, not seconds
_SCAN_STEP = 2_000  # directory entries read per step, about 20 ms of work
# A log dated after the sweep began but no later than this past the clock is a new one.
_JUST_MADE_S = 2.0
_LOG_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.log")


# Counting finished commands, in steps of `_COUNT_STEP` rows in order of their end:
# the kind of each is in its row, so a million rows take half a second to count.
_NEXT_EDGE = (
    "SELECT ended_us, seq FROM entries WHERE ended_us IS NOT NULL AND (ended_us, seq) > (?, ?) "
    "ORDER BY ended_us, seq LIMIT 1 OFFSET ?"
)
_FINISHED_COMMANDS = "FROM entries WHERE ended_us IS NOT NULL AND kind = 'command'"
_COUNT_AFTER = f"SELECT count(*) {_FINISHED_COMMANDS} AND (ended_us, seq) > (?, ?)"
_COUNT_UP_TO = _COUNT_AFTER + " AND (ended_us, seq) <= (?, ?)"
_COUNT_STEP = 20_000


def _count_finished_commands(conn: sqlite3.Connection) -> Generator[None, None, int]:
    """How many commands the journal holds that have ended: a step of the job per `_COUNT_STEP` rows."""
    total = 0
    after: tuple[int, int] = (-1, -1)
    while True:
        edge = conn.execute(_NEXT_EDGE, (*after, _COUNT_STEP - 1)).fetchone()
        if edge is None:
            return total + int(conn.execute(_COUNT_AFTER, after).fetchone()[0])
        total += int(conn.execute(_COUNT_UP_TO, (*after, *edge)).fetchone()[0])
        after = (int(edge[0]), int(edge[1]))
        yield


def run_job(job: Iterator[None]) -> None:
    """Run a job to its end, here."""
    for _ in job:
        pass


class Retention:
    """One policy applied to a log directory and, when there is one, a journal."""

    def __init__(self, policy: RetentionPolicy, log_dir: Path) -> None:
        self.policy = policy
        self.log_dir = log_dir

    def cutoff(self, now: float) -> datetime | None:
        """What ended before this is too old; None without `max_age_s`, or with one older than the epoch."""
        max_age_s = self.policy.max_age_s
        if max_age_s is None or max_age_s >= now:
            return None  # nothing ended that long ago (and a date that old is out of range)
        return datetime.fromtimestamp(now - max_age_s, UTC)

    # -- the journal (on its writer thread) ---------------------------------------

    def journal_job(self, conn: sqlite3.Connection, live: set[UUID], now: float) -> Iterator[None]:
        """Delete rows (and their logs) by age, then by count; then sweep the log directory."""
        policy = self.policy
        cutoff = self.cutoff(now)
        if cutoff is not None:
            yield from self._delete_units(conn, "ended_us < ?", (us_of(cutoff),), None)
        if policy.max_executions is not None:
            finished = yield from _count_finished_commands(conn)
            excess = finished - policy.max_executions
            if excess > 0:
                yield from self._delete_units(conn, "ended_us IS NOT NULL", (), excess)
        yield from self.logs_job(live, now)

    def _delete_units(
        self, conn: sqlite3.Connection, condition: str, params: tuple[int, ...], budget: int | None
    ) -> Iterator[None]:
        """Delete the oldest-ended units matching `condition`; with `budget`, until that many commands."""
        while budget is None or budget > 0:
            units = conn.execute(
                f"SELECT seq, id, kind, log_path FROM entries WHERE {condition} AND plan_id IS NULL "
                "ORDER BY ended_us LIMIT ?",
                (*params, _CHUNK),
            ).fetchall()
            if not units:
                return
            seqs: list[int] = []
            logs: list[str] = []
            for seq, key, kind, log_path in units:
                if budget is not None and budget <= 0:
                    break
                seqs.append(seq)
                if kind == "plan":
                    members = conn.execute(
                        "SELECT seq, log_path FROM entries WHERE plan_id = ?", (key,)
                    ).fetchall()
                    seqs.extend(member_seq for member_seq, _ in members)
                    logs.extend(path for _, path in members if path)
                    if budget is not None:
                        budget -= len(members)
                else:
                    if log_path:
                        logs.append(log_path)
                    if budget is not None:
                        budget -= 1
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("DELETE FROM entries WHERE seq = ?", [(seq,) for seq in seqs])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            for path in logs:
                self._unlink(Path(path))
            yield

    # -- the log directory -------------------------------------------------------

    def logs_job(self, live: set[UUID], now: float) -> Iterator[None]:
        """Delete `<uuid>.log` files by age, count and total size, oldest first."""
        policy = self.policy
        files = yield from self._log_files(live, now)
        files.sort(key=lambda item: item[1])  # oldest first
        doomed: list[Path] = []
        kept: list[tuple[Path, float, int]] = []
        cutoff = now - policy.max_age_s if policy.max_age_s is not None else None
        for item in files:
            if cutoff is not None and item[1] < cutoff:
                doomed.append(item[0])
            else:
                kept.append(item)
        if policy.max_executions is not None and len(kept) > policy.max_executions:
            excess = len(kept) - policy.max_executions
            doomed.extend(path for path, _, _ in kept[:excess])
            kept = kept[excess:]
        if policy.max_log_bytes is not None:
            total = sum(size for _, _, size in kept)
            index = 0
            while total > policy.max_log_bytes and index < len(kept):
                path, _, size = kept[index]
                doomed.append(path)
                total -= size
                index += 1
        for start in range(0, len(doomed), _CHUNK):
            for path in doomed[start : start + _CHUNK]:
                self._unlink(path)
            yield

    def _log_files(self, live: set[UUID], now: float) -> Generator[None, None, list[tuple[Path, float, int]]]:
        """(path, mtime, size) of each finished execution's log file; a file touched since `now` is not.

        A step of the job every `_SCAN_STEP` entries: a directory of a hundred
        thousand logs takes about a second to read, which would otherwise hold
        the journal's commits back in one piece.
        """
        found: list[tuple[Path, float, int]] = []
        try:
            entries = os.scandir(self.log_dir)
        except OSError as exc:
            logger.warning("retention cannot list %s: %s", self.log_dir, exc)
            return found
        live_names = {f"{key}.log" for key in live}
        with entries:
            for count, entry in enumerate(entries, 1):
                if count % _SCAN_STEP == 0:
                    yield
                name = entry.name
                # The spelling `log_path_for` gives (a UUID as `str` writes it), and nothing else.
                if len(name) != 40 or not _LOG_NAME.fullmatch(name) or name in live_names:
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                mtime = info.st_mtime
                if mtime >= now:
                    if mtime <= time.time() + _JUST_MADE_S:
                        continue  # made since the sweep began: perhaps not yet held by its writer
                    # Dated ahead of the clock (set back since, or copied with its times): the newest.
                    mtime = now
                found.append((Path(entry.path), mtime, info.st_size))
        return found

    def _unlink(self, path: Path) -> None:
        # Only a log file in our directory: a path from an earlier engine's
        # configuration that points elsewhere is not ours to delete now.
        if path.parent != self.log_dir or not path.name.endswith(".log"):
            return
        try:
            # A log held open is being written, by this engine or another one on the same directory.
            unlink_unless_in_use(path)
        except OSError as exc:
            logger.warning("retention could not delete %s: %s", path, exc)


def now() -> float:
    return time.time()


class Sweeps:
    """The timer that calls a store's `sweep` every `SWEEP_INTERVAL`, and the thread job it may be running."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[None] | None = None
        self._stopped = False

    def start(self, sweep: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = False

        def tick() -> None:
            if self._stopped:
                return
            try:
                sweep()
            except Exception:
                logger.exception("a retention sweep failed")
            self._timer = loop.call_later(SWEEP_INTERVAL, tick)

        self._timer = loop.call_later(SWEEP_INTERVAL, tick)

    def run_in_thread(self, fn: Callable[[Iterator[None]], None], job: Iterator[None]) -> None:
        """Run `job` in a thread, unless the previous one is still running."""
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.ensure_future(in_thread(fn, job, name="cloudops-retention"))

    async def stop(self) -> None:
        self.abandon()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    def abandon(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

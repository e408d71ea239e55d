"""The journal's tables, and the migrations that bring an older journal up to date.

The schema version is SQLite's `PRAGMA user_version`: the number of entries of
`MIGRATIONS` applied. Opening a journal applies the missing ones in order, each
in a transaction of its own; a journal whose version is above what this code
knows was written by a newer release and is refused, never downgraded.

One table holds executions and plans alike (`entries`), in submission order
(`seq`). Ids are the UUIDs' 16 bytes. Times are integer microseconds since the
epoch, so that what is read back equals what the engine held. `request` is the
serde JSON of the request (a command submitted alone) or of the plan (a plan's
row; its commands' rows have none, they are in the plan's); `result` is the
serde JSON of the final result. `runs` has one row per engine that opened the
journal: the pid recovery names when that engine died with work unfinished,
and the engine's id, which its commands carry (from version 2).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import IoError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

_V1 = """
CREATE TABLE runs (
    run INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    opened_us INTEGER NOT NULL,
    closed_us INTEGER
);
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    plan_id BLOB,
    idx INTEGER NOT NULL DEFAULT -1,
    run INTEGER NOT NULL,
    status TEXT NOT NULL,
    submitted_us INTEGER NOT NULL,
    started_us INTEGER,
    ended_us INTEGER,
    duration_ns INTEGER,
    pid INTEGER,
    log_path TEXT,
    request TEXT,
    result TEXT
);
CREATE INDEX entries_by_status ON entries (status, seq);
CREATE INDEX entries_by_plan ON entries (plan_id, seq) WHERE plan_id IS NOT NULL;
CREATE INDEX entries_by_submission ON entries (submitted_us);
CREATE INDEX entries_by_end ON entries (ended_us) WHERE ended_us IS NOT NULL;
"""

# Which engine a run was (`process_tree.ENGINE_ENV` in its commands): recovery
# then kills only that engine's processes of an execution id, not another's.
_V2 = """
ALTER TABLE runs ADD COLUMN engine_id TEXT;
"""

MIGRATIONS: list[str] = [_V1, _V2]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the journal at `path` to `SCHEMA_VERSION`; `IoError` for one written by a newer release."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise IoError(
            f"journal {path} has schema version {version}, newer than the {SCHEMA_VERSION} this "
            "release knows: it was written by a newer cloudops-execution-engine"
        )
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            # PRAGMA takes no parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

"""The journal's tables, and the migrations that bring an older journal up to date.

The schema version is SQLite's `PRAGMA user_version`: the number of entries of
`MIGRATIONS` applied. Opening a journal applies the missing ones in order, each
in a transaction of its own; a journal whose version is above what this code
knows was written by a newer release and is refused, never downgraded. A
journal also carries SQLite's `PRAGMA application_id`, so that a database of
another application named by mistake is refused before anything is changed in it.

One table holds executions and plans alike (`entries`), in submission order
(`seq`). Ids are the UUIDs' 16 bytes. Times are integer microseconds since the
epoch, so that what is read back equals what the engine held. `request` is the
serde JSON of the request (a command submitted alone) or of the plan (a plan's
row; its commands' rows have none, they are in the plan's); `result` is the
serde JSON of the final result. `runs` has one row per engine that opened the
journal: the pid recovery names when that engine died with work unfinished,
and the engine's id, which its commands carry (from version 2). A resumed
plan's row names the plan it resumes (`resumed_from`, from version 3). Each attempt's
start is recorded (`attempt`, from version 4). A row whose `request` had the
engine's secrets masked in it says so (`masked`, from version 5): such a plan's
commands are not what ran, and it is not resumed from its row.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import IoError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "check_is_a_journal", "migrate"]

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

# Which plan a resumed plan resumes (`PlanExecutionResult.resumed_from`): known from the
# start, so that recovery can say it of a resumed plan its dead host left running.
_V3 = """
ALTER TABLE entries ADD COLUMN resumed_from BLOB;
"""

# How many attempts of a retried execution have started (from version 4): recovery says it
# of one its dead host left running. None for one that never started again, as 1.
_V4 = """
ALTER TABLE entries ADD COLUMN attempt INTEGER;
"""

_V5 = """
ALTER TABLE entries ADD COLUMN masked INTEGER;
"""

MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5]
SCHEMA_VERSION = len(MIGRATIONS)
# SQLite's field for telling one application's files from another's ("CoEE").
APPLICATION_ID = 0x436F4545
# Tables of a journal, with columns every version of it has.
_OURS = {
    "runs": {"run", "pid", "hostname", "opened_us"},
    "entries": {"seq", "id", "kind", "run", "status", "submitted_us", "request", "result"},
}


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the journal at `path` to `SCHEMA_VERSION`.

    `IoError` for one written by a newer release, and for a database that is
    not a journal (a host's own file, named by mistake), which is left as it was.
    """
    check_is_a_journal(conn, path)
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            # PRAGMA takes no parameters; the values are our own integers.
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def check_is_a_journal(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse, by reading alone, a database some other application wrote or a newer release did.

    Migrating the first would change its tables, the second would be downgraded.
    A journal carries `APPLICATION_ID`. One without any is new (no tables),
    or a journal from before the id was set (its tables are ours, with our
    columns), or not a journal at all.
    """
    application = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if application == APPLICATION_ID:
        _check_version(conn, path)
        return
    if application != 0:
        raise IoError(
            f"journal {path} is a SQLite database of another application "
            f"(application_id {application:#x}), not a journal"
        )
    listed = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    tables = {str(row[0]) for row in listed}
    if not tables:
        _check_version(conn, path)  # new, unless a newer release marked it so
        return
    if tables >= _OURS.keys() and all(_columns(conn, table) >= columns for table, columns in _OURS.items()):
        # Written before journals carried the id; it is set as they are brought up to date.
        _check_version(conn, path)
        return
    raise IoError(
        f"journal {path} is a SQLite database of something else (tables: {', '.join(sorted(tables))}), "
        "not a journal"
    )


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise IoError(
            f"journal {path} has schema version {version}, newer than the {SCHEMA_VERSION} this "
            "release knows: it was written by a newer cloudops-execution-engine"
        )


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    # PRAGMA takes no parameters; the table's name is one of ours.
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}

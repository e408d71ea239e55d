"""A journal read as it was last committed, beside the engine that holds it.

One engine at a time owns a journal (its lock, its writer, its recovery), but
SQLite in WAL mode lets others read while it writes. `JournalView` is such a
reader, for `cloudops-exec history`, `show` and `logs` while a long `run` or
a service holds the journal: it answers the engine's queries from committed
rows only, never writes, and never recovers anything (an entry a dead holder
left `running` reads as `running` until the next engine opens the journal).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

from ..errors import IoError, NotCompleted, NotFound, map_errors
from ..logfiles import read_log
from ..results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult
from .journal import open_connection
from .journal_rows import (
    ENTRY_COLUMNS,
    SQLITE_MAX_INT,
    SUMMARY_COLUMNS,
    plan_from_row,
    record_from_row,
    summary_from_row,
)
from .journal_schema import SCHEMA_VERSION

__all__ = ["JournalView"]

# Only the engines that run commands use a request's timeout; a reader needs a value to build records.
_UNUSED_TIMEOUT_MS = 1


class JournalView:
    """The engine's read queries over a journal's committed rows; `IoError` naming the file on any fault."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise IoError(f"no journal at {path}")
        with self._faults():
            self._conn = open_connection(path, readonly=True)
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            self._conn.close()
            raise IoError(
                f"journal {path} has schema version {version}, newer than the {SCHEMA_VERSION} "
                "this release knows: it was written by a newer cloudops-execution-engine"
            )

    async def __aenter__(self) -> JournalView:
        return self

    def close(self) -> None:
        self._conn.close()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _faults(self) -> Any:
        # ValueError: a row it cannot read back (a status or document damaged, or edited by hand).
        return map_errors({sqlite3.Error: IoError, ValueError: IoError}, f"cannot read journal {self.path}")

    def _row(self, entry_id: UUID, columns: str) -> tuple[Any, ...]:
        with self._faults():
            query = f"SELECT {columns} FROM entries WHERE id = ?"
            row = self._conn.execute(query, (entry_id.bytes,)).fetchone()
        if row is None:
            raise NotFound(entry_id)
        return tuple(row)

    async def list_executions(
        self, *, status: ExecutionStatus | str | None = None, limit: int | None = None
    ) -> list[ExecutionSummary]:
        """As `ExecutionEngine.list_executions`: submission order, the newest `limit`."""
        sql = f"SELECT {SUMMARY_COLUMNS} FROM entries"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(ExecutionStatus(status).value)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(min(limit, SQLITE_MAX_INT))
        with self._faults():
            rows = self._conn.execute(sql, params).fetchall()
            return [summary_from_row(tuple(row)) for row in reversed(rows)]

    async def get_status(self, execution_id: UUID) -> ExecutionStatus:
        status = self._row(execution_id, "status")[0]
        with self._faults():
            return ExecutionStatus(status)

    async def get_result(self, execution_id: UUID) -> ExecutionResult:
        row = self._row(execution_id, ENTRY_COLUMNS)
        if row[0] == "plan":
            raise NotFound(execution_id)
        plan_json = None
        if row[7] is None and row[2] is not None:
            plan_json = self._row(UUID(bytes=row[2]), "request")[0]
        with self._faults():
            result = record_from_row(execution_id, row, plan_json, _UNUSED_TIMEOUT_MS).result
        if result is None:
            raise NotCompleted(execution_id)
        return result

    async def get_plan_result(self, plan_id: UUID) -> PlanExecutionResult:
        row = self._row(plan_id, ENTRY_COLUMNS)
        if row[0] != "plan":
            raise NotFound(plan_id)
        with self._faults():
            result = plan_from_row(row, _UNUSED_TIMEOUT_MS).result
        if result is None:
            raise NotCompleted(plan_id)
        return result

    def get_log_path(self, execution_id: UUID) -> Path:
        return Path(self._row(execution_id, "log_path")[0] or "")

    async def read_logs(self, execution_id: UUID) -> str:
        """A command's log file; for a plan, its commands' logs that exist, one after another."""
        kind, log_path = self._row(execution_id, "kind, log_path")
        if kind == "plan":
            paths = [item.log_path for item in (await self.get_plan_result(execution_id)).results]
            return "".join(read_log(path, missing_ok=True) for path in paths)
        # A log file on a local disk: a read the command line waits for anyway, whatever its length.
        return read_log(Path(log_path))

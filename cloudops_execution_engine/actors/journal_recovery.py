"""Recovery: what a journal's previous owner left pending or running ends `failed`, its processes killed.

Only an engine holding the journal's lock runs this, so every unfinished row
belongs to an engine that is gone. Processes still running for those
executions on this machine are found by the marker every command carries in
its environment (`CLOUDOPS_EXECUTION_ID`, with the dead engine's
`CLOUDOPS_ENGINE_ID`: another engine may run the same id) and by the session its main process
led (its pid, trusted only while no other process has taken that pid), and
killed with their descendants before anything is written. Then each
execution's row gets a `failed` result whose error starts with
"Interrupted:" and names the dead host's pid, and each unfinished plan a
result made of its commands' results.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
from pydantic import TypeAdapter

from .._model import Duration, UtcDateTime, construct_unchecked
from ..requests import ExecutionPlan
from ..results import ExecutionResult, ExecutionStats, ExecutionStatus, PlanExecutionResult
from . import process_tree
from .journal_rows import datetime_from_us, fitting_json, now_us, value_limit

__all__ = ["interrupted_error", "recover"]

_RESULT_FIELDS = set(ExecutionResult.model_fields)
# A recorded pid still names the command's session leader only while the process
# with that pid started when the command did (the kernel counts in clock ticks).
_START_TOLERANCE_S = 1.0


def interrupted_error(host_pid: int) -> str:
    return f"Interrupted: the engine's host process (pid {host_pid}) ended before this execution did"


def recover(conn: sqlite3.Connection) -> int:
    """Fail what the journal has unfinished; returns how many executions and plans it ended."""
    rows = conn.execute(
        "SELECT e.seq, e.id, e.kind, e.pid, e.started_us, e.log_path, r.pid, r.engine_id, e.attempt "
        "FROM entries AS e JOIN runs AS r ON r.run = e.run "
        "WHERE e.status IN ('pending', 'running')"
    ).fetchall()
    if not rows:
        return 0
    commands = [row for row in rows if row[2] == "command"]
    _kill_leftovers(commands)
    ended = now_us()
    results = _Results(datetime_from_us(ended))
    updates = []
    for seq, key, _kind, _pid, started_us, log_path, host_pid, _engine, attempt in commands:
        began = started_us if started_us is not None else ended
        text = results.json(
            key, datetime_from_us(began), log_path or "", interrupted_error(host_pid), attempt or 1
        )
        updates.append((ended, (ended - began) * 1000, text, seq))
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "UPDATE entries SET status = 'failed', ended_us = ?, duration_ns = ?, result = ? WHERE seq = ?",
            updates,
        )
        for seq, key, kind, *_rest in rows:
            if kind == "plan":
                _end_plan(conn, seq, key, ended)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(rows)


class _Results:
    """The serde JSON of interrupted executions' results, made quickly: recovery may write 100,000.

    One result is serialised by its model; the others are that one's JSON
    values with their own id, start, duration, log path and error, each
    serialised as the model serialises it.
    """

    _times = TypeAdapter(UtcDateTime)
    _durations = TypeAdapter(Duration)

    def __init__(self, completed_at: datetime) -> None:
        self.completed_at = completed_at
        template = construct_unchecked(
            ExecutionResult,
            {
                "id": UUID(int=0),
                "status": ExecutionStatus.FAILED,
                "exit_code": -1,
                "stdout": "",
                "stderr": "",
                "duration": timedelta(0),
                "started_at": completed_at,
                "completed_at": completed_at,
                "log_path": Path(),
                "error": "",
                "resource_usage": None,
                "stdout_truncated": False,
                "stderr_truncated": False,
                "attempts": 1,
            },
            _RESULT_FIELDS,
        )
        self._template: dict[str, Any] = json.loads(template.model_dump_json())

    def json(self, key: bytes, started_at: datetime, log_path: str, error: str, attempts: int) -> str:
        values = dict(self._template)
        values["attempts"] = attempts
        values["id"] = str(UUID(bytes=key))
        if started_at != self.completed_at:
            values["started_at"] = self._times.dump_python(started_at, mode="json")
            values["duration"] = self._durations.dump_python(self.completed_at - started_at, mode="json")
        values["log_path"] = log_path
        values["error"] = error
        return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


def _kill_leftovers(commands: list[tuple[Any, ...]]) -> None:
    # A run from before engines were named (no engine id) is found by its marker alone.
    markers = {process_tree.marker_key(str(UUID(bytes=row[1])), row[7]) for row in commands}
    alive = set(psutil.pids())
    sessions: set[int] = set()
    checked: dict[int, bool] = {}
    for row in commands:
        pid, started_us = row[3], row[4]
        if not isinstance(pid, int) or pid <= 0 or not isinstance(started_us, int):
            continue
        if pid not in alive:
            sessions.add(pid)  # its leader is gone; members of its session may not be
            continue
        if pid not in checked:
            checked[pid] = _may_lead(pid, started_us)
        if checked[pid]:
            sessions.add(pid)
    process_tree.kill_abandoned(markers, sessions)


def _may_lead(pid: int, started_us: int) -> bool:
    """Whether the live process `pid` is the command's main process: it started when the command did."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
    return abs(created - started_us / 1e6) < _START_TOLERANCE_S


# Ids looked up at a time: well under SQLite's bound on a statement's parameters.
_IDS_AT_ONCE = 500


def _command_results(conn: sqlite3.Connection, key: bytes, plan_json: str | None) -> list[str | None]:
    """The result JSON of each of the plan's commands, in its order.

    Found by the ids in the plan's own JSON: a command a resumed plan reuses
    is linked to the newest plan that reused it, so a plan resumed twice
    would find, by link, only the commands that are its alone.
    """
    try:
        ids = [request.id.bytes for request in ExecutionPlan.model_validate_json(plan_json or "").commands]
    except ValueError:  # not the plan's JSON: the commands linked to it, as written
        rows = conn.execute(
            "SELECT result FROM entries WHERE plan_id = ? AND kind = 'command' ORDER BY idx", (key,)
        ).fetchall()
        return [text for (text,) in rows]
    found: dict[bytes, str | None] = {}
    for start in range(0, len(ids), _IDS_AT_ONCE):
        chunk = ids[start : start + _IDS_AT_ONCE]
        # Only "?" marks are put into the statement; the ids go as its parameters.
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT id, result FROM entries WHERE id IN ({marks})"
        found.update(conn.execute(query, chunk).fetchall())
    return [found.get(command) for command in ids]


def _end_plan(conn: sqlite3.Connection, seq: int, key: bytes, ended: int) -> None:
    """A plan's result from its commands' (now all final) results.

    `failed`, as interrupted; unless every command had completed before the
    host died: the plan's end is written in the batch after its last command's,
    and a host killed between the two had decided it `completed` (SPEC 7).
    """
    submitted_us, resumed_from, plan_json = conn.execute(
        "SELECT submitted_us, resumed_from, request FROM entries WHERE seq = ?", (seq,)
    ).fetchone()
    texts = _command_results(conn, key, plan_json)
    results = [ExecutionResult.model_validate_json(text) for text in texts if text is not None]
    stats = ExecutionStats.of(result.status for result in results)
    whole = bool(texts) and len(results) == len(texts) and stats.completed == len(texts)
    status = ExecutionStatus.COMPLETED if whole else ExecutionStatus.FAILED
    plan_result = PlanExecutionResult(
        plan_id=UUID(bytes=key),
        status=status,
        results=results,
        total_duration=timedelta(microseconds=ended - submitted_us),
        stats=stats,
        resumed_from=UUID(bytes=resumed_from) if resumed_from is not None else None,
    )
    conn.execute(
        "UPDATE entries SET status = ?, ended_us = ?, duration_ns = ?, result = ? WHERE seq = ?",
        (
            status.value,
            ended,
            (ended - submitted_us) * 1000,
            fitting_json(plan_result, value_limit(conn)),
            seq,
        ),
    )

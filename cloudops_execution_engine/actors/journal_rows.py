"""How executions and plans become journal rows, and rows become what queries answer with.

The `write_*` functions run on the writer thread, inside its transaction; the
`*_from_row` functions run where a query is answered.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from .._model import construct_unchecked
from ..requests import ExecutionPlan, ExecutionRequest
from ..results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult
from .records import PlanRun, Record

__all__ = [
    "SQLITE_MAX_INT",
    "SUMMARY_COLUMNS",
    "DropOldest",
    "apply_batch",
    "datetime_from_us",
    "describe_op",
    "fitting_json",
    "now_us",
    "op_added",
    "op_closed",
    "op_ended",
    "op_plan_added",
    "op_started",
    "plan_from_row",
    "record_from_row",
    "summary_from_row",
    "us_of",
    "value_limit",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_SUMMARY_FIELDS = set(ExecutionSummary.model_fields)

# The largest integer SQLite stores: a bound past it is a bound past everything.
SQLITE_MAX_INT = 2**63 - 1
SUMMARY_COLUMNS = "seq, id, kind, plan_id, status, submitted_us, started_us, duration_ns"
ENTRY_COLUMNS = "kind, status, plan_id, idx, submitted_us, started_us, log_path, request, result"


def us_of(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICRO


def datetime_from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def now_us() -> int:
    return time.time_ns() // 1000


def _duration_ns(duration: timedelta) -> int:
    return (duration // _MICRO) * 1000


# -- writing (the writer thread) ----------------------------------------------
#
# The store queues operations; the writer hands each batch to `apply_batch`,
# which writes the batch's end state: an execution submitted and ended within
# one batch (the common case for short commands under load) is one INSERT of
# its final row, not an INSERT and two UPDATEs. Rows are addressed by `seq`,
# the rowid, so an update finds its row without the id index.

ADD, ADD_PLAN, STARTED, ENDED, CLOSED = range(5)

_INSERT = (
    "INSERT INTO entries (seq, id, kind, plan_id, idx, run, status, submitted_us, started_us, ended_us, "
    "duration_ns, pid, log_path, request, result, resumed_from, attempt, masked) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_ENDED = (
    "UPDATE entries SET status = ?, started_us = coalesce(?, started_us), ended_us = ?, duration_ns = ?, "
    "pid = coalesce(?, pid), result = ? WHERE seq = ?"
)
# A retried execution starts again while `running`: each attempt's start is written, so
# that recovery can say how many attempts ran.
_UPDATE_STARTED = (
    "UPDATE entries SET status = 'running', pid = ?, started_us = ?, attempt = ? "
    "WHERE seq = ? AND status IN ('pending', 'running')"
)


def op_added(seq: int, run: int, record: Record, request: ExecutionRequest) -> tuple[Any, ...]:
    # Its JSON now: the request is the host's object, which it may edit after `execute()`.
    document: str | Exception
    try:
        document = request.model_dump_json()
    except Exception as exc:  # raised again as the record is written: it is left out alone
        document = exc
    return (ADD, seq, run, record, document)


def op_plan_added(run: int, plan_run: PlanRun, seqs: list[int], plan_seq: int) -> tuple[Any, ...]:
    """`seqs`: one per command of the plan that is new (not reused from a resumed plan), in order."""
    return (ADD_PLAN, run, plan_run, seqs, plan_seq)


def op_started(seq: int, pid: int, started_us: int, attempt: int) -> tuple[Any, ...]:
    return (STARTED, seq, pid, started_us, attempt)


def op_ended(seq: int, entry: Record | PlanRun) -> tuple[Any, ...]:
    return (ENDED, seq, entry)


def op_closed(run: int) -> tuple[Any, ...]:
    return (CLOSED, run)


def describe_op(op: tuple[Any, ...]) -> str:
    """What an operation is about, for a message: the execution or plan it writes."""
    kind = op[0]
    if kind == ADD:
        return f"execution {op[3].id}"
    if kind == ADD_PLAN:
        return f"plan {op[2].id}"
    if kind == ENDED:
        entry = op[2]
        return f"the end of {'execution' if isinstance(entry, Record) else 'plan'} {entry.id}"
    if kind == STARTED:
        return f"the start of the execution in row {op[1]}"
    return f"the close of run {op[1]}"


class DropOldest:
    """Which operations a failing journal's writer lets go of when it keeps too many (`JournalWriter`).

    The oldest submissions go, each with every operation on it, then or later:
    an end whose row was never written is of no use, and a row written without
    its end would be taken for one a dead host left running. Operations on
    rows written before the journal began to fail are kept. Seqs are given in
    submission order, so what goes is one range of them, from the first
    submission of the episode on (`reset` when it ends).
    """

    def __init__(self) -> None:
        self._floor: int | None = None
        self._ceiling = -1

    def __call__(self, ops: list[tuple[Any, ...]], excess: int) -> list[tuple[Any, ...]]:
        counted = 0
        for op in ops:
            if counted >= excess:
                break
            kind = op[0]
            if kind == ADD:
                first = last = op[1]
                counted += 3  # with its start and its end
            elif kind == ADD_PLAN:
                first, last = min([*op[3], op[4]]), op[4]
                counted += 2 + 2 * len(op[3])
            else:
                continue
            if self._floor is None:
                self._floor = first
            self._ceiling = max(self._ceiling, last)
        return [op for op in ops if not self._doomed(op)]

    def reset(self) -> None:
        self._floor, self._ceiling = None, -1

    def _doomed(self, op: tuple[Any, ...]) -> bool:
        kind = op[0]
        if kind in (ADD, STARTED, ENDED):
            seq = op[1]
        elif kind == ADD_PLAN:
            seq = op[4]
        else:
            return False
        return self._floor is not None and self._floor <= seq <= self._ceiling


# What one character of a command's output may take in JSON: a control character is `\u0001`.
_WORST_BYTES_PER_CHAR = 6
# Room in a document for all but the outputs, per result it holds.
_RESULT_SLACK = 64 * 1024


def fitting_json(result: ExecutionResult | PlanExecutionResult, limit: int) -> str:
    """`result`'s serde JSON, in at most `limit` bytes: outputs past that are cut to their ends.

    SQLite stores no value longer than its length limit (a billion bytes by
    default). A plan's result holds each command's, outputs and all: a plan of
    a few commands that each print their output cap of control characters
    (six bytes of JSON each) is past it, and so, with a raised cap, is one
    command's. Such a row could not be written, nor, at the next start,
    recovered, and the journal could not be opened again. Cut, each output
    keeps its last part and is said truncated; a command's own row keeps its
    output whole when that fits.
    """
    results = [result] if isinstance(result, ExecutionResult) else result.results
    longest = max((max(len(item.stdout), len(item.stderr)) for item in results), default=0)
    # Under the worst case (every character six bytes) it fits as it is, measured or not.
    if 2 * longest * len(results) * _WORST_BYTES_PER_CHAR + _RESULT_SLACK * (len(results) + 1) <= limit:
        return result.model_dump_json()
    text = result.model_dump_json()
    size = len(text.encode())
    keep = longest
    while size > limit and keep > 0:
        # Shrunk by the measured excess, and a tenth more: one or two rounds.
        keep = int(keep * limit / size * 0.9)
        cut = [_cut(item, keep) for item in results]
        fitted = cut[0] if isinstance(result, ExecutionResult) else result.model_copy(update={"results": cut})
        text = fitted.model_dump_json()
        size = len(text.encode())
    return text


def _cut(result: ExecutionResult, keep: int) -> ExecutionResult:
    update: dict[str, Any] = {}
    for name in ("stdout", "stderr"):
        text: str = getattr(result, name)
        if len(text) > keep:
            update[name] = text[len(text) - keep :]
            update[f"{name}_truncated"] = True
    return result.model_copy(update=update) if update else result


def _final(
    entry: Record | PlanRun, pid: int | None, mask: Callable[[str], str], limit: int
) -> tuple[Any, ...]:
    """(status, started_us, ended_us, duration_ns, pid, result JSON) of an ended entry."""
    if isinstance(entry, Record):
        result = entry.result
        assert result is not None
        ended = result.completed_at or datetime.now(UTC)
        return (
            result.status.value,
            us_of(result.started_at),
            us_of(ended),
            _duration_ns(result.duration),
            entry.pid or pid,
            mask(fitting_json(result, limit)),
        )
    plan_result = entry.result
    assert plan_result is not None
    return (
        plan_result.status.value,
        None,
        now_us(),
        _duration_ns(plan_result.total_duration),
        None,
        mask(fitting_json(plan_result, limit)),
    )


def value_limit(conn: sqlite3.Connection) -> int:
    """The longest value, in bytes, that `conn` stores (SQLite's length limit)."""
    return int(conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))


def _as_is(text: str) -> str:
    return text


def apply_batch(
    conn: sqlite3.Connection, ops: list[tuple[Any, ...]], mask: Callable[[str], str] = _as_is
) -> None:
    """Write a batch of operations (in the writer's transaction); `mask` hides the config's secrets."""
    limit = value_limit(conn)
    ended: dict[int, Record | PlanRun] = {}
    started: dict[int, tuple[int, int, int]] = {}  # seq: (pid, started_us, attempt)
    for op in ops:
        if op[0] == ENDED:
            ended[op[1]] = op[2]
        elif op[0] == STARTED:
            started[op[1]] = (op[2], op[3], op[4])
    inserts: list[tuple[Any, ...]] = []
    relinks: list[tuple[Any, ...]] = []
    closes: list[tuple[Any, ...]] = []

    def row(
        seq: int,
        entry: Record | PlanRun,
        kind: str,
        plan_key: bytes | None,
        index: int,
        run: int,
        **values: Any,
    ) -> tuple[Any, ...]:
        done = ended.pop(seq, None)
        began = started.pop(seq, None)
        if done is not None:
            pid_seen = began[0] if began else None
            status, started_us, ended_us, duration_ns, pid, result = _final(done, pid_seen, mask, limit)
        elif began is not None:
            status, started_us, ended_us, duration_ns, pid, result = (
                "running",
                began[1],
                None,
                None,
                began[0],
                None,
            )
        else:
            status, started_us, ended_us, duration_ns, pid, result = (
                values["status"],
                None,
                None,
                None,
                None,
                None,
            )
        return (
            seq,
            entry.id.bytes,
            kind,
            plan_key,
            index,
            run,
            status,
            values["submitted_us"],
            started_us,
            ended_us,
            duration_ns,
            pid,
            values["log_path"],
            values["request"],
            result,
            values.get("resumed_from"),
            began[2] if began is not None else None,
            values.get("masked"),
        )

    for op in ops:
        kind = op[0]
        if kind == ADD:
            _, seq, run, record, request = op
            if isinstance(request, Exception):
                raise request
            written = mask(request)
            inserts.append(
                row(
                    seq,
                    record,
                    "command",
                    None,
                    -1,
                    run,
                    status="pending",
                    submitted_us=us_of(record.submitted_at),
                    log_path=str(record.log_path),
                    request=written,
                    masked=1 if written is not request and written != request else None,
                )
            )
        elif kind == ADD_PLAN:
            _, run, plan_run, seqs, plan_seq = op
            plan_key = plan_run.id.bytes
            new = iter(seqs)
            for record in plan_run.records:
                if record.settled:
                    # Completed in the plan this one resumes: the same execution, now this plan's.
                    relinks.append((plan_key, record.index, record.key))
                    continue
                inserts.append(
                    row(
                        next(new),
                        record,
                        "command",
                        plan_key,
                        record.index,
                        run,
                        status="pending",
                        submitted_us=us_of(record.submitted_at),
                        log_path=str(record.log_path),
                        request=None,
                    )
                )
            document = plan_run.plan.model_dump_json()
            written = mask(document)
            inserts.append(
                row(
                    plan_seq,
                    plan_run,
                    "plan",
                    None,
                    -1,
                    run,
                    status="running",
                    submitted_us=us_of(plan_run.started_at),
                    log_path=None,
                    request=written,
                    resumed_from=plan_run.resumed_from.bytes if plan_run.resumed_from is not None else None,
                    # Compared whole only when the masker wrote the document anew: it may have found nothing.
                    masked=1 if written is not document and written != document else None,
                )
            )
        elif kind == CLOSED:
            closes.append((now_us(), op[1]))
    if inserts:
        conn.executemany(_INSERT, inserts)
    if relinks:
        conn.executemany("UPDATE entries SET plan_id = ?, idx = ? WHERE id = ?", relinks)
    if started:
        conn.executemany(
            _UPDATE_STARTED,
            [
                (pid, started_us, attempt, seq)
                for seq, (pid, started_us, attempt) in started.items()
                if seq not in ended
            ],
        )
    if ended:
        # A generator, not a list: SQLite lets go of the GIL for each row it
        # writes, so the host's loop waits for one result's JSON at most, not a batch's.
        conn.executemany(
            _UPDATE_ENDED,
            (
                (*_final(entry, started[seq][0] if seq in started else None, mask, limit), seq)
                for seq, entry in ended.items()
            ),
        )
    if closes:
        conn.executemany("UPDATE runs SET closed_us = ? WHERE run = ?", closes)


# -- reading --------------------------------------------------------------------


def summary_from_row(row: tuple[Any, ...]) -> ExecutionSummary:
    """A summary from the `SUMMARY_COLUMNS` of a row."""
    _seq, key, kind, plan_key, status, submitted_us, started_us, duration_ns = row
    values = {
        "id": UUID(bytes=key),
        "status": ExecutionStatus(status),
        "started_at": datetime_from_us(
            started_us if started_us is not None and kind == "command" else submitted_us
        ),
        "duration": timedelta(microseconds=duration_ns // 1000) if duration_ns is not None else None,
        "kind": kind,
        "plan_id": UUID(bytes=plan_key) if plan_key is not None else None,
    }
    return construct_unchecked(ExecutionSummary, values, _SUMMARY_FIELDS)


def record_from_row(
    execution_id: UUID, row: tuple[Any, ...], plan_json: str | None, timeout_ms: int
) -> Record:
    """An ended execution of an earlier engine, as the supervisor's queries read records.

    `plan_json` is the plan's own row's request, for a command of a plan.
    """
    _kind, status, _plan_key, index, submitted_us, started_us, log_path, request_json, result_json = row
    if request_json is not None:
        request = ExecutionRequest.model_validate_json(request_json)
    else:
        assert plan_json is not None
        request = ExecutionPlan.model_validate_json(plan_json).commands[index]
    record = Record(request, [], Path(log_path) if log_path else Path(), timeout_ms, index=index)
    record.status = ExecutionStatus(status)
    record.submitted_at = datetime_from_us(submitted_us)
    record.started_at = datetime_from_us(started_us) if started_us is not None else None
    if result_json is not None:
        record.result = ExecutionResult.model_validate_json(result_json)
    record.mark_ended()
    assert record.id == execution_id
    return record


def plan_from_row(row: tuple[Any, ...], timeout_ms: int, masked: bool = False) -> PlanRun:
    """An ended plan of an earlier engine, with its commands as records; `masked` as its row says."""
    _kind, status, _plan_key, _index, submitted_us, _started_us, _log_path, plan_json, result_json = row
    plan = ExecutionPlan.model_validate_json(plan_json)
    result = PlanExecutionResult.model_validate_json(result_json) if result_json is not None else None
    records: list[Record] = []
    for index, request in enumerate(plan.commands):
        own = result.results[index] if result is not None and index < len(result.results) else None
        record = Record(request, [], own.log_path if own else Path(), timeout_ms, index=index)
        record.submitted_at = datetime_from_us(submitted_us)  # with its plan
        if own is not None:
            record.id = own.id
            record.key = own.id.bytes
            record.result = own
            record.status = own.status
            record.started_at = own.started_at
        else:
            record.status = ExecutionStatus.CANCELLED
        record.mark_ended()
        records.append(record)
    run = PlanRun(plan, records)
    run.status = ExecutionStatus(status)
    run.started_at = datetime_from_us(submitted_us)
    run.result = result
    if result is not None:
        run.resumed_from = result.resumed_from
    run.ended = len(records)
    run.masked = bool(masked)
    run.mark_ended()
    return run

"""Secrets (`secret_env` values and `ExecutionConfig.secrets`) never appear in what the engine writes.

They are masked as `***` in output events, results, log files, error texts
and the command line, in `repr()` and `model_dump_json()` of the request.
The property tests feed random secrets and random output, cut at random
points, first through the worker's own text functions (with a small piece
size, so that pieces of an endless line are cut often), then through the
engine, with real 1 MiB pieces.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from conftest import PYTHON, Recorder, config, result_of, run, shell
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStatus,
    InvalidCommand,
    InvalidPlan,
    InvalidWorkingDir,
    ScriptCommand,
    ScriptNotFound,
    SerialStrategy,
    ShellCommand,
    SyncExecutionEngine,
)
from cloudops_execution_engine.actors import output
from cloudops_execution_engine.actors.output import (
    block_lines,
    keep,
    kept_text,
    mark_lines,
    mark_read,
    masked_kept,
    read_lines,
    split_lines,
    takes_masking,
    whole_lines_cut,
)
from cloudops_execution_engine.actors.secrets import Masker

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2-s3cr3t"
GLOBAL = "company-wide-token"


# -- the worker's text functions, at every cut ----------------------------------------------


def _through_reads(reads: list[bytes], masker: Masker, max_output: int) -> dict[str, Any]:
    """What the worker makes of a stream read in `reads`: as its `_on_output` and `_close_stream` do."""
    partial = b""
    stream = b""  # the lines as sent, pieces joined as they were in the output
    log = b""
    events: list[str] = []
    kept = bytearray()
    truncated = False
    for data in reads:
        if keep(kept, data, max_output + masker.hold):
            truncated = True
        cut = whole_lines_cut(partial, data)
        if takes_masking(partial, data, cut, masker):
            block, pieces, partial = split_lines(partial, data, masker)
        elif cut:
            log += b"".join(mark_read(b"", partial, data, cut))
            events += read_lines(partial, data, cut)
            stream += partial + data[:cut]
            partial = data[cut:]
            continue
        else:
            block, pieces, partial = split_lines(partial, data)
        log += mark_lines(b"", block, pieces)
        events += block_lines(block, pieces)
        stream += block + b"".join(pieces)
    if partial:
        rest = masker.mask(partial)
        log += mark_lines(b"", b"", [rest])
        events += block_lines(b"", [rest])
        stream += rest
    kept_bytes, truncated = masked_kept(kept, truncated, max_output, masker)
    text, truncated = kept_text(kept_bytes, truncated, max_output)
    return {"stream": stream, "log": log, "events": events, "kept": text, "truncated": truncated}


_SECRET_TEXT = st.text(alphabet="abcdAB12é-", min_size=4, max_size=9)
_FILLER = st.text(alphabet="abcdAB12é-*x\n", max_size=40)


@settings(max_examples=400, deadline=None)
@given(
    secrets=st.lists(_SECRET_TEXT, min_size=1, max_size=4, unique=True),
    parts=st.lists(st.tuples(_FILLER, st.integers(0, 3)), max_size=12),
    cuts=st.lists(st.integers(1, 60), max_size=30),
    max_output=st.integers(0, 120),
)
def test_no_secret_survives_any_cut_of_the_output(
    secrets: list[str], parts: list[tuple[str, int]], cuts: list[int], max_output: int
) -> None:
    """Random secrets in random output, read in random pieces: every secret masked, and only secrets."""
    raw = "".join(filler + secrets[i % len(secrets)] for filler, i in parts).encode()
    reads, at = [], 0
    for size in cuts:
        if at >= len(raw):
            break
        reads.append(raw[at : at + size])
        at += size
    if at < len(raw):
        reads.append(raw[at:])
    masker = Masker(secrets)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(output, "LINE_PIECE", 16)  # pieces every 16 bytes: cuts everywhere
        seen = _through_reads(reads, masker, max_output)
    whole = b"\n".join(masker.mask(line) for line in raw.split(b"\n"))
    # Cut into pieces or not, the stream is exactly the output with each line masked.
    assert seen["stream"] == whole
    for secret in secrets:
        encoded = secret.encode()
        assert encoded not in seen["stream"]
        assert encoded not in seen["log"]
        assert all(secret not in line for line in seen["events"])
        assert secret not in seen["kept"]
    # The result keeps a prefix of that, within the limit; all of it when it fits.
    assert whole.decode().startswith(seen["kept"])
    assert len(seen["kept"].encode()) <= max_output
    if len(raw) <= max_output + masker.hold and len(whole) <= max_output:
        assert (seen["kept"], seen["truncated"]) == (whole.decode(), False)
    else:
        assert seen["truncated"] == (seen["kept"] != whole.decode())


def test_masker_prefers_the_longest_secret_and_masks_text() -> None:
    """Of overlapping secrets the longest is masked whole; text masking matches bytes masking."""
    masker = Masker(["abcd", "abcdefgh"])
    assert masker.mask(b"xxabcdefghxx abcd") == b"xx***xx ***"
    assert masker.mask_text("é abcdefgh") == "é ***"
    assert not masker.hit(b"abc")


# -- through the engine ---------------------------------------------------------------------


def _log_text(log_dir: Path, execution_id: Any) -> str:
    return (log_dir / f"{execution_id}.log").read_text(errors="replace")


async def test_secrets_are_masked_in_events_results_logs_and_the_command_line(
    tmp_path: Path, recorder: Recorder
) -> None:
    """secret_env reaches the command; its values and config.secrets are *** wherever they would show."""
    cfg = config(tmp_path, secrets=[GLOBAL])
    async with ExecutionEngine(cfg).with_event_handler(recorder) as engine:
        request = shell(
            f'echo "token=$TOKEN"; echo "{GLOBAL}" >&2; echo "{SECRET}{SECRET}"; exit 3',
            secret_env={"TOKEN": SECRET},
        )
        execution = await engine.execute(request)
        result = await result_of(engine, execution, 20)
        await recorder.until_final(execution)
        log = await engine.read_logs(execution)
    assert result.stdout == "token=***\n******\n"
    assert result.stderr == "***\n"
    assert result.error == "Command failed with exit code 3"
    events = recorder.of(execution)
    dumped = "".join(event.model_dump_json() for event in events) + result.model_dump_json() + log
    assert "token=***" in dumped
    for secret in (SECRET, GLOBAL):
        assert secret not in dumped
    started = next(e for e in events if e.event_type == "started")
    assert started.command.startswith('echo "token=$TOKEN"; echo "***" >&2; echo "******"')
    assert "token=***" in log
    assert "# command: " in log


async def test_an_error_text_is_masked(engine: ExecutionEngine) -> None:
    """A program that cannot start is named in the error, with the secret in its path masked."""
    request = ExecutionRequest(
        command=ExecCommand(program=f"/nonexistent/{SECRET}/tool"), secret_env={"T": SECRET}
    )
    result = await result_of(engine, await engine.execute(request), 20)
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert "/nonexistent/***/tool" in result.error
    assert SECRET not in result.error


@pytest.mark.parametrize("whose", ["config", "secret_env"])
async def test_a_refusal_names_no_secret(tmp_path: Path, whose: str) -> None:
    """A working directory or script named with a secret is refused with the secret masked."""
    secret_env = {"T": SECRET} if whose == "secret_env" else {}
    bad = [
        (
            ExecutionRequest(
                command=ShellCommand(command="true"),
                working_dir=f"/nonexistent/{SECRET}",
                secret_env=secret_env,
            ),
            InvalidWorkingDir,
            "Invalid working directory: /nonexistent/***",
        ),
        (
            ExecutionRequest(command=ScriptCommand(path=f"/nonexistent/{SECRET}.sh"), secret_env=secret_env),
            ScriptNotFound,
            "Script file not found: /nonexistent/***.sh",
        ),
    ]
    async with ExecutionEngine(config(tmp_path, secrets=[SECRET] if whose == "config" else [])) as engine:
        for request, error, text in bad:
            with pytest.raises(error) as refused:
                await engine.execute(request)
            assert str(refused.value) == text
            assert SECRET not in str(getattr(refused.value, "path", ""))
            plan = ExecutionPlan(commands=[request], strategy=SerialStrategy())
            with pytest.raises(InvalidPlan) as in_plan:
                await engine.execute_plan(plan)
            assert str(in_plan.value).endswith(text)


async def test_a_secret_env_value_is_masked_wherever_the_request_is_written(tmp_path: Path) -> None:
    """Typed into the command line too: repr, JSON (alone and in a plan), and the journal."""
    request = ExecutionRequest(
        command=ExecCommand(program="echo", args=["--token", SECRET]), secret_env={"T": SECRET}
    )
    plan = ExecutionPlan(commands=[request], strategy=SerialStrategy())
    for text in (repr(request), request.model_dump_json(), repr(plan), plan.model_dump_json()):
        assert SECRET not in text
        assert "***" in text
    assert json.loads(request.model_dump_json())["command"]["args"] == ["--token", "***"]
    journal = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
        alone = await engine.execute(request.model_copy(update={"id": uuid4()}))
        assert (await result_of(engine, alone, 20)).stdout == "--token ***\n"
        planned = await engine.execute_plan(plan)
        await engine.wait(planned, timeout=20)
    with sqlite3.connect(journal) as conn:
        rows = conn.execute("SELECT request, result FROM entries").fetchall()
    conn.close()
    assert rows
    assert not [row for row in rows if SECRET in repr(row)]


async def test_a_secret_in_a_bytes_stdin_is_masked_wherever_the_request_is_written(tmp_path: Path) -> None:
    """serde writes bytes as an array of numbers: the secret's are masked there too, the command gets them."""
    engine_wide = "ENGINE-WIDE-SECRET"
    data = f"token={SECRET}\nother={engine_wide}\n".encode()
    copy = tmp_path / "stdin-copy"
    request = ExecutionRequest(
        command=ExecCommand(program="sh", args=["-c", f"cat > {copy}"]), stdin=data, secret_env={"T": SECRET}
    )
    for options in ({}, {"indent": 2}):
        written = json.loads(request.model_dump_json(**options))
        assert bytes(written["stdin"]) == f"token=***\nother={engine_wide}\n".encode(), options
    journal = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(config(tmp_path, journal=journal, secrets=[engine_wide])) as engine:
        result = await result_of(engine, await engine.execute(request), 20)
        assert result.status is ExecutionStatus.COMPLETED
    assert copy.read_bytes() == data
    with sqlite3.connect(journal) as conn:
        (row,) = conn.execute("SELECT request FROM entries").fetchall()
    conn.close()
    assert bytes(json.loads(row[0])["stdin"]) == b"token=***\nother=***\n"


def _words_of(document: str) -> list[str]:
    """Pieces of `document` that a secret might happen to equal: its keys, tags, numbers and ids' parts."""
    return sorted({word for word in re.findall(r"[A-Za-z_]{4,}|[0-9a-f]{4}", document)})


async def test_a_secret_that_is_also_a_word_of_the_json_leaves_the_json_whole(tmp_path: Path) -> None:
    """A secret equal to a key, a tag, a status or four digits of an id is masked in text, not in structure.

    The request's JSON still parses, and a later engine reads back from the
    journal the very result the first one announced.
    """
    journal = tmp_path / "journal.sqlite3"
    first = ExecutionRequest(command=ExecCommand(program="true"))
    async with ExecutionEngine(config(tmp_path / "probe", journal=tmp_path / "probe.sqlite3")) as engine:
        probe = await result_of(engine, await engine.execute(first), 20)
    words = _words_of(first.model_dump_json() + probe.model_dump_json())
    assert {"exec", "status", "completed", "stdout"} <= set(words)
    async with ExecutionEngine(config(tmp_path, journal=journal, secrets=words)) as engine:
        request = ExecutionRequest(
            command=ExecCommand(program="echo", args=[words[0]]), secret_env={"T": "completed"}
        )
        assert ExecutionRequest.model_validate_json(request.model_dump_json()).id == request.id
        plan = ExecutionPlan(commands=[request], strategy=SerialStrategy())
        assert ExecutionPlan.model_validate_json(plan.model_dump_json()).commands[0].id == request.id
        alone = await engine.execute(first.model_copy(update={"id": uuid4()}))
        announced = await result_of(engine, alone, 20)
        said = await engine.execute(request)
        assert (await result_of(engine, said, 20)).stdout == "***\n"
    async with ExecutionEngine(config(tmp_path, journal=journal, secrets=words)) as later:
        assert await later.get_result(alone) == announced
        assert (await later.get_result(said)).stdout == "***\n"
        assert [s.status for s in await later.list_executions()] == [ExecutionStatus.COMPLETED] * 2


def test_a_secret_is_masked_in_json_written_with_any_of_pydantics_options() -> None:
    """ensure_ascii writes a non-ASCII secret as escapes, indent spreads the document: masked either way."""
    secret = "pässwört-ünïcode"
    request = ExecutionRequest(
        command=ExecCommand(program="login", args=[secret]), secret_env={"T": secret}, timeout_ms=5000
    )
    for options in ({}, {"ensure_ascii": True}, {"indent": 2}, {"indent": 2, "ensure_ascii": True}):
        written = request.model_dump_json(**options)
        assert secret not in written, options
        assert json.dumps(secret)[1:-1] not in written, options
        back = ExecutionRequest.model_validate_json(written)
        assert back.command == ExecCommand(program="login", args=["***"]), options
        assert back.timeout_ms == 5000


async def test_a_secret_across_a_piece_of_an_endless_line_is_masked(
    tmp_path: Path, recorder: Recorder
) -> None:
    """A secret that straddles the 1 MiB cut of a line with no newline is masked, not split in two."""
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        for offset in (1, 5, len(SECRET) - 1):
            code = (
                "import os, sys\n"
                f"os.write(1, b'x' * ({output.LINE_PIECE} - {offset}))\n"
                f"os.write(1, sys.argv[1].encode() + b'y' * 100 + sys.argv[1].encode())\n"
            )
            execution = await engine.execute(run(PYTHON, "-c", code, SECRET, secret_env={"S": SECRET}))
            result = await result_of(engine, execution, 20)
            await recorder.until_final(execution)
            lines = [e.line for e in recorder.of(execution) if e.event_type == "stdout"]
            assert len(lines) == 2, "the line came in two pieces"
            joined = "".join(lines)
            assert joined == "x" * (output.LINE_PIECE - offset) + "***" + "y" * 100 + "***"
            assert result.stdout == joined
            log = _log_text(tmp_path / "logs", execution)
            assert SECRET not in log
            assert log.count("***") == 3, "two in the output, one in the logged command line"


def test_request_repr_and_json_keep_keys_and_mask_values() -> None:
    """repr() and model_dump_json() show secret_env's keys with *** values; the engine still has the value."""
    request = ExecutionRequest(
        command=ExecCommand(program="true"), secret_env={"TOKEN": SECRET, "KEY": GLOBAL}
    )
    assert SECRET not in repr(request)
    assert GLOBAL not in repr(request)
    assert "secret_env={'TOKEN': '***', 'KEY': '***'}" in repr(request)
    assert SECRET not in str(request)
    document = json.loads(request.model_dump_json())
    assert document["secret_env"] == {"TOKEN": "***", "KEY": "***"}
    assert request.model_dump()["secret_env"] == {"TOKEN": "***", "KEY": "***"}
    assert request.secret_env["TOKEN"] == SECRET


async def test_short_or_multiline_secrets_are_refused(engine: ExecutionEngine) -> None:
    """A secret under 4 characters would mask ordinary text; one with a newline cannot be masked by line.

    A request read back from its JSON has `***` for each secret: it is refused, saying why.
    """
    with pytest.raises(InvalidCommand, match="at least 4 characters"):
        await engine.execute(run("true", secret_env={"T": "abc"}))
    with pytest.raises(InvalidCommand, match="line break"):
        await engine.execute(run("true", secret_env={"T": "abcd\nefgh"}))
    read_back = ExecutionRequest.model_validate_json(run("true", secret_env={"T": SECRET}).model_dump_json())
    with pytest.raises(InvalidCommand, match="give their values again"):
        await engine.execute(read_back)
    with pytest.raises(ValueError, match=r"secrets\[1\].*at least 4 characters") as info:
        ExecutionConfig(secrets=["long-enough", "xyz"])
    assert "xyz" not in str(info.value), "the refusal must not quote the secret"
    dumped = ExecutionConfig(secrets=[SECRET]).model_dump_json()
    assert SECRET not in dumped
    assert '"secrets":["***"]' in dumped


async def test_environment_values_are_never_logged(engine: ExecutionEngine, tmp_path: Path) -> None:
    """Neither env nor secret_env values reach the log unless the command prints them (masked then)."""
    execution = await engine.execute(
        run("true", env={"PLAIN": "plain-visible-value"}, secret_env={"S": SECRET})
    )
    await result_of(engine, execution, 20)
    log = _log_text(tmp_path / "logs", execution)
    assert "plain-visible-value" not in log
    assert SECRET not in log


# Each holds a capital other than T and Z, which nothing the engine writes of its own holds (ids and
# paths are lower case, times digits with T and Z): a secret of digits alone, say "0000", would be
# "found" in a duration or a timestamp that has nothing to do with it.
_ENGINE_SECRET = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=4, max_size=24).filter(
    lambda s: any(c in "ABCDEFGHIJKLMNOPQRSUVWXY" for c in s)
)
# Runs of filler that put a secret just before, across and after a 1 MiB cut of an endless line.
_RUN = st.one_of(
    st.integers(0, 64),
    st.integers(output.LINE_PIECE - 24, output.LINE_PIECE - 1),
    st.integers(0, output.LINE_PIECE),
)


@pytest.mark.timeout(120)
def test_no_secret_reaches_events_results_or_logs(tmp_path: Path) -> None:
    """Property: random secrets in random output with endless lines: no leak in events, result, log file."""
    log_dir = tmp_path / "logs"
    writer = (
        "import os, sys\n"
        "data = sys.stdin.buffer.read()\n"
        "cuts = [int(c) for c in sys.argv[1].split(',') if c]\n"
        "at = 0\n"
        "for cut in cuts + [len(data)]:\n"
        "    while at < min(cut, len(data)):\n"
        "        at += os.write(1, data[at:cut])\n"
    )
    with SyncExecutionEngine(
        config(tmp_path, secrets=["GLOBALSECRET"], max_output_bytes=output.LINE_PIECE + 7)
    ) as engine:

        @settings(
            max_examples=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            secrets=st.lists(_ENGINE_SECRET, min_size=1, max_size=3, unique=True),
            parts=st.lists(st.tuples(_RUN, st.integers(0, 3), st.booleans()), min_size=1, max_size=5),
            cuts=st.lists(st.integers(1, 3 * output.LINE_PIECE), max_size=4),
        )
        def check(secrets: list[str], parts: list[tuple[int, int, bool]], cuts: list[int]) -> None:
            every = [*secrets, "GLOBALSECRET"]
            raw = b"".join(
                b"x" * run_length + every[i % len(every)].encode() + (b"\n" if newline else b"")
                for run_length, i, newline in parts
            )
            request = ExecutionRequest(
                command=ExecCommand(program=PYTHON, args=["-c", writer, ",".join(map(str, sorted(cuts)))]),
                stdin=raw,
                secret_env={f"S{i}": s for i, s in enumerate(secrets)},
            )
            execution = engine.execute(request)
            events = list(engine.events(execution))
            result = engine.get_result(execution)
            assert result.status is ExecutionStatus.COMPLETED, result.error
            text = "".join(e.line for e in events if e.event_type == "stdout")
            log = _log_text(log_dir, execution)
            everything = text + result.stdout + log + "".join(e.model_dump_json() for e in events)
            for secret in every:
                assert secret not in everything
            assert text.count("***") == len(parts)

        check()


QUOTED = "pa'ssw0rd-XYZ"


def test_a_request_printed_or_formatted_masks_what_repr_masks() -> None:
    """`str()` (print, f-strings) and `repr()` alike, a secret quoted by either of repr's ways."""
    request = ExecutionRequest(
        command=ShellCommand(command=f'echo "hi" "{QUOTED}"; echo hunter2SECRETvalue'),
        secret_env={"A": QUOTED, "B": "hunter2SECRETvalue"},
    )
    plan = ExecutionPlan(commands=[request], strategy=SerialStrategy())
    for text in (str(request), f"{request}", repr(request), str(plan), repr(plan)):
        assert "hunter2SECRETvalue" not in text
        assert "pa'ssw0rd" not in text
        assert "pa\\'ssw0rd" not in text
        assert "***" in text


async def test_a_secret_with_a_quote_in_an_argument_is_masked_in_the_command_line_shown(
    tmp_path: Path,
) -> None:
    """The command line shown (the started event, the log's header) quotes it for a shell: masked too."""
    recorder = Recorder()
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        request = run("true", QUOTED, secret_env={"TOKEN": QUOTED})
        result = await result_of(engine, await engine.execute(request), timeout=20)
    started = next(e for e in recorder.of(request.id) if e.event_type == "started")
    for text in (started.command, result.log_path.read_text()):
        assert "ssw0rd" not in text, text
        assert "***" in text

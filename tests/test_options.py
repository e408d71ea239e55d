"""The per-request options `stdin` and `success_exit_codes` through the engine, and as JSON."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from conftest import PYTHON, Recorder, config, result_of, run, shell

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionStatus,
    InvalidCommand,
)
from cloudops_execution_engine.actors.admission import MAX_STDIN_BYTES

pytestmark = pytest.mark.timeout(40)

TEN_MB = 10 * 1000 * 1000


async def test_ten_megabytes_of_stdin_reach_cat_byte_for_byte(
    engine: ExecutionEngine, tmp_path: Path
) -> None:
    """10 MB of binary stdin, every byte value among them, arrive exactly; then cat sees end of input."""
    data = os.urandom(TEN_MB)
    target = tmp_path / "copy"
    request = shell(f"cat > {target}", stdin=data)
    result = await result_of(engine, await engine.execute(request), 30)
    assert result.status is ExecutionStatus.COMPLETED, result.error
    copy = target.read_bytes()
    assert len(copy) == len(data)
    assert hashlib.sha256(copy).digest() == hashlib.sha256(data).digest()


async def test_text_stdin_is_written_as_utf8(engine: ExecutionEngine) -> None:
    """A str stdin reaches the command as its UTF-8 bytes, and is closed after it."""
    result = await result_of(engine, await engine.execute(run("cat", stdin="héllo wörld ✓\nline 2")), 20)
    assert result.stdout == "héllo wörld ✓\nline 2"
    hexed = await result_of(engine, await engine.execute(run("od", "-An", "-tx1", stdin="é")), 20)
    assert hexed.stdout.split() == ["c3", "a9"]


async def test_without_stdin_the_command_reads_end_of_input_at_once(engine: ExecutionEngine) -> None:
    """No stdin (the default) and an empty one both give the command an empty input, not a hang."""
    for stdin in (None, b"", ""):
        result = await result_of(engine, await engine.execute(run("cat", stdin=stdin, timeout_ms=5000)), 10)
        assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "")


async def test_a_command_that_ignores_stdin_stalls_nothing(tmp_path: Path, recorder: Recorder) -> None:
    """A sleeping command given 10 MB of stdin holds up no worker: a bystander on its worker runs at once."""
    async with ExecutionEngine(config(tmp_path, workers=1)).with_event_handler(recorder) as engine:
        sleeper = await engine.execute(run("sleep", "30", stdin=os.urandom(TEN_MB)))
        await recorder.until(lambda _: "started" in recorder.types_of(sleeper), 10)
        began = time.monotonic()
        bystander = await result_of(engine, await engine.execute(run("echo", "bystander")), 10)
        assert bystander.stdout == "bystander\n"
        assert time.monotonic() - began < 5
        assert await engine.get_status(sleeper) is ExecutionStatus.RUNNING
        await engine.cancel(sleeper)
        cancelled = await result_of(engine, sleeper, 10)
        assert cancelled.status is ExecutionStatus.CANCELLED


async def test_exit_codes_past_a_frame_are_refused_and_end_nothing_else(tmp_path: Path) -> None:
    """Seven million exit codes do not fit one message to a worker: `execute()` says so.

    Sent, they took the worker down, and the command running there with it.
    """
    codes = list(range(2**31 - 7_000_000, 2**31))
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        bystander = await engine.execute(shell("sleep 1; echo bystander"))
        with pytest.raises(InvalidCommand, match="one message to a worker may hold"):
            await engine.execute(run("true", success_exit_codes=codes))
        # The same code over and over is one code.
        repeated = await engine.execute(run("true", success_exit_codes=[0] * 7_000_000))
        assert (await result_of(engine, repeated, 20)).status is ExecutionStatus.COMPLETED
        result = await result_of(engine, bystander, 20)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "bystander\n")


async def test_a_command_that_reads_part_of_stdin_ends_normally(engine: ExecutionEngine) -> None:
    """A command that closes its stdin early (head) completes; the rest of the input is dropped."""
    result = await result_of(engine, await engine.execute(run("head", "-c", "5", stdin=b"x" * TEN_MB)), 20)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "xxxxx")


async def test_stdin_over_the_limit_is_refused_at_execute(engine: ExecutionEngine) -> None:
    """A stdin larger than MAX_STDIN_BYTES is InvalidCommand at execute(), naming the limit."""
    with pytest.raises(InvalidCommand, match=f"stdin is {MAX_STDIN_BYTES + 1} bytes.*{MAX_STDIN_BYTES}"):
        await engine.execute(run("cat", stdin=b"x" * (MAX_STDIN_BYTES + 1)))
    result = await result_of(engine, await engine.execute(run("wc", "-c", stdin=b"x" * MAX_STDIN_BYTES)), 30)
    assert result.stdout.strip() == str(MAX_STDIN_BYTES)


async def test_stdin_that_is_not_text_is_refused(engine: ExecutionEngine) -> None:
    """A str stdin with a lone surrogate cannot be UTF-8: InvalidCommand."""
    with pytest.raises(InvalidCommand, match="stdin"):
        await engine.execute(run("cat", stdin="bad \udcff"))


async def test_stdin_writing_does_not_block_many_executions(engine: ExecutionEngine) -> None:
    """Several executions each fed a megabyte run side by side and all get their input whole."""
    payloads = [bytes([65 + i]) * 1_000_000 for i in range(6)]
    ids = [await engine.execute(run("wc", "-c", stdin=p)) for p in payloads]
    results = await asyncio.gather(*(result_of(engine, i, 30) for i in ids))
    assert [r.stdout.strip() for r in results] == ["1000000"] * 6


async def test_success_exit_codes_say_exactly_what_completes(engine: ExecutionEngine) -> None:
    """With [3], exit 3 is completed and exit 0 a failure; with [0, 2], both complete."""
    three = await result_of(engine, await engine.execute(shell("exit 3", success_exit_codes=[3])), 20)
    assert (three.status, three.exit_code, three.error) == (ExecutionStatus.COMPLETED, 3, None)
    zero = await result_of(engine, await engine.execute(shell("exit 0", success_exit_codes=[3])), 20)
    assert (zero.status, zero.exit_code) == (ExecutionStatus.FAILED, 0)
    assert zero.error == "Command failed with exit code 0"
    two = await result_of(engine, await engine.execute(shell("exit 2", success_exit_codes=[0, 2])), 20)
    assert two.status is ExecutionStatus.COMPLETED
    plain = await result_of(engine, await engine.execute(shell("exit 2")), 20)
    assert plain.status is ExecutionStatus.FAILED


async def test_success_exit_codes_must_name_a_code(engine: ExecutionEngine) -> None:
    """An empty list, which no command could satisfy, is InvalidCommand at execute()."""
    with pytest.raises(InvalidCommand, match="at least one"):
        await engine.execute(shell("true", success_exit_codes=[]))


def test_options_stay_out_of_json_until_set() -> None:
    """A request with no option set is the same document as before; a set option is written."""
    request = ExecutionRequest(command=ExecCommand(program="true"))
    document = json.loads(request.model_dump_json())
    assert not {"stdin", "success_exit_codes", "limits", "secret_env", "retry"} & set(document)
    request = ExecutionRequest(command=ExecCommand(program="true"), success_exit_codes=[0, 3], stdin="hi")
    document = json.loads(request.model_dump_json())
    assert (document["success_exit_codes"], document["stdin"]) == ([0, 3], "hi")


def test_bytes_stdin_is_a_serde_byte_array_and_reads_back_as_bytes() -> None:
    """bytes stdin is written as serde writes a Vec<u8>, an array of numbers; str stays a string."""
    request = ExecutionRequest(command=ExecCommand(program="cat"), stdin=b"\x00\xffA")
    document = json.loads(request.model_dump_json())
    assert document["stdin"] == [0, 255, 65]
    assert ExecutionRequest.model_validate_json(request.model_dump_json()).stdin == b"\x00\xffA"
    text = ExecutionRequest(command=ExecCommand(program="cat"), stdin="AB")
    assert ExecutionRequest.model_validate_json(text.model_dump_json()).stdin == "AB"
    with pytest.raises(ValueError, match=r"0\.\.255"):
        ExecutionRequest.model_validate_json(
            '{"command": {"type": "exec", "program": "cat"}, "stdin": [256]}'
        )


@pytest.mark.ray
@pytest.mark.timeout(120)
async def test_the_options_work_the_same_on_ray(tmp_path: Path, ray_address: str, recorder: Recorder) -> None:
    """On a Ray worker actor: stdin arrives, success codes decide, a limit is named, secrets are masked."""
    from cloudops_execution_engine import RayConfig, ResourceLimits

    cfg = config(tmp_path, ray=RayConfig(address=ray_address, workers=1), secrets=["cluster-secret"])
    async with ExecutionEngine(cfg).with_event_handler(recorder) as engine:
        piped = await engine.execute(
            shell('cat; echo " $TOKEN cluster-secret"; exit 3', stdin="from stdin",
                  secret_env={"TOKEN": "token-value"}, success_exit_codes=[3])
        )  # fmt: skip
        limited = await engine.execute(
            run(PYTHON, "-c", "while True: pass", limits=ResourceLimits(cpu_seconds=1), timeout_ms=20_000)
        )
        result = await result_of(engine, piped, 60)
        assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "from stdin *** ***\n")
        log = await engine.read_logs(piped)
        assert "token-value" not in log
        assert "cluster-secret" not in log
        assert "*** ***" in log
        stopped = await result_of(engine, limited, 60)
        assert (stopped.status, stopped.error) == (ExecutionStatus.FAILED, "CPU time limit exceeded")

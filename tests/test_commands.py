"""Each command kind runs as SPEC section 5 says, with no shell unless asked for."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from uuid import uuid4

import pytest
from conftest import AWS_ENV, config, result_of, run

from cloudops_execution_engine import (
    AwsCliCommand,
    ExecCommand,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    InvalidCommand,
    ScriptCommand,
    ShellCommand,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

HOSTILE = ["; rm -rf ~", "$(id)", "`id`", "a b", "'\"", "*", "$HOME", "\\n"]


async def finish(engine: ExecutionEngine, request: ExecutionRequest) -> ExecutionResult:
    result = await engine.wait(await engine.execute(request), timeout=60)
    assert isinstance(result, ExecutionResult)
    return result


async def test_exec_arguments_reach_the_program_literally(engine: ExecutionEngine) -> None:
    """Shell metacharacters in exec arguments are plain text to the program."""
    result = await finish(engine, run("printf", "%s\\n", *HOSTILE))
    assert result.status is ExecutionStatus.COMPLETED
    assert result.stdout.splitlines() == HOSTILE


async def test_shell_command_runs_under_the_named_shell(engine: ExecutionEngine) -> None:
    result = await finish(
        engine, ExecutionRequest(command=ShellCommand(command="echo $0; echo a | tr a b", shell="sh"))
    )
    assert result.stdout == "sh\nb\n"


def write_script(path: Path, text: str, executable: bool = False) -> Path:
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(
    ("name", "text", "interpreter", "executable", "expected"),
    [
        (
            "shebang",
            "#!/usr/bin/env python3\nimport sys; print(sys.argv[0].endswith('shebang'))\n",
            None,
            False,
            "True\n",
        ),
        ("by_extension.py", "print('python by extension')\n", None, False, "python by extension\n"),
        ("by_extension.sh", 'echo "bash:${BASH_VERSION:+yes}"\n', None, False, "bash:yes\n"),
        ("explicit", "print('explicit interpreter')\n", "python3 -u", False, "explicit interpreter\n"),
        ("executable", "#!/bin/sh\necho executable file\n", None, True, "executable file\n"),
    ],
)
async def test_script_interpreter_resolution(
    engine: ExecutionEngine,
    tmp_path: Path,
    name: str,
    text: str,
    interpreter: str | None,
    executable: bool,
    expected: str,
) -> None:
    """Interpreter from the argument, else #!, else the extension, else the file itself."""
    script = write_script(tmp_path / name, text, executable)
    request = ExecutionRequest(command=ScriptCommand(path=script, interpreter=interpreter))
    result = await finish(engine, request)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, expected)


async def test_script_relative_to_working_dir(engine: ExecutionEngine, tmp_path: Path) -> None:
    write_script(tmp_path / "here.sh", "echo relative ok\n")
    request = ExecutionRequest(command=ScriptCommand(path=Path("here.sh")), working_dir=tmp_path)
    assert (await finish(engine, request)).stdout == "relative ok\n"


@pytest.mark.parametrize("named", ["./id", "id", "-id"])
@pytest.mark.parametrize("working_dir", [None, Path(".")])
async def test_a_relative_script_runs_that_very_file_never_a_program_of_its_name(
    engine: ExecutionEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    named: str,
    working_dir: Path | None,
) -> None:
    """An executable `./id` in the host's directory is that file, not /usr/bin/id found in PATH.

    Nor, named `-id`, an option to anything.
    """
    monkeypatch.chdir(tmp_path)
    # An executable with no #! line and no extension to go by: the file itself runs.
    shutil.copy(shutil.which("pwd") or "/bin/pwd", tmp_path / named.removeprefix("./"))
    command = ScriptCommand(path=Path(named))
    result = await finish(engine, ExecutionRequest(command=command, working_dir=working_dir))
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, f"{tmp_path}\n")


async def test_a_relative_script_in_a_relative_working_dir_is_the_file_validation_found(
    engine: ExecutionEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sub/s.sh` is checked at `execute()`, and is what runs: not `sub/sub/s.sh`, joined twice."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub" / "sub").mkdir(parents=True)
    write_script(tmp_path / "sub" / "s.sh", "echo the checked one\n")
    write_script(tmp_path / "sub" / "sub" / "s.sh", "echo another\n")
    request = ExecutionRequest(command=ScriptCommand(path=Path("s.sh")), working_dir=Path("sub"))
    result = await finish(engine, request)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "the checked one\n")


async def test_a_shebang_that_is_not_utf8_is_refused_naming_the_line(
    engine: ExecutionEngine, tmp_path: Path
) -> None:
    """Its interpreter's path was passed on with U+FFFD in place of the byte, and was never found."""
    script = tmp_path / "job.run"
    script.write_bytes(b"#!" + os.fsencode(tmp_path) + b"/tools\xff/interp\n")
    with pytest.raises(InvalidCommand, match=r"the #! line of .*job.run is not UTF-8 text"):
        await engine.execute(ExecutionRequest(command=ScriptCommand(path=script)))


async def test_an_interpreter_that_cannot_be_split_is_named(engine: ExecutionEngine, tmp_path: Path) -> None:
    script = write_script(tmp_path / "s.sh", "echo hi\n")
    with pytest.raises(InvalidCommand, match=r"interpreter .*No closing quotation"):
        await engine.execute(
            ExecutionRequest(command=ScriptCommand(path=script, interpreter="bash -c 'echo"))
        )


async def test_unrunnable_script_is_rejected_with_a_reason(engine: ExecutionEngine, tmp_path: Path) -> None:
    script = write_script(tmp_path / "data.unknown", "no way to run this\n")
    with pytest.raises(InvalidCommand, match="cannot tell how to run"):
        await engine.execute(ExecutionRequest(command=ScriptCommand(path=script)))


async def test_missing_interpreter_fails_clearly(engine: ExecutionEngine, tmp_path: Path) -> None:
    script = write_script(tmp_path / "s", "#!/no/such/interpreter\n")
    result = await finish(engine, ExecutionRequest(command=ScriptCommand(path=script)))
    assert result.status is ExecutionStatus.FAILED
    assert result.error == "Process spawn failed: No such file or directory: /no/such/interpreter"


async def test_working_dir_removed_before_start_fails_clearly(tmp_path: Path) -> None:
    """A directory that vanishes between validation and start fails that execution only."""
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=1)) as engine:
        blocker = await engine.execute(run("sleep", "30"))
        eid = await engine.execute(ExecutionRequest(command=ExecCommand(program="true"), working_dir=doomed))
        assert await engine.get_status(eid) is ExecutionStatus.PENDING
        doomed.rmdir()
        await engine.cancel(blocker)
        result = await result_of(engine, eid, timeout=30)
        assert result.status is ExecutionStatus.FAILED
        assert result.error == f"Process spawn failed: No such file or directory: {doomed}"
        after = await engine.execute(run("true"))
        assert (await engine.wait(after, timeout=30)).status is ExecutionStatus.COMPLETED


def aws(endpoint: str, service: str, operation: str, *args: str, **fields: str | None) -> ExecutionRequest:
    return ExecutionRequest(
        command=AwsCliCommand(
            service=service, operation=operation, args=["--endpoint-url", endpoint, *args], **fields
        ),
        env=AWS_ENV,
    )


async def test_aws_cli_against_a_local_emulator(engine: ExecutionEngine, aws_endpoint: str) -> None:
    """The real AWS CLI, run through the engine, talks to moto on loopback."""
    created = await finish(
        engine, aws(aws_endpoint, "s3api", "create-bucket", "--bucket", "cee-test", region="us-east-1")
    )
    assert created.status is ExecutionStatus.COMPLETED, created.stderr
    listed = await finish(engine, aws(aws_endpoint, "s3api", "list-buckets", "--output", "json"))
    assert listed.status is ExecutionStatus.COMPLETED, listed.stderr
    assert "cee-test" in [b["Name"] for b in json.loads(listed.stdout)["Buckets"]]


async def test_aws_cli_profile_and_region_are_passed_as_options(
    engine: ExecutionEngine, aws_endpoint: str, tmp_path: Path
) -> None:
    config_file = tmp_path / "aws-config"
    config_file.write_text("[profile ops]\nregion = eu-west-1\n")
    request = aws(aws_endpoint, "sts", "get-caller-identity", profile="ops", region="ap-south-1")
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[ops]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    request.env["AWS_CONFIG_FILE"] = str(config_file)
    request.env["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
    result = await finish(engine, request)
    assert result.status is ExecutionStatus.COMPLETED, result.stderr
    assert "Account" in result.stdout
    assert "# command: aws --profile ops --region ap-south-1 sts get-caller-identity" in (
        await engine.read_logs(request.id)
    )


async def test_aws_cli_arguments_are_never_interpreted_by_a_shell(
    engine: ExecutionEngine, aws_endpoint: str
) -> None:
    result = await finish(
        engine, aws(aws_endpoint, "s3api", "list-buckets", "--query", "$(touch /tmp/pwned)")
    )
    assert not os.path.exists("/tmp/pwned")  # noqa: ASYNC240
    assert result.status is ExecutionStatus.FAILED
    assert "$(touch /tmp/pwned)" in result.stderr


async def test_aws_cli_not_installed_is_a_spawn_failure(engine: ExecutionEngine) -> None:
    request = ExecutionRequest(
        command=AwsCliCommand(service="s3", operation="ls"), env={"PATH": "/nonexistent"}
    )
    result = await finish(engine, request)
    assert result.status is ExecutionStatus.FAILED
    assert result.exit_code == -1
    assert result.error == (
        "Process spawn failed: No such file or directory: aws"
        " (the AWS CLI is not installed: pip install 'cloudops-execution-engine[aws]')"
    )


@pytest.mark.parametrize(
    ("command", "match"),
    [
        (AwsCliCommand(service="", operation="ls"), "aws service must not be empty"),
        (AwsCliCommand(service="s3 rm", operation="ls"), "not a single word"),
        (AwsCliCommand(service="s3", operation="--debug"), "not a single word"),
        (AwsCliCommand(service="s3", operation="ls", profile=""), "aws profile must not be empty"),
    ],
)
async def test_aws_cli_validation(engine: ExecutionEngine, command: AwsCliCommand, match: str) -> None:
    with pytest.raises(InvalidCommand, match=match):
        await engine.execute(ExecutionRequest(command=command))


def _tool(directory: Path, says: str) -> None:
    directory.mkdir(exist_ok=True)
    write_script(directory / "tool", f"#!/bin/sh\necho {says}\n", executable=True)


async def test_a_program_is_looked_up_in_path_as_it_is_at_each_start(tmp_path: Path) -> None:
    """As execvp does: a tool installed earlier in PATH since, or one no longer runnable, is seen at once."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    _tool(second, "from-b")
    request = run("tool", env={"PATH": f"{first}:{second}"})
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        assert (await finish(engine, request.model_copy(update={"id": uuid4()}))).stdout == "from-b\n"
        _tool(first, "from-a")
        assert (await finish(engine, request.model_copy(update={"id": uuid4()}))).stdout == "from-a\n"
        (first / "tool").chmod(0o644)
        assert (await finish(engine, request.model_copy(update={"id": uuid4()}))).stdout == "from-b\n"
        (first / "tool").chmod(0o755)  # a mode changes no directory's time
        assert (await finish(engine, request.model_copy(update={"id": uuid4()}))).stdout == "from-a\n"


@pytest.mark.parametrize("entry", ["bin", ""])
async def test_a_relative_path_entry_is_searched_from_the_commands_working_dir(
    engine: ExecutionEngine, tmp_path: Path, entry: str
) -> None:
    """`PATH=bin:/usr/bin` with `working_dir=/proj` finds /proj/bin/tool, as subprocess does; "" is ".".

    They were searched from the worker's own directory.
    """
    _tool(tmp_path / (entry or "."), "found")
    request = run("tool", env={"PATH": f"{entry}:/usr/bin:/bin"}, working_dir=tmp_path)
    result = await finish(engine, request)
    assert (result.status, result.stdout) == (ExecutionStatus.COMPLETED, "found\n")

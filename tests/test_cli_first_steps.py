"""What a newcomer meets in the first minutes: installs, options, messages, the schema and the demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from conftest import AWS_ENV, PYTHON, config, result_of, shell

from cloudops_execution_engine import (
    AwsCliCommand,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    NotFound,
    SerialStrategy,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

ROOT = Path(__file__).parent.parent


def cli(*args: str, tmp_path: Path, python_code: str = "") -> subprocess.CompletedProcess[str]:
    """The real command line; `python_code` runs first in the same process (to hide a module)."""
    code = f"{python_code}\nfrom cloudops_execution_engine.cli import main\nmain()"
    return subprocess.run(
        [PYTHON, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
    )


def write(tmp_path: Path, name: str, document: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("module", ["click", "rich", "yaml"])
def test_without_the_cli_extra_the_command_says_what_to_install(tmp_path: Path, module: str) -> None:
    """A core install has the script but not click, Rich or PyYAML: what to install, exit 1, no traceback."""
    hide = f"import sys; sys.modules[{module!r}] = None"
    done = cli("run", "--", "true", tmp_path=tmp_path, python_code=hide)
    assert done.returncode == 1
    assert "pip install 'cloudops-execution-engine[cli]'" in done.stderr
    assert f"({module} is not installed)" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_loads_neither_rich_nor_yaml(tmp_path: Path) -> None:
    """`run` imports only what it uses: the live view and YAML are for `plan`."""
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('loaded:', sorted(m for m in ('rich', 'yaml') if m in sys.modules),"
        " file=sys.stderr))"
    )
    done = cli("run", "--", "true", tmp_path=tmp_path, python_code=probe)
    assert done.returncode == 0
    assert "loaded: []" in done.stderr


def test_plan_timeout_options_let_an_hour_long_step_run(tmp_path: Path) -> None:
    """`--max-timeout` admits a step with a 1-hour timeout; `--timeout` sets the default of the others."""
    plan = write(
        tmp_path,
        "long.json",
        {
            "strategy": {"type": "serial"},
            "commands": [
                {"command": {"type": "exec", "program": "true"}, "timeout_ms": 3_600_000},
                {"command": {"type": "shell", "command": "sleep 5"}},
            ],
        },
    )
    refused = cli("plan", str(plan), tmp_path=tmp_path)
    assert refused.returncode == 2
    assert "commands.0.timeout_ms" in refused.stderr
    assert "--max-timeout 3600000" in refused.stderr
    done = cli("plan", "--max-timeout", "3600000", "--timeout", "300", str(plan), tmp_path=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "#0   completed" in done.stdout
    assert "#1   timeout" in done.stdout, "the default timeout of 300 ms stopped the sleep"
    assert "#1 timeout: Execution timeout after 300ms" in done.stdout


def test_plan_max_concurrency_bounds_the_commands_running_at_once(tmp_path: Path) -> None:
    """`--max-concurrency 1` runs a parallel plan one command at a time (no two overlap)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    step = f"mkdir {marks}/running || exit 9; sleep 0.2; rmdir {marks}/running"
    plan = write(
        tmp_path,
        "par.json",
        {"strategy": {"type": "parallel"}, "commands": [{"command": {"type": "shell", "command": step}}] * 3},
    )
    done = cli("plan", "--max-concurrency", "1", str(plan), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "plan completed: 3 completed" in done.stdout


def test_help_says_defaults_units_and_plain_words(tmp_path: Path) -> None:
    """`plan --help` names its timeout's default and maximum in milliseconds, in words a user knows."""
    text = " ".join(cli("plan", "--help", tmp_path=tmp_path).stdout.split())
    assert "--timeout MS" in text
    assert "default: 120000, 2 minutes" in text
    assert "--max-timeout MS" in text
    assert "default: 600000, 10 minutes" in text
    assert "--max-concurrency N" in text
    assert "seed" not in text
    run_help = " ".join(cli("run", "--help", tmp_path=tmp_path).stdout.split())
    assert "default: 120000, 2 minutes" in run_help


def test_validate_reports_every_problem_with_its_path_and_hints(tmp_path: Path) -> None:
    """One run names all problems: unwrapped commands, a missing field, a cycle, a too-long timeout."""
    bad = write(
        tmp_path,
        "bad.json",
        {
            "strategy": {"type": "serial"},
            "commands": [
                {"type": "exec", "program": "ls"},
                {"command": {"type": "exec"}},
                {"type": "shell", "command": "ls"},
            ],
        },
    )
    done = cli("validate", str(bad), tmp_path=tmp_path)
    assert done.returncode == 2
    assert "(3 problems)" in done.stderr
    assert "commands.0.command: Field required" in done.stderr
    assert "commands.1.command.exec.program: Field required" in done.stderr
    assert "commands.2.command:" in done.stderr
    assert done.stderr.count('hint: each command goes inside "command"') == 2
    runnable_but_wrong = write(
        tmp_path,
        "semantic.json",
        {
            "strategy": {"type": "dependency_graph", "dependencies": {"0": [1], "1": [0]}},
            "commands": [
                {"command": {"type": "exec", "program": "ls -la", "args": ["/tmp"]}},
                {"command": {"type": "exec", "program": "true"}, "timeout_ms": 3_600_000},
            ],
        },
    )
    done = cli("validate", str(runnable_but_wrong), tmp_path=tmp_path)
    assert done.returncode == 2
    assert "(3 problems)" in done.stderr
    assert re.search(r"strategy: .*dependency cycle: 0 -> 1 -> 0", done.stderr)
    assert 'commands.0.command.program: "ls -la" is not a program' in done.stderr
    assert '"program": "ls", "args": ["-la", "/tmp"]' in done.stderr
    assert "commands.1.timeout_ms:" in done.stderr
    allowed = cli("validate", "--max-timeout", "3600000", str(runnable_but_wrong), tmp_path=tmp_path)
    assert "(2 problems)" in allowed.stderr


def _properties(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every (path, property schema) under `node`, through definitions and unions."""
    found = []
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            found.append((f"{path}.{name}", prop))
        for key, value in node.items():
            if key != "properties":
                found.extend(_properties(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.extend(_properties(item, f"{path}[{i}]"))
    return found


@pytest.mark.parametrize("kind", ["request", "plan", "result", "event"])
def test_schema_describes_every_field_with_its_unit(tmp_path: Path, kind: str) -> None:
    """Each field in `cloudops-exec schema` says what it is; times and sizes name their unit."""
    done = cli("schema", kind, tmp_path=tmp_path)
    assert done.returncode == 0
    properties = _properties(json.loads(done.stdout))
    assert properties
    undescribed = [path for path, prop in properties if not prop.get("description")]
    assert not undescribed, f"fields without a description: {undescribed}"
    units = {"_ms": "milliseconds", "_bytes": "bytes", "_s": "seconds"}
    for path, prop in properties:
        for suffix, unit in units.items():
            if path.endswith(suffix):
                assert unit in prop["description"], f"{path} does not name its unit: {prop['description']}"
    for path, prop in properties:
        if path.endswith(("duration", "total_duration")):
            assert "seconds" in prop["description"], path


def test_events_ndjson_rounds_floats_to_microseconds(tmp_path: Path) -> None:
    """`--events ndjson` writes CPU seconds as measured (6 decimals), not binary float noise."""
    done = cli("run", "--events", "ndjson", "--", PYTHON, "-c", "sum(range(300000))", tmp_path=tmp_path)
    assert done.returncode == 0
    last = done.stdout.splitlines()[-1]
    usage = json.loads(last)["result"]["resource_usage"]
    for key in ("user_cpu_s", "system_cpu_s"):
        text = last.split(f'"{key}":')[1].split(",")[0].split("}")[0]
        assert len(text.partition(".")[2]) <= 6, f"{key} written as {text}"
        assert usage[key] == round(usage[key], 6)
    assert usage["user_cpu_s"] > 0


def test_make_demo_installs_only_the_cli_and_runs_the_real_command() -> None:
    """`make demo` installs `[cli]` (not `[dev]`) and shows `cloudops-exec plan` itself."""
    done = subprocess.run(
        ["make", "-n", "-B", "demo"], capture_output=True, text=True, cwd=ROOT, timeout=30, check=True
    )
    assert "-e '.[cli]'" in done.stdout
    assert "[dev]" not in done.stdout
    assert "cloudops-exec plan examples/deploy.json" in done.stdout


async def test_get_result_of_a_plan_points_to_get_plan_result(tmp_path: Path) -> None:
    """Asking get_result() for a plan's id says that it is a plan and which call answers."""
    plan = ExecutionPlan(commands=[shell("true")], strategy=SerialStrategy())
    async with ExecutionEngine(config(tmp_path)) as engine:
        await engine.wait(await engine.execute_plan(plan), timeout=30)
        with pytest.raises(NotFound, match=r"is a plan: get_plan_result\(\)"):
            await engine.get_result(plan.id)
        with pytest.raises(NotFound, match=r"^Execution not found: [0-9a-f-]+$"):
            await engine.get_result(uuid4())


async def test_a_missing_aws_cli_says_how_to_install_it(tmp_path: Path) -> None:
    """An aws_cli command on a machine without `aws` fails with the extra to install."""
    request = ExecutionRequest(
        command=AwsCliCommand(service="s3api", operation="list-buckets"),
        env={"PATH": str(tmp_path / "empty-bin")},
    )
    async with ExecutionEngine(config(tmp_path)) as engine:
        result = await result_of(engine, await engine.execute(request), 30)
    assert result.status == "failed"
    assert result.error is not None
    assert "No such file or directory: aws" in result.error
    assert "pip install 'cloudops-execution-engine[aws]'" in result.error


def test_aws_cli_commands_reach_an_endpoint_named_in_env_or_args(tmp_path: Path, aws_endpoint: str) -> None:
    """As the README says: AWS_ENDPOINT_URL in a request's env, or --endpoint-url in its args, reach moto."""
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": aws_endpoint}
    bucket = f"readme-{uuid4().hex[:12]}"
    plan = tmp_path / "aws.yaml"
    plan.write_text(
        "strategy: {type: serial}\n"
        "commands:\n"
        "  - command: {type: aws_cli, service: s3api, operation: create-bucket,"
        f" args: [--bucket, {bucket}]}}\n"
        f"    env: {json.dumps(env)}\n"
        "  - command: {type: aws_cli, service: s3api, operation: list-buckets,"
        f" args: [--endpoint-url, '{aws_endpoint}', --output, json]}}\n"
        f"    env: {json.dumps(AWS_ENV)}\n"
    )
    done = cli("plan", "--no-journal", str(plan), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert bucket in done.stdout


def test_importing_the_package_loads_its_modules_on_first_use() -> None:
    """`import cloudops_execution_engine` loads neither pydantic nor the engine until a name is used."""
    probe = (
        "import sys, cloudops_execution_engine as cee\n"
        "print(sorted(m for m in ('pydantic', 'cloudops_execution_engine.engine') if m in sys.modules))\n"
        "print(cee.ExecutionEngine.__name__, 'ExecutionEngine' in dir(cee), 'engine' in dir(cee))\n"
    )
    done = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.splitlines() == ["[]", "ExecutionEngine True False"]


def test_run_of_a_quoted_command_line_says_to_split_it(tmp_path: Path) -> None:
    """`cloudops-exec run "ls -la"` cannot start a program named `ls -la`: the hint shows the words."""
    done = cli("run", "--no-journal", "ls -la", tmp_path=tmp_path)
    assert done.returncode == 127
    assert "did not start: No such file or directory: ls -la" in done.stderr
    assert "(cloudops-exec run -- ls -la) or use --shell" in done.stderr

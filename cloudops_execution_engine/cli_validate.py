"""Checking a request or a plan the way the engine would, and saying every problem at once.

Each problem names where it is (`commands.2.command.program`), so that one
run of `cloudops-exec validate` is enough to fix a file; the usual mistakes
get a hint on how to write it instead.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pydantic

from .actors.admission import Admission, HostEnvironment
from .config import ExecutionConfig
from .errors import ExecutionError, InvalidPlan, InvalidWorkingDir, TimeoutTooLarge
from .plans import check_plan
from .requests import ExecutionPlan, ExecutionRequest

__all__ = ["check_document", "parse_problems", "plan_problems"]

_KINDS = '"exec", "shell", "script" or "aws_cli"'
_WRAP_HINT = (
    'hint: each command goes inside "command": '
    '{"command": {"type": "exec", "program": "ls", "args": ["-la"]}, "timeout_ms": 5000}'
)


def _at(data: Any, path: tuple[int | str, ...]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _hint(error: Any, data: Any) -> str | None:
    loc = tuple(error["loc"])
    if not loc or loc[-1] != "command":
        return None
    parent = _at(data, loc[:-1])
    if isinstance(parent, dict) and ("type" in parent or "program" in parent):
        return _WRAP_HINT
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return f'hint: "type" says which kind of command it is: {_KINDS}'
    return None


def parse_problems(exc: pydantic.ValidationError, data: Any) -> list[str]:
    """Every problem pydantic found, each with its path, and a hint where one helps."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problem = f"{where}: {error['msg']}"
        hint = _hint(error, data)
        problems.append(f"{problem}\n    {hint}" if hint else problem)
    return problems


def _field_of(exc: ExecutionError) -> str:
    if isinstance(exc, TimeoutTooLarge):
        return "timeout_ms"
    if isinstance(exc, InvalidWorkingDir):
        return "working_dir"
    return "command"


def _request_problems(
    request: ExecutionRequest,
    config: ExecutionConfig,
    prefix: str,
    lint: bool = True,
    admission: Admission | None = None,
) -> list[str]:
    problems = []
    if admission is None:
        admission = Admission(HostEnvironment(), config.secrets)
    try:
        request.validate(config)
        # What the engine checks as it takes the request: what an exec and a worker's pipe take.
        admission.options(request, request.argv())
    except ExecutionError as exc:
        problem = f"{prefix}{_field_of(exc)}: {exc}"
        if isinstance(exc, TimeoutTooLarge):
            problem += f"\n    hint: allow it with --max-timeout {request.timeout_ms}"
        problems.append(problem)
    command = request.command
    if lint and command.type == "exec" and any(ch.isspace() for ch in command.program):
        words = command.program.split()
        on_path = shutil.which(command.program, path=request.env.get("PATH")) is not None
        if words and not on_path:
            problems.append(
                f"{prefix}command.program: {json.dumps(command.program)} is not a program (it has spaces)\n"
                f'    hint: the arguments go in "args": "program": {json.dumps(words[0])}, '
                f'"args": {json.dumps([*words[1:], *command.args])}'
            )
    return problems


def check_document(
    data: Any, config: ExecutionConfig
) -> tuple[ExecutionPlan | ExecutionRequest | None, list[str]]:
    """Parse `data` as a plan (it has `commands`) or a request; return it and every problem found."""
    model: type[ExecutionPlan | ExecutionRequest] = (
        ExecutionPlan if isinstance(data, dict) and "commands" in data else ExecutionRequest
    )
    try:
        parsed = model.model_validate(data)
    except pydantic.ValidationError as exc:
        return None, parse_problems(exc, data)
    if isinstance(parsed, ExecutionRequest):
        return parsed, _request_problems(parsed, config, "")
    return parsed, plan_problems(parsed, config)


def plan_problems(plan: ExecutionPlan, config: ExecutionConfig, lint: bool = True) -> list[str]:
    """Every reason the engine would refuse `plan` under `config`, each with its path.

    With `lint`, also what would surely fail on this machine though the engine
    accepts it (a program name with spaces that is not a program).
    """
    problems = []
    try:
        check_plan(plan)
    except InvalidPlan as exc:
        problems.append(f"strategy: {exc}")
    admission = Admission(HostEnvironment(), config.secrets)
    for index, request in enumerate(plan.commands):
        problems.extend(_request_problems(request, config, f"commands.{index}.", lint, admission))
    return problems

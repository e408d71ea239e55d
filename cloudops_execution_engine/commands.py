"""The four command kinds and how each becomes an argument vector.

No kind passes through a shell unless it asks for one (`ShellCommand`): the
vector goes to the kernel as is, so `; rm -rf ~` in an argument stays text.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from ._model import Model
from .errors import InvalidCommand, ScriptNotFound

__all__ = [
    "AwsCliCommand",
    "Command",
    "ExecCommand",
    "ScriptCommand",
    "ShellCommand",
]

# Interpreters by extension, for scripts with neither an explicit interpreter nor a #! line.
_INTERPRETERS = {
    ".sh": ["bash"],
    ".bash": ["bash"],
    ".zsh": ["zsh"],
    ".py": ["python3"],
    ".rb": ["ruby"],
    ".pl": ["perl"],
    ".js": ["node"],
    ".ps1": ["pwsh", "-File"],
}
_SHEBANG_LIMIT = 256  # Linux reads at most 256 bytes of a #! line.


def _reject_nul(what: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidCommand(f"{what} contains a NUL byte")


def _require(what: str, value: str) -> None:
    if not value.strip():
        raise InvalidCommand(f"{what} must not be empty")
    _reject_nul(what, value)


class ScriptCommand(Model):
    type: Literal["script"] = "script"
    """Always "script": run a script file."""
    path: Path
    """The script file; a relative path is looked up in the request's working_dir."""
    interpreter: str | None = None
    """What runs it (split as a shell would, e.g. "python3 -u"); None: its #! line, then its extension,
    then the file itself."""
    _positional: ClassVar[tuple[str, ...]] = ("path", "interpreter")

    def validate(self, cwd: str | os.PathLike[str] | None = None) -> None:  # type: ignore[override]
        """Raise `ScriptNotFound` or `InvalidCommand` unless this script can run.

        A relative path is looked up in `cwd` (the request's working directory), else here.
        """
        _require("script path", str(self.path))
        if self.interpreter is not None:
            _require("interpreter", self.interpreter)
        self.argv(cwd)

    def resolved_path(self, cwd: str | os.PathLike[str] | None = None) -> Path:
        if self.path.is_absolute() or cwd is None:
            return self.path
        return Path(cwd) / self.path

    def argv(self, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        path = self.resolved_path(cwd)
        if not path.is_file():
            raise ScriptNotFound(self.path)
        # Absolute, as it was found here: `./id` is `id` to pathlib, which a bare name would
        # make a program looked up in PATH; a relative working_dir would be joined twice (the
        # command runs in it); and `-x` would be an option to its interpreter.
        target = str(path.absolute())
        if self.interpreter is not None:
            try:
                interpreter = shlex.split(self.interpreter)
            except ValueError as exc:
                reason = f"interpreter {self.interpreter!r} cannot be split as a shell would: {exc}"
                raise InvalidCommand(reason) from None
            return [*interpreter, target]
        shebang = _read_shebang(path)
        if shebang:
            return [*shebang, target]
        by_extension = _INTERPRETERS.get(path.suffix.lower())
        if by_extension:
            return [*by_extension, target]
        if os.access(path, os.X_OK):
            return [target]
        raise InvalidCommand(
            f"cannot tell how to run {self.path}: give an interpreter, a #! line, "
            "a known extension, or make it executable"
        )

    def display(self) -> str:
        if self.interpreter:
            return f"{self.interpreter} {shlex.quote(str(self.path))}"
        return shlex.quote(str(self.path))


def _read_shebang(path: Path) -> list[str] | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(_SHEBANG_LIMIT)
    except OSError as exc:
        raise InvalidCommand(f"cannot read script {path}: {exc.strerror}") from exc
    if not head.startswith(b"#!"):
        return None
    try:
        line = head[2:].split(b"\n", 1)[0].decode().strip()
    except UnicodeDecodeError as exc:
        # Commands travel as text: a byte that is not UTF-8 cannot be passed on as the kernel would.
        raise InvalidCommand(
            f"the #! line of {path} is not UTF-8 text ({exc.reason} at {exc.start + 2})"
        ) from None
    if not line:
        return None
    # The kernel passes everything after the interpreter as one argument.
    parts = line.split(None, 1)
    return parts


class ExecCommand(Model):
    type: Literal["exec"] = "exec"
    """Always "exec": run a program directly, without a shell."""
    program: str
    """The program: a path, or a name looked up in PATH. Its arguments go in args, not here."""
    args: list[str] = Field(default_factory=list)
    """The program's arguments, each passed as it is (no shell, no splitting)."""
    _positional: ClassVar[tuple[str, ...]] = ("program", "args")

    def validate(self, cwd: str | os.PathLike[str] | None = None) -> None:  # type: ignore[override]
        _require("program", self.program)
        for arg in self.args:
            _reject_nul("argument", arg)

    def argv(self, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        return [self.program, *self.args]

    def display(self) -> str:
        return shlex.join(self.argv())


class ShellCommand(Model):
    type: Literal["shell"] = "shell"
    """Always "shell": run a command line with a shell."""
    command: str
    """The command line, run as `<shell> -c <command>`."""
    shell: str = "bash"
    """The shell program."""
    _positional: ClassVar[tuple[str, ...]] = ("command", "shell")

    def validate(self, cwd: str | os.PathLike[str] | None = None) -> None:  # type: ignore[override]
        _require("shell command", self.command)
        _require("shell", self.shell)

    def argv(self, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        return [self.shell, "-c", self.command]

    def display(self) -> str:
        return self.command


class AwsCliCommand(Model):
    type: Literal["aws_cli"] = "aws_cli"
    """Always "aws_cli": run the AWS CLI, without a shell."""
    service: str
    """The AWS CLI's service, e.g. s3api."""
    operation: str
    """The service's operation, e.g. list-buckets."""
    args: list[str] = Field(default_factory=list)
    """More arguments, e.g. ["--bucket", "b"]; ["--endpoint-url", "http://127.0.0.1:5000"] points it at
    an emulator."""
    profile: str | None = None
    """Passed as --profile; None: the AWS CLI's default."""
    region: str | None = None
    """Passed as --region; None: the AWS CLI's default."""
    _positional: ClassVar[tuple[str, ...]] = ("service", "operation", "args", "profile", "region")

    def validate(self, cwd: str | os.PathLike[str] | None = None) -> None:  # type: ignore[override]
        for what, value in (("service", self.service), ("operation", self.operation)):
            _require(f"aws {what}", value)
            if any(ch.isspace() for ch in value) or value.startswith("-"):
                raise InvalidCommand(f"aws {what} {value!r} is not a single word")
        for what, option in (("profile", self.profile), ("region", self.region)):
            if option is not None:
                _require(f"aws {what}", option)
        for arg in self.args:
            _reject_nul("argument", arg)

    def argv(self, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        argv = ["aws"]
        if self.profile is not None:
            argv += ["--profile", self.profile]
        if self.region is not None:
            argv += ["--region", self.region]
        return [*argv, self.service, self.operation, *self.args]

    def display(self) -> str:
        return shlex.join(self.argv())


Command = Annotated[
    ScriptCommand | ExecCommand | ShellCommand | AwsCliCommand,
    Field(discriminator="type"),
]

"""What a request must satisfy before it is admitted: it must fit an exec and cross the pipe.

`Admission.options` also turns a request's per-request options into the plain
values a `Run` carries (`RunOptions`): stdin as bytes, the limits as numbers,
the secrets to mask. A stdin larger than `MAX_STDIN_BYTES` is refused: the
whole `Run` must fit one frame of the worker's `DEFAULT_MAX_FRAME`, beside
the command's arguments and environment (at most the exec limit, and as much
again for the command's display).

Checked at `execute()`, so that a request the kernel or the wire would refuse
fails there with `InvalidCommand`, alone, and never later in a worker where it
could cost other executions. The host's environment counts too, as every
command inherits it; it is read as bytes, since a host's environment may hold
names and values that are not UTF-8, which commands then get exactly.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import InvalidCommand
from ..protocol import DEFAULT_MAX_FRAME
from .process_tree import ENGINE_ENV
from .secrets import masker_for

if TYPE_CHECKING:
    from ..requests import ExecutionRequest

__all__ = ["MAX_STDIN_BYTES", "NO_OPTIONS", "Admission", "HostEnvironment", "RunOptions"]

# Half of a worker's frame limit: with the exec's own limit (2 MiB on a usual
# Linux) twice over, the `Run` stays well inside one frame.
MAX_STDIN_BYTES = 16 * 1024 * 1024
# Room in a `Run` frame for everything but the strings counted here.
_RUN_ROOM = 64 * 1024
# The most an integer takes in msgpack (an i32 exit code, a CPU number).
_MSGPACK_INT = 5

# What the kernel takes across one execve besides the strings: a pointer each.
_POINTER = 8
_ENGINE_KEY = os.fsencode(ENGINE_ENV)
_MAX_ARG_STRLEN = 32 * 4096  # Linux: the most one argument or variable may hold
# Far below the frame limit, so a request that passes always fits a frame.
_MAX_REQUEST = 16 * 1024 * 1024
_MARKER = 128  # the execution's marker variable, added to every command's environment


class HostEnvironment:
    """The host's environment as bytes, copied again only when it has changed.

    Comparing the raw mapping with the last one seen costs about a microsecond;
    the size the kernel will count for it is worked out once per change. With
    `engine_id`, it names the engine (`process_tree.ENGINE_ENV`), over any name
    the host itself inherited from an engine that runs it.
    """

    def __init__(self, engine_id: str | None = None) -> None:
        self._raw: dict[Any, Any] | None = None
        self._copy: dict[bytes, bytes] = {}
        self._engine = {_ENGINE_KEY: engine_id.encode()} if engine_id else None
        self.size = 0

    def current(self) -> dict[bytes, bytes]:
        raw = getattr(os.environ, "_data", None)
        if raw is None:
            raw = dict(os.environb)
        if raw != self._raw:
            # Nothing changes either copy: the one compared against is the one
            # handed out, unless the engine's name is added to it.
            self._raw = dict(raw)
            self._copy = self._raw if self._engine is None else {**self._raw, **self._engine}
            self.size = sum(len(k) + len(v) + 2 + _POINTER for k, v in self._copy.items())
        return self._copy


class RunOptions:
    """A request's per-request options as a `Run` carries them; one shared `NO_OPTIONS` when none is set."""

    __slots__ = ("cpu_affinity", "limits", "secret_env", "secrets", "stdin", "success_exit_codes")

    def __init__(
        self,
        stdin: bytes = b"",
        success_exit_codes: list[int] | None = None,
        limits: dict[str, int] | None = None,
        cpu_affinity: list[int] | None = None,
        secrets: list[str] | None = None,
        secret_env: dict[str, str] | None = None,
    ) -> None:
        self.stdin = stdin
        self.success_exit_codes = success_exit_codes if success_exit_codes is not None else [0]
        self.limits = limits if limits is not None else {}
        self.cpu_affinity = cpu_affinity if cpu_affinity is not None else []
        self.secrets = secrets if secrets is not None else []
        self.secret_env = secret_env if secret_env is not None else {}

    def mask(self, text: str) -> str:
        """`text` with this request's secrets masked: for what the host writes itself (the command line)."""
        masker = masker_for(tuple(self.secrets))
        return masker.mask_text(text) if masker is not None else text


NO_OPTIONS = RunOptions()


class Admission:
    def __init__(self, environment: HostEnvironment, secrets: list[str] | None = None) -> None:
        self._environment = environment
        self._limit = min(_arg_max(), _MAX_REQUEST)
        self._secrets = list(secrets or ())
        # The engine's secrets travel in every Run: counted once, not per request.
        self._secrets_size = sum(len(secret.encode()) for secret in self._secrets)
        # What a request that sets no option of its own gets: shared, not one per request.
        self._plain = RunOptions(secrets=self._secrets) if self._secrets else NO_OPTIONS

    def options(self, request: ExecutionRequest, argv: list[str]) -> RunOptions:
        """Check a request's options and the size of its whole `Run`; their wire values.

        `argv` is the request's, checked by `check` already; it counts again here
        for the display the `Run` also carries.
        """
        secret_env = request.secret_env
        plain = not (secret_env or request.stdin or request.limits is not None)
        if plain and request.success_exit_codes == [0]:
            # Most requests set no option: the same checks, without building what they would need.
            self._check_frame(self.check(argv, request.env), 0, self._secrets_size)
            return self._plain
        env = {**request.env, **secret_env} if secret_env else request.env
        size = self.check(argv, env)
        stdin = request.stdin
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        if len(data) > MAX_STDIN_BYTES:
            raise InvalidCommand(
                f"stdin is {len(data)} bytes, more than the {MAX_STDIN_BYTES} a request may carry"
            )
        secrets = [*self._secrets, *secret_env.values()]
        limits = request.limits
        values: dict[str, int] = {}
        affinity: list[int] = []
        if limits is not None:
            values = {
                name: value
                for name, value in limits.model_dump(exclude={"cpu_affinity"}).items()
                if value is not None
            }
            affinity = sorted(set(limits.cpu_affinity or ()))
        # Sets, as lists: what repeats says nothing more, and would only fill the frame.
        codes = request.success_exit_codes
        if len(codes) > 1:
            codes = sorted(set(codes))
        # A list the host may make as long as it likes: millions of exit codes fill a frame too.
        numbers = _MSGPACK_INT * (len(codes) + len(affinity))
        self._check_frame(size, len(data) + numbers, sum(len(s.encode()) for s in secrets))
        if not (data or values or affinity or secret_env) and codes == [0]:
            return self._plain
        return RunOptions(data, list(codes), values, affinity, secrets, dict(secret_env))

    @staticmethod
    def _check_frame(size: int, stdin: int, secrets: int) -> None:
        """Refuse a request whose `Run` would not fit one frame: its strings twice (with the display)."""
        total = 2 * size + stdin + secrets + _RUN_ROOM
        if total > DEFAULT_MAX_FRAME:
            raise InvalidCommand(
                f"the request (command, environment, stdin, secrets and lists of numbers) takes about "
                f"{total} bytes, "
                f"more than the {DEFAULT_MAX_FRAME} one message to a worker may hold"
            )

    def check(self, argv: list[str], env: dict[str, str]) -> int:
        """Refuse what the kernel would refuse at exec, or what could not cross the pipe; the size it takes.

        The count is the kernel's: every argument and `NAME=value` string with its
        NUL and its pointer, the host's environment included. One string over the
        per-string limit fails the same way; text that is not valid Unicode too.
        """
        environment = self._environment
        environment.current()
        size = environment.size + _MARKER
        longest = 0
        # `isascii()` answers from the string's header: ASCII text is its own UTF-8, so
        # only other text is encoded, to count it and to refuse what cannot be encoded.
        for item in argv:
            length = len(item) if item.isascii() else len(_utf8(item, "an argument"))
            if length > longest:
                longest = length
            size += length + 1 + _POINTER
        for key, value in env.items():
            length = (len(key) if key.isascii() else len(_utf8(key, "an environment variable name"))) + 1
            length += len(value) if value.isascii() else len(_utf8(value, f"variable {key}"))
            if length > longest:
                longest = length
            size += length + 1 + _POINTER
        if size > self._limit:
            raise InvalidCommand(
                f"the command's arguments and environment take {size} bytes, "
                f"more than the {self._limit} an exec may take"
            )
        if longest > _MAX_ARG_STRLEN and sys.platform.startswith("linux"):
            raise InvalidCommand(
                f"one argument or environment variable takes {longest} bytes, "
                f"more than the {_MAX_ARG_STRLEN} an exec may take for one"
            )
        return size


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        # A lone surrogate (PEP 383) stands for bytes that are not text, which
        # neither the wire nor a Rust peer can carry.
        raise InvalidCommand(f"{what} is not valid Unicode text: {exc.reason} at {exc.start}") from None


def _arg_max() -> int:
    try:
        value = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        value = -1
    return value if value > 0 else 128 * 1024

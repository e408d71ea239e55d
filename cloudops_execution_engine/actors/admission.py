"""What a request must satisfy before it is admitted: it must fit an exec and cross the pipe.

Checked at `execute()`, so that a request the kernel or the wire would refuse
fails there with `InvalidCommand`, alone, and never later in a worker where it
could cost other executions. The host's environment counts too, as every
command inherits it; it is read as bytes, since a host's environment may hold
names and values that are not UTF-8, which commands then get exactly.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import InvalidCommand

__all__ = ["Admission", "HostEnvironment"]

# What the kernel takes across one execve besides the strings: a pointer each.
_POINTER = 8
_MAX_ARG_STRLEN = 32 * 4096  # Linux: the most one argument or variable may hold
# Far below the frame limit, so a request that passes always fits a frame.
_MAX_REQUEST = 16 * 1024 * 1024
_MARKER = 128  # the execution's marker variable, added to every command's environment


class HostEnvironment:
    """The host's environment as bytes, copied again only when it has changed.

    Comparing the raw mapping with the last one seen costs about a microsecond;
    the size the kernel will count for it is worked out once per change.
    """

    def __init__(self) -> None:
        self._raw: dict[Any, Any] | None = None
        self._copy: dict[bytes, bytes] = {}
        self.size = 0

    def current(self) -> dict[bytes, bytes]:
        raw = getattr(os.environ, "_data", None)
        if raw is None:
            raw = dict(os.environb)
        if raw != self._raw:
            # One copy, both compared against and handed out: nothing changes it.
            self._raw = self._copy = dict(raw)
            self.size = sum(len(k) + len(v) + 2 + _POINTER for k, v in self._copy.items())
        return self._copy


class Admission:
    def __init__(self, environment: HostEnvironment) -> None:
        self._environment = environment
        self._limit = min(_arg_max(), _MAX_REQUEST)

    def check(self, argv: list[str], env: dict[str, str]) -> None:
        """Refuse what the kernel would refuse at exec, or what could not cross the pipe.

        The count is the kernel's: every argument and `NAME=value` string with its
        NUL and its pointer, the host's environment included. One string over the
        per-string limit fails the same way; text that is not valid Unicode too.
        """
        self._environment.current()
        size = self._environment.size + _MARKER
        longest = 0
        for item in argv:
            length = len(_utf8(item, "an argument"))
            longest = max(longest, length)
            size += length + 1 + _POINTER
        for key, value in env.items():
            name = _utf8(key, "an environment variable name")
            length = len(name) + len(_utf8(value, f"variable {key}")) + 1
            longest = max(longest, length)
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

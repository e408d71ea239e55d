"""Masking secret values as `***` in what the engine writes: output, logs, errors.

A `Masker` holds one compiled alternation of the secrets' UTF-8 bytes, longest
first, so that at any position the longest secret wins and a secret that
contains another is masked whole. Most output holds no secret at all: `hit`
answers that with one C-level substring search per secret, and only output
that holds one is rewritten.

Output is masked as bytes, before it is decoded, logged or kept, and only at
places where no secret can be cut in two: a whole line, or a piece of an
endless line cut where no occurrence spans the cut (`piece_cut`). Secrets
never hold a newline or a carriage return (they are refused at validation),
so line boundaries never cut one. Replacing a secret with `***` can make a new
occurrence of a secret that itself holds `*`; masking repeats until none is
left, which ends because every replacement shortens the text (secrets are at
least `MIN_SECRET` characters long).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import PurePath
from typing import Any, Protocol

__all__ = [
    "MASK",
    "MIN_SECRET",
    "JsonMask",
    "Masker",
    "check_secret",
    "json_masker",
    "mask_error",
    "masker_for",
]

MASK = "***"
MIN_SECRET = 4
_MASK_BYTES = MASK.encode()


def check_secret(value: str, what: str) -> None:
    """Raise `ValueError` naming `what` if `value` cannot be masked reliably."""
    if len(value) < MIN_SECRET:
        raise ValueError(
            f"{what} is {len(value)} character(s) long; secrets must be at least {MIN_SECRET} "
            "characters, as shorter ones would mask ordinary text"
        )
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} holds a line break; output is masked line by line, so it could not be")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: {exc.reason} at {exc.start}") from None


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Masker:
    """Replaces every occurrence of the given secrets with `***`."""

    __slots__ = ("_needles", "_pattern", "_text_pattern", "hold")

    def __init__(self, secrets: Iterable[str]) -> None:
        # A value with a lone surrogate is refused as a secret, but masked in the text of
        # that very refusal: as bytes it is one no output can hold.
        unique = sorted({s for s in secrets if s}, key=lambda s: (-len(_utf8(s)), s))
        if not unique:
            raise ValueError("a Masker needs at least one secret")
        self._needles = tuple(_utf8(s) for s in unique)
        self._pattern = re.compile(b"|".join(re.escape(n) for n in self._needles))
        self._text_pattern = re.compile("|".join(re.escape(s) for s in unique))
        # Bytes of a line held back before a piece is cut, so that an occurrence
        # that starts before the cut is whole in what has been read.
        self.hold = len(self._needles[0]) - 1

    def hit(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether `data` holds any secret: the usual answer, no, costs a substring search per secret."""
        return any(needle in data for needle in self._needles)

    def mask(self, data: bytes) -> bytes:
        """`data` with every secret replaced by `***`."""
        if not self.hit(data):
            return data
        count = 1
        while count:
            data, count = self._pattern.subn(_MASK_BYTES, data)
        return data

    def finds(self, text: str) -> bool:
        """Whether `text` holds any secret."""
        return self._text_pattern.search(text) is not None

    def mask_text(self, text: str) -> str:
        """`text` with every secret replaced by `***`; for error texts, command lines and paths."""
        count = 1
        while count:
            text, count = self._text_pattern.subn(MASK, text)
        return text

    def mask_upto(self, data: bytes | bytearray, limit: int) -> bytes:
        """The masked text of `data[:limit]`, where an occurrence that starts before `limit` counts whole.

        `data` should hold `hold` bytes past `limit` where it can, so that an
        occurrence that starts before the limit is seen whole: its bytes are
        then masked rather than cut into a prefix. The result may be a little
        longer than `limit` (a mask that crosses it); the caller cuts it.
        """
        raw = bytes(data)
        if len(raw) <= limit:
            return self.mask(raw)
        # Not inside a UTF-8 sequence: back over at most three continuation bytes.
        lowest = limit - 3
        while limit > max(lowest, 0) and (raw[limit] & 0xC0) == 0x80:
            limit -= 1
        end = limit
        for match in self._pattern.finditer(raw, 0, limit + self.hold):
            if match.start() >= limit:
                break
            end = max(end, match.end())
        return self.mask(raw[:end])

    def piece_cut(self, data: bytes, cut: int) -> int:
        """A cut at or near `cut` that no occurrence of a secret spans, scanning `data` from its start.

        `data` must start where no occurrence spans (a line's start, or an
        earlier cut) and hold `hold` bytes past `cut`, so that masking the two
        sides apart masks exactly what masking them together would.
        """
        if not self.hit(data):
            return cut
        for match in self._pattern.finditer(data, 0, cut + self.hold):
            start, end = match.span()
            if start >= cut:
                break
            if end > cut:
                return start if start > 0 else end
        return cut


@lru_cache(maxsize=64)
def masker_for(secrets: tuple[str, ...]) -> Masker | None:
    """The masker for a set of secrets, compiled once per set; None when there is nothing to mask.

    A value too short to be a secret (refused at validation, but masked in the
    text of that very refusal) is left out: masking `*` with `***` never ends.
    """
    usable = tuple(secret for secret in secrets if len(secret) >= MIN_SECRET)
    if not usable:
        return None
    # A command line is shown quoted for a shell (`shlex.join`): a quote in a secret typed into
    # an argument is written there as '"'"', and that form is masked too.
    quoted = tuple(secret.replace("'", "'\"'\"'") for secret in usable if "'" in secret)
    return Masker(usable + quoted)


# Keys whose string values the engine makes or checks against a fixed set (ids,
# the tags of a command's or a strategy's type, statuses, times, its own log
# files): never a secret, and masking one leaves a document that no longer reads
# back, as when a secret happens to be `exec`, `completed` or four digits of an id.
_MADE_BY_THE_ENGINE = frozenset(
    {
        "id",
        "type",
        "status",
        "started_at",
        "completed_at",
        "plan_id",
        "resumed_from",
        "conversation_id",
        "retry_on",
        "log_path",
    }
)
# Maps of the host's own text: their keys are masked as well as their values.
_HOSTS_MAPS = frozenset({"env", "secret_env", "tags"})


class JsonMask(Protocol):
    """Masks a JSON document dumped with these options (`json_masker`)."""

    def __call__(self, document: str, indent: int | None = None, ensure_ascii: bool = False) -> str: ...


def json_masker(secrets: Iterable[str]) -> JsonMask | None:
    """Masks secrets in the text of a JSON document the engine writes, leaving its structure whole.

    For documents written whole, such as a journal's rows or a request's JSON:
    a secret typed into a command line is in the request's JSON, escaped as
    JSON escapes it. Only the strings the host wrote are masked, never keys
    or what the engine made (`_MADE_BY_THE_ENGINE`), so that the document still
    reads back. Most documents hold no secret and are returned as they are.
    """
    usable = tuple(sorted(set(secrets)))
    masker = masker_for(usable)
    if masker is None:
        return None
    # A secret as written in the document: as it is, and as JSON escapes it (a quote, a control, non-ASCII).
    forms = {
        form for s in usable for form in (s, json.dumps(s, ensure_ascii=False)[1:-1], json.dumps(s)[1:-1])
    }
    # A `bytes` stdin is written as serde writes a Vec<u8>: an array of numbers.
    raw = tuple(sorted({s.encode() for s in usable}, key=len, reverse=True))
    forms.update(",".join(map(str, secret)) for secret in raw)
    seen = masker_for(tuple(sorted(forms)))
    assert seen is not None

    def mask(document: str, indent: int | None = None, ensure_ascii: bool = False) -> str:
        # Indented, an array's numbers are a line each: only a whole look can tell.
        if not seen.finds(document) and not (indent is not None and '"stdin": [' in document):
            return document
        masked = _masked_value(json.loads(document), masker, hosts=False, raw=raw)
        separators = (",", ": ") if indent is not None else (",", ":")
        return json.dumps(masked, ensure_ascii=ensure_ascii, indent=indent, separators=separators)

    return mask


def _masked_value(value: object, masker: Masker, *, hosts: bool, raw: tuple[bytes, ...] = ()) -> object:
    if isinstance(value, str):
        return masker.mask_text(value)
    if isinstance(value, list):
        return [_masked_value(item, masker, hosts=False, raw=raw) for item in value]
    if isinstance(value, dict):
        if hosts:
            return {masker.mask_text(k): _masked_value(v, masker, hosts=False) for k, v in value.items()}
        return {
            k: v
            if k in _MADE_BY_THE_ENGINE
            else _masked_bytes(v, raw)
            if k == "stdin" and isinstance(v, list)
            else _masked_value(v, masker, hosts=k in _HOSTS_MAPS, raw=raw)
            for k, v in value.items()
        }
    return value


def _masked_bytes(numbers: list[Any], raw: tuple[bytes, ...]) -> list[Any]:
    """A `bytes` stdin's numbers, with each secret's UTF-8 bytes (longest first) as `***`'s."""
    try:
        data = bytes(numbers)
    except (TypeError, ValueError):  # not bytes after all
        return numbers
    for secret in raw:
        data = data.replace(secret, _MASK_BYTES)
    return list(data)


def mask_error(exc: BaseException, secrets: Iterable[str]) -> None:
    """Mask the secrets in an exception's text and in the path or reason it carries, in place."""
    masker = masker_for(tuple(secrets))
    if masker is None:
        return
    exc.args = tuple(masker.mask_text(arg) if isinstance(arg, str) else arg for arg in exc.args)
    for name in ("path", "reason"):
        value = getattr(exc, name, None)
        if isinstance(value, str):
            setattr(exc, name, masker.mask_text(value))
        elif isinstance(value, PurePath):
            setattr(exc, name, type(value)(masker.mask_text(str(value))))

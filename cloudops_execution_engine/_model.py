"""The base of the public models and the seed's serde encodings.

`Duration` is written as serde writes `std::time::Duration` and `UtcDateTime`
as chrono writes `DateTime<Utc>`, so JSON crosses between this library and a
Rust service using the crate unchanged: nanoseconds are kept exactly
(`NanoDuration`, `NanoDateTime`) and timestamps carry 0, 3, 6 or 9 fractional
digits as chrono's do.

Validation reads JSON as serde does: an integer field takes only a JSON integer
within its Rust type's range (`U64`, `I32`, `Usize`, ...), never `true`,
`"5000"` or `5.0`. Values the models cannot hold (a leap second, a year past
9999, a `Duration` beyond `timedelta`) are validation errors that say why.
"""

from __future__ import annotations

import difflib
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import PosixPath
from typing import Annotated, Any, ClassVar, Self, TypeVar, cast
from uuid import UUID

import pydantic.main
from annotated_types import Ge, Le
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    Strict,
    ValidationError,
    WithJsonSchema,
)
from pydantic._internal._model_construction import ModelMetaclass
from pydantic_core import PydanticCustomError

from . import errors

# Models build their validators and serializers on first use only where pydantic
# builds a deferred model under a lock (`_rebuild_lock`, pydantic 2.14). Before,
# two threads using a model for the first time at once could get its parent's
# validator, and a host may call us from several threads.
_DEFER_BUILD = hasattr(pydantic.main, "_rebuild_lock")

__all__ = [
    "F64",
    "I32",
    "U32",
    "U64",
    "Duration",
    "FiniteF64",
    "Model",
    "ModelValidationError",
    "NanoDateTime",
    "NanoDuration",
    "PositiveU32",
    "StrictBool",
    "Usize",
    "UsizeKeyMap",
    "UtcDateTime",
    "Value",
    "aware",
    "construct_unchecked",
    "duration_to_serde",
    "own_copy",
    "utc_from_timestamp",
    "utcnow",
]

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1

# Integers as the crate's fields declare them; JSON `true`, `"5"` and `5.0` are
# not integers to serde, so they are not here either.
U64 = Annotated[int, Strict(), Ge(0), Le(U64_MAX)]
U32 = Annotated[int, Strict(), Ge(0), Le(U32_MAX)]
I32 = Annotated[int, Strict(), Ge(I32_MIN), Le(I32_MAX)]
Usize = U64  # the crate's usize on the 64-bit targets it runs on
StrictBool = Annotated[bool, Strict()]
F64 = Annotated[float, Strict()]  # serde's f64 takes JSON integers too, and so does a strict float
# A float that goes into serde's JSON: serde_json writes inf and NaN as null, which no f64 reads back.
FiniteF64 = Annotated[float, Strict(), AllowInfNan(False)]
# A count that starts at one (attempts): `Field(ge=1)` on a U32 would lose to its own Ge(0).
PositiveU32 = Annotated[int, Strict(), Ge(1), Le(U32_MAX)]


class ModelValidationError(ValidationError, errors.ValidationError):
    """What a model's constructor raises for a value it refuses.

    It is pydantic's `ValidationError` (with its `errors()`) and the engine's
    `ValidationError` both, so a request built with `timeout_ms=-1` is refused
    as the engine would refuse it, however the caller catches it.
    """


class _ModelMetaclass(ModelMetaclass):
    def __call__(cls, *args: Any, **data: Any) -> Any:
        # Only a call of the class comes here: pydantic builds the models it
        # validates from JSON and dicts without one, so they keep ignoring
        # unknown fields, and need not pass through a Python `__init__`.
        model: Any = cls
        if args:
            if len(args) > len(model._positional):
                raise TypeError(
                    f"{cls.__name__} takes at most {len(model._positional)} "
                    f"positional arguments ({len(args)} given)"
                )
            for name, value in zip(model._positional, args, strict=False):
                if name in data:
                    raise TypeError(f"{cls.__name__} got {name!r} twice")
                data[name] = value
        if not model._keywords.issuperset(data):
            model._unexpected(data)
        try:
            return super().__call__(**data)
        except ModelValidationError:
            raise
        except ValidationError as exc:
            raise _as_model_error(exc, bool(model.model_config.get("hide_input_in_errors"))) from None


def _as_model_error(exc: ValidationError, hide_input: bool) -> ModelValidationError:
    details: list[Any] = exc.errors(include_url=False)
    try:
        return ModelValidationError.from_exception_data(exc.title, details, hide_input=hide_input)
    except (KeyError, TypeError):
        # An error type pydantic made in Python (e.g. path_type) is rebuilt as what it says.
        rebuilt: list[Any] = [dict(d, type=PydanticCustomError(d["type"], d["msg"])) for d in details]
        return ModelValidationError.from_exception_data(exc.title, rebuilt, hide_input=hide_input)


class Model(BaseModel, metaclass=_ModelMetaclass):
    """Pydantic base that also takes the leading fields positionally.

    `ExecCommand("ls", ["-l"])` reads like the Rust constructor it stands for;
    keyword construction works as with any pydantic model. A keyword that names
    no field is a `TypeError`, as for any Python callable, so that a misspelt
    option (`timeout=5` for `timeout_ms`) is not silently dropped; JSON and
    dicts given to `model_validate*` ignore unknown fields, as serde does.

    Subclasses define `validate` because the seed names its checks so; that
    shadows pydantic's deprecated v1 classmethod of the same name, hence the
    `type: ignore[override]` on each.
    """

    # Each model's validator and serializer are built on its first use, not
    # when its module is imported: a process uses only some of the models
    # (`cloudops-exec run` about half), and building one costs a millisecond or more.
    # An attribute set after construction is validated as the constructor would: a host that edits
    # a request (`request.timeout_ms = 1.5`) hears of a wrong value there, not from a worker.
    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, defer_build=_DEFER_BUILD, validate_assignment=True
    )
    _positional: ClassVar[tuple[str, ...]] = ()
    _keywords: ClassVar[frozenset[str]] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ModelValidationError:
            raise
        except ValidationError as exc:  # refused as the constructor refuses: a contract error
            raise _as_model_error(exc, bool(self.model_config.get("hide_input_in_errors"))) from None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        names = set(cls.model_fields)
        names.update(f.alias for f in cls.model_fields.values() if f.alias)
        cls._keywords = frozenset(names)

    @classmethod
    def _unexpected(cls, data: dict[str, Any]) -> None:
        name = sorted(set(data) - cls._keywords)[0]
        close = difflib.get_close_matches(name, sorted(cls._keywords), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}{hint}")

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        """The schema pydantic makes, each field described by its attribute docstring (see `_field_docs`)."""
        from ._field_docs import add_field_descriptions

        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        add_field_descriptions(cls, handler.resolve_ref_schema(schema))
        return schema


class Value(Model):
    """A model the engine makes and hands out, to every handler and caller alike: it cannot be edited.

    One event object goes to every handler and `events()` reader, and one
    result to every waiter, every `get_result()` and its terminal event: a
    handler that set `event.result.stdout` changed what all the others saw,
    and what the engine answered from then on. `model_copy(update=...)`
    makes an edited copy.
    """

    model_config = ConfigDict(frozen=True)


_M = TypeVar("_M", bound=BaseModel)
_V = TypeVar("_V")


def construct_unchecked(cls: type[_M], values: dict[str, Any], fields: set[str]) -> _M:
    """Build a model from values the engine made itself, without validation or defaults.

    `model_construct` does the same with more bookkeeping; on the per-line path
    of output events this is a quarter of the cost. `values` must name every
    field with a value of the right type; `fields` is the set of those names.
    """
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", fields)
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


# Values that cannot change: shared by a copy, not copied.
_SHARED = frozenset({str, int, float, bool, bytes, type(None), UUID, PosixPath, datetime, timedelta})


def own_copy(value: _V) -> _V:
    """`value` copied as deep as its mutable parts (models, lists, dicts, sets); the rest is shared.

    What `copy.deepcopy` does for these models, at a fraction of its cost
    (a plan of 20,000 commands is copied on the loop): strings, numbers,
    UUIDs and paths cannot change, so they need no copy.
    """
    kind = type(value)
    if kind in _SHARED:
        return value
    if kind is list:
        return [item if type(item) in _SHARED else own_copy(item) for item in value]  # type: ignore[attr-defined,return-value]
    if kind is dict:
        return {k: v if type(v) in _SHARED else own_copy(v) for k, v in value.items()}  # type: ignore[attr-defined,return-value]
    if kind is set:
        return {own_copy(item) for item in value}  # type: ignore[attr-defined,return-value]
    if isinstance(value, BaseModel):
        values = {name: own_copy(item) for name, item in value.__dict__.items()}
        copied: Any = construct_unchecked(cast(type[BaseModel], kind), values, set(value.model_fields_set))
        private = value.__pydantic_private__
        if private:
            object.__setattr__(copied, "__pydantic_private__", own_copy(private))
        return cast(_V, copied)
    return value


# -- Duration ----------------------------------------------------------------------

_NANOS_PER_SECOND = 1_000_000_000
_TIMEDELTA_MAX_SECS = timedelta.max.days * 86_400 + timedelta.max.seconds


class _NanoOrder:
    """Equality, order and hash by (the value to the microsecond, the nanoseconds below it).

    Mixed into `timedelta` and `datetime` subclasses, before the base, so that
    a value with nanoseconds compares with plain values of its base as well.
    """

    __slots__ = ()
    _plain_type: ClassVar[type]
    _ns: int

    def _key(self) -> tuple[Any, int]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if isinstance(other, self._plain_type):
            return self._key() == _key_of(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, self._plain_type):
            return self._key() != _key_of(other)
        return NotImplemented

    def __lt__(self, other: Any) -> bool:
        return self._key() < _key_of(other)

    def __le__(self, other: Any) -> bool:
        return self._key() <= _key_of(other)

    def __gt__(self, other: Any) -> bool:
        return self._key() > _key_of(other)

    def __ge__(self, other: Any) -> bool:
        return self._key() >= _key_of(other)

    def __hash__(self) -> int:
        return hash(self._key()) if self._ns else hash(self._key()[0])


def _key_of(value: Any) -> tuple[Any, int]:
    return value._key() if isinstance(value, _NanoOrder) else (value, 0)


class NanoDuration(_NanoOrder, timedelta):
    """A `timedelta` that keeps the nanoseconds of serde's `Duration` below the microsecond.

    Made by parsing (`{"secs": 1, "nanos": 123456789}`) or by `from_parts`; it is a
    `timedelta` for every use, and written back to JSON exactly. Arithmetic gives
    plain `timedelta`s, at microsecond precision. Comparison and hashing count the
    extra nanoseconds.
    """

    _ns: int = 0  # nanoseconds below the microsecond; a class default, since C methods make instances too
    _plain_type = timedelta

    @classmethod
    def from_parts(cls, secs: int, nanos: int = 0) -> NanoDuration:
        """The duration of serde's `Duration {secs, nanos}`; `nanos` may exceed a second."""
        secs, nanos = secs + nanos // _NANOS_PER_SECOND, nanos % _NANOS_PER_SECOND
        micros, extra = divmod(nanos, 1000)
        self = cls(0, secs, micros)
        self._ns = extra
        return self

    @property
    def secs(self) -> int:
        """Whole seconds, as Rust's `Duration::as_secs`."""
        return self.days * 86_400 + self.seconds

    @property
    def nanos(self) -> int:
        """Nanoseconds of the last second (0..999_999_999), as Rust's `Duration::subsec_nanos`."""
        return self.microseconds * 1000 + self._ns

    def total_nanoseconds(self) -> int:
        return self.secs * _NANOS_PER_SECOND + self.nanos

    def _key(self) -> tuple[timedelta, int]:
        return timedelta(self.days, self.seconds, self.microseconds), self._ns

    def __repr__(self) -> str:
        return f"{type(self).__name__}.from_parts(secs={self.secs}, nanos={self.nanos})"

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # timedelta's own would rebuild the microseconds only.
        return (NanoDuration.from_parts, (self.secs, self.nanos))


def _serde_int(value: Any, name: str, top: int) -> int:
    if type(value) is not int or not 0 <= value <= top:
        kind = "u64" if top == U64_MAX else "u32"
        raise ValueError(f"Duration '{name}' must be an integer in the range of {kind}, got {value!r}")
    return value


def _duration_from_parts(secs: Any, nanos: Any) -> timedelta:
    secs = _serde_int(secs, "secs", U64_MAX)
    nanos = _serde_int(nanos, "nanos", U32_MAX)
    secs += nanos // _NANOS_PER_SECOND
    nanos %= _NANOS_PER_SECOND
    if secs > U64_MAX:
        raise ValueError("overflow deserializing Duration: secs plus whole seconds of nanos exceed u64")
    if secs > _TIMEDELTA_MAX_SECS:
        raise ValueError(
            f"Duration of {secs} s is longer than Python's timedelta can hold ({_TIMEDELTA_MAX_SECS} s)"
        )
    if nanos % 1000:
        return NanoDuration.from_parts(secs, nanos)
    return timedelta(0, secs, nanos // 1000)


def _validate_duration(value: Any) -> timedelta:
    """A `Duration` as serde reads it: `{"secs": u64, "nanos": u32}` or `[secs, nanos]`, or a timedelta."""
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError("a Duration cannot be negative (Rust's Duration is unsigned)")
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"secs", "nanos"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r} in Duration, expected 'secs' or 'nanos'")
        for name in ("secs", "nanos"):
            if name not in value:
                raise ValueError(f"Duration is missing field {name!r}")
        return _duration_from_parts(value["secs"], value["nanos"])
    if isinstance(value, list | tuple) and len(value) == 2:
        return _duration_from_parts(value[0], value[1])
    raise ValueError(f'a Duration is {{"secs": <u64>, "nanos": <u32>}}, got {type(value).__name__}')


def duration_to_serde(value: timedelta) -> dict[str, int]:
    secs = value.days * 86_400 + value.seconds
    if secs < 0:  # only a value built without validation; Rust's Duration has no sign
        return {"secs": 0, "nanos": 0}
    nanos = value.microseconds * 1000
    if type(value) is not timedelta:
        nanos += getattr(value, "_ns", 0)
    return {"secs": secs, "nanos": nanos}


Duration = Annotated[
    timedelta,
    PlainValidator(_validate_duration),
    PlainSerializer(duration_to_serde, return_type=dict[str, int]),
    WithJsonSchema(
        {
            "type": "object",
            "properties": {
                "secs": {"type": "integer", "minimum": 0, "maximum": U64_MAX},
                "nanos": {"type": "integer", "minimum": 0, "maximum": U32_MAX},
            },
            "required": ["secs", "nanos"],
        }
    ),
]


# -- timestamps --------------------------------------------------------------------


class NanoDateTime(_NanoOrder, datetime):
    """An aware `datetime` that keeps chrono's nanoseconds below the microsecond.

    Made by parsing a timestamp with more than six fractional digits, or by
    `from_parts`; it is a `datetime` for every use and is written back to JSON
    exactly. `nanosecond` is the nanoseconds of the second (0..999_999_999), as
    chrono's. Arithmetic and `replace(microsecond=...)` work at microsecond
    precision; comparison and hashing count the extra nanoseconds.
    """

    _ns: int = 0  # nanoseconds below the microsecond; a class default, since C methods make instances too
    _plain_type = datetime

    @classmethod
    def from_parts(cls, value: datetime, nanosecond: int) -> NanoDateTime:
        """`value` (to the second; an aware UTC datetime) with `nanosecond` of that second."""
        if not 0 <= nanosecond < _NANOS_PER_SECOND:
            raise ValueError(f"nanosecond must be in 0..999_999_999, got {nanosecond}")
        micros, extra = divmod(nanosecond, 1000)
        self = cls(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            micros,
            tzinfo=value.tzinfo,
            fold=value.fold,
        )
        self._ns = extra
        return self

    @property
    def nanosecond(self) -> int:
        """Nanoseconds of the second (0..999_999_999), as chrono's `Timelike::nanosecond`."""
        return self.microsecond * 1000 + self._ns

    def astimezone(self, tz: Any = None) -> Self:
        moved = super().astimezone(tz)
        if moved is not self:
            moved._ns = self._ns
        return moved

    def replace(self, *args: Any, **kwargs: Any) -> Self:
        moved = super().replace(*args, **kwargs)
        if len(args) < 7 and "microsecond" not in kwargs:
            moved._ns = self._ns
        return moved

    def _key(self) -> tuple[datetime, int]:
        return _plain(self), self._ns

    def __repr__(self) -> str:
        return f"{datetime.__repr__(self)[:-1]}, nanosecond={self.nanosecond})"

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # datetime's own would rebuild the microseconds only.
        return (NanoDateTime.from_parts, (_plain(self), self.nanosecond))


def _plain(value: datetime) -> datetime:
    return datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        tzinfo=value.tzinfo,
        fold=value.fold,
    )


# RFC 3339 as chrono writes and reads it; a year beyond four digits (chrono's
# `+10000`) or a sign is matched so that refusing it can say why.
# ASCII digits only, as chrono reads them: Python's `\d` takes every script's.
_TIMESTAMP = re.compile(
    r"(?P<year>[+-]?\d{4,})-(?P<month>\d\d)-(?P<day>\d\d)[Tt ]"
    r"(?P<hour>\d\d):(?P<minute>\d\d):(?P<second>\d\d)(?:\.(?P<fraction>\d+))?"
    r"(?P<offset>[Zz]|(?i:utc)|[+-]\d\d:?\d\d)?",
    re.ASCII,
)


def _parse_timestamp(text: str) -> datetime:
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp such as 2024-05-01T12:00:00.250Z")
    year = int(match["year"])
    if not 1 <= year <= 9999:
        raise ValueError(f"{text!r}: year {year} is outside 1..=9999, the years Python's datetime holds")
    if match["second"] == "60":
        raise ValueError(f"{text!r} is a leap second, which Python's datetime cannot hold")
    fraction = (match["fraction"] or "")[:9]  # chrono reads nine digits and skips the rest
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    offset = match["offset"]
    # A timestamp without an offset is taken as UTC, as a naive datetime is.
    value = datetime(
        year,
        int(match["month"]),
        int(match["day"]),
        int(match["hour"]),
        int(match["minute"]),
        int(match["second"]),
        nanos // 1000,
        tzinfo=UTC,
    )
    if offset and offset[0] in "+-":
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[-2:])
        if hours > 23 or minutes > 59:
            raise ValueError(f"{text!r}: the offset {offset} is out of range")
        try:
            value -= sign * timedelta(hours=hours, minutes=minutes)
        except OverflowError:
            raise ValueError(
                f"{text!r} is outside years 1..=9999 in UTC, the years Python's datetime holds"
            ) from None
    if nanos % 1000:
        return NanoDateTime.from_parts(value, nanos)
    return value


def _validate_datetime(value: Any) -> datetime:
    """A chrono `DateTime<Utc>`: an RFC 3339 string (or a datetime), held as an aware UTC datetime."""
    if isinstance(value, str):
        return _parse_timestamp(value)
    if isinstance(value, datetime):
        return _aware_utc(value)
    raise ValueError(f"a timestamp is an RFC 3339 string, got {type(value).__name__}")


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if value.tzinfo is UTC:
        return value
    if value.utcoffset() == _ZERO and isinstance(value.tzinfo, timezone):
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value} is outside years 1..=9999 in UTC") from None


_ZERO = timedelta(0)


def _datetime_to_chrono(value: datetime) -> str:
    """`2024-05-01T12:00:00.250Z` as chrono writes it: 0, 3, 6 or 9 fractional digits."""
    if value.tzinfo is not UTC:
        value = _aware_utc(value)
    text = value.isoformat()  # 'YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00'; the year has four digits
    extra = 0 if type(value) is datetime else getattr(value, "_ns", 0)
    if extra:
        return f"{text[:19]}.{value.microsecond * 1000 + extra:09d}Z"
    micros = value.microsecond
    if micros == 0:
        return text[:19] + "Z"
    if micros % 1000:
        return text[:26] + "Z"
    return text[:23] + "Z"


UtcDateTime = Annotated[
    datetime,
    PlainValidator(_validate_datetime),
    PlainSerializer(_datetime_to_chrono, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


# -- maps keyed by usize -------------------------------------------------------------

# What Rust's `u64::from_str` takes, which serde_json uses for an integer map key.
_USIZE_KEY = re.compile(r"\+?[0-9]+")


def _usize_keys(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(key, str):
            if not _USIZE_KEY.fullmatch(key):
                raise ValueError(f"map key {key!r} is not an unsigned integer")
            key = int(key)
        out[key] = item
    return out


UsizeKeyMap = Annotated[dict[Usize, list[Usize]], BeforeValidator(_usize_keys)]
"""serde's `HashMap<usize, Vec<usize>>`: JSON object keys are decimal strings."""


def aware(value: datetime) -> datetime:
    """Every datetime the models hold is timezone-aware UTC."""
    return _aware_utc(value)


def utc_from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)

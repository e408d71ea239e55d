"""The base of the public models and the seed's serde encodings.

`Duration` is written as serde writes `std::time::Duration` and `UtcDateTime`
as chrono writes `DateTime<Utc>`, so JSON crosses between this library and a
Rust service using the crate unchanged.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainSerializer

_NANOS_PER_MICRO = 1000
_MICROS_PER_SECOND = 1_000_000


class Model(BaseModel):
    """Pydantic base that also takes the leading fields positionally.

    `ExecCommand("ls", ["-l"])` reads like the Rust constructor it stands for;
    keyword construction works as with any pydantic model.

    Subclasses define `validate` because the seed names its checks so; that
    shadows pydantic's deprecated v1 classmethod of the same name, hence the
    `type: ignore[override]` on each.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    _positional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **data: Any) -> None:
        if args:
            if len(args) > len(self._positional):
                raise TypeError(
                    f"{type(self).__name__} takes at most {len(self._positional)} "
                    f"positional arguments ({len(args)} given)"
                )
            for name, value in zip(self._positional, args, strict=False):
                if name in data:
                    raise TypeError(f"{type(self).__name__} got {name!r} twice")
                data[name] = value
        super().__init__(**data)


_M = TypeVar("_M", bound=BaseModel)


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


def _duration_from_serde(value: Any) -> Any:
    if isinstance(value, dict) and set(value) <= {"secs", "nanos"}:
        secs = value.get("secs", 0)
        nanos = value.get("nanos", 0)
        if not isinstance(secs, int) or not isinstance(nanos, int) or isinstance(secs, bool):
            raise ValueError("Duration needs integer 'secs' and 'nanos'")
        if secs < 0 or not 0 <= nanos < 1_000_000_000:
            raise ValueError("Duration 'secs' must be >= 0 and 'nanos' in [0, 1e9)")
        micros = (nanos + _NANOS_PER_MICRO // 2) // _NANOS_PER_MICRO
        return timedelta(seconds=secs, microseconds=micros)
    return value


def duration_to_serde(value: timedelta) -> dict[str, int]:
    micros = (value.days * 86_400 + value.seconds) * _MICROS_PER_SECOND + value.microseconds
    micros = max(micros, 0)
    secs, rem = divmod(micros, _MICROS_PER_SECOND)
    return {"secs": secs, "nanos": rem * _NANOS_PER_MICRO}


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration_from_serde),
    PlainSerializer(duration_to_serde, return_type=dict[str, int]),
]

# chrono writes up to nine fractional digits; Python keeps six.
_FRACTION = re.compile(r"^(?P<head>[^.]+T\d\d:\d\d:\d\d)\.(?P<frac>\d+)(?P<tail>.*)$")


def _datetime_from_chrono(value: Any) -> Any:
    if isinstance(value, str):
        match = _FRACTION.match(value.strip())
        if match and len(match["frac"]) > 6:
            frac = match["frac"]
            micros = round(int(frac) / 10 ** (len(frac) - 6))
            head = datetime.fromisoformat(match["head"] + match["tail"].replace("z", "Z"))
            return head + timedelta(microseconds=micros)
    return value


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _datetime_to_chrono(value: datetime) -> str:
    return _aware_utc(value).isoformat().replace("+00:00", "Z")


UtcDateTime = Annotated[
    datetime,
    BeforeValidator(_datetime_from_chrono),
    AfterValidator(_aware_utc),
    PlainSerializer(_datetime_to_chrono, return_type=str, when_used="json"),
]


def aware(value: datetime) -> datetime:
    """Every datetime the models hold is timezone-aware UTC."""
    return _aware_utc(value)


def utc_from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)

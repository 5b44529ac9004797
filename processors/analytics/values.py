"""Event fields converted to ClickHouse column values, shared by every row builder.

`processors/analytics/rows.py` (the verification and categorization topics) and
`processors/review/rows.py` (the review topics) build their rows with these. Each
converter either returns a value the column can hold or raises `BadValue` naming
the field; `rows.rows_for()` turns that into a `Failure(INVALID_EVENT)`, so bad data
never reaches the server. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

#: The rows one record becomes: table -> rows (without the position columns).
Rows = dict[str, list[tuple[Any, ...]]]

DECISIONS = frozenset({"Pick", "Not Pick"})
VALIDATION_STATUSES = frozenset({"valid", "invalid"})
_MIN_TIME_MS = 0  # DateTime64 covers 1900-2299; events before 1970 are errors here
_MAX_TIME_MS = 10_413_792_000_000  # 2300-01-01


class BadValue(ValueError):
    """A field that cannot be converted to its column type; the message names it."""


def text(event: Mapping[str, Any], name: str) -> str:
    """Field `name` of `event` as a string; missing or None -> "".

    Raises `BadValue` for a value of another type.
    """
    value = event.get(name)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise BadValue(f"field {name!r} must be a string, got {type(value).__name__}")


def integer(value: Any, name: str, low: int, high: int) -> int:
    """`value` as an int within `low..high` (a whole float is accepted).

    Raises `BadValue` for a bool, a non-number, a fraction or a value out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadValue(f"field {name!r} must be an integer, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise BadValue(f"field {name!r} must be an integer, got {value!r}")
    result = int(value)
    if not low <= result <= high:
        raise BadValue(f"field {name!r} must be within {low}..{high}, got {result}")
    return result


def number(value: Any, name: str) -> float:
    """`value` as a float; raises `BadValue` for a bool or a non-number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadValue(f"field {name!r} must be a number, got {type(value).__name__}")
    return float(value)


def boolean(value: Any) -> bool:
    """`value` as a bool: a string is true only when it reads "true"; never raises."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def ms_to_time(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime; raises `BadValue` outside 1970-2299."""
    if not _MIN_TIME_MS <= ms < _MAX_TIME_MS:
        raise BadValue(f"time {ms} ms is outside 1970-2299")
    return datetime.fromtimestamp(ms / 1000, UTC)


def event_time(value: Any, fallback_ms: int, name: str) -> datetime:
    """Epoch ms (or an aware datetime, as fastavro decodes it); 0/None -> the fallback.

    A naive datetime is taken as UTC. Raises `BadValue` for anything else or a time
    outside 1970-2299.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if value is None or value == 0:
        return ms_to_time(fallback_ms)
    return ms_to_time(integer(value, name, _MIN_TIME_MS, _MAX_TIME_MS - 1))


def iso_time(value: Any, fallback_ms: int) -> datetime:
    """An ISO 8601 timestamp (naive is UTC); empty or not a string -> the fallback.

    Raises `BadValue` for a string that is not ISO 8601.
    """
    if not isinstance(value, str) or not value:
        return ms_to_time(fallback_ms)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadValue(f"timestamp {value[:40]!r} is not ISO 8601") from None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def str_list(value: Any, name: str) -> list[str]:
    """A list of strings; None -> []. Raises `BadValue` for anything else."""
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise BadValue(f"field {name!r} must be a list of strings")
    return list(value)


def raw_bytes(value: Any, name: str) -> bytes:
    """Bytes (a string is UTF-8 encoded); None -> b"". Raises `BadValue` otherwise."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise BadValue(f"field {name!r} must be bytes")


def input_position(value: Any) -> tuple[str, int, int]:
    """(topic, partition, offset) of an output's `source`; not a mapping -> ("", -1, -1).

    Raises `BadValue` for a partition or offset that is not an integer in range.
    """
    if not isinstance(value, Mapping):
        return ("", -1, -1)
    return (
        text(value, "topic"),
        integer(value.get("partition", -1), "source.partition", -1, 2**31 - 1),
        integer(value.get("offset", -1), "source.offset", -1, 2**63 - 1),
    )


def is_url(candidate: str) -> bool:
    """True for an http(s) URL (the only image references stored)."""
    return candidate.startswith(("http://", "https://"))


__all__ = [
    "DECISIONS",
    "VALIDATION_STATUSES",
    "BadValue",
    "Rows",
    "boolean",
    "event_time",
    "input_position",
    "integer",
    "is_url",
    "iso_time",
    "ms_to_time",
    "number",
    "raw_bytes",
    "str_list",
    "text",
]

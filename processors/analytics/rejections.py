"""What the analytics sink does when ClickHouse refuses an insert.

An insert fails in one of two ways, told apart by `rejection_code()`:

- **transient** (`None`): the connection failed or timed out, or the server cannot
  take the insert now for a reason that is not about the rows (overloaded, read-only,
  too many parts waiting for merges, a missing table, authentication). The sink keeps
  the batch, acknowledges nothing and retries; readiness says "database unreachable".
- **rejected** (a code): the server (or the client, while serializing) refused the
  rows themselves: a value it cannot store, a violated constraint, or a block that
  spans more month partitions than one insert may (code 252). The sink splits the
  block with `split_rows()` and inserts the parts, so one bad row cannot block the
  rest; a single row still rejected becomes a `sink_failures` row
  (`failure_row()`, schemas/clickhouse/migrations/0003_sink_failures.sql) and the
  sink moves on.

Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

FAILURES_TABLE = "sink_failures"
FAILURE_COLUMNS = (
    "failed_at",
    "target_table",
    "error_code",
    "error_message",
    "row_json",
    "row_size",
    "insert_token",
    "source_topic",
    "source_partition",
    "source_offset",
    "kafka_time",
)
MAX_ERROR_CHARS = 4096
MAX_ROW_JSON_CHARS = 65536
# ClickHouse's default `max_partitions_per_insert_block`.
DEFAULT_MAX_PARTITIONS_PER_INSERT = 100

#: ClickHouse error codes that refuse the rows of an insert, not the insert itself.
REJECTING_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        128,  # TOO_LARGE_ARRAY_SIZE
        131,  # TOO_LARGE_STRING_SIZE
        252,  # TOO_MANY_PARTS, only as "Too many partitions for single INSERT block"
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        395,  # FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
        469,  # VIOLATED_CONSTRAINT
        691,  # UNKNOWN_ELEMENT_OF_ENUM
    }
)
_TOO_MANY_PARTITIONS = "too many partitions for single insert block"
_CODE_RE = re.compile(r"\bCode:\s*(\d+)")
# Raised by clickhouse-connect (or Python) while serializing a value the column cannot
# hold: a problem of the row, before anything was sent.
_CLIENT_VALUE_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,
    OverflowError,
    struct.error,
    UnicodeError,
)

Row = tuple[Any, ...]


def error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code an exception carries (attribute or `Code: N` text)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and not isinstance(code, bool) and code > 0:
        return code
    match = _CODE_RE.search(str(exc))
    return int(match.group(1)) if match else None


def rejection_code(exc: BaseException) -> int | None:
    """The code when `exc` means "these rows are refused"; None when it is transient.

    Client-side value errors are rejections with code 0. Connection errors, timeouts
    and every server error outside `REJECTING_CODES` are transient (retry, do not
    split): splitting would send good rows to `sink_failures` for a server problem.
    """
    # Deferred, as in client.open_client: importing clickhouse-connect is slow.
    from clickhouse_connect.driver import exceptions as ch_errors

    if isinstance(exc, ConnectionError | TimeoutError):
        return None
    if isinstance(exc, ch_errors.OperationalError):
        return None  # clickhouse-connect's wrapper of connection failures
    code = error_code(exc)
    if code is not None:
        if code == 252 and _TOO_MANY_PARTITIONS not in str(exc).lower():
            return None  # "too many parts": merges are behind, it passes with time
        return code if code in REJECTING_CODES else None
    if isinstance(exc, ch_errors.DataError):
        return 0
    if isinstance(exc, _CLIENT_VALUE_ERRORS):
        return 0
    return None


def _month(row: Row) -> tuple[int, int] | None:
    when = row[0] if row else None
    return (when.year, when.month) if isinstance(when, datetime) else None


def split_rows(
    rows: Sequence[Row], max_partitions: int = DEFAULT_MAX_PARTITIONS_PER_INSERT
) -> list[tuple[str, tuple[Row, ...]]]:
    """The parts a rejected block is inserted as next, each with a stable label.

    Rows are grouped by the month of their first column (`event_time`, the partition
    key of every table). A block spanning more than `max_partitions` months is cut
    into runs of at most that many months; one spanning 2..`max_partitions` months
    into two halves of months; a one-month block into two halves of rows. One row
    cannot be split: `[]`. Deterministic (equal rows give equal parts and labels), so
    a retried part carries the same deduplication token.
    """
    if max_partitions < 1:
        raise ValueError("max_partitions must be positive")
    months: dict[tuple[int, int] | None, list[Row]] = {}
    for row in rows:
        months.setdefault(_month(row), []).append(row)
    if len(months) > 1 and None not in months:
        keys = sorted(k for k in months if k is not None)
        if len(keys) > max_partitions:
            runs = [keys[i : i + max_partitions] for i in range(0, len(keys), max_partitions)]
        else:
            half = len(keys) // 2
            runs = [keys[:half], keys[half:]]
        return [
            (
                f"m{run[0][0]:04d}{run[0][1]:02d}-{run[-1][0]:04d}{run[-1][1]:02d}",
                tuple(row for key in run for row in months[key]),
            )
            for run in runs
        ]
    if len(rows) <= 1:
        return []
    half = len(rows) // 2
    return [
        (f"r0-{half - 1}", tuple(rows[:half])),
        (f"r{half}-{len(rows) - 1}", tuple(rows[half:])),
    ]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "base64:" + base64.b64encode(bytes(value)).decode()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def failure_row(
    table: str,
    columns: Sequence[str],
    row: Row,
    code: int,
    message: str,
    token: str,
    failed_at: datetime | None = None,
) -> Row:
    """The `sink_failures` row (in `FAILURE_COLUMNS` order) for one refused row.

    `columns` name the values of `row`, which end with the sink's position columns
    (source_topic, source_partition, source_offset, kafka_time, ...). The row is kept
    as JSON (bytes as `base64:...`), cut at `MAX_ROW_JSON_CHARS`; the message at
    `MAX_ERROR_CHARS`. The caller removes passwords from `message`.
    """
    record = dict(zip(columns, row, strict=False))
    text = json.dumps(record, default=_json_value, ensure_ascii=False)
    kafka_time = record.get("kafka_time")
    return (
        failed_at or datetime.now(UTC),
        table,
        code,
        message[:MAX_ERROR_CHARS],
        text[:MAX_ROW_JSON_CHARS],
        min(len(text), 2**32 - 1),
        token,
        str(record.get("source_topic", "")),
        int(record.get("source_partition", 0)),
        int(record.get("source_offset", 0)),
        kafka_time if isinstance(kafka_time, datetime) else datetime.fromtimestamp(0, UTC),
    )


__all__ = [
    "DEFAULT_MAX_PARTITIONS_PER_INSERT",
    "FAILURES_TABLE",
    "FAILURE_COLUMNS",
    "REJECTING_CODES",
    "error_code",
    "failure_row",
    "rejection_code",
    "split_rows",
]

"""Named analytics reports over the tables the analytics sink fills.

Each report is one SQL file, `schemas/clickhouse/reports/<name>.sql`, whose leading
`--` comment describes it and its columns. Every report takes one parameter,
`{since:DateTime64(3, 'UTC')}`, bound by clickhouse-connect (server-side binding,
never string formatting), and counts each input once (`ORDER BY version DESC
LIMIT 1 BY <key>`; see `processors/analytics/sink.py` for the dedup design).

`run_report` and `run_query` return a `ReportResult`; `format_table` renders it as
a plain aligned text table and `to_json` as JSON. `parse_since` reads the window
of the command line ("30m", "12h", "7d").

Failures: an unknown report name or a malformed window raise `ValueError` with the
accepted values; `run_query` raises `ValueError` for anything but one read-only
statement; errors of the ClickHouse client propagate unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any
from uuid import UUID

from processors.analytics.client import AnalyticsClient
from processors.analytics.migrations import split_sql
from schemas import CLICKHOUSE_DIR

REPORTS_DIR = CLICKHOUSE_DIR / "reports"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SINCE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_SINCE = timedelta(days=3650)
_READ_ONLY_START = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.I)
_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.I)


@dataclass(frozen=True, slots=True)
class ReportResult:
    """Column names and rows of one report or query, in the order ClickHouse returned."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def as_dicts(self) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def list_reports() -> list[str]:
    """Names of every report, sorted."""
    return sorted(p.stem for p in REPORTS_DIR.glob("*.sql") if _NAME.match(p.stem))


@cache
def report_sql(name: str) -> str:
    """The SQL of a report; raises `ValueError` for an unknown name."""
    if not _NAME.match(name) or not (REPORTS_DIR / f"{name}.sql").is_file():
        raise ValueError(f"unknown report {name!r}; known: {', '.join(list_reports())}")
    return (REPORTS_DIR / f"{name}.sql").read_text(encoding="utf-8")


def report_description(name: str) -> str:
    """The leading comment of a report's SQL file, without the `--` markers."""
    lines = []
    for line in report_sql(name).splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:].strip())
    return " ".join(lines)


def _query(client: AnalyticsClient, sql: str, parameters: dict[str, Any] | None) -> ReportResult:
    raw = client.query(sql, parameters=parameters)
    columns = tuple(raw.column_names)
    rows = tuple(tuple(row) for row in raw.result_rows)
    if not columns and not rows:
        # chDB sends no Native bytes, hence no column names, for an empty result;
        # a LIMIT 0 wrapper takes clickhouse-connect's metadata probe instead.
        # Best effort, whatever fails (SHOW cannot be wrapped, say) keeps no columns.
        with contextlib.suppress(Exception):
            wrapped = f"SELECT * FROM (\n{sql}\n) LIMIT 0"  # noqa: S608 - a report or checked query
            probe = client.query(wrapped, parameters=parameters)
            columns = tuple(probe.column_names)
    return ReportResult(columns=columns, rows=rows)


def run_report(
    client: AnalyticsClient, name: str, since: timedelta, *, now: datetime | None = None
) -> ReportResult:
    """Run report `name` over the window `[now - since, ...)`.

    `now` defaults to the current UTC time (pass it for reproducible results; a
    naive value is taken as UTC). Raises `ValueError` for an unknown report or a
    negative window; client errors propagate.
    """
    if since < timedelta(0):
        raise ValueError(f"since must not be negative, got {since}")
    sql = report_sql(name)
    end = now or datetime.now(UTC)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    return _query(client, sql, {"since": end - since})


def run_query(client: AnalyticsClient, sql: str) -> ReportResult:
    """Run one ad hoc read-only statement (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS).

    Raises `ValueError` for several statements (the embedded chDB engine would run
    them all), for another statement kind, or for `INTO OUTFILE`. This is a guard
    against accidents, not a security boundary: give a server DSN a read-only user.
    """
    statements = split_sql(sql)
    if len(statements) != 1:
        raise ValueError(f"run_query takes exactly one statement, got {len(statements)}")
    statement = statements[0]
    if not _READ_ONLY_START.match(statement) or _OUTFILE.search(statement):
        raise ValueError(
            "run_query only runs read-only statements: SELECT, WITH, SHOW, DESCRIBE, "
            "EXPLAIN or EXISTS, without INTO OUTFILE"
        )
    return _query(client, statement, None)


def parse_since(text: str) -> timedelta:
    """Parse a window such as "30m", "12h", "1d", "7d" or "2w" (also "45s").

    Raises `ValueError` naming the accepted form for anything else, for zero, and
    for windows over ten years.
    """
    match = _SINCE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid window {text!r}: use a positive whole number and a unit, "
            "s (seconds), m (minutes), h (hours), d (days) or w (weeks), e.g. 30m, 12h, 7d"
        )
    amount, unit = int(match.group(1)), match.group(2).lower()
    if amount == 0:
        raise ValueError(f"invalid window {text!r}: it must be longer than zero")
    window = timedelta(**{_UNITS[unit]: amount})
    if window > MAX_SINCE:
        raise ValueError(f"invalid window {text!r}: at most {MAX_SINCE.days}d")
    return window


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        return "0" if text == "-0" else text
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def format_table(result: ReportResult) -> str:
    """A plain aligned text table: header, dashes, rows (numbers right-aligned), row count."""
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(result.rows) and all(_numeric(row[i]) for row in result.rows if row[i] is not None)
        for i in range(len(result.columns))
    ]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(result.columns)), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    out.append(f"({len(result.rows)} row{'' if len(result.rows) == 1 else 's'})")
    return "\n".join(out)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return base64.b64encode(value).decode()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_value(v) for v in value]
    return value


def to_json(result: ReportResult, *, indent: int | None = None) -> str:
    """`{"columns": [...], "rows": [{column: value}, ...]}`; dates as ISO 8601, NaN as null."""
    payload = {
        "columns": list(result.columns),
        "rows": [{k: _json_value(v) for k, v in row.items()} for row in result.as_dicts()],
    }
    return json.dumps(payload, indent=indent, ensure_ascii=False, allow_nan=False)


__all__ = [
    "REPORTS_DIR",
    "ReportResult",
    "format_table",
    "list_reports",
    "parse_since",
    "report_description",
    "report_sql",
    "run_query",
    "run_report",
    "to_json",
]

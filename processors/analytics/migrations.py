"""Versioned ClickHouse DDL, applied once each, and the SQL statement splitter.

Migrations are the files `schemas/clickhouse/migrations/NNNN_name.sql`, applied in
order once each and recorded in `schema_migrations`; a released file is never edited
(its checksum is checked). `split_sql()` cuts SQL text into the statements a server
takes one per request; the reports use it too.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from processors.analytics.client import DEDUP_SETTING, AnalyticsClient
from schemas import CLICKHOUSE_DIR

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = CLICKHOUSE_DIR / "migrations"
MIGRATIONS_TABLE = "schema_migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """A migration file is malformed, or an applied one was edited afterwards."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One DDL file `NNNN_name.sql`: its version, name, text and checksum."""

    version: int
    name: str
    sql: str
    checksum: str

    def statements(self) -> list[str]:
        """The file's statements, in order (`split_sql`)."""
        return split_sql(self.sql)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every `NNNN_name.sql` under `directory`, oldest first.

    Raises `MigrationError` for a `.sql` file not named that way or a version used twice.
    """
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"migration version {version} is used twice")
        text = path.read_text(encoding="utf-8")
        checksum = hashlib.sha256(text.encode()).hexdigest()
        found[version] = Migration(version, match.group(2), text, checksum)
    return [found[v] for v in sorted(found)]


def split_sql(text: str) -> list[str]:
    """Split SQL text into statements at `;`, ignoring `;` in quotes and `--` comments.

    Statements are sent one by one: a ClickHouse server takes one per request.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    quote: str | None = None
    while i < n:
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < n:
                current.append(text[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch in ("'", '"', "`"):
            quote = ch
            current.append(ch)
        elif ch == ";":
            statements.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


_MIGRATIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
"""


def applied_migrations(client: AnalyticsClient) -> dict[int, str]:
    """Version -> checksum of every migration recorded in `schema_migrations`."""
    client.command(_MIGRATIONS_DDL)
    result = client.query(
        "SELECT version, argMax(checksum, applied_at) FROM schema_migrations GROUP BY version"
    )
    return {int(v): str(c) for v, c in result.result_rows}


def apply_migrations(client: AnalyticsClient, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply the migrations not yet recorded, in order; return the versions applied now.

    Idempotent: a second call returns `[]` and changes nothing. Every statement is
    `IF NOT EXISTS`, so a run interrupted between a statement and its record is
    simply completed by the next run. Raises `MigrationError` when an applied
    migration's file changed since (released migrations are never edited), and
    lets client errors propagate.
    """
    done = applied_migrations(client)
    applied: list[int] = []
    for migration in load_migrations(directory):
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name}.sql changed after it "
                    "was applied; add a new migration instead"
                )
            continue
        for statement in migration.statements():
            client.command(statement)
        client.insert(
            MIGRATIONS_TABLE,
            [[migration.version, migration.name, migration.checksum, datetime.now(UTC)]],
            column_names=["version", "name", "checksum", "applied_at"],
            settings={DEDUP_SETTING: f"{MIGRATIONS_TABLE}:{migration.version}"},
        )
        logger.info("applied ClickHouse migration %04d_%s", migration.version, migration.name)
        applied.append(migration.version)
    return applied


__all__ = [
    "MIGRATIONS_DIR",
    "MIGRATIONS_TABLE",
    "Migration",
    "MigrationError",
    "applied_migrations",
    "apply_migrations",
    "load_migrations",
    "split_sql",
]

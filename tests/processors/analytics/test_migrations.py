"""Migrations (applied once each, edits refused) and SQL splitting, against chDB.

Uses the suite's one chDB engine directory (see tests/conftest.py); the migration
test drops and re-creates every table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from processors.analytics.migrations import (
    MIGRATIONS_DIR,
    MigrationError,
    apply_migrations,
    load_migrations,
    split_sql,
)
from processors.analytics.rows import COLUMNS
from tests.processors.analytics.test_sink import count


def test_migrations_applied_twice_are_a_no_op(module_client: Any, tmp_path: Path) -> None:
    ch = module_client
    for table in [*COLUMNS, "sink_failures", "schema_migrations"]:
        ch.command(f"DROP TABLE IF EXISTS {table} SYNC")
    assert apply_migrations(ch) == [1, 2, 3]
    tables = ch.query("SHOW TABLES").result_rows
    assert apply_migrations(ch) == []
    assert ch.query("SHOW TABLES").result_rows == tables
    assert {row[0] for row in tables} == {*COLUMNS, "sink_failures", "schema_migrations"}
    assert count(ch, "SELECT count() FROM schema_migrations") == 3
    # A released migration that was edited afterwards is refused.
    (tmp_path / "0001_init.sql").write_text(
        (MIGRATIONS_DIR / "0001_init.sql").read_text() + "\n-- edited\n"
    )
    with pytest.raises(MigrationError, match="changed after it was applied"):
        apply_migrations(ch, tmp_path)
    (tmp_path / "init.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="NNNN_name"):
        load_migrations(tmp_path)


def test_split_sql_ignores_semicolons_in_quotes_and_comments() -> None:
    text = (
        "-- a; comment\nCREATE TABLE a (x String DEFAULT ';') ENGINE = Memory;\n\n"
        "SELECT 'it''s;', \"b;\" ;"
    )
    assert split_sql(text) == [
        "CREATE TABLE a (x String DEFAULT ';') ENGINE = Memory",
        "SELECT 'it''s;', \"b;\"",
    ]
    assert [m.version for m in load_migrations()] == [1, 2, 3]

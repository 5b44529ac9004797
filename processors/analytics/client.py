"""ClickHouse connection and migrations, shared by the sink, the reports and the CLI.

Connection: one DSN. `chdb:///path/to/dir` reaches clickhouse-connect's built-in
in-process chDB backend (`clickhouse_connect.get_client(dsn="chdb:///path")`, no
server needed); `http(s)://user:password@host:port/database` reaches a server. Both
return the same `clickhouse_connect` client class, so every other line of code is
shared. `redact_dsn()` hides the password wherever a DSN is logged or raised.

Migrations: versioned DDL files `schemas/clickhouse/migrations/NNNN_name.sql`, applied
in order once each and recorded in `schema_migrations`; a released file is never
edited (its checksum is checked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from schemas import CLICKHOUSE_DIR

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = CLICKHOUSE_DIR / "migrations"
MIGRATIONS_TABLE = "schema_migrations"
DEDUP_SETTING = "insert_deduplication_token"

_SECRET_QUERY_KEYS = frozenset({"password", "pwd", "access_token", "token", "secret"})


# --------------------------------------------------------------------------- client


class AnalyticsClient(Protocol):
    """The part of `clickhouse_connect.driver.Client` the sink and the reports use.

    It is the seam for fakes: a test passes a factory returning a wrapper whose
    `insert` raises, instead of patching internals.
    """

    def command(
        self, cmd: str, parameters: Any = None, data: Any = None, settings: Any = None
    ) -> Any: ...

    def query(
        self, query: str | None = None, parameters: Any = None, settings: Any = None
    ) -> Any: ...

    def insert(
        self,
        table: str | None = None,
        data: Any = None,
        column_names: Any = "*",
        database: Any = None,
        column_types: Any = None,
        column_type_names: Any = None,
        column_oriented: bool = False,
        settings: Any = None,
    ) -> Any: ...

    def close(self) -> None: ...


class SinkUnavailable(Exception):
    """ClickHouse could not be opened or written; the caller must not acknowledge Kafka.

    Raised by `open_client`, `AnalyticsSink.setup` and `AnalyticsSink.flush`. After a
    failed flush the sink still holds every row; calling `flush()` again retries.
    The message never contains a password.
    """


class MigrationError(Exception):
    """A migration file is malformed, or an applied one was edited afterwards."""


def redact_dsn(dsn: str) -> str:
    """The DSN with its password (and secret query values) replaced by `***`.

    Never raises: a DSN that does not parse is returned as `<unparseable dsn>`.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable dsn>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if sep else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*"
        )
    if netloc == parts.netloc and query == parts.query:
        return dsn
    # Built by hand: urlunsplit would drop the empty authority of chdb:///path.
    text = f"{parts.scheme}://{netloc}{parts.path}"
    text += f"?{query}" if query else ""
    return text + (f"#{parts.fragment}" if parts.fragment else "")


def _dsn_secrets(dsn: str) -> list[str]:
    try:
        parts = urlsplit(dsn)
        secrets = [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_QUERY_KEYS]
        password = parts.password
    except ValueError:
        return []
    if password:
        secrets.append(password)
    return [s for s in secrets if s]


def scrub_secrets(text: str, dsn: str) -> str:
    """`text` with the password and secret query values of `dsn` replaced by `***`."""
    for secret in _dsn_secrets(dsn):
        text = text.replace(secret, "***")
    return text


def open_client(
    dsn: str, *, connect_timeout: float = 10.0, send_receive_timeout: float = 60.0
) -> Client:
    """Open a `clickhouse_connect` client for `dsn`; the one code path for both backends.

    - `chdb:///abs/dir` (or `chdb://memory`): the in-process chDB engine, through
      `clickhouse_connect.get_client(dsn=dsn)`. chDB hosts one engine path per
      process: a second path can only be opened after every client of the first
      one is closed (clients on the same path share the engine).
    - `http(s)://user:password@host:port/database`: a ClickHouse server.

    Raises `ValueError` for another scheme and `SinkUnavailable` when the client
    cannot connect; neither message contains the password.
    """
    import clickhouse_connect  # deferred: importing it is slow and loads native code

    try:
        scheme = urlsplit(dsn).scheme.lower()
    except ValueError:
        raise ValueError(f"unparseable DSN {redact_dsn(dsn)}") from None
    try:
        if scheme == "chdb":
            return clickhouse_connect.get_client(dsn=dsn)
        if scheme in ("http", "https"):
            # The DSN parser does not infer TLS from the scheme, so pass it on.
            return clickhouse_connect.get_client(
                dsn=dsn,
                interface=scheme,
                connect_timeout=connect_timeout,
                send_receive_timeout=send_receive_timeout,
            )
    except Exception as exc:
        message = scrub_secrets(f"{type(exc).__name__}: {exc}", dsn)
        raise SinkUnavailable(f"cannot open ClickHouse at {redact_dsn(dsn)}: {message}") from None
    raise ValueError(
        f"unsupported DSN {redact_dsn(dsn)}: use chdb:///path/to/dir or "
        "http(s)://user:password@host:port/database"
    )


# ----------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class Migration:
    """One DDL file `NNNN_name.sql`: its version, name, text and checksum."""

    version: int
    name: str
    sql: str
    checksum: str

    def statements(self) -> list[str]:
        return split_sql(self.sql)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every `NNNN_name.sql` under `directory`, oldest first.

    Raises `MigrationError` for a `.sql` file not named that way or a version used twice.
    """
    import hashlib
    import re

    pattern = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = pattern.match(path.name)
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
    "DEDUP_SETTING",
    "MIGRATIONS_DIR",
    "MIGRATIONS_TABLE",
    "AnalyticsClient",
    "Migration",
    "MigrationError",
    "SinkUnavailable",
    "applied_migrations",
    "apply_migrations",
    "load_migrations",
    "open_client",
    "redact_dsn",
    "scrub_secrets",
    "split_sql",
]

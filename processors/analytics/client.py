"""The ClickHouse client: one DSN for the embedded engine or a server, and redaction.

One DSN: `chdb:///path/to/dir` reaches clickhouse-connect's built-in in-process chDB
backend (`clickhouse_connect.get_client(dsn="chdb:///path")`, no server needed);
`http(s)://user:password@host:port/database` reaches a server. Both return the same
`clickhouse_connect` client class, so every other line of code is shared.
`redact_dsn()` hides the password wherever a DSN is logged or raised, and
`scrub_secrets()` removes it from an error message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

DEDUP_SETTING = "insert_deduplication_token"

_SECRET_QUERY_KEYS = frozenset({"password", "pwd", "access_token", "token", "secret"})


class AnalyticsClient(Protocol):
    """The part of `clickhouse_connect.driver.Client` the sink and the reports use.

    It is the seam for fakes: a test passes a factory returning a wrapper whose
    `insert` raises, instead of patching internals.
    """

    def command(
        self, cmd: str, parameters: Any = None, data: Any = None, settings: Any = None
    ) -> Any:
        """Run one statement that returns no rows (DDL); raises on a server error."""

    def query(self, query: str | None = None, parameters: Any = None, settings: Any = None) -> Any:
        """Run one query; the result has `column_names` and `result_rows`. Raises on error."""

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
    ) -> Any:
        """Insert `data` (rows) into `table`; raises when the server or the client refuses."""

    def close(self) -> None:
        """Release the connection (or the embedded engine's session)."""


class SinkUnavailable(Exception):
    """ClickHouse could not be opened or written; the caller must not acknowledge Kafka.

    Raised by `open_client`, `AnalyticsSink.setup` and `AnalyticsSink.flush`. After a
    failed flush the sink still holds every row; calling `flush()` again retries.
    The message never contains a password.
    """


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
    # Blind on purpose: whatever the driver raises must become SinkUnavailable, and the
    # chain is dropped (`from None`) so that no traceback carries the password.
    except Exception as exc:  # noqa: BLE001
        message = scrub_secrets(f"{type(exc).__name__}: {exc}", dsn)
        raise SinkUnavailable(f"cannot open ClickHouse at {redact_dsn(dsn)}: {message}") from None
    raise ValueError(
        f"unsupported DSN {redact_dsn(dsn)}: use chdb:///path/to/dir or "
        "http(s)://user:password@host:port/database"
    )


__all__ = [
    "DEDUP_SETTING",
    "AnalyticsClient",
    "SinkUnavailable",
    "open_client",
    "redact_dsn",
    "scrub_secrets",
]

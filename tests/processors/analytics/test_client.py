"""The ClickHouse client: DSN redaction and `open_client` failures, against chDB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from processors.analytics.client import SinkUnavailable, open_client, redact_dsn
from processors.analytics.sink import AnalyticsSink


def test_redact_dsn_hides_passwords() -> None:
    dsn = "https://analyst:s3cr%40t!@ch.example:8443/visionstream?password=p2&compress=1"
    redacted = redact_dsn(dsn)
    assert "s3cr" not in redacted and "p2" not in redacted
    assert redacted == "https://analyst:***@ch.example:8443/visionstream?password=***&compress=1"
    assert redact_dsn("http://default@localhost:8123/db") == "http://default@localhost:8123/db"
    assert redact_dsn("chdb:///var/lib/vs") == "chdb:///var/lib/vs"
    assert redact_dsn("http://[::1") == "<unparseable dsn>"
    sink = AnalyticsSink("http://u:hunter2@ch:8123/db")
    assert "hunter2" not in repr(sink) and "hunter2" not in sink.dsn


def test_open_client_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError, match="unsupported DSN") as bad_scheme:
        open_client("mysql://u:hunter2@db:3306/x")
    assert "hunter2" not in str(bad_scheme.value)
    # Nothing listens on port 1: the connection is refused at once.
    dsn = "http://u:hunter2@127.0.0.1:1/db"
    with pytest.raises(SinkUnavailable) as refused:
        open_client(dsn, connect_timeout=2, send_receive_timeout=2)
    assert "hunter2" not in str(refused.value)
    assert "u:***@127.0.0.1:1" in str(refused.value)


def test_chdb_refuses_a_second_engine_path_while_one_is_open(
    module_client: Any, tmp_path: Path
) -> None:
    with pytest.raises(SinkUnavailable, match=r"already initialized|cannot connect"):
        open_client(f"chdb://{tmp_path / 'other-engine'}")

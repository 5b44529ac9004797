"""Test-only launcher: the sink role whose ClickHouse inserts fail while a flag file exists.

Should only be used for testing: `python -m tests.support.outage_sink_worker worker`
with `VS_TEST_OUTAGE_FLAG=/path/to/flag`. It builds the real app and the real sink,
injecting a client wrapper through the sink's `client_factory` seam.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from processors.sink import AnalyticsSink, SinkTopics, open_client
from streams.app import create_app
from streams.settings import Settings


class OutageClient:
    """Delegates to a real client; `insert` raises while the flag file exists."""

    def __init__(self, inner: Any, flag: Path) -> None:
        self._inner = inner
        self._flag = flag

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self._flag.exists():
            raise ConnectionError("simulated ClickHouse outage")
        return self._inner.insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def main() -> None:
    settings = Settings.from_env(os.environ)
    flag = Path(os.environ["VS_TEST_OUTAGE_FLAG"])
    topics = settings.topics
    sink = AnalyticsSink(
        settings.effective_clickhouse_dsn,
        topics=SinkTopics(
            pickup_completed=topics.pickup_completed,
            product_listed=topics.product_listed,
            verification_decision=topics.verification_decision,
            category_tag=topics.category_tag,
            verification_attempts=topics.verification_attempts,
            dead_letter=topics.dead_letter,
        ),
        max_rows=settings.sink_max_rows,
        max_interval_s=settings.sink_max_interval_s,
        client_factory=lambda dsn: OutageClient(open_client(dsn), flag),
    )
    create_app(settings, sink=sink).main()


if __name__ == "__main__":
    main()
